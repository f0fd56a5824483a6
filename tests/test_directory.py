"""Tests for edge_relay/directory.py: keys, held-packet bounds, timeouts, and a round trip through Redis."""

import time

import pytest

from edge_relay import directory, resp, sockaddr
from edge_relay.directory import Directory, Hold, flow_key
from redisserver import drive, redis_server

SA1 = sockaddr.from_tuple(("192.0.2.1", 5000))
SA2 = sockaddr.from_tuple(("192.0.2.2", 5000))
SA6 = sockaddr.from_tuple(("2001:db8::1", 443))


def sa(i):
    return sockaddr.from_tuple((f"10.0.{i // 256}.{i % 256}", 4000))


def test_flow_key_format():
    assert flow_key(0, SA1) == b"edge-relay:flow:0:041388c0000201"
    assert flow_key(3, SA6) == b"edge-relay:flow:3:0601bb20010db8000000000000000000000001"
    # an IPv4-mapped address on a dual-stack socket names the same flow
    mapped = sockaddr.from_fields(4, (5000).to_bytes(2, "big"), bytes([192, 0, 2, 1]) + bytes(12),
                                  sockaddr.socket.AF_INET6)
    assert flow_key(0, mapped) == flow_key(0, SA1)
    assert flow_key(0, SA1, prefix=b"p:") == b"p:0:041388c0000201"


def test_decode_value():
    assert directory.decode_value(b"17") == 17
    assert directory.decode_value(b"65535") == 65535
    for bad in (b"65536", b"", b"-1", b"1a", b"123456", "17", 17, None, [b"1"]):
        assert directory.decode_value(bad) is None


def test_publish_and_unpublish_commands():
    d = Directory(ttl=30)
    assert d.publish(0, SA1, 17) == ("SET", flow_key(0, SA1), b"17", "EX", 30)
    assert d.unpublish(0, SA1) == ("DEL", flow_key(0, SA1))
    assert resp.encode_command(*d.publish(0, SA1, 17)).startswith(b"*5\r\n$3\r\nSET\r\n")


def test_hold_then_hit_releases_packets_in_order():
    d = Directory(timeout=0.1)
    status, lk = d.hold(0, SA1, memoryview(b"p1"), 1.0)
    assert status == Hold.LOOKUP and lk.command == ("GET", flow_key(0, SA1))
    assert d.hold(0, SA1, b"p2", 1.01) == (Hold.HELD, None)
    assert d.held_total == 2 and d.next_deadline() == pytest.approx(1.1)
    r = d.resolved(lk, b"7", 1.02)
    assert r.transceiver == 7 and r.packets == [b"p1", b"p2"] and r.reason == "hit"
    assert r.listener == 0 and r.sa == SA1
    assert d.held_total == 0 and d.lookups == {} and d.next_deadline() is None
    assert d.resolved(lk, b"7", 1.03) is None          # answered once


def test_miss_is_remembered_for_negative_ttl():
    d = Directory(negative_ttl=1.0)
    _, lk = d.hold(0, SA1, b"x", 0.0)
    r = d.resolved(lk, None, 0.01)
    assert r.transceiver is None and r.reason == "miss" and r.packets == [b"x"]
    assert d.hold(0, SA1, b"y", 0.5) == (Hold.DROP_NEGATIVE, None)
    assert d.hold(0, SA1, b"y", 1.2)[0] == Hold.LOOKUP      # forgotten after negative_ttl
    # a publish for the address forgets the negative entry at once
    d2 = Directory()
    _, lk = d2.hold(0, SA2, b"x", 0.0)
    d2.resolved(lk, None, 0.0)
    d2.publish(0, SA2, 3)
    assert d2.hold(0, SA2, b"y", 0.1)[0] == Hold.LOOKUP


def test_errors_and_invalid_values():
    d = Directory()
    _, lk = d.hold(0, SA1, b"x", 0.0)
    assert d.resolved(lk, resp.Disconnected("down"), 0.0).reason == "error"
    assert d.hold(0, SA1, b"x", 0.0)[0] == Hold.LOOKUP      # errors are not cached
    r = d.resolved(d.lookups[flow_key(0, SA1)], b"not-a-number", 0.0)
    assert r.reason == "invalid" and r.transceiver is None


def test_timeout_drops_and_ignores_late_reply():
    d = Directory(timeout=0.1)
    _, lk = d.hold(0, SA1, b"x", 0.0)
    assert d.expire(0.05) == []
    (r,) = d.expire(0.1)
    assert r.reason == "timeout" and r.packets == [b"x"] and d.held_total == 0
    assert d.resolved(lk, b"5", 0.2) is None
    assert d.stats["late_replies"] == 1 and d.stats[directory.Result.TIMEOUT] == 1
    # a new lookup for the same address is not confused by the old one's reply
    _, lk2 = d.hold(0, SA1, b"y", 0.3)
    assert d.resolved(lk, b"5", 0.31) is None
    assert d.resolved(lk2, b"6", 0.32).transceiver == 6


def test_bounds():
    d = Directory(max_held_per_flow=2, max_held_total=5, max_lookups=3)
    assert d.hold(0, SA1, b"1", 0)[0] == Hold.LOOKUP
    assert d.hold(0, SA1, b"2", 0)[0] == Hold.HELD
    assert d.hold(0, SA1, b"3", 0)[0] == Hold.DROP_FLOW_FULL
    assert d.hold(0, sa(1), b"1", 0)[0] == Hold.LOOKUP
    assert d.hold(0, sa(2), b"1", 0)[0] == Hold.LOOKUP
    assert d.hold(0, sa(3), b"1", 0)[0] == Hold.DROP_LOOKUPS_FULL
    assert d.hold(0, sa(1), b"2", 0)[0] == Hold.HELD
    assert d.hold(0, sa(2), b"2", 0)[0] == Hold.DROP_TOTAL_FULL
    assert d.held_total == 5 and len(d.lookups) == 3
    assert d.stats[Hold.DROP_FLOW_FULL] == d.stats[Hold.DROP_LOOKUPS_FULL] == d.stats[Hold.DROP_TOTAL_FULL] == 1


def test_negative_cache_is_bounded():
    d = Directory(max_negative=10, max_lookups=1000)
    for i in range(100):
        _, lk = d.hold(0, sa(i), b"x", 0.0)
        d.resolved(lk, None, 0.0)
    assert len(d.negative) == 10
    d.expire(5.0)
    assert d.negative == {}


def test_refresh_is_paced():
    d = Directory(ttl=30)
    flows = [(0, sa(i), i % 3) for i in range(1000)]
    calls = []

    def snapshot():
        calls.append(1)
        return list(flows)

    batches = [d.refresh(snapshot, 0.0, budget=300) for _ in range(5)]
    assert [len(b) for b in batches] == [300, 300, 300, 100, 0]
    assert len(calls) == 1
    assert d.refresh(snapshot, 9.9) == []              # next sweep after ttl / 3
    assert len(d.refresh(snapshot, 10.0, budget=2000)) == 1000 and len(calls) == 2


def test_two_relays_share_flows_through_redis(tmp_path):
    """Relay A publishes its confirmed flows; relay B, which never saw them, finds them."""
    with redis_server(tmp_path, tcp=True) as server:
        a_client = resp.Client(server.address, timeout=1.0)
        b_client = resp.Client(server.address, timeout=1.0)
        a, b = Directory(ttl=5), Directory(ttl=5, timeout=1.0)
        acks = []
        now = time.monotonic()
        for i in range(50):
            assert a_client.call(a.publish(0, sa(i), 100 + i), acks.append, now)
        drive(a_client, lambda: len(acks) == 50)
        assert acks == ["OK"] * 50

        resolutions = []
        now = time.monotonic()
        for i in list(range(50)) + [999]:          # 999: unknown to the directory
            for n in range(3):
                status, lk = b.hold(0, sa(i), b"pkt%d" % n, now)
                if status == Hold.LOOKUP:
                    assert b_client.call(lk.command,
                                         lambda r, lk=lk: resolutions.append(b.resolved(lk, r, time.monotonic())),
                                         now)
                else:
                    assert status == Hold.HELD
        drive(b_client, lambda: len(resolutions) == 51)
        got = {r.sa: (r.transceiver, r.packets) for r in resolutions}
        for i in range(50):
            assert got[sa(i)] == (100 + i, [b"pkt0", b"pkt1", b"pkt2"])
        assert got[sa(999)] == (None, [b"pkt0", b"pkt1", b"pkt2"])
        assert b.stats[directory.Result.HIT] == 50 and b.stats[directory.Result.MISS] == 1
        assert b.held_total == 0

        # the entry carries the TTL
        ttl = []
        b_client.call(("TTL", flow_key(0, sa(0))), ttl.append, time.monotonic())
        drive(b_client, lambda: ttl)
        assert 0 < ttl[0] <= 5
        a_client.close()
        b_client.close()


# -- demo/state.py: the demo transceiver's shared session state ------------------------

def test_demo_state_primary_and_backup_share_a_session(tmp_path):
    from edge_relay.demo.state import DemoState, MediaCounters
    with redis_server(tmp_path) as server:
        primary = DemoState(server.address, ttl=60)
        backup = DemoState(server.address, ttl=60)
        primary.put_session("ufragA", "pw-A", owner="1")
        counters = MediaCounters(primary, "ufragA", interval=0.2)
        counters.add(0.0, rtp_in=1, bytes_in=100)          # first add flushes
        counters.add(0.1, rtp_in=1, bytes_in=100)          # batched
        assert counters.flush(0.3) == {"rtp_in": 2, "bytes_in": 200}
        assert counters.flush(0.4) == {}
        # the primary dies; the backup picks the session up
        assert backup.password("ufragA") == "pw-A"
        assert backup.password("nope") is None
        assert backup.claim("ufragA", "2") == "1"
        assert backup.add_media("ufragA", {"rtp_in": 5}) == {"rtp_in": 7}
        assert backup.media("ufragA") == {"rtp_in": 7, "bytes_in": 200}
        assert backup.media("nope") == {}
        # a broken connection is reopened once
        server.stop()
        server.start()
        assert backup.password("ufragA") is None              # fresh server, no persistence
        primary.close()
        backup.close()
    with pytest.raises(resp.RespError):
        DemoState(str(tmp_path / "gone.sock")).password("x")
