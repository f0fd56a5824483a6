"""Tests for edge_relay/probes.py: scheduling, ack validation, RTT, hysteresis, failover."""

import itertools

import pytest

from edge_relay import probes
from edge_relay.histogram import Histogram
from edge_relay.probes import PAYLOAD_LEN, Prober, State


def counter_random():
    c = itertools.count()
    return lambda n: next(c).to_bytes(n, "big")


def make(ids=(1, 2), **kw):
    kw.setdefault("random", counter_random())
    return Prober(ids, **kw)


def run(p, until, step=0.01, answer=lambda tid: True, rtt=0.002, t=0.0):
    """Drive the prober from t to `until`; transceivers for which answer(tid) echo after rtt."""
    in_flight = []
    while t < until:
        for tid, payload in p.due(t):
            if answer(tid):
                in_flight.append((t + rtt, tid, payload))
        for item in [x for x in in_flight if x[0] <= t]:
            in_flight.remove(item)
            p.ack(item[1], item[2], t)
        t = round(t + step, 6)
    return t


def test_initial_state_is_up_and_first_probes_are_due_at_once():
    p = make()
    assert p.is_up(1) and p.is_up(2) and p.is_up(99)   # unknown ids count as up
    sent = p.due(0.0)
    assert sorted(tid for tid, _ in sent) == [1, 2]
    assert all(len(payload) == PAYLOAD_LEN for _, payload in sent)
    assert p.due(0.0) == []                 # nothing more until the interval passes
    assert p.next_deadline() is not None


def test_payloads_are_unique_and_carry_a_nonce():
    p = Prober([1], interval=0.25)         # real os.urandom
    payloads = [pl for t in range(50) for _, pl in p.due(t * 0.25)]
    assert len(set(payloads)) == 50
    assert len({pl[16:] for pl in payloads}) == 50


def test_ack_validation():
    p = make([1])
    (tid, payload), = p.due(0.0)
    forged = payload[:-1] + bytes([payload[-1] ^ 1])
    assert not p.ack(1, forged, 0.001)                  # wrong nonce
    assert not p.ack(2, payload, 0.001)                 # unknown transceiver
    assert not p.ack(1, payload[:-1], 0.001)            # wrong length
    assert not p.ack(1, memoryview(b"x" * PAYLOAD_LEN), 0.001)
    assert p.ack(1, memoryview(payload), 0.004)         # memoryview accepted
    assert not p.ack(1, payload, 0.005)                 # answered once only (replay)
    h = p.health[1]
    assert h.bad_acks == 4 and h.acked == 1
    assert h.srtt == pytest.approx(0.004) and h.rttvar == pytest.approx(0.002)
    assert h.histogram.count == 1


def test_rtt_ewma_follows_rfc6298():
    p = make([1], interval=0.1)
    srtt = rttvar = None
    for i, rtt in enumerate([0.010, 0.020, 0.010, 0.030, 0.010]):
        t = i * 0.1
        (_, payload), = p.due(t)
        assert p.ack(1, payload, t + rtt)
        if srtt is None:
            srtt, rttvar = rtt, rtt / 2
        else:
            rttvar = 0.75 * rttvar + 0.25 * abs(srtt - rtt)
            srtt = 0.875 * srtt + 0.125 * rtt
        assert p.health[1].srtt == pytest.approx(srtt)
        assert p.health[1].rttvar == pytest.approx(rttvar)
    assert p.rto(p.health[1]) == pytest.approx(max(0.05, srtt + 4 * rttvar))


def test_down_after_three_misses_up_after_two_answers_with_events():
    p = make([1, 2], interval=0.25)
    alive = {1: True, 2: True}
    t = run(p, 1.0, answer=lambda tid: alive[tid])
    assert p.take_events() == []
    alive[1] = False
    t_dead = t
    t = run(p, t + 3.0, answer=lambda tid: alive[tid], t=t)
    events = p.take_events()
    assert [(e.transceiver, e.state) for e in events] == [(1, State.DOWN)]
    assert events[0].reason == "3 probes missed"
    # detection within down_after intervals plus one timeout (adaptive, min 0.05)
    assert events[0].at - t_dead <= 3 * 0.25 + 0.05 + 0.02
    assert not p.is_up(1) and p.is_up(2)
    alive[1] = True
    t = run(p, t + 1.0, answer=lambda tid: alive[tid], t=t)
    events = p.take_events()
    assert [(e.transceiver, e.state, e.reason) for e in events] == [(1, State.UP, "2 probes answered")]
    assert p.health[1].transitions == 2


def test_hysteresis_single_misses_do_not_flap():
    p = make([1], interval=0.25)
    n = itertools.count()
    # every third probe lost: never three in a row
    run(p, 10.0, answer=lambda tid: next(n) % 3 != 0)
    assert p.take_events() == [] and p.is_up(1)
    assert p.health[1].lost > 5


def test_late_ack_feeds_rtt_but_not_success():
    p = make([1], interval=0.25, timeout=0.1)
    (_, payload), = p.due(0.0)
    p.due(0.15)                             # times out: a miss
    assert p.health[1].misses == 1
    assert p.ack(1, payload, 0.2)           # late but remembered
    h = p.health[1]
    assert h.late == 1 and h.acked == 0 and h.misses == 1 and h.srtt == pytest.approx(0.2)
    # after max_timeout the probe is forgotten
    (_, payload2), = p.due(0.25)
    p.due(1.3)
    assert not p.ack(1, payload2, 1.31)
    assert len(h.outstanding) <= 2


def test_outstanding_probes_stay_bounded_when_dead():
    p = make([1], interval=0.25, max_timeout=1.0)
    run(p, 30.0, answer=lambda tid: False)
    assert len(p.health[1].outstanding) <= int(1.0 / 0.25) + 1
    assert not p.is_up(1)
    assert [e.state for e in p.take_events()] == [State.DOWN]   # one transition, not one per miss


def test_route_for_backups_and_chains():
    p = make([1, 2, 3], interval=0.25)
    backups = {1: 2, 2: 3, 3: 1}
    assert p.route_for(1, backups) == (1, False)
    p.health[1].up = False
    assert p.route_for(1, backups) == (2, True)
    p.health[2].up = False
    assert p.route_for(1, backups) == (3, True)          # chain followed
    p.health[3].up = False
    assert p.route_for(1, backups) == (1, False)         # cycle stopped, nothing up
    assert p.route_for(7, backups) == (7, False)         # unknown: up
    p.health[2].up = True
    assert p.route_for(1, {}) == (1, False)              # no backup configured


def test_next_deadline_covers_timeouts():
    p = make([1], interval=0.25, timeout=0.1)
    p.due(0.0)
    assert p.next_deadline() == pytest.approx(0.1)
    p.due(0.1)
    assert p.health[1].misses == 1
    assert p.next_deadline() == pytest.approx(0.25)


def test_set_transceivers_keeps_state():
    p = make([1, 2])
    p.health[1].up = False
    p.set_transceivers([1, 3], 5.0)
    assert set(p.health) == {1, 3} and not p.is_up(1) and p.is_up(3)


def test_bad_parameters():
    with pytest.raises(ValueError):
        Prober([1], interval=0)
    with pytest.raises(ValueError):
        Prober([1], timeout=2.0, max_timeout=1.0)


def test_render_has_bounded_series():
    p = make([1, 2])
    run(p, 2.0)
    text = "\n".join(p.render({1: "alpha"}))
    assert 'edge_relay_transceiver_up{transceiver="alpha"} 1' in text
    assert 'edge_relay_transceiver_up{transceiver="tx2"} 1' in text
    assert 'edge_relay_transceiver_rtt_seconds_bucket{transceiver="alpha",le="+Inf"}' in text
    assert text.count("_bucket{") == 2 * (len(probes.RTT_BUCKETS) + 1)


def test_histogram_words_roundtrip():
    h = Histogram([0.1, 1])
    for v in (0.05, 0.1, 0.5, 3, float("nan")):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    g = Histogram([0.1, 1])
    g.add_words(h.to_words())
    g.add_words(h.to_words())
    assert g.counts == [4, 2, 2] and g.sum == pytest.approx(2 * 3.65)
    with pytest.raises(ValueError):
        Histogram([1, 1])
