"""Tests for edge_relay/quality.py: RFC 3550 A.1 sequence tracking, A.8 jitter, sampling, export.

Reference: RFC 3550 appendix A.1 (https://www.rfc-editor.org/rfc/rfc3550#appendix-A.1)
and A.8 (https://www.rfc-editor.org/rfc/rfc3550#appendix-A.8).
"""

import random
import struct
import tracemalloc

import pytest

from edge_relay import quality
from edge_relay.quality import CLIENT, TRANSCEIVER, QualityMonitor, StreamStats, is_rtp, observe


def rtp(seq, ts, pt=111, ssrc=0x1234, marker=0, payload=b"\x00" * 20):
    return struct.pack(">BBHII", 0x80, (marker << 7) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def feed(seqs, st=None, t0=0.0):
    st = st or StreamStats()
    for i, s in enumerate(seqs):
        assert observe(st, rtp(s, s * 960), t0 + i * 0.02)
    return st


def test_is_rtp_rfc5761():
    assert is_rtp(rtp(1, 1))
    assert is_rtp(bytes([0x80, 0x6F]))                  # PT 111
    assert is_rtp(bytes([0x80, 0x80 | 0x6F]))           # PT 111 with marker
    assert is_rtp(bytes([0x80, 64]))                    # PT 64 without marker: RTP
    for rtcp_type in (200, 201, 202, 203, 204, 205, 206, 207, 192, 223):
        assert not is_rtp(bytes([0x80, rtcp_type]))     # SR, RR, SDES, BYE, APP, RTPFB, PSFB...
    assert is_rtp(bytes([0x80, 224]))                   # PT 96 with marker
    assert not is_rtp(bytes([0x00, 0x01]))              # STUN
    assert not is_rtp(bytes([22, 0xFE]))                # DTLS
    assert not is_rtp(b"\x80")
    assert not is_rtp(bytes([0x40, 0x6F]))              # version 1


def test_in_order_stream_no_loss():
    st = feed(range(100, 200))
    # probation: the first packet is not counted, base is the second
    assert st.expected == 99 and st.received == 99 and st.lost == 0
    assert st.reordered == 0 and st.duplicates == 0


def test_sequence_wrap():
    st = feed([(65500 + i) % 65536 for i in range(100)])
    assert st.cycles == 65536
    assert st.extended_max == 65536 + (65500 + 99) % 65536
    assert st.expected == 99 and st.lost == 0


def test_loss_counting():
    seqs = [s for s in range(1, 1001) if s % 10 != 5]    # 100 lost
    st = feed(seqs)
    assert st.expected == 999 and st.lost == 100


def test_loss_across_wrap():
    seqs = [s % 65536 for s in range(65000, 66000) if s not in (65535, 65536, 65537)]
    st = feed(seqs)
    assert st.lost == 3 and st.cycles == 65536


def test_reorder_is_not_loss():
    seqs = list(range(1, 101))
    seqs[50], seqs[51] = seqs[51], seqs[50]
    seqs[70], seqs[73] = seqs[73], seqs[70]
    st = feed(seqs)
    # 51 after 52; 72, 73, 71 after 74: four packets arrived after a higher one
    assert st.lost == 0 and st.reordered == 4 and st.duplicates == 0


def test_duplicates_not_counted_as_received():
    seqs = list(range(1, 51)) + [50, 49, 30] + list(range(51, 101))
    st = feed(seqs)
    assert st.duplicates == 3 and st.lost == 0 and st.reordered == 0
    assert st.received == st.expected == 99


def test_large_jump_resyncs_after_two_sequential():
    st = feed(list(range(1, 51)))
    before = st.received
    # one stray far-away packet is ignored ...
    assert observe(st, rtp(40000, 0), 10.0)
    assert st.received == before and st.max_seq == 50
    # ... two sequential ones mean the sender restarted: re-sync (A.1)
    assert observe(st, rtp(30000, 0), 10.1)
    assert observe(st, rtp(30001, 0), 10.2)
    assert st.base_seq == 30001 and st.max_seq == 30001 and st.lost == 0


def test_new_ssrc_restarts():
    st = feed(list(range(1, 51)))
    for i, s in enumerate(range(9000, 9010)):
        observe(st, rtp(s, s * 960, ssrc=0x9999), 5 + i * 0.02)
    assert st.ssrc == 0x9999 and st.base_seq == 9001 and st.lost == 0


def test_not_rtp_leaves_state_alone():
    st = StreamStats()
    assert not observe(st, bytes([0x80, 200]) + bytes(26), 0.0)   # RTCP SR
    assert not observe(st, rtp(1, 1)[:11], 0.0)                   # short
    assert not observe(st, memoryview(b"\x16\xfe\xfd" + bytes(20)), 0.0)
    assert st.packets == 0 and st.max_seq is None


def test_jitter_zero_for_perfect_pacing_and_wraps():
    st = StreamStats()
    ts0 = 2**32 - 960 * 50           # timestamps wrap mid-stream
    for i in range(200):
        observe(st, rtp(i, ts0 + i * 960), 100.0 + i * 0.02)
    assert st.jitter == pytest.approx(0.0, abs=1e-9)


def test_jitter_converges_to_known_value():
    # Arrival = send time + uniform delay in [0, a]: |D| = |X1 - X2| for two
    # independent uniforms has mean a/3, and the A.8 estimator converges to it.
    rng = random.Random(7)
    a = 0.030
    st = StreamStats()
    values = []
    for i in range(20000):
        observe(st, rtp(i, i * 960), i * 0.02 + rng.uniform(0, a))
        if i > 1000:
            values.append(st.jitter)
    mean = sum(values) / len(values)
    assert mean == pytest.approx(a / 3, rel=0.05)


def test_jitter_uses_clock_rate_per_payload_type():
    st = StreamStats()
    rates = {0: 8000}
    for i in range(100):   # PCMU at 8 kHz, 160 samples per 20 ms, perfectly paced
        observe(st, rtp(i, i * 160, pt=0), i * 0.02, rates)
    assert st.jitter == pytest.approx(0.0, abs=1e-9)
    st2 = StreamStats()
    for i in range(100):   # same stream read with the default 48 kHz: looks jittery
        observe(st2, rtp(i, i * 160, pt=0), i * 0.02)
    assert st2.jitter > 0.01


def test_monitor_samples_one_in_n_and_caps():
    m = QualityMonitor(sample_every=4, max_sampled=3)
    got = [m.start(("f", i), 0.0, 0.0) for i in range(20)]
    assert [i for i, q in enumerate(got) if q] == [0, 4, 8]        # cap 3
    m.end(("f", 0), 1.0)
    assert m.start(("f", 100), 0.0, 0.0) is not None   # 21st flow: a 1-in-4 slot, room again
    assert m.start(("f", 101), 0.0, 0.0) is None
    assert m.start(("f", 102), 0.0, 0.0) is None
    assert m.start(("f", 103), 0.0, 0.0) is None


def test_monitor_aggregates_into_bounded_histograms():
    m = QualityMonitor(sample_every=1, report_interval=1.0)
    for f in range(10):
        q = m.start(f, first_stun=0.0, now=0.3)
        for i in range(100):
            if f % 2 and i % 10 == 3:
                continue   # odd flows lose 10%
            m.observe(q.client, rtp(i, i * 960), 0.5 + i * 0.02)
            m.observe(q.transceiver, rtp(i, i * 960, ssrc=7), 0.6 + i * 0.02)
    m.report(2.6)
    for f in range(10):
        m.end(f, 3.0)
    assert m.flows == {}
    c = m.dirs[CLIENT]
    assert c.loss.count == 10 and c.loss.counts[0] == 5          # five loss-free flows
    assert c.lost == 5 * 10 and c.expected == 5 * 99 + 5 * 99
    assert c.ttfm.count == 10 and c.ttfm.sum == pytest.approx(10 * 0.5)
    assert m.dirs[TRANSCEIVER].ttfm.sum == pytest.approx(10 * 0.6)
    text = "\n".join(m.render())
    assert 'edge_relay_flow_jitter_seconds_bucket{direction="client",le="+Inf"} 10' in text
    assert 'edge_relay_rtp_lost_total{direction="client"} 50' in text
    # cardinality: fixed whatever the number of flows
    assert text.count("\n") == len("\n".join(QualityMonitor().render()).split("\n")) - 1


def test_stream_stats_memory_is_small():
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    objs = [quality.FlowQuality(0.0, 0.0) for _ in range(1000)]
    for q in objs:
        for i in range(3):
            observe(q.client, rtp(i, i * 960), i * 0.02)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per_flow = sum(s.size_diff for s in after.compare_to(before, "filename")) / len(objs)
    assert per_flow < 800, per_flow
