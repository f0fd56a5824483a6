"""Hot-path changes the profile points at, timed against the code as it is (ns per packet).

Usage: python -m bench.candidates [--cpu N] [--json]

Each candidate is a drop-in variant written here, never in edge_relay/, and
checked to give the same answer as the current code before it is timed. The
report uses these numbers as the expected gain of each proposal; the owners
of edge_relay/ decide.
"""

import argparse
import ctypes
import hmac
import json
import os
import socket
import struct
import sys
import timeit

from edge_relay import batchio, header, keys, ratelimit, sockaddr

N = 200_000


def best(fn, number=N):
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def seal_c(mac_state, head26, ts6, payload):
    """header.seal with the C HMAC object (no hmac.HMAC wrapper) and one update for head + timestamp."""
    mac = mac_state.copy()
    mac.update(head26 + ts6)
    mac.update(payload)
    return head26 + ts6 + mac.digest()[:header.TAG_LEN]


_ALL = struct.Struct(">2sBBBBBBH16sHI16s")


def decode_to_client(view, keyring, now_ms, window):
    """The relay's decode for TO_CLIENT only: C HMAC object, a plain tuple instead of a NamedTuple."""
    if len(view) < header.HEADER_LEN:
        return None
    magic, version, msg_type, key_id, flags, route, family, port, address, hi, lo, tag = _ALL.unpack_from(view)
    if magic != header.MAGIC or version != header.HEADER_VERSION or msg_type != header.TO_CLIENT:
        return None
    key = keyring.by_id[key_id]
    if key is None or (family != 4 and family != 6):
        return None
    mac = key.header_mac._hmac.copy()
    mac.update(view[:header.MAC_INPUT_LEN])
    payload = view[header.HEADER_LEN:]
    mac.update(payload)
    if not hmac.compare_digest(mac.digest()[:header.TAG_LEN], tag):
        return None
    ts = (hi << 32) | lo
    if ts > now_ms + window or ts < now_ms - window:
        return None
    return route, family, port, address, payload


def run():
    out = {}
    ring = keys.KeyRing({1: os.urandom(32)})
    key = ring.signing
    c_mac = getattr(key.header_mac, "_hmac", None)
    payload = memoryview(bytearray(160))
    head = header.prefix(1, header.TO_TRANSCEIVER, 0, 0, 4, 5000, bytes(16))
    ts = header.timestamp_bytes(1_700_000_000_000)
    if c_mac is not None:
        assert seal_c(c_mac, head, ts, payload) == header.seal(key.header_mac, head, ts, payload)
        out["seal"] = {"where": "edge_relay/header.py seal (and keys.Key: keep the C HMAC object)",
                       "now": best(lambda: header.seal(key.header_mac, head, ts, payload)),
                       "candidate": best(lambda: seal_c(c_mac, head, ts, payload))}
        now_ms = 1_700_000_000_000
        dg = memoryview(bytearray(header.encode(key, header.TO_CLIENT, bytes(160), route=0, family=4, port=5000,
                                                address=bytes(16), timestamp_ms=now_ms) + bytes(160)))
        cur = header.decode(dg, ring, now_ms, 2000)
        cand = decode_to_client(dg, ring, now_ms, 2000)
        assert (cur.route, cur.family, cur.port, cur.address, bytes(cur.payload)) == cand[:4] + (bytes(cand[4]),)
        out["decode"] = {"where": "edge_relay/header.py decode, as used by Router.from_transceivers",
                         "now": best(lambda: header.decode(dg, ring, now_ms, 2000)),
                         "candidate": best(lambda: decode_to_client(dg, ring, now_ms, 2000))}

    meter = ratelimit.FlowMeter(1e9, 2 * 10**9)       # threshold never reached while timing: the fast path
    fkey = sockaddr.from_tuple(("10.0.0.1", 5000))
    meter.allow(fkey, 1.0)

    batch = [sockaddr.from_tuple((f"10.0.0.{i + 1}", 5000)) for i in range(32)]
    allow = meter.allow

    def loop_now():
        for k in batch:
            if not allow(k, 1.0):
                pass

    def loop_inline():
        # window checked once per batch (now is per batch); the two-array fast path inline
        mask, thr, row0, row1 = meter.mask, meter.threshold, meter.row0, meter.row1
        for k in batch:
            h = hash(k)
            i = h & mask
            j = (h >> 24) & mask
            x = row0[i]
            y = row1[j]
            if (x if x < y else y) < thr:
                row0[i] = x + 1
                row1[j] = y + 1
            elif not allow(k, 1.0):
                pass

    def loop_bare():
        for k in batch:
            pass
    bare = best(loop_bare, N // 32) / 32
    out["flow_meter"] = {"where": "edge_relay/ratelimit.py FlowMeter.allow, called per packet from Router.from_clients",
                         "now": best(loop_now, N // 32) / 32 - bare, "candidate": best(loop_inline, N // 32) / 32 - bare}
    meter.row0[:] = meter._zero
    meter.row1[:] = meter._zero

    buf = bytearray(2048 * 32)
    view = memoryview(buf)[100:260]
    keep = []
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def address_now():
        keep.clear()
        return batchio._address(view, keep)
    out["send_address"] = {"where": "edge_relay/batchio.py MmsgIO._stage -> _address for payload views",
                           "now": best(address_now), "candidate": best(lambda: (base + 100, 160))}

    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.bind(("127.0.0.1", 0))
    io = batchio.open_io(a, 32, mode="mmsg")
    if io.name == "mmsg":
        for _ in range(32):
            b.sendto(bytes(160), a.getsockname())
        n = 0
        for _ in range(100):
            n = io.recv()
            if n == 32:
                break
        if n == 32:
            u32 = io._rhdr_u32
            names = struct.Struct("16s112x" * 31 + "16s")
            lens = struct.Struct("56xI4x" * 32)
            rb = io._rbuf_view

            def collect_now():
                for i in range(32):
                    u32[i * batchio._HDR_U32 + batchio._NAMELEN] = 16
                return io._collect(32)

            def collect_struct():
                addrs = names.unpack_from(io._rnames)
                views = [rb[i * 2048:i * 2048 + ln] for i, ln in enumerate(lens.unpack_from(io._rhdr_mem))]
                return addrs, views
            assert list(collect_struct()[0]) == io.addrs[:32]
            out["recv_collect"] = {"where": "edge_relay/batchio.py MmsgIO._collect (per-packet slicing)",
                                   "now": best(collect_now, N // 32) / 32,
                                   "candidate": best(collect_struct, N // 32) / 32}
    a.close()
    b.close()
    for v in out.values():
        v["saving_ns"] = v["now"] - v["candidate"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    out = run()
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        for name, v in out.items():
            print(f"{name:14s} now {v['now']:6.0f} ns  candidate {v['candidate']:6.0f} ns  "
                  f"saves {v['saving_ns']:5.0f} ns/pkt   {v['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
