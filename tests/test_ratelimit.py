"""App-level rate limits: the token buckets alone (sans-IO, clock passed in), then
wired into a worker on loopback, where each refusal is its own Drop counter and
nothing at all is sent.
"""

import os
import tracemalloc

import pytest

from edge_relay import ratelimit
from edge_relay.ratelimit import Bucket, FlowMeter, SourceBuckets
from edge_relay.router import Policy
from relayharness import drain
from tests.test_relay import assert_silent, binding_request, open_flow

# -- the buckets --------------------------------------------------------------


def test_bucket_starts_full_refills_at_rate_and_caps_at_burst():
    b = Bucket(rate=4.0, burst=5, now=100.0)
    assert [b.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(100.125)                # half a token
    assert b.take(100.25)                     # one token after 1/rate
    assert not b.take(100.25)
    assert sum(b.take(1000.0) for _ in range(10)) == 5    # long idle: burst, not more


def test_bucket_clock_going_back_adds_nothing():
    b = Bucket(rate=1.0, burst=1, now=10.0)
    assert b.take(10.0)
    assert not b.take(5.0)
    assert not b.take(10.5)
    assert b.take(11.0)


@pytest.mark.parametrize("args", [(0, 1), (-1, 1), (float("inf"), 1), (float("nan"), 1), (1, 0)])
def test_bucket_refuses_bad_numbers(args):
    with pytest.raises(ValueError):
        Bucket(*args)


def test_source_buckets_are_per_key():
    s = SourceBuckets(rate=1.0, burst=2)
    assert [s.take(b"a", 0.0) for _ in range(3)] == [True, True, False]
    assert s.take(b"b", 0.0) and s.take(b"b", 0.0)
    assert not s.take(b"a", 0.5)
    assert s.take(b"a", 1.0)


def test_source_table_is_capped_forgets_refilled_buckets_and_fails_open_to_untracked():
    s = SourceBuckets(rate=1.0, burst=2, max_sources=100)
    for i in range(100):
        assert s.take(i, 0.0)
    assert len(s) == 100
    # Full of busy sources: a newcomer passes untracked (the global bucket still applies).
    assert s.take("new", 0.5)
    assert len(s) == 100 and s.untracked == 1
    # The scan is not repeated for every newcomer while nothing can have refilled.
    assert s.take("new2", 0.6) and s.untracked == 2
    # Once the old buckets have refilled they are forgotten and the newcomer is tracked.
    assert s.take("later", 10.0)
    assert len(s) == 1 and "later" in s.buckets
    for i in range(10_000):            # a spoofer cycling sources never grows the table
        s.take(("spoof", i), 10.0 + i * 1e-4)
    assert len(s) <= 100


def test_source_key_is_ipv4_address_or_ipv6_slash_64():
    from edge_relay import sockaddr
    a = sockaddr.from_tuple(("192.0.2.1", 1000))
    b = sockaddr.from_tuple(("192.0.2.1", 2000))
    assert ratelimit.source_key(a) == ratelimit.source_key(b) == bytes([192, 0, 2, 1])
    c = sockaddr.from_tuple(("2001:db8:1:2::1", 1000))
    d = sockaddr.from_tuple(("2001:db8:1:2:ffff::9", 1000))
    e = sockaddr.from_tuple(("2001:db8:1:3::1", 1000))
    assert ratelimit.source_key(c) == ratelimit.source_key(d) != ratelimit.source_key(e)


def test_flow_meter_caps_each_flow_at_burst_per_window():
    m = FlowMeter(rate=100.0, burst=200)      # window 2 s
    allowed = sum(m.allow(b"flood", 0.0 + i * 1e-5) for i in range(1000))
    assert allowed == 200
    assert m.allow(b"other", 0.5)             # another flow is not affected
    assert m.allow(b"flood", 2.0)             # next window
    # Average over many windows never exceeds rate.
    m = FlowMeter(rate=100.0, burst=200)
    t, allowed = 0.0, 0
    for i in range(100_000):
        t = i * 0.0001                         # 10 kpps for 10 s
        allowed += m.allow(b"k", t)
    assert allowed <= 100 * 10 + 200


def test_flow_meter_never_stops_a_flow_below_half_its_allowance_even_when_cells_collide():
    # Tiny sketch: every key shares both cells with the flood.
    m = FlowMeter(rate=100.0, burst=200, cells=1)
    for i in range(5000):
        m.allow(b"flood", i * 1e-5)
    assert sum(m.allow(b"voice", 0.1 + i * 0.02) for i in range(95)) == 95   # < burst/2 in the window
    assert not m.allow(b"flood", 1.0)


def test_flow_meter_voice_flows_pass_and_keep_no_per_flow_state():
    m = FlowMeter(rate=1000.0, burst=2000)
    keys = [os.urandom(16) for _ in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for tick in range(20):                 # 50 packets/s each for 0.4 s
            now = tick * 0.02
            for k in keys:
                assert m.allow(k, now)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert m.heavy == {}
    # Fixed cost: the sketch (512 KiB, allocated up front); nothing per flow.
    print(f"flow meter growth for 20k voice flows: {grown} bytes")
    assert grown < 20_000      # i.e. < 1 byte per flow


def test_flow_meter_memory_is_bounded_by_flows_that_are_heavy():
    m = FlowMeter(rate=10.0, burst=20)
    for i in range(5000):
        for _ in range(15):
            m.allow(i, 0.0)
    assert len(m.heavy) <= 5000
    m.allow(0, 100.0)                          # the window advances: everything reset
    assert len(m.heavy) == 0


class ExactBucket:
    """The token bucket SourceBuckets keeps per key, in exact arithmetic: the reference."""

    def __init__(self, rate, burst, now):
        from fractions import Fraction
        self.rate, self.burst = Fraction(rate), Fraction(burst)
        self.tokens, self.stamp = self.burst, Fraction(now)

    def take(self, now):
        from fractions import Fraction
        now = Fraction(now)
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def full(self, now):
        from fractions import Fraction
        return self.tokens + (Fraction(now) - self.stamp) * self.rate >= self.burst


@pytest.mark.parametrize("rate, burst", [(1.0, 1), (4.0, 3), (0.5, 2), (64.0, 40), (1024.0, 7)])
def test_source_buckets_are_exact_token_buckets(rate, burst):
    """One float per key (full_at) answers as a [tokens, stamp] bucket would, on every take."""
    import random
    rng = random.Random(int(rate * 10 + burst))
    s = SourceBuckets(rate=rate, burst=burst, max_sources=10**6)
    ref = {}
    now = 0.0
    for _ in range(3000):
        now += rng.choice((0, 0, 1, 1, 2, 5, 64, 300)) / 256     # dyadic: exact in floats
        k = rng.randrange(6)
        if k not in ref:
            ref[k] = ExactBucket(rate, burst, now)
        assert s.take(k, now) == ref[k].take(now), (k, now)
        if rng.random() < 0.05:
            s.expire(now, budget=2)
            assert all(ref[k].full(now) for k in ref if k not in s.buckets)


def test_source_buckets_burst_at_one_instant_despite_float_rounding():
    s = SourceBuckets(rate=20.0, burst=40)            # 1/20 is not exact in binary
    assert [s.take("a", 5.0) for _ in range(41)] == [True] * 40 + [False]
    assert [s.take("a", 6.0) for _ in range(21)] == [True] * 20 + [False]
    assert [s.take("b", 0.1 * i) for i in range(1, 200)].count(False) == 0    # 10/s under 20/s


def test_source_buckets_expire_forgets_only_refilled_buckets_with_bounded_work_per_call():
    s = SourceBuckets(rate=10.0, burst=4, max_sources=10**6)     # refills in 0.4 s
    for i in range(1000):
        assert s.take(i, 0.0)
    for i in range(0, 1000, 2):             # the even sources are busier: empty at 0.0
        for _ in range(3):
            s.take(i, 0.0)
    assert s.expire(0.0) == 0 and len(s) == 1000
    # at 0.35 s the odd ones (3 tokens + 3.5) are full, the even ones (0 + 3.5) are not
    forgotten, calls = 0, 0
    while True:
        calls += 1
        forgotten += s.expire(0.35, budget=64)
        if s._pass is None:
            break
    assert calls == (1000 + 63) // 64
    assert forgotten == 500 and sorted(s.buckets) == list(range(0, 1000, 2))
    # the survivors keep their state: an even source still has 3.5 tokens
    assert [s.take(0, 0.35) for _ in range(4)] == [True, True, True, False]
    # keys added during a pass wait for the next one; keys gone meanwhile are skipped
    assert s.expire(0.6, budget=100) == 99           # 0 was taken from at 0.35: 3 of 4 tokens at 0.6
    s.take("new", 0.6)
    del s.buckets[498]
    while s._pass is not None:
        s.expire(0.6, budget=100)
    assert set(s.buckets) == {0, "new"}
    while True:                                       # next pass: both full at 2.0
        s.expire(2.0)
        if s._pass is None:
            break
    assert len(s) == 0 and s.expire(2.0) == 0 and s._pass is None


def test_source_buckets_give_their_memory_back_once_a_burst_of_sources_has_refilled():
    import sys
    s = SourceBuckets(rate=10.0, burst=4, max_sources=10**6)      # refills in 0.4 s
    for i in range(50_000):
        assert s.take(i.to_bytes(4, "big"), 0.0)
    peak = sys.getsizeof(s.buckets)
    assert s.take(b"late", 0.35)                          # not refilled at the pass's end
    for _ in range(50_000 // 4096 + 2):                   # one pass, bounded work per call
        s.expire(0.42)
    assert s._pass is None and list(s.buckets) == [b"late"]
    assert sys.getsizeof(s.buckets) < peak // 100
    assert s.buckets[b"late"] == pytest.approx(0.35 + 0.1)   # the survivor keeps its bucket (one token taken)


def test_source_buckets_expire_matches_the_full_sweep():
    import random
    rng = random.Random(3)
    a = SourceBuckets(rate=5.0, burst=3, max_sources=10**6)
    b = SourceBuckets(rate=5.0, burst=3, max_sources=10**6)
    now = 0.0
    for step in range(50):
        now += rng.random() * 0.3
        for _ in range(rng.randrange(200)):
            k = rng.randrange(500)
            assert a.take(k, now) == b.take(k, now)
        while True:
            a.expire(now, budget=rng.randrange(1, 300))
            if a._pass is None:
                break
        b._next_sweep = -float("inf")
        b._sweep(now)                 # the full sweep the table does when full
        assert a.buckets == b.buckets, step


def test_policy_from_limits_carries_every_rate_key():
    from edge_relay import config
    cfg = config.parse({"listeners": [{"address": "127.0.0.1"}],
                        "transceivers": [{"id": 1, "address": "127.0.0.1", "port": 9}],
                        "limits": {"new_flows_rate": 5.0, "flow_packets_burst": 7}}, ".")
    p = Policy.from_limits(cfg.limits)
    assert p.rates["new_flows_rate"] == 5.0 and p.rates["flow_packets_burst"] == 7
    assert set(p.rates) == set(ratelimit.CONFIG_KEYS)
    with pytest.raises(TypeError):
        Policy(2.0, 1.0, 1.0, no_such_rate=1)


# -- wired into the router: each refusal counted, nothing sent ----------------

@pytest.fixture(params=["mmsg", "plain"])
def make(make_harness, request):
    clock = [1000.0]

    def factory(limits=None, **kw):
        kw.setdefault("io_mode", request.param)
        kw.setdefault("transceivers", {1: "sink"})
        h = make_harness(limits=limits, clock=lambda: clock[0], **kw)
        # The worker builds its Policy from three numbers only (worker.policy_of);
        # give the router the whole limits section as a worker should.
        h.router.configure(h.keyring, h.router.transceivers, Policy.from_limits(h.cfg.limits))
        h.clock = clock
        return h
    return factory


def test_per_source_new_flow_rate(make):
    h = make(limits={"new_flows_per_source_rate": 1.0, "new_flows_per_source_burst": 2,
                     "max_pending_per_source": 100})
    clients = [h.client() for _ in range(4)]     # one source IP, four ports
    for c in clients:
        ufrag, _ = h.session()
        c.sendto(binding_request(ufrag), h.public)
    h.settle()
    assert len(drain(h.sinks[1])) == 2
    assert_silent(h, *clients)
    assert h.drops() == {"RATE_SOURCE_NEW_FLOWS": 2}
    assert len(h.router.flows) == 2
    h.clock[0] += 1.0                               # one token back
    ufrag, _ = h.session()
    clients[2].sendto(binding_request(ufrag), h.public)
    h.settle()
    assert len(drain(h.sinks[1])) == 1
    assert h.drops() == {"RATE_SOURCE_NEW_FLOWS": 2}


def test_per_source_limit_applies_before_token_verification(make):
    h = make(limits={"new_flows_per_source_rate": 1.0, "new_flows_per_source_burst": 1})
    c = h.client()
    for _ in range(5):
        c.sendto(binding_request("x" * 40), h.public)     # bad token
    h.settle()
    assert_silent(h, c)
    d = h.drops()
    assert d.get("RATE_SOURCE_NEW_FLOWS") == 4 and sum(d.values()) == 5


def test_global_new_flow_rate_counts_only_verified_tokens(make):
    h = make(limits={"new_flows_rate": 1.0, "new_flows_burst": 2})
    sources = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
    clients = [h.client(s) for s in sources]
    forged = h.client("127.0.0.5")
    for _ in range(3):
        forged.sendto(binding_request("A" * 40), h.public)     # forged: never spends the global budget
    for c in clients:
        ufrag, _ = h.session()
        c.sendto(binding_request(ufrag), h.public)
    h.settle()
    assert len(drain(h.sinks[1])) == 2
    assert_silent(h, *clients, forged)
    d = h.drops()
    assert d["RATE_GLOBAL_NEW_FLOWS"] == 2
    assert "RATE_SOURCE_NEW_FLOWS" not in d
    assert len(h.router.flows) == 2


def test_per_flow_packet_rate(make):
    h = make(limits={"flow_packets_rate": 10.0, "flow_packets_burst": 4})
    c = h.client()
    open_flow(h, c)
    for i in range(10):
        c.sendto(b"\x80" + bytes([i]) * 20, h.public)
    h.settle()
    assert len(drain(h.sinks[1])) == 4
    assert_silent(h, c)
    assert h.drops() == {"RATE_FLOW_PACKETS": 6}
    h.clock[0] += 1.0                                 # next window
    c.sendto(b"\x80again", h.public)
    h.settle()
    assert len(drain(h.sinks[1])) == 1


def test_per_flow_cap_leaves_other_flows_alone(make):
    h = make(limits={"flow_packets_rate": 10.0, "flow_packets_burst": 4})
    flood, voice = h.client(), h.client("127.0.0.2")
    open_flow(h, flood)
    open_flow(h, voice)
    for _ in range(50):
        flood.sendto(b"\x80flood", h.public)
    voice.sendto(b"\x80voice", h.public)
    h.settle()
    got = [d for d, _ in drain(h.sinks[1])]
    assert sum(d.endswith(b"voice") for d in got) == 1
    assert h.drops() == {"RATE_FLOW_PACKETS": 46}


def test_reload_with_same_numbers_keeps_bucket_state(make):
    h = make(limits={"new_flows_per_source_rate": 1.0, "new_flows_per_source_burst": 1})
    limits = h.router.limits
    h.router.configure(h.keyring, h.router.transceivers, Policy.from_limits(h.cfg.limits))
    assert h.router.limits is limits
    h.router.configure(h.keyring, h.router.transceivers, Policy())
    assert h.router.limits is not limits
