"""Tests for edge_relay/journal.py: the crash journal of confirmed flows.

The unit tests are pure (a bytearray stands for the shared memory, `now` is
passed in). The last test runs the relay as real processes, SIGKILLs one
worker and shows that its successor forwards for that worker's callers
without a new Binding Request, while the other worker's calls go on.
"""

import binascii
import os
import random
import signal
import struct
import time

import pytest

from edge_relay import sockaddr
from edge_relay.drops import Drop
from edge_relay.flows import CONFIRMED, FAILED_OVER, FlowTable
from edge_relay.journal import (HEADER_SIZE, RECORD_SIZE, Journal, Restored, header, high_mark, record_stores,
                                region_size)


def sa4(i, port=40000):
    return sockaddr.from_tuple((f"198.51.{i // 250}.{i % 250 + 1}", port))


def sa6(i, port=40000):
    return sockaddr.from_tuple((f"2001:db8::{i + 1:x}", port))


def journaled(capacity=64, n_listeners=2, **kw):
    """(table, journal, buffer): an empty table writing a journal over a fresh zeroed buffer."""
    buf = bytearray(region_size(capacity))
    t = FlowTable(n_listeners=n_listeners, max_flows=capacity, **kw)
    j = Journal(buf)
    assert j.attach(t, 0.0) == Restored(0, 0, 0, 0, False)
    return t, j, buf


def successor(buf, now=500.0, n_listeners=2, max_flows=None, fresh=False):
    """(table, journal, Restored): what the next worker of the slot starts with."""
    cap = (len(buf) - HEADER_SIZE) // RECORD_SIZE
    t = FlowTable(n_listeners=n_listeners, max_flows=max_flows or max(cap, 1))
    j = Journal(buf)
    return t, j, j.attach(t, now, fresh=fresh)


def state(table):
    """{(listener, key): (transceiver, flags)} of the confirmed flows."""
    return {(f.listener, f.key): (f.transceiver, f.flags) for f in table if f.state == CONFIRMED}


def confirmed(t, listener, key, tid, now=1.0):
    f = t.open(listener, key, tid, now)
    assert t.confirm(f, now)
    return f


def test_restore_gives_back_exactly_the_confirmed_flows_with_a_fresh_deadline():
    t, j, buf = journaled()
    a = confirmed(t, 0, sa4(1), 7)
    b = confirmed(t, 1, sa6(2), 8)
    c = confirmed(t, 0, sa4(3), 9)
    t.open(0, sa4(4), 7, 2.0)                       # pending: not journaled
    b.flags |= FAILED_OVER
    t.move(b, 10, 3.0)                              # a new owner, and the flag with it
    t.remove(c)
    u, _, got = successor(bytearray(buf), now=500.0)
    assert got == Restored(2, 0, 0, 0, False)
    assert state(u) == {(0, a.key): (7, 0), (1, b.key): (10, FAILED_OVER)}
    assert u.pending == 0 and u.confirmed == 2
    for f in u:
        assert f.last_seen == 500.0 and f.jslot is not None         # a fresh idle deadline
    assert u.expire(500.0 + u.idle_timeout - 1.0) == 0
    assert u.expire(500.0 + u.idle_timeout + u.granularity) == 2


def test_nothing_is_written_per_packet_or_for_pending_flows():
    t, j, buf = journaled()
    f = confirmed(t, 0, sa4(1), 7)
    p = t.open(1, sa4(2), 7, 1.0)
    before, seq = bytes(buf), j.seq
    for i in range(100):
        f.last_seen = 2.0 + i                       # the hot path's refresh
        t.confirm(f, 2.0 + i)                       # idempotent confirm refreshes too
    t.expire(40.0)                                  # re-buckets f, expires p
    assert p.state != CONFIRMED and f.state == CONFIRMED
    assert bytes(buf) == before and j.seq == seq


def test_the_successor_carries_on_writing_in_place():
    t, j, buf = journaled(capacity=4)
    flows = [confirmed(t, 0, sa4(i), 1) for i in range(4)]
    freed = flows[1].jslot
    t.remove(flows[1])
    u, k, got = successor(buf)
    assert got.restored == 3 and k.seq >= 4
    # the freed record is reused: a fourth flow fits in a journal of four
    n = confirmed(u, 1, sa4(9), 2, now=600.0)
    assert k.full == 0 and n.jslot == freed
    u.move(u.get(0, flows[0].key), 5, 601.0)
    u.remove(u.get(0, flows[2].key))
    v, _, again = successor(buf, now=900.0)
    assert again.restored == 3 and state(v) == state(u)


def test_a_full_journal_counts_and_the_flow_is_served_anyway():
    t, j, buf = journaled(capacity=2)
    t.set_limits(max_flows=3, max_pending_per_source=16, pending_ttl=5.0, idle_timeout=30.0)
    fs = [confirmed(t, 0, sa4(i), 1) for i in range(3)]
    assert j.full == 1 and fs[2].jslot is None and t.confirmed == 3
    t.remove(fs[0])
    t.move(fs[2], 2, 2.0)                           # its next write finds the freed record
    assert fs[2].jslot is not None
    assert set(state(successor(buf)[0])) == {(0, fs[1].key), (0, fs[2].key)}


def test_duplicate_records_keep_the_newest_and_refused_ones_are_freed():
    t, j, buf = journaled(capacity=8, n_listeners=3)
    a = confirmed(t, 0, sa4(1), 1)
    t.move(a, 2, 2.0)
    old = bytes(buf[HEADER_SIZE:HEADER_SIZE + RECORD_SIZE])
    t.move(a, 3, 3.0)
    confirmed(t, 2, sa4(2), 1)                      # listener 2: the successor has only 2
    c = confirmed(t, 0, sa4(3), 1)
    off = HEADER_SIZE + c.jslot * RECORD_SIZE
    t.remove(c)
    # an older copy of a's record in the freed one: the newer seq wins
    buf[off:off + RECORD_SIZE] = old
    u, k, got = successor(bytearray(buf), n_listeners=2)
    assert got == Restored(1, 0, 1, 1, False)
    assert state(u) == {(0, a.key): (3, 0)}
    w, _, again = successor(bytes_of(k), n_listeners=2)
    assert again == Restored(1, 0, 0, 0, False)     # what was dropped was freed, not left behind


def bytes_of(journal):
    return bytearray(journal._buf)


def test_fresh_attach_rewrites_the_journal_from_the_table():
    t, j, buf = journaled()
    confirmed(t, 0, sa4(1), 1)
    u = FlowTable(n_listeners=2, max_flows=64)
    b = confirmed(u, 1, sa4(2), 5)
    got = Journal(buf).attach(u, 10.0, fresh=True)
    assert got.restored == 0 and b.jslot is not None
    assert state(successor(buf)[0]) == {(1, b.key): (5, 0)}


def test_another_layout_is_refused_and_the_region_formatted_afresh():
    t, j, buf = journaled()
    confirmed(t, 0, sa4(1), 1)
    for patch in (b"XXXX", b"ERFJ\x01", b"ERFJ\x03", b"ERFJ\x02\x01"):     # version 1: one unchecked mark
        other = bytearray(buf)
        other[:len(patch)] = patch
        u, k, got = successor(other)
        assert got == Restored(0, 0, 0, 0, True) and len(u) == 0
        assert not any(other[HEADER_SIZE:])        # nothing of the unknown layout is kept
        confirmed(u, 0, sa4(2), 3, now=600.0)
        assert state(successor(other)[0]) == {(0, sa4(2)): (3, 0)}


def test_records_above_the_high_mark_are_never_read():
    t, j, buf = journaled(capacity=16)
    a = confirmed(t, 0, sa4(1), 1)
    stray = bytearray(buf[HEADER_SIZE:HEADER_SIZE + RECORD_SIZE])
    stray[20:36] = sa4(2)                       # a valid-looking record, but in a never-used slot
    stray[60:64] = struct.pack("<I", binascii.crc32(bytes(stray[:60])))
    buf[HEADER_SIZE + 9 * RECORD_SIZE:HEADER_SIZE + 10 * RECORD_SIZE] = stray
    u, k, got = successor(buf)
    assert got == Restored(1, 0, 0, 0, False) and state(u) == {(0, a.key): (1, 0)}
    assert k._next == 1                         # and new records go just above the used ones
    assert confirmed(u, 0, sa4(3), 1, now=600.0).jslot == 1


def test_a_region_too_small_for_a_header_never_raises():
    for size in (0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + RECORD_SIZE - 1):
        t = FlowTable()
        j = Journal(bytearray(size))
        got = j.attach(t, 0.0)
        assert got.restored == 0
        confirmed(t, 0, sa4(1), 1)
        assert j.full == 1


def _history(rng, capacity=48, steps=400):
    """A journal after random transitions, and every (listener, key, tid, flags) ever written."""
    t, j, buf = journaled(capacity=capacity)
    written = set()
    now = 1.0
    for _ in range(steps):
        now += rng.random()
        op = rng.random()
        live = [f for f in t if f.state == CONFIRMED]
        if op < 0.45 or not live:
            key = (sa4 if rng.random() < 0.6 else sa6)(rng.randrange(80), rng.randrange(1, 4))
            f = t.open(rng.randrange(2), key, rng.randrange(1, 6), now)
            if not isinstance(f, Drop) and f.state != CONFIRMED:
                t.confirm(f, now)
        elif op < 0.65:
            f = rng.choice(live)
            if rng.random() < 0.5:
                f.flags |= FAILED_OVER
            t.move(f, rng.randrange(1, 6), now)
        elif op < 0.8:
            t.remove(rng.choice(live))
        else:
            t.expire(now + rng.random() * 40)
        written |= {(f.listener, f.key, f.transceiver, f.flags) for f in t if f.state == CONFIRMED}
    return t, j, buf, written


@pytest.mark.parametrize("seed", range(6))
def test_model_restore_equals_the_live_table(seed):
    t, j, buf, _ = _history(random.Random(seed))
    u, _, got = successor(bytearray(buf))
    assert got.bad == got.duplicate == got.skipped == 0
    assert state(u) == state(t)


@pytest.mark.parametrize("seed", range(8))
def test_restore_of_corrupted_bytes_never_raises_and_never_invents_a_flow(seed):
    rng = random.Random(seed)
    t, j, buf, written = _history(rng)
    for trial in range(150):
        data = bytearray(buf)
        how = trial % 4
        for _ in range(rng.randrange(1, 12)):
            if how == 0:                                # bit flips anywhere
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
            elif how == 1:                              # random bytes over a random span
                i = rng.randrange(len(data))
                n = rng.randrange(1, 80)
                data[i:i + n] = os.urandom(len(data[i:i + n]))
            elif how == 2:                              # a record copied over another
                a, b = rng.randrange(j.capacity), rng.randrange(j.capacity)
                oa, ob = HEADER_SIZE + a * RECORD_SIZE, HEADER_SIZE + b * RECORD_SIZE
                data[ob:ob + RECORD_SIZE] = data[oa:oa + RECORD_SIZE]
            else:                                       # a kind byte set on a free record
                data[HEADER_SIZE + rng.randrange(j.capacity) * RECORD_SIZE] = rng.randrange(256)
        high = min(high_mark(data) or 0, j.capacity)     # what restore reads
        kinds = sum(1 for i in range(high) if data[HEADER_SIZE + i * RECORD_SIZE])
        u, _, got = successor(data)
        for f in u:
            assert (f.listener, f.key, f.transceiver, f.flags) in written
        if not got.reformatted:
            assert got.restored + got.bad + got.duplicate + got.skipped == kinds
        # and whatever it kept is a journal a third worker restores to the same flows
        assert state(successor(bytearray(data))[0]) == state(u)


def test_whole_garbage_regions_never_raise_and_restore_nothing():
    rng = random.Random(7)
    for size in (region_size(1), region_size(16), region_size(16) + 13):
        cap = (size - HEADER_SIZE) // RECORD_SIZE
        for _ in range(50):
            data = bytearray(os.urandom(size))
            ours = rng.random() < 0.5
            if ours:                # our header over garbage records: each one is checked and counted
                data[:HEADER_SIZE] = header(cap, cap)
            kinds = sum(1 for i in range(cap) if data[HEADER_SIZE + i * RECORD_SIZE])
            u, _, got = successor(data)
            assert len(u) == 0 and got.restored == 0
            assert got == (Restored(0, kinds, 0, 0, False) if ours else Restored(0, 0, 0, 0, True))


def _torn(old, new, k, forward):
    """The record a writer killed after k bytes leaves, writing in either direction."""
    out = bytearray(old)
    if forward:
        out[:k] = new[:k]
    else:
        out[RECORD_SIZE - k:] = new[RECORD_SIZE - k:]
    return out


def test_a_writer_killed_mid_record_leaves_old_new_or_nothing_counted():
    t, j, buf = journaled(capacity=1)
    rec = slice(HEADER_SIZE, HEADER_SIZE + RECORD_SIZE)
    states = [bytes(buf[rec])]                          # free
    f = confirmed(t, 0, sa4(1), 1)
    states.append(bytes(buf[rec]))                      # written
    f.flags |= FAILED_OVER
    t.move(f, 2, 2.0)
    states.append(bytes(buf[rec]))                      # overwritten
    t.remove(f)
    states.append(bytes(buf[rec]))                      # freed
    meaning = [{}, {(0, f.key): (1, 0)}, {(0, f.key): (2, FAILED_OVER)}, {}]
    for step in range(3):
        old, new = states[step], states[step + 1]
        for k in range(RECORD_SIZE + 1):
            for forward in (True, False):
                data = bytearray(buf)
                data[rec] = _torn(old, new, k, forward)
                u, _, got = successor(data)
                seen = state(u)
                # old, new, or (a torn record) nothing: that one flow lost, and counted
                assert seen in (meaning[step], meaning[step + 1], {}), (step, k, forward, seen)
                if not seen and data[HEADER_SIZE]:
                    assert got.bad == 1, (step, k, forward)
                if k in (0, RECORD_SIZE):
                    assert seen == meaning[step + (k == RECORD_SIZE)]   # whole writes are exact


def test_a_removal_torn_and_then_a_reuse_torn_never_revive_the_removed_flow():
    t, j, buf = journaled(capacity=1, n_listeners=1)
    confirmed(t, 0, sa4(1), 1)
    rec = slice(HEADER_SIZE, HEADER_SIZE + RECORD_SIZE)
    buf[HEADER_SIZE] = 0                    # the worker was killed inside drop(): kind cleared, x still there
    u, k, got = successor(buf, n_listeners=1)
    assert got.restored == 0 and state(u) == {}
    before = bytes(buf[rec])
    y = confirmed(u, 0, sa4(2), 2, now=600.0)       # the successor reuses the record for y ...
    assert y.jslot == 0
    after = bytes(buf[rec])
    stores = record_stores(0, after[:60])  # the record's stores, at offset 0 of `before`
    for forward in (True, False):
        for i, (at, data) in enumerate(stores):
            for n in range(len(data) + 1):  # ... and is killed after n bytes of its i-th store
                cur = bytearray(before)
                for a, d in stores[:i]:
                    cur[a:a + len(d)] = d
                part = slice(at, at + n) if forward else slice(at + len(data) - n, at + len(data))
                cur[part] = data[part.start - at:part.stop - at]
                data2 = bytearray(buf)
                data2[rec] = cur
                seen = state(successor(data2, n_listeners=1)[0])
                assert seen in ({}, {(0, y.key): (2, 0)}), (forward, i, n, seen)


def _header_stores(old, new, forward):
    """The header bytes after each byte store of a writer going from `old` to `new` header:
    4-byte words in address order, each written byte by byte (struct.pack_into) in either direction."""
    out = bytearray(old)
    yield bytes(out)
    for word in range(0, HEADER_SIZE, 4):
        for i in (range(word, word + 4) if forward else range(word + 3, word - 1, -1)):
            if out[i] != new[i]:
                out[i] = new[i]
                yield bytes(out)


def test_a_writer_killed_while_raising_the_high_mark_hides_no_record():
    # 255 -> 256 changes two bytes of the mark: a store torn between them must not
    # leave a mark below the records already written (nor one that unformats the region)
    t, j, buf = journaled(capacity=300, n_listeners=1)
    flows = [confirmed(t, 0, sa4(i), 1) for i in range(255)]
    before = bytes(buf[:HEADER_SIZE])
    confirmed(t, 0, sa4(255), 1)
    after = bytes(buf[:HEADER_SIZE])
    assert before != after
    want = {(0, f.key): (1, 0) for f in flows}
    last = HEADER_SIZE + 255 * RECORD_SIZE
    for forward in (True, False):
        for k, head in enumerate(_header_stores(before, after, forward)):
            data = bytearray(buf)
            data[:HEADER_SIZE] = head
            data[last:last + RECORD_SIZE] = bytes(RECORD_SIZE)     # killed before the record itself
            u, _, got = successor(data, n_listeners=1)
            assert not got.reformatted and state(u) == want, (forward, k, got)


def test_a_restored_flow_whose_transceiver_left_the_config_is_never_forwarded_to():
    # the worker died after a reload removed transceiver 3; its successor runs the new config
    import socket

    from edge_relay import keys
    from edge_relay.router import Policy, Router
    t, j, buf = journaled(n_listeners=1)
    kept, gone = confirmed(t, 0, sa4(1), 1), confirmed(t, 0, sa4(2), 3)
    u, _, got = successor(buf, n_listeners=1)
    assert got.restored == 2                    # restored like the live table kept it ...
    tx = {1: sockaddr.from_tuple(("10.9.0.5", 5000))}
    router = Router(u, keys.KeyRing({1: bytes(range(32))}), tx, [socket.AF_INET], Policy())
    rtp = b"\x80" + bytes(40)
    router.from_clients(0, [memoryview(rtp)] * 2, [kept.key, gone.key], 2, 501.0, int(time.time() * 1000))
    assert [dest for dest, *_ in router.to_transceivers] == [tx[1]]     # ... but only kept's datagram leaves
    assert router.drops[Drop.UNKNOWN_TRANSCEIVER] == 1


def test_a_failed_over_flow_is_journaled_and_its_successor_still_says_so(tmp_path):
    """The router's failover (flags set before the move) reaches the journal; the restored flow's
    datagrams carry FLAG_FAILOVER to the backup, as through a snapshot (test_failover.py)."""
    from edge_relay.worker import Worker, flow_table
    from test_failover import Clock, fail_over_call, make, media_round
    clock = Clock()
    h = make(tmp_path, clock)
    try:
        buf = bytearray(region_size(h.cfg.limits.max_flows))
        Journal(buf).attach(h.router.flows, clock.t)
        vc, other = fail_over_call(h, clock, extra_tx=2)   # other: the backup's own client
        flows = flow_table(h.cfg)
        got = Journal(buf).attach(flows, clock.t)
        assert got == Restored(2, 0, 0, 0, False)
        assert sorted((f.transceiver, f.flags) for f in flows) == [(2, 0), (2, FAILED_OVER)]
        h.worker = Worker(h.cfg, h.keyring, h.listen_socks, h.internal_sock, h.log, clock=clock, flows=flows)
        h.router = h.worker.router
        backup = h.demos[2]
        backup.clients.clear()
        assert media_round(h, vc, clock) == 1 and media_round(h, other, clock) == 1
        assert backup.clients == {vc.sock.getsockname()[:2]: True, other.sock.getsockname()[:2]: False}
    finally:
        h.close()


def test_start_flows_restores_the_journal_unless_a_snapshot_was_handed_over(tmp_path):
    """worker.start_flows over a real memfd region: the crash path, then the hand-over path."""
    import io

    from edge_relay.log import Log
    from edge_relay.worker import JournalMemory, start_flows
    from relayharness import Harness
    h = Harness(tmp_path)
    memory = JournalMemory(h.cfg.limits.max_flows)
    try:
        out = io.StringIO()
        log = Log(level="info", stream=out)
        first = start_flows(h.cfg, log, 0, None, memory)
        a = confirmed(first, 0, sa4(1), 1)
        crashed = start_flows(h.cfg, log, 0, None, memory)      # the first worker was killed
        assert state(crashed) == {(0, a.key): (1, 0)}
        # only the pages of records in use are allocated (restore reads nothing above `high`)
        assert memory.size >= region_size(100_000) and os.fstat(memory.fd).st_blocks * 512 <= 16384
        assert "worker 0: 1 flows restored from the crash journal" in out.getvalue()
        other = FlowTable(n_listeners=1)
        b = confirmed(other, 0, sa4(2), 1)
        handed = start_flows(h.cfg, log, 0, other.snapshot(2.0), memory)
        assert state(handed) == {(0, b.key): (1, 0)}           # the snapshot is the truth ...
        again = start_flows(h.cfg, log, 0, None, memory)
        assert state(again) == {(0, b.key): (1, 0)}            # ... and the journal says so now
        del first, crashed, handed, again       # their journals' views of the mapping
        memory.close()
    finally:
        h.close()


def test_the_supervisor_closes_the_journals_it_holds(tmp_path):
    """Supervisor.close releases every slot's region (fd and mapping) as it does its sockets."""
    from edge_relay import config, keys
    from edge_relay.log import Log
    from edge_relay.supervisor import Supervisor
    from edge_relay.worker import journal_memory
    from relayproc import free_port
    (tmp_path / "keys").mkdir(mode=0o700)
    keys.write_key_file(tmp_path / "keys", 1)
    cfg = config.parse({"listeners": [{"address": "127.0.0.1", "port": free_port()}],
                        "internal": {"address": "127.0.0.1", "port": free_port()},
                        "keys": {"dir": str(tmp_path / "keys")},
                        "transceivers": [{"id": 1, "address": "127.0.0.1", "port": 9}],
                        "management": {"port": 0}, "probes": {"enabled": False}}, tmp_path)
    log = Log(level="err", stream=open(os.devnull, "w"))
    sup = Supervisor(None, cfg, keys.load_dir(tmp_path / "keys"), log, workers=1, env={})
    sup.journals[0] = memory = journal_memory(cfg, 0, log)
    sup.close()
    with pytest.raises(OSError):
        os.fstat(memory.fd)
    assert memory.map.closed


# -- real processes -----------------------------------------------------------------


@pytest.mark.slow
def test_a_sigkilled_workers_calls_resume_without_a_new_binding_request(tmp_path):
    from relayproc import Relay, Setup, Traffic, Transceiver, clients_for, http_get, metrics, value, wait_for
    setup = Setup(tmp_path / "r", workers=2)
    relay = Relay(setup)
    traffic = None
    try:
        wait_for(lambda: http_get(setup.url + "/healthz")[0] == 200 or relay.proc.poll() is not None,
                 20, what="/healthz 200")
        assert relay.proc.poll() is None, relay.log()
        tx = Transceiver(setup.keyring, setup.tx_sock)
        clients = clients_for(setup, 16)
        checks = {c: [0] for c in clients}
        for c in clients:
            def counted(now, c=c, send=c.send_check):
                checks[c][0] += 1
                send(now)
            c.send_check = counted
        traffic = Traffic(clients, tx)
        assert traffic.run(10, until=lambda: all(c.connected for c in clients))
        traffic.run(0.5)
        base = setup.ports["internal_port"]
        worker_of = {c: tx.worker_of[tuple(c.address)] - base for c in clients}
        victims = [c for c in clients if worker_of[c] == 0]
        others = [c for c in clients if worker_of[c] != 0]
        assert victims and others, f"reuseport put every client on one worker: {worker_of}"
        # From here on no client sends a Binding Request (consent checks held off):
        # only the journal can give the successor its flows.
        far = time.monotonic() + 3600
        for c in clients:
            c.next_consent = far
        checks_before = {c: checks[c][0] for c in clients}
        pids = relay.worker_pids()
        pid = pids[0]
        os.kill(pid, signal.SIGKILL)
        before = {c: c.received for c in victims}
        rtts_before = {c: len(c.rtts) for c in victims}
        assert traffic.run(10, until=lambda: relay.worker_pids().get(0) not in (None, pid))
        # the victims' media is answered again, through the successor
        assert traffic.run(15, until=lambda: all(c.received - before[c] >= 25 for c in victims)), \
            ([c.received - before[c] for c in victims], relay.log())
        traffic.quiesce()
        late = [max(c.rtts[rtts_before[c]:]) * 1000 for c in victims]
        print(f"\nworker SIGKILL: victims lost {[c.sent - c.received for c in victims]} packets, "
              f"max RTT after the kill {max(late):.0f} ms; others lost "
              f"{sum(c.sent - c.received for c in others)}")
        assert {c: checks[c][0] for c in clients} == checks_before      # not one Binding Request
        assert sum(c.sent - c.received for c in others) == 0            # the others lost nothing
        assert relay.worker_pids()[1] == pids[1]                        # ... nor their worker
        log = relay.log()
        print(next((line for line in log.splitlines() if "crash journal" in line), "no journal line"))
        assert f"worker 0: {len(victims)} flows restored from the crash journal" in log, log
        assert "(records: 0 bad, 0 duplicate, 0 refused)" in log
        m = wait_for(lambda: (lambda m: m if value(m, "edge_relay_workers_up") == 2 else None)(metrics(setup)),
                     10, what="both workers serving in /metrics")
        assert value(m, "edge_relay_worker_restarts_total") == 1
        # what the log line says, /metrics says too: the successor's restore and the journal in use
        assert value(m, "edge_relay_journal_restored_flows", worker="0") == len(victims)
        assert value(m, "edge_relay_journal_restored_flows", worker="1") == 0
        assert value(m, "edge_relay_journal_restore_records_total", result="restored") == len(victims)
        assert value(m, "edge_relay_journal_records", worker="0") == len(victims)
        assert value(m, "edge_relay_journal_records", worker="1") == len(others)
        assert value(m, "edge_relay_journal_capacity", worker="0") == setup_max_flows(setup)
        assert value(m, "edge_relay_journal_restore_seconds", worker="0") > 0
    finally:
        if traffic is not None:
            traffic.close()
        relay.kill()
        setup.tx_sock.close()


def setup_max_flows(setup):
    from edge_relay import config
    return config.load(setup.path).limits.max_flows


def test_the_bench_runs_at_tiny_scale(tmp_path, capsys):
    """bench/journal.py works (functional only: the figures are the bench's, not a threshold)."""
    import json

    from bench import journal as bench_journal
    out = tmp_path / "journal.json"
    assert bench_journal.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["ns_per_op"]) == {"confirm", "move", "remove", "put"}
    assert set(doc["restore"]) == {"1000", "10000"}
    assert doc["restore"]["1000"]["region_bytes"] == region_size(1000)


def test_a_journal_region_adopted_from_its_memfd_is_the_same_memory_and_other_sizes_are_refused():
    import os

    from edge_relay.worker import JournalMemory
    mem = JournalMemory(8)
    mem.map[:4] = b"abcd"
    again = JournalMemory.adopt(os.dup(mem.fd))            # what an upgrade's new image does with it
    assert (again.capacity, again.size) == (8, mem.size) and again.map[:4] == b"abcd"
    again.map[4:8] = b"efgh"
    assert mem.map[4:8] == b"efgh"                          # one region: the old writer's and the new holder's
    again.close()
    mem.close()
    fd = os.memfd_create("not-a-journal")
    os.ftruncate(fd, region_size(8) + 1)
    try:
        with pytest.raises(ValueError):
            JournalMemory.adopt(fd)
    finally:
        os.close(fd)
