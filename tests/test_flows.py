"""Tests for edge_relay/flows.py: the sans-IO flow table.

Pure: no sockets, no sleeps, no clock. Every test passes `now` itself.
"""

import collections
import gc
import math
import random
import socket
import struct
import tracemalloc

import pytest

from edge_relay import journal, sockaddr
from edge_relay.drops import Drop
from edge_relay.flows import CONFIRMED, FAILED_OVER, PENDING, REMOVED, SNAPSHOT_VERSION, Flow, FlowTable


def sa4(ip, port=40000):
    """Raw sockaddr_in bytes for IPv4 `ip` (str or int)."""
    if isinstance(ip, int):
        ip = socket.inet_ntop(socket.AF_INET, ip.to_bytes(4, "big"))
    return sockaddr.from_tuple((ip, port))


def sa6(ip, port=40000):
    return sockaddr.from_tuple((ip, port))


def check_invariants(table):
    """Recompute every counter from the dicts and compare with the table's."""
    pending = confirmed = 0
    per_source = collections.Counter()
    for listener, flows in enumerate(table.by_listener):
        for key, flow in flows.items():
            assert type(key) is bytes
            assert flow.key is key and flow.listener == listener
            assert flow.state in (PENDING, CONFIRMED)
            if flow.state == PENDING:
                pending += 1
                per_source[sockaddr.source_ip(key)] += 1
            else:
                confirmed += 1
    assert (table.pending, table.confirmed, len(table)) == (pending, confirmed, pending + confirmed)
    assert table._per_source == dict(per_source)       # exact, and no zero entries
    assert sorted(map(id, table)) == sorted(id(f) for d in table.by_listener for f in d.values())
    assert table._per_tx == dict(collections.Counter(f.transceiver for f in table))
    sessions = collections.Counter(f.session[1] for f in table if f.session is not None)
    assert {k: rec[0] for k, rec in table._sessions.items()} == dict(sessions)
    assert all(table._sessions[f.session[1]] is f.session for f in table if f.session is not None)
    assert {id(f) for f in table if f.state == PENDING} <= {id(f) for f in table._fifo}


# -- open / confirm / get ------------------------------------------------------


def test_open_confirm_get():
    t = FlowTable(n_listeners=2)
    a = sa4("192.0.2.1", 5000)
    f = t.open(1, a, 300, 10.0)
    assert isinstance(f, Flow)
    assert (f.key, f.listener, f.transceiver, f.state, f.last_seen) == (a, 1, 300, PENDING, 10.0)
    assert f.restart_to is None and f.route is None
    assert t.get(1, a) is f and t.by_listener[1].get(a) is f
    assert t.get(0, a) is None and t.get(1, sa4("192.0.2.1", 5001)) is None
    assert (t.pending, t.confirmed, len(t)) == (1, 0, 1)

    # An existing flow comes back unchanged, whatever transceiver is named.
    assert t.open(1, a, 999, 11.0) is f
    assert (f.transceiver, f.last_seen, len(t)) == (300, 10.0, 1)

    assert t.confirm(f, 12.0) is True
    assert (f.state, f.last_seen, t.pending, t.confirmed) == (CONFIRMED, 12.0, 0, 1)
    assert t.confirm(f, 13.0) is True           # idempotent: only refreshes
    assert (f.state, f.last_seen, t.pending, t.confirmed) == (CONFIRMED, 13.0, 0, 1)
    assert list(t) == [f]
    check_invariants(t)


def test_open_copies_buffer_views():
    t = FlowTable()
    buf = bytearray(sa4("192.0.2.7", 1234))
    f = t.open(0, bytes(buf), 1, 0.0)
    g = t.open(0, bytearray(sa4("192.0.2.8", 1234)), 1, 0.0)
    assert type(g.key) is bytes and t.get(0, sa4("192.0.2.8", 1234)) is g
    buf[5] ^= 0xFF                                 # the table never aliases caller memory
    assert t.get(0, sa4("192.0.2.7", 1234)) is f


def test_transceiver_ids_are_interned():
    t = FlowTable()
    ids = [int.from_bytes(b"\x12\x34", "big") for _ in range(3)]
    assert ids[0] is not ids[1]
    flows = [t.open(0, sa4(i + 1), tid, 0.0) for i, tid in enumerate(ids)]
    assert flows[0].transceiver is flows[1].transceiver is flows[2].transceiver


# -- lifetimes -----------------------------------------------------------------


def test_pending_expires_at_ttl_even_with_client_packets():
    t = FlowTable(pending_ttl=5.0, granularity=0.25)
    f = t.open(0, sa4("198.51.100.1"), 7, 100.0)
    g = t.open(0, sa4("198.51.100.2"), 7, 100.0)
    for now in (101.0, 102.0, 103.0, 104.0, 104.9):
        f.last_seen = now          # a hot path that wrongly refreshes pending flows
        assert t.expire(now) == 0
    assert t.expire(104.999) == 0
    assert t.expire(105.25) == 2   # deadline 105.0, at most one granularity late
    assert t.get(0, f.key) is None and t.get(0, g.key) is None
    assert f.state == REMOVED and g.state == REMOVED
    assert (t.pending, len(t), t._per_source) == (0, 0, {})


def test_confirmed_idle_expiry_and_refresh():
    t = FlowTable(pending_ttl=5.0, idle_timeout=30.0, granularity=0.25)
    quiet = t.open(0, sa4("203.0.113.1"), 1, 0.0)
    busy = t.open(0, sa4("203.0.113.2"), 1, 0.0)
    t.confirm(quiet, 1.0)
    t.confirm(busy, 1.0)
    assert t.expire(5.5) == 0                  # past pending_ttl: confirmed flows stay
    for now in range(2, 60, 2):                # client packets: the hot path's assignment
        busy.last_seen = float(now)
    assert t.expire(30.99) == 0
    assert t.expire(31.25) == 1                # quiet: last_seen 1.0 + 30
    assert quiet.state == REMOVED and busy.state == CONFIRMED
    assert t.expire(87.9) == 0                 # busy: last_seen 58.0 + 30 = 88.0
    assert t.expire(88.25) == 1
    assert len(t) == 0
    check_invariants(t)


def test_confirm_gives_a_full_idle_timeout_from_confirmation():
    t = FlowTable(pending_ttl=5.0, idle_timeout=30.0)
    f = t.open(0, sa4("203.0.113.9"), 1, 0.0)
    t.confirm(f, 4.9)
    assert t.expire(34.8) == 0 and f.state == CONFIRMED
    assert t.expire(35.15) == 1


def test_idle_timeout_shorter_than_pending_ttl():
    # The confirmed deadline is earlier than the pending entry: it must not wait for it.
    t = FlowTable(pending_ttl=10.0, idle_timeout=2.0, granularity=0.25)
    f = t.open(0, sa4("203.0.113.3"), 1, 0.0)
    t.confirm(f, 1.0)
    assert t.expire(2.9) == 0
    assert t.expire(3.25) == 1
    assert t.expire(20.0) == 0                 # its second (stale) entry is skipped
    check_invariants(t)


@pytest.mark.parametrize("g", [0.25, 0.1, 0.3, 1.0, 0.05])
def test_expiry_granularity_bound(g):
    """No flow goes before its deadline; every flow goes by deadline + granularity."""
    rng = random.Random(1234)
    t = FlowTable(pending_ttl=1.7, idle_timeout=3.3, granularity=g, max_flows=10_000,
                  max_pending_per_source=10_000)
    deadline = {}
    for i in range(400):
        now = rng.uniform(0.0, 10.0)
        f = t.open(0, sa4(i + 1), 1, now)
        if rng.random() < 0.5:
            c = now + rng.uniform(0.0, 1.0)
            t.confirm(f, c)
            deadline[f] = c + 3.3
        else:
            deadline[f] = now + 1.7
    # Flows were opened out of time order (the table does not care); now run a fine clock.
    step = g / 7
    now = 0.0
    gone = {}
    while len(t):
        t.expire(now)
        for f in deadline:
            if f.state == REMOVED and f not in gone:
                gone[f] = now
        now += step
    for f, when in gone.items():
        assert deadline[f] <= when, (deadline[f], when)                 # never early
        assert when <= deadline[f] + g + step + 1e-9, (deadline[f], when, g)
    assert len(gone) == 400 and t.next_deadline() is None


def test_next_deadline_is_never_late():
    t = FlowTable(pending_ttl=5.0, granularity=0.25)
    assert t.next_deadline() is None
    t.open(0, sa4(1), 1, 3.1)
    nd = t.next_deadline()
    assert 8.1 <= nd <= 8.1 + 0.25
    assert t.expire(math.nextafter(nd, 0.0)) == 0
    assert t.expire(nd) == 1
    assert t.next_deadline() is None


# -- caps ------------------------------------------------------------------------


def test_per_source_pending_cap():
    t = FlowTable(max_pending_per_source=3, n_listeners=2)
    ip = "192.0.2.50"
    flows = [t.open(i % 2, sa4(ip, 1000 + i), 1, 0.0) for i in range(3)]
    assert all(isinstance(f, Flow) for f in flows)
    assert t.open(0, sa4(ip, 2000), 1, 0.0) is Drop.PENDING_PER_SOURCE
    assert t.open(1, sa4(ip, 2000), 1, 0.0) is Drop.PENDING_PER_SOURCE   # per IP, all listeners
    # The same IPv4 address seen through a dual-stack socket is the same source.
    assert t.open(0, sa6("::ffff:192.0.2.50", 2000), 1, 0.0) is Drop.PENDING_PER_SOURCE
    # Other sources are unaffected.
    other = t.open(0, sa4("192.0.2.51", 2000), 1, 0.0)
    assert isinstance(other, Flow)
    assert isinstance(t.open(0, sa6("2001:db8::1", 2000), 1, 0.0), Flow)
    # Confirming frees a pending slot (confirmed flows do not count against it).
    t.confirm(flows[0], 1.0)
    f = t.open(0, sa4(ip, 2000), 1, 1.0)
    assert isinstance(f, Flow)
    assert t.open(0, sa4(ip, 2001), 1, 1.0) is Drop.PENDING_PER_SOURCE
    # Removal and expiry free slots too; the per-source map never keeps zeros.
    t.remove(flows[1])
    assert isinstance(t.open(0, sa4(ip, 2001), 1, 1.0), Flow)
    check_invariants(t)
    t.expire(100.0)                            # everything pending goes; flows[0] idles out too
    assert len(t) == 0 and t._per_source == {}
    check_invariants(t)


def test_total_cap_refuses_and_never_evicts():
    t = FlowTable(max_flows=5, max_pending_per_source=100, evict_pending=False)
    flows = [t.open(0, sa4(i + 1), 1, 0.0) for i in range(5)]
    t.confirm(flows[0], 0.0)
    assert t.open(0, sa4(100), 1, 1.0) is Drop.FLOW_TABLE_FULL
    # Table full is reported before the per-source cap.
    t2 = FlowTable(max_flows=1, max_pending_per_source=1, evict_pending=False)
    t2.open(0, sa4(1, 1), 1, 0.0)
    assert t2.open(0, sa4(1, 2), 1, 0.0) is Drop.FLOW_TABLE_FULL
    # Nothing was evicted, and existing flows are still returned while full.
    assert all(t.get(0, f.key) is f for f in flows)
    assert t.open(0, flows[3].key, 9, 1.0) is flows[3]
    assert len(t) == 5
    t.remove(flows[2])
    g = t.open(0, sa4(100), 1, 1.0)
    assert isinstance(g, Flow) and len(t) == 5
    check_invariants(t)


# -- ICE restart, removal ----------------------------------------------------------


def test_move_and_restart_to():
    t = FlowTable()
    f = t.open(0, sa4("192.0.2.9"), 10, 0.0)
    t.confirm(f, 1.0)
    f.restart_to = 20            # the router saw a valid token for transceiver 20
    f.route = ("cached", "for 10")
    assert t.move(f, 20, 2.0) is True
    assert (f.transceiver, f.restart_to, f.route, f.state, f.last_seen) == (20, None, None, CONFIRMED, 2.0)
    assert (t.pending, t.confirmed) == (0, 1)

    # A restart that completes before the flow was ever confirmed confirms it.
    p = t.open(0, sa4("192.0.2.10"), 10, 3.0)
    p.restart_to = 30
    assert t.move(p, 30, 3.5) is True
    assert (p.transceiver, p.restart_to, p.state) == (30, None, CONFIRMED)
    assert (t.pending, t.confirmed, t._per_source) == (0, 2, {})
    assert t.expire(33.4) == 1 and f.state == REMOVED      # f: 2.0 + 30
    assert p.state == CONFIRMED                            # p: 3.5 + 30

    # A flow that left the table is not resurrected.
    t.remove(p)
    assert t.move(p, 40, 4.0) is False and t.confirm(p, 4.0) is False
    assert (p.state, p.transceiver, len(t)) == (REMOVED, 30, 0)
    check_invariants(t)


def test_remove():
    t = FlowTable(pending_ttl=5.0)
    a = sa4("192.0.2.77")
    f = t.open(0, a, 1, 0.0)
    t.remove(f)
    assert f.state == REMOVED and t.get(0, a) is None and len(t) == 0
    t.remove(f)                                 # idempotent
    assert (t.pending, t.confirmed, t._per_source) == (0, 0, {})
    # Reopening the same address makes a new flow; the old bucket entry must not touch it.
    g = t.open(0, a, 2, 4.0)
    assert g is not f
    assert t.expire(5.5) == 0 and t.get(0, a) is g
    assert t.expire(9.25) == 1
    check_invariants(t)


def test_compaction_bounds_stale_entries():
    t = FlowTable(pending_ttl=5.0, idle_timeout=30.0, max_flows=10)
    t._compact_slack = 50
    keep = t.open(0, sa4(1), 1, 0.0)
    t.confirm(keep, 0.0)
    for i in range(1000):                       # open/remove churn within one idle period
        f = t.open(0, sa4(2 + i), 1, i * 0.001)
        t.remove(f)
        assert t._entries <= 2 * len(t) + 51
    assert t.expire(29.9) == 0 and keep.state == CONFIRMED
    assert t.expire(30.25) == 1
    check_invariants(t)


# -- model-based test ------------------------------------------------------------


class Model:
    """The obvious reference: a dict and a list scan. Expiry is exact at the deadline."""

    def __init__(self, max_flows, per_source, pending_ttl, idle):
        self.max_flows, self.per_source = max_flows, per_source
        self.pending_ttl, self.idle = pending_ttl, idle
        self.flows = {}            # (listener, key) -> [state, tid, t0_or_last_seen, restart_to]

    def count(self, state):
        return sum(1 for v in self.flows.values() if v[0] == state)

    def pending_of(self, src):
        return sum(1 for (_, k), v in self.flows.items()
                   if v[0] == PENDING and sockaddr.source_ip(k) == src)

    def open(self, listener, key, tid, now):
        if (listener, key) in self.flows:
            return "exists"
        if len(self.flows) >= self.max_flows:
            return Drop.FLOW_TABLE_FULL
        if self.pending_of(sockaddr.source_ip(key)) >= self.per_source:
            return Drop.PENDING_PER_SOURCE
        self.flows[(listener, key)] = [PENDING, tid, now, None]
        return "opened"

    def deadline(self, v):
        return v[2] + (self.pending_ttl if v[0] == PENDING else self.idle)


@pytest.mark.parametrize("pending_ttl,idle,g,slack,seed", [
    (2.0, 5.0, 0.25, 4096, 1),
    (2.0, 5.0, 0.1, -40, 2),         # negative compaction slack: rebuilds happen often
    (3.0, 1.0, 0.25, 4096, 3),       # idle < pending: duplicate bucket entries
    (1.0, 2.0, 0.5, -10, 4),
])
def test_model_random_operations(pending_ttl, idle, g, slack, seed):
    rng = random.Random(seed)
    max_flows, per_source = 50, 3
    t = FlowTable(n_listeners=2, max_flows=max_flows, max_pending_per_source=per_source,
                  pending_ttl=pending_ttl, idle_timeout=idle, granularity=g, evict_pending=False)
    t._compact_slack = slack
    # The crash journal rides along: a successor restoring it must find the table's confirmed flows.
    region = bytearray(journal.region_size(max_flows))
    journal.Journal(region).attach(t, 0.0)
    flags = {}                  # (listener, key) -> FAILED_OVER bits the test set on that flow
    m = Model(max_flows, per_source, pending_ttl, idle)
    ips = [sa4(f"10.0.{i // 8}.{i % 8 + 1}", 1)[4:8] for i in range(24)]
    keys = []
    for ip in ips:
        for port in (1, 2, 3, 4, 5):
            keys.append(struct.pack("=H2s4s8x", socket.AF_INET, port.to_bytes(2, "big"), ip))
    keys += [sa6(f"2001:db8::{i}", 7) for i in range(1, 6)]
    keys += [sa6("::ffff:10.0.0.1", p) for p in (8, 9)]     # share a source with an IPv4 key
    now = 0.0
    counts = collections.Counter()

    def live_flow(key_pair):
        return t.get(*key_pair)

    for step in range(20000):
        # Alternate churn (time runs, flows come and go) with floods (time nearly
        # stands still and opens dominate) so that both caps are reached.
        flood = (step // 1000) % 2 == 1
        now += rng.choice((0.0, 0.001) if flood else (0.0, 0.0, 0.0, 0.01, 0.05, 0.2, 0.7))
        op = rng.random()
        listener = rng.randrange(2)
        if op < (0.6 if flood else 0.35):
            key = rng.choice(keys)
            tid = rng.randrange(1, 5)
            expect = m.open(listener, key, tid, now)
            before = t.get(listener, key)
            got = t.open(listener, key, tid, now)
            if expect == "exists":
                assert got is before and before is not None
            elif expect == "opened":
                assert isinstance(got, Flow) and got.state == PENDING and got.last_seen == now
                flags.pop((listener, key), None)
            else:
                assert got is expect, (step, got, expect)
            counts[expect if isinstance(expect, str) else expect.name] += 1
        elif m.flows and op < 0.85:
            pair = rng.choice(sorted(m.flows))
            v = m.flows[pair]
            f = live_flow(pair)
            assert f is not None and f.state == v[0] and f.transceiver == v[1]
            assert f.restart_to == v[3]
            sub = rng.random()
            if sub < 0.25:
                assert t.confirm(f, now) is True
                v[0], v[2] = CONFIRMED, now
                counts["confirm"] += 1
            elif sub < 0.55:
                if v[0] == CONFIRMED:          # the hot path: client packet on a confirmed flow
                    f.last_seen = now
                    v[2] = now
                counts["touch"] += 1
            elif sub < 0.65:
                new = rng.randrange(1, 5)
                f.restart_to = new
                v[3] = new
            elif sub < 0.8:
                new = rng.randrange(1, 5)
                if rng.random() < 0.3:
                    f.flags |= FAILED_OVER          # as the router does before a failover move
                    flags[pair] = FAILED_OVER
                assert t.move(f, new, now) is True
                v[0], v[1], v[2], v[3] = CONFIRMED, new, now, None
                counts["move"] += 1
            elif not flood:
                t.remove(f)
                assert f.state == REMOVED
                del m.flows[pair]
                counts["remove"] += 1
        elif op < 0.95:
            snapshot_before = {p: t.get(*p) for p in m.flows}
            n = t.expire(now)
            removed = 0
            for pair, v in list(m.flows.items()):
                d = m.deadline(v)
                f = snapshot_before[pair]
                if t.get(*pair) is None:
                    assert d <= now, (step, pair, d, now)       # never early
                    assert f.state == REMOVED
                    del m.flows[pair]
                    removed += 1
                else:
                    assert d > now - g - 1e-9, (step, d, now)   # never more than g late
            assert n == removed
            counts["expired"] += n
        else:
            # Hand everything to a fresh table (a restart) and carry on with it.
            if rng.random() < 0.3:
                data = t.snapshot(now)
                fresh = FlowTable(n_listeners=2, max_flows=max_flows,
                                  max_pending_per_source=per_source, pending_ttl=pending_ttl,
                                  idle_timeout=idle, granularity=g, evict_pending=False)
                fresh._compact_slack = slack
                later = now + 1000.0      # another process, another clock origin
                n = fresh.restore(data, later)
                journal.Journal(region).attach(fresh, later, fresh=True)     # as worker.start_flows
                for pair, v in list(m.flows.items()):
                    if m.deadline(v) <= now:
                        del m.flows[pair]        # expired but not yet reaped: not handed over
                    else:
                        v[2] += 1000.0
                assert n == len(m.flows)
                for pair, v in m.flows.items():
                    f = fresh.get(*pair)
                    assert f.state == v[0] and f.transceiver == v[1] and f.restart_to == v[3]
                    assert f.flags == flags.get(pair, 0)
                    assert f.last_seen == pytest.approx(v[2], abs=1e-6)
                    v[2] = f.last_seen          # float rounding of the age: follow the table
                t, now = fresh, later
                counts["restore"] += 1
        # Exact counters after every step.
        assert t.pending == m.count(PENDING) and t.confirmed == m.count(CONFIRMED)
        assert len(t) == len(m.flows)
        if step % 50 == 0:
            check_invariants(t)
            assert {(f.listener, f.key) for f in t} == set(m.flows)
            successor = FlowTable(n_listeners=2, max_flows=max_flows)
            journal.Journal(bytearray(region)).attach(successor, now)
            assert ({(f.listener, f.key, f.transceiver, f.flags) for f in successor}
                    == {(f.listener, f.key, f.transceiver, f.flags) for f in t if f.state == CONFIRMED})
    check_invariants(t)
    # Every kind of step actually happened.
    for kind in ("opened", "exists", "PENDING_PER_SOURCE", "FLOW_TABLE_FULL", "confirm", "touch", "move",
                 "remove", "expired", "restore"):
        assert counts[kind] > 0, (kind, counts)


# -- expiry work -------------------------------------------------------------------


def test_expire_touches_only_due_buckets():
    n = 100_000
    t = FlowTable(max_flows=n, idle_timeout=30.0, granularity=0.25)
    for i in range(n):
        now = i * 1e-4                         # opened over 10 s: 40 buckets of 2,500
        f = t.open(0, sa4(i + 1), 1, now)
        t.confirm(f, now)
    assert t.pending == 0 and t.confirmed == n
    # Pending entries (deadline now + 5) come due first and re-bucket their confirmed flows.
    assert t.expire(16.0) == 0
    assert t.scanned == n
    # Now every flow has exactly one entry, at last_seen + 30. Nothing due: no work at all.
    for now in (16.0, 20.0, 29.9, 30.0):
        before = t.scanned
        assert t.expire(now) == 0
        assert t.scanned == before
    # One bucket due: only its entries are looked at.
    before = t.scanned
    removed = t.expire(30.25)
    assert 0 < removed == t.scanned - before <= 2_600
    assert len(t) == n - removed


def test_expiry_work_is_amortised_per_idle_period():
    """Busy flows are re-bucketed about once per idle_timeout, never per packet."""
    t = FlowTable(idle_timeout=30.0, granularity=0.25)
    flows = [t.open(0, sa4(i + 1), 1, 0.0) for i in range(200)]
    for f in flows:
        t.confirm(f, 0.0)
    now = 0.0
    while now < 300.0:
        now += 0.1
        for f in flows:                        # every flow sends 10 packets a second
            f.last_seen = now
        t.expire(now)
    assert len(t) == 200
    per_flow = t.scanned / 200
    assert per_flow <= 300.0 / 30.0 + 2, per_flow      # ~one visit per 30 s, not 3000


# -- snapshot / restore ----------------------------------------------------------


def _populated(now=1000.0):
    t = FlowTable(n_listeners=3, pending_ttl=5.0, idle_timeout=30.0)
    spec = [
        # key, listener, tid, created, confirm_at, restart_to
        (sa4("192.0.2.1", 1), 0, 1, now - 1.0, None, None),            # pending, age 1
        (sa4("192.0.2.1", 2), 1, 2, now - 4.5, None, 7),               # pending with restart
        (sa4("192.0.2.2", 1), 2, 65535, now - 20.0, now - 10.0, None),  # confirmed, age 10
        (sa6("2001:db8::5", 9), 0, 3, now - 2.0, now - 0.5, 4),        # v6 confirmed + restart
        (sa6("::ffff:192.0.2.1", 3), 1, 1, now - 0.25, None, None),    # mapped v4, pending
        (sa4("192.0.2.3", 1), 0, 1, now - 6.0, None, None),            # pending, past ttl
        (sa4("192.0.2.4", 1), 0, 1, now - 40.0, now - 31.0, None),     # confirmed, idle
    ]
    flows = []
    for key, listener, tid, created, confirm_at, rto in spec:
        f = t.open(listener, key, tid, created)
        if confirm_at is not None:
            t.confirm(f, confirm_at)
        f.restart_to = rto
        f.route = object()
        flows.append(f)
    return t, flows


def test_snapshot_round_trip():
    t, flows = _populated(1000.0)
    data = t.snapshot(1000.0)
    assert data[:4] == b"ERFT" and data[4] == SNAPSHOT_VERSION
    assert t.snapshot(1000.0) == data                  # deterministic
    u = FlowTable(n_listeners=3, pending_ttl=5.0, idle_timeout=30.0)
    assert u.restore(data, 50.0) == 5                  # the two past their deadline are gone
    check_invariants(u)
    assert (u.pending, u.confirmed) == (3, 2)
    for f in flows[:5]:
        g = u.get(f.listener, f.key)
        assert g is not None and g is not f
        assert (g.state, g.transceiver, g.restart_to, g.route) == (f.state, f.transceiver, f.restart_to, None)
        assert g.last_seen == pytest.approx(50.0 - (1000.0 - f.last_seen), abs=1e-9)
    for f in flows[5:]:
        assert u.get(f.listener, f.key) is None
    # Ages carry over: each restored flow expires when the original would have.
    assert u.expire(50.0 + 0.5 - 0.01) == 0
    assert u.expire(50.0 + 0.5 + 0.25) == 1            # pending, age 4.5
    assert u.expire(50.0 + 4.0 + 0.25) == 1            # pending, age 1
    assert u.expire(50.0 + 4.75 + 0.25) == 1           # pending, age 0.25
    assert u.expire(50.0 + 20.0 + 0.25) == 1           # confirmed, age 10
    assert u.expire(50.0 + 29.5 + 0.25) == 1           # confirmed, age 0.5
    assert len(u) == 0 and u._per_source == {}
    # Empty tables round-trip too.
    assert FlowTable().restore(FlowTable().snapshot(0.0), 0.0) == 0


def test_snapshot_carries_the_flags_to_restore():
    t, flows = _populated(1000.0)
    marked_keys = {flows[1].key, flows[3].key}          # one pending with restart, one v6 confirmed
    plain = t.snapshot(1000.0)
    for f in t:
        if f.key in marked_keys:
            f.flags |= FAILED_OVER
    data = t.snapshot(1000.0)
    assert data != plain                                # the flag is on the wire
    u = FlowTable(n_listeners=3, pending_ttl=5.0, idle_timeout=30.0)
    assert u.restore(data, 50.0) == 5
    assert sorted(f.key for f in u if f.flags & FAILED_OVER) == sorted(marked_keys)
    assert all(f.flags == 0 for f in u if f.key not in marked_keys)
    # restart_to still comes from its own bit, whatever the flags
    assert u.get(flows[1].listener, flows[1].key).restart_to == 7
    assert u.get(flows[0].listener, flows[0].key).restart_to is None
    # a snapshot without flags restores none
    v = FlowTable(n_listeners=3, pending_ttl=5.0, idle_timeout=30.0)
    assert v.restore(plain, 50.0) == 5 and all(f.flags == 0 for f in v)


def test_restore_respects_caps_and_existing_flows():
    t, flows = _populated(1000.0)
    data = t.snapshot(1000.0)
    # Per-source: 192.0.2.1 has three pending flows (one via a v4-mapped v6 address).
    u = FlowTable(n_listeners=3, max_pending_per_source=1)
    assert u.restore(data, 0.0) == 3
    assert u._per_source == {bytes([192, 0, 2, 1]): 1}
    check_invariants(u)
    # Total cap.
    v = FlowTable(n_listeners=3, max_flows=2)
    assert v.restore(data, 0.0) == 2 and len(v) == 2
    # A client that already has a flow keeps it; restoring twice adds nothing.
    w = FlowTable(n_listeners=3)
    mine = w.open(0, flows[0].key, 99, 0.0)
    assert w.restore(data, 0.0) == 4
    assert w.get(0, flows[0].key) is mine and mine.transceiver == 99
    assert w.restore(data, 0.0) == 0
    check_invariants(w)
    # Fewer listeners in the new process: flows of the missing ones are skipped.
    x = FlowTable(n_listeners=1)
    assert x.restore(data, 0.0) == 2
    assert all(f.listener == 0 for f in x)


def _mutations_of(data, rng):
    """Truncations, byte flips, insertions and deletions of `data`."""
    kind = rng.randrange(4)
    b = bytearray(data)
    if kind == 0:
        return bytes(b[:rng.randrange(len(b))])
    if kind == 1:
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:
        i = rng.randrange(len(b) + 1)
        return bytes(b[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) + b[i:])
    i = rng.randrange(len(b))
    return bytes(b[:i] + b[i + rng.randrange(1, 40):])


def _fix_crc(data):
    """Recompute the body CRC so a mutation gets past it to the record parser."""
    import binascii
    if len(data) < 16:
        return data
    return data[:12] + struct.pack("<I", binascii.crc32(data[16:])) + data[16:]


def _state(table):
    return (table.pending, table.confirmed, dict(table._per_source),
            [dict(d) for d in table.by_listener], table._entries)


def test_restore_garbage_raises_only_value_error():
    rng = random.Random(7)
    t, _ = _populated(1000.0)
    base = t.snapshot(1000.0)
    seeds = [base, FlowTable().snapshot(0.0)]
    outcomes = collections.Counter()
    for case in range(6000):
        src = rng.choice(seeds)
        if case % 10 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        elif case % 10 == 1:
            data = src[:16] + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        else:
            data = _mutations_of(src, rng)
        if case % 2:
            data = _fix_crc(data)
        u = FlowTable(n_listeners=3)
        u.open(0, sa4("198.51.100.200"), 5, 0.0)
        before = _state(u)
        try:
            n = u.restore(data, 0.0)
        except ValueError:
            assert _state(u) == before          # atomic: nothing half-restored
            outcomes["ValueError"] += 1
        else:
            assert isinstance(n, int) and len(u) == 1 + n
            outcomes["ok"] += 1
        check_invariants(u)
    assert outcomes["ValueError"] > 3000 and outcomes["ok"] > 0, outcomes


@pytest.mark.parametrize("data", [
    "ERFT", None, 42, [1, 2, 3], memoryview(b"\x00" * 32)[::2],
])
def test_restore_non_bytes_raises_value_error(data):
    with pytest.raises(ValueError):
        FlowTable().restore(data, 0.0)


def test_restore_specific_malformed_records():
    t = FlowTable()
    f = t.open(0, sa4("192.0.2.1"), 1, 0.0)
    good = t.snapshot(1.0)
    head, rec = good[:16], bytearray(good[16:])
    # record layout: age f64 | tid u32 | restart u32 | listener u16 | state u8 | flags u8 | klen u8 | key
    cases = {
        "version": good[:4] + b"\x02" + good[5:],
        "reserved": good[:5] + b"\x01" + good[6:],
        "count": good[:8] + struct.pack("<I", 2) + good[12:],
        "trailing": _fix_crc(good + b"\x00"),
    }
    for name, patch in [("nan age", (0, struct.pack("<d", math.nan))),
                        ("inf age", (0, struct.pack("<d", math.inf))),
                        ("negative age", (0, struct.pack("<d", -1.0))),
                        ("state", (18, b"\x02")),
                        ("flags", (19, b"\x04")),
                        ("marked, restart without its flag",
                         (12, struct.pack("<I", 1) + bytes(rec[16:19]) + b"\x02")),
                        ("restart without flag", (12, b"\x01")),
                        ("key length", (20, b"\x11")),
                        ("family", (21, b"\x0a")),
                        ("padding", (36, b"\x01"))]:
        off, value = patch
        r = bytearray(rec)
        r[off:off + len(value)] = value
        cases[name] = _fix_crc(head + bytes(r))
    dup = good[:8] + struct.pack("<I", 2) + good[12:16] + bytes(rec) * 2
    cases["duplicate"] = _fix_crc(dup)
    assert FlowTable().restore(good, 1.0) == 1
    for name, data in cases.items():
        with pytest.raises(ValueError):
            FlowTable().restore(data, 1.0)
            pytest.fail(name)
    del f


# -- memory --------------------------------------------------------------------


@pytest.mark.parametrize("journaled", [False, True], ids=["plain", "journaled"])
def test_memory_per_confirmed_flow(journaled):
    """100k confirmed IPv4 flows, everything they cost included, <= 300 bytes each.

    Counted by tracemalloc: the Flow objects, the key bytes (created here, as
    the I/O layer would), a distinct last_seen float per flow (worst case: the
    loop shares one `now` per batch), a fresh int per transceiver id (as
    struct.unpack makes), the dict entries and the bucket entries. `route` is
    the router's and stays None here. Journaled: what the crash journal adds
    in the worker's heap (each flow's record index); its 64-byte records are
    in the shared region, allocated before counting starts.
    """
    n = 100_000
    region = bytearray(journal.region_size(n)) if journaled else None
    gc.collect()
    tracemalloc.start()
    try:
        t = FlowTable(max_flows=n)
        if journaled:
            journal.Journal(region).attach(t, 0.0)
        base = tracemalloc.get_traced_memory()[0]
        pack = struct.Struct("=H2s4s8x").pack
        for i in range(n):
            key = pack(socket.AF_INET, (1024 + i % 50000).to_bytes(2, "big"),
                       (0x0A000000 + i).to_bytes(4, "big"))
            tid = int.from_bytes((300 + i % 16).to_bytes(2, "big"), "big")
            now = 1000.0 + i * 1e-5
            f = t.open(0, key, tid, now)
            t.confirm(f, now + 0.001)
        del f, key, tid, now
        gc.collect()
        per_flow = (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()
    assert t.confirmed == n and all((f.jslot is not None) == journaled for f in t)
    print(f"flow table{' with its journal' if journaled else ''}: {per_flow:.1f} bytes per confirmed "
          f"IPv4 flow (tracemalloc)")
    assert per_flow <= 300, per_flow


def test_full_table_evicts_oldest_pending_never_confirmed():
    """issue 14 item 3: a flood of pending flows cannot lock new calls out of a full table."""
    t = FlowTable(max_flows=4, max_pending_per_source=100)
    c = t.open(0, sa4(1), 1, 0.0)
    t.confirm(c, 0.0)
    junk = [t.open(0, sa4(10 + i), 1, 1.0 + i) for i in range(3)]
    new = t.open(0, sa4(99), 1, 5.0)                   # full: the oldest pending goes
    assert isinstance(new, Flow) and junk[0].state == REMOVED and t.evicted == 1
    assert t.get(0, junk[0].key) is None and c.state == CONFIRMED
    for f in (junk[1], junk[2], new):
        t.confirm(f, 6.0)
    assert t.open(0, sa4(100), 1, 7.0) is Drop.FLOW_TABLE_FULL   # nothing pending: refuse
    assert len(t) == 4 and t.evicted == 1
    check_invariants(t)


def test_flows_per_session_and_per_transceiver_caps():
    t = FlowTable(max_flows_per_session=2, max_flows_per_transceiver=3, max_pending_per_source=100)
    a = [t.open(0, sa4(i + 1), 1, 0.0, session=b"nonce-A") for i in range(2)]
    assert t.open(0, sa4(3), 1, 0.0, session=b"nonce-A") is Drop.SESSION_FLOWS
    assert t.per_session(b"nonce-A") == 2
    b = t.open(0, sa4(4), 1, 0.0, session=b"nonce-B")
    assert t.open(0, sa4(5), 1, 0.0, session=b"nonce-C") is Drop.TRANSCEIVER_FLOWS
    other = t.open(0, sa4(5), 2, 0.0, session=b"nonce-C")    # another transceiver has room
    assert isinstance(other, Flow) and t.per_transceiver(1) == 3 and t.per_transceiver(2) == 1
    check_invariants(t)
    t.remove(a[0])                          # the session frees a place when a flow goes
    assert isinstance(t.open(0, sa4(6), 1, 0.0, session=b"nonce-A"), Flow)
    t.move(b, 2, 1.0)                       # an ICE restart moves the count with the flow
    assert t.per_transceiver(1) == 2 and t.per_transceiver(2) == 2
    t.expire(100.0)
    assert t._sessions == {} and t._per_tx == {}
    check_invariants(t)


def test_set_limits_applies_to_the_live_table():
    """issue 14 item 6: new caps and lifetimes reach flows that already exist."""
    t = FlowTable(max_pending_per_source=16, pending_ttl=5.0, idle_timeout=30.0)
    pend = [t.open(0, sa4(1, 1000 + i), 1, 0.0) for i in range(4)]
    c = t.open(0, sa4(2), 1, 0.0)
    t.confirm(c, 0.0)
    t.set_limits(max_flows=100, max_pending_per_source=4, pending_ttl=1.0, idle_timeout=2.0)
    assert t.open(0, sa4(1, 2000), 1, 0.5) is Drop.PENDING_PER_SOURCE
    assert t.next_deadline() <= 1.25
    t.expire(1.25)
    assert all(f.state == REMOVED for f in pend) and c.state == CONFIRMED
    t.expire(2.25)
    assert c.state == REMOVED and len(t) == 0
    with pytest.raises(ValueError):
        t.set_limits(max_flows=1, max_pending_per_source=1, pending_ttl=0.0, idle_timeout=1.0)
    check_invariants(t)


def test_snapshot_leaves_out_what_restore_would_refuse():
    t = FlowTable()
    good = t.open(0, sa4("192.0.2.1"), 1, 0.0)
    t.open(0, b"\x01\x02\x03", 1, 0.0)                  # not a sockaddr: must not poison the rest
    t.open(0, sa4("192.0.2.2"), 1 << 40, 0.0)           # id wider than the format
    data = t.snapshot(1.0)
    u = FlowTable()
    assert u.restore(data, 1.0) == 1 and u.get(0, good.key) is not None
