"""The crash journal's costs: per write, restore time by flow count, memory.

Usage: python -m bench.journal [--quick] [--out FILE]   (prints figures, writes JSON)

Theory of operation
  A FlowTable with a journal over a real memfd mapping (worker.JournalMemory,
  as a worker has it) is compared with the same table without one, so each
  figure is what the journal adds:
  confirm    open + confirm of a fresh flow (pending -> confirmed writes one record)
  move       a change of owner of a confirmed flow (one record rewritten)
  remove     a confirmed flow leaving the table (its record freed)
  put        Journal.put alone on a journaled flow: the record write itself
  restore    Journal.attach of a successor over N journaled flows, and a
             snapshot restore (FlowTable.restore) of the same flows for scale
  memory     the region's size for max_flows and the shared memory actually
             allocated (memfd st_blocks) after N flows
  Rounds alternate with and without, and the median is reported. The cyclic
  GC is off while timing (as worker.start_flows holds it off for a restore),
  so its pauses do not land on one side.
"""

import argparse
import gc
import json
import os
import socket
import statistics
import struct
import sys
import time

from edge_relay.flows import FlowTable
from edge_relay.journal import RECORD_SIZE, Journal, region_size
from edge_relay.worker import JournalMemory

_KEY = struct.Struct("=H2s4s8x")


def keys(n, salt=0):
    return [_KEY.pack(socket.AF_INET, (1024 + i % 50000).to_bytes(2, "big"),
                      (0x0A000000 + salt * n + i).to_bytes(4, "big")) for i in range(n)]


def table(n, memory=None):
    t = FlowTable(max_flows=n, max_pending_per_source=n)
    if memory is not None:
        Journal(memory.map).attach(t, 0.0, fresh=True)
    return t


def per_op(n, memory, rounds):
    """{op: (ns with, ns without)} medians over `rounds` of n operations each."""
    out = {"confirm": ([], []), "move": ([], []), "remove": ([], [])}
    for r in range(rounds):
        for with_journal in (True, False):
            t = table(n, memory if with_journal else None)
            ks = keys(n, r)
            clock = time.perf_counter_ns
            begin = clock()
            flows = [t.confirm(f, 1.0) and f for f in (t.open(0, k, 7, 1.0) for k in ks)]
            mid = clock()
            for f in flows:
                t.move(f, 8, 2.0)
            mid2 = clock()
            for f in flows:
                t.remove(f)
            end = clock()
            i = 0 if with_journal else 1
            out["confirm"][i].append((mid - begin) / n)
            out["move"][i].append((mid2 - mid) / n)
            out["remove"][i].append((end - mid2) / n)
            if with_journal:
                t = table(n, memory)
                flows = [t.confirm(f, 1.0) and f for f in (t.open(0, k, 7, 1.0) for k in ks)]
                put = t.journal.put
                begin = clock()
                for f in flows:
                    put(f)
                out.setdefault("put", ([], [0]))[0].append((clock() - begin) / n)
            del t, flows
    return {op: (statistics.median(w), statistics.median(wo)) for op, (w, wo) in out.items()}


def restore_times(sizes, rounds):
    out = {}
    for n in sizes:
        memory = JournalMemory(n)
        try:
            t = table(n, memory)
            for f in [t.open(0, k, 7, 1.0) for k in keys(n)]:
                t.confirm(f, 1.0)
            snap = t.snapshot(2.0)
            js, ss = [], []
            for _ in range(rounds):
                u = FlowTable(max_flows=n)
                begin = time.perf_counter()
                got = Journal(memory.map).attach(u, 10.0)
                js.append(time.perf_counter() - begin)
                assert got.restored == n, got
                del u
                u = FlowTable(max_flows=n)
                begin = time.perf_counter()
                u.restore(snap, 10.0)
                ss.append(time.perf_counter() - begin)
            allocated = os.fstat(memory.fd).st_blocks * 512
            del t, u            # their journals' views of the mapping, so that it can close
            out[n] = {"journal_ms": round(statistics.median(js) * 1000, 2),
                      "snapshot_ms": round(statistics.median(ss) * 1000, 2),
                      "region_bytes": memory.size, "allocated_bytes": allocated}
        finally:
            memory.close()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer flows and rounds (a smoke run)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    n, rounds = (2000, 3) if args.quick else (50_000, 5)
    sizes = (1000, 10_000) if args.quick else (1000, 10_000, 100_000)
    gc.disable()
    memory = JournalMemory(n)
    try:
        ops = per_op(n, memory, rounds)
    finally:
        memory.close()
    restore = restore_times(sizes, 3 if not args.quick else 1)
    gc.enable()
    doc = {"record_bytes": RECORD_SIZE, "region_bytes_for_200000_flows": region_size(200_000),
           "ns_per_op": {op: {"with_journal": round(w), "without": round(wo), "journal_adds": round(w - wo)}
                         for op, (w, wo) in ops.items()},
           "restore": {str(k): v for k, v in restore.items()}}
    for op, (w, wo) in ops.items():
        print(f"{op:8s} {w:8.0f} ns with the journal, {wo:8.0f} without: +{w - wo:.0f} ns", file=sys.stderr)
    for k, v in restore.items():
        print(f"restore {k:7d} flows: journal {v['journal_ms']:8.2f} ms, snapshot {v['snapshot_ms']:8.2f} ms;"
              f" region {v['region_bytes']} B, allocated {v['allocated_bytes']} B", file=sys.stderr)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
