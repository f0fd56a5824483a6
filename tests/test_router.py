"""router.Router unit tests, without sockets: batches go through memio (batch.py's contract in memory).

Each test drives the router the way worker.py does: a MemIO endpoint for the
listener and one for the internal socket, recv() into views, a from_clients /
from_transceivers call, then send() of the router's Outbox with the receiving
endpoint as `src` (memio checks every origin the router wrote). Transceivers
and clients are MemIO endpoints too, so what arrives is what a socket would
carry. Every drop path asserts both that nothing was sent and which counter
moved.
"""

import os
import socket

import pytest

from edge_relay import header, keys, memio, sockaddr, stun, token
from edge_relay.drops import Drop
from edge_relay.flows import CONFIRMED, PENDING, FlowTable
from edge_relay.router import (CLIENT_IN_PACKETS, FLOWS_CONFIRMED, FLOWS_OPENED, TO_CLIENT_PACKETS, TO_TX_PACKETS,
                               TX_IN_PACKETS, Policy, Router)

RING = keys.KeyRing({1: bytes(range(32))})
OTHER_RING = keys.KeyRing({1: bytes(32)})         # same key id, another key
PUB = sockaddr.from_tuple(("198.51.100.1", 3478))
INTERNAL = sockaddr.from_tuple(("10.0.0.1", 4000))
TX = {1: sockaddr.from_tuple(("10.0.0.5", 5000)), 2: sockaddr.from_tuple(("10.0.0.6", 5000))}
NOW, WALL_MS = 100.0, 1_700_000_000_000
RTP = b"\x80\x6f" + bytes(158)
DTLS = b"\x16\xfe\xfd" + bytes(40)


def client(i):
    return sockaddr.from_tuple((f"203.0.113.{i}", 40000 + i))


def check(tx_id=1, ring=RING, lifetime=600, ufrag=None):
    """A Binding Request whose USERNAME carries a routing token for `tx_id`."""
    if ufrag is None:
        ufrag = token.mint(ring.signing, tx_id, WALL_MS // 1000 + lifetime)
    return stun.encode(stun.BINDING_REQUEST, os.urandom(12), [(stun.USERNAME, f"{ufrag}:clnt".encode())])


class Rig:
    """A router between MemIO endpoints: one listener, the internal socket, two transceivers."""

    def __init__(self, rates=None, **table):
        table.setdefault("max_pending_per_source", 64)
        self.net = memio.Network()
        self.pub = self.net.bind(PUB)
        self.internal = self.net.bind(INTERNAL)
        self.tx = {t: self.net.bind(sa) for t, sa in TX.items()}
        self.clients = {}
        rates = {"new_flows_per_source_rate": 1e6, "new_flows_per_source_burst": 10**6, **(rates or {})}
        self.router = Router(FlowTable(n_listeners=1, **table), RING, TX, [socket.AF_INET], Policy(**rates))

    def endpoint(self, sa):
        if sa not in self.clients:
            self.clients[sa] = self.net.bind(sa)
        return self.clients[sa]

    def from_clients(self, datagrams, now=NOW, wall_ms=WALL_MS):
        """One batch of (payload, client sockaddr) through the router; returns how many left for transceivers."""
        for data, sa in datagrams:
            self.endpoint(sa)
            self.pub.inject(data, sa)
        n = self.pub.recv()
        assert n == len(datagrams)
        self.router.from_clients(0, self.pub.views, self.pub.addrs, n, now, wall_ms)
        sent = self.internal.send(self.router.to_transceivers, self.pub)
        self.router.to_transceivers.clear()
        return sent

    def from_transceivers(self, datagrams, now=NOW, wall_ms=WALL_MS):
        """One batch of (datagram, source sockaddr) on the internal socket; returns how many left for clients."""
        for data, sa in datagrams:
            self.internal.inject(data, sa)
        n = self.internal.recv()
        self.router.from_transceivers(self.internal.views, self.internal.addrs, n, now, wall_ms)
        box = self.router.to_clients[0]
        sent = self.pub.send(box, self.internal)
        box.clear()
        return sent

    def at_transceiver(self, tx_id):
        """[(decoded header, payload bytes)] that reached transceiver `tx_id` from the relay."""
        out = []
        for data, source in self.tx[tx_id].received():
            assert source == INTERNAL
            hdr = header.decode(data, RING, WALL_MS, 2000, accept=header.TRANSCEIVER_ACCEPTS)
            assert hdr.__class__ is not Drop, hdr
            out.append((hdr, bytes(data[header.HEADER_LEN:])))
        return out

    def at_client(self, sa):
        got = self.endpoint(sa).received()
        assert all(source == PUB for _, source in got)
        return [data for data, _ in got]

    def drops(self):
        return {Drop(i).name: n for i, n in enumerate(self.router.drops) if n}

    def open(self, sa, tx_id=1, confirm=True):
        """A flow for `sa` opened by a check (and confirmed by its transceiver's answer)."""
        assert self.from_clients([(check(tx_id), sa)]) == 1
        self.at_transceiver(tx_id)
        if confirm:
            assert self.from_transceivers([(to_client(sa, b"\x01\x01" + bytes(18)), TX[tx_id])]) == 1
            self.at_client(sa)
        return self.router.flows.get(0, sa)


def to_client(sa, payload, ring=RING, wall_ms=WALL_MS, msg_type=header.TO_CLIENT, route=0):
    """A datagram from a transceiver: its header for client `sa`, then `payload`."""
    family, port, address = sockaddr.client_fields(sa)
    return header.encode(ring.signing, msg_type, payload, route=route, family=family,
                         port=int.from_bytes(port, "big"), address=address, timestamp_ms=wall_ms) + payload


# --- opening, confirming, forwarding ---------------------------------------------

def test_a_first_binding_request_opens_a_pending_flow_and_goes_to_its_transceiver():
    rig = Rig()
    req = check(2)
    assert rig.from_clients([(req, client(1))]) == 1
    (hdr, payload), = rig.at_transceiver(2)
    assert payload == req and rig.at_transceiver(1) == []
    assert (hdr.type, hdr.family, hdr.port) == (header.TO_TRANSCEIVER, 4, 40001)
    assert hdr.address[:4] == socket.inet_aton("203.0.113.1") and hdr.timestamp_ms == WALL_MS
    flow = rig.router.flows.get(0, client(1))
    assert flow.state == PENDING and flow.transceiver == 2
    assert rig.router.stats[FLOWS_OPENED] == 1 and rig.drops() == {}


def test_the_transceivers_answer_confirms_the_flow_and_reaches_the_client():
    rig = Rig()
    rig.open(client(1), confirm=False)
    answer = b"\x01\x01" + bytes(30)
    assert rig.from_transceivers([(to_client(client(1), answer), TX[1])], now=NOW + 0.01) == 1
    assert rig.at_client(client(1)) == [answer]           # the header stripped, nothing else
    assert rig.router.flows.get(0, client(1)).state == CONFIRMED
    assert rig.router.stats[FLOWS_CONFIRMED] == 1 and rig.drops() == {}


def test_media_is_forwarded_both_ways_in_batch_order():
    rig = Rig()
    sas = [client(i) for i in range(1, 5)]
    for sa in sas:
        rig.open(sa)
    batch = [(RTP[:12] + bytes([i]) * 20, sas[i % 4]) for i in range(10)] + [(DTLS, sas[0])]
    assert rig.from_clients(batch) == 11
    got = rig.at_transceiver(1)
    assert [p for _, p in got] == [d for d, _ in batch]
    assert [hdr.port for hdr, _ in got] == [40001 + i % 4 for i in range(10)] + [40001]
    back = [(to_client(sa, b"\x80\x6f" + bytes([i]) * 30), TX[1]) for i, sa in enumerate(sas * 2)]
    assert rig.from_transceivers(back) == 8
    for i, sa in enumerate(sas):
        assert rig.at_client(sa) == [b"\x80\x6f" + bytes([i]) * 30, b"\x80\x6f" + bytes([i + 4]) * 30]
    stats = rig.router.stats
    assert (stats[CLIENT_IN_PACKETS], stats[TO_TX_PACKETS]) == (4 + 11, 4 + 11)
    assert (stats[TX_IN_PACKETS], stats[TO_CLIENT_PACKETS]) == (4 + 8, 4 + 8)


def test_a_reload_between_receive_and_send_forwards_every_datagram_both_ways():
    """Key rotation step 1 (a new key accepted, signing kept) with new rate numbers, applied between
    a batch's routing and its send, each way: every datagram leaves (their origins still name the
    batch: memio checks them), signed with the kept key, and the new key is accepted at once."""
    rig = Rig()
    sas = [client(i) for i in range(1, 5)]
    for sa in sas:
        rig.open(sa)
    r = rig.router
    rotated = keys.KeyRing({1: bytes(range(32)), 2: bytes([7]) * 32}, signing_key_id=1)
    policy = Policy(new_flows_per_source_rate=1e6, new_flows_per_source_burst=10**6, flow_packets_rate=400)
    for i, sa in enumerate(sas):
        rig.pub.inject(RTP[:12] + bytes([i]) * 20, sa)
    n = rig.pub.recv()
    r.from_clients(0, rig.pub.views, rig.pub.addrs, n, NOW, WALL_MS)
    r.configure(rotated, TX, policy)
    assert rig.internal.send(r.to_transceivers, rig.pub) == 4
    r.to_transceivers.clear()
    got = rig.at_transceiver(1)
    assert [p for _, p in got] == [RTP[:12] + bytes([i]) * 20 for i in range(4)]
    assert {hdr.key_id for hdr, _ in got} == {1}
    for i, sa in enumerate(sas):
        rig.internal.inject(to_client(sa, b"\x80\x6f" + bytes([i]) * 30), TX[1])
    n = rig.internal.recv()
    r.from_transceivers(rig.internal.views, rig.internal.addrs, n, NOW, WALL_MS)
    r.configure(rotated, TX, Policy(new_flows_per_source_rate=1e6, new_flows_per_source_burst=10**6))
    assert rig.pub.send(r.to_clients[0], rig.internal) == 4
    r.to_clients[0].clear()
    for i, sa in enumerate(sas):
        assert rig.at_client(sa) == [b"\x80\x6f" + bytes([i]) * 30]
    new_key = keys.KeyRing({2: bytes([7]) * 32})
    assert rig.from_transceivers([(to_client(sas[0], b"\x80\x6f", ring=new_key), TX[1])]) == 1
    assert rig.from_clients([(RTP, sa) for sa in sas]) == 4
    assert rig.drops() == {}


def test_drops_inside_a_batch_leave_the_other_datagrams_and_their_origins_intact():
    """Dropped datagrams between forwarded ones: each forwarded body is still its own (memio checks origins)."""
    rig = Rig()
    a, b = client(1), client(2)
    rig.open(a)
    rig.open(b)
    batch = [(RTP, a), (b"\xc8junk", a), (RTP[:20], b), (DTLS, client(9)), (b"", b), (RTP[:30], a)]
    assert rig.from_clients(batch) == 3
    assert [p for _, p in rig.at_transceiver(1)] == [RTP, RTP[:20], RTP[:30]]
    assert rig.drops() == {"NOT_WEBRTC": 2, "UNKNOWN_FLOW": 1}
    back = [(to_client(a, b"A" * 5), TX[1]), (b"short", TX[1]), (to_client(b, b"B" * 7), TX[2]),
            (to_client(b, b"B" * 9), TX[1])]
    assert rig.from_transceivers(back) == 2
    assert rig.at_client(a) == [b"A" * 5] and rig.at_client(b) == [b"B" * 9]
    assert rig.drops() == {"NOT_WEBRTC": 2, "UNKNOWN_FLOW": 1, "HEADER_SHORT": 1, "FLOW_OF_OTHER": 1}


def test_a_consent_check_on_a_live_flow_goes_to_its_owner():
    rig = Rig()
    rig.open(client(1))
    assert rig.from_clients([(check(1), client(1))]) == 1
    assert len(rig.at_transceiver(1)) == 1 and rig.drops() == {}


def test_an_ice_restart_request_goes_to_the_new_owner_only():
    rig = Rig()
    flow = rig.open(client(1))
    req = check(2)
    assert rig.from_clients([(RTP, client(1)), (req, client(1)), (RTP[:40], client(1))]) == 3
    assert [p for _, p in rig.at_transceiver(1)] == [RTP, RTP[:40]]
    assert [p for _, p in rig.at_transceiver(2)] == [req]
    assert flow.transceiver == 1 and flow.restart_to == 2
    assert rig.router.stats[TO_TX_PACKETS] == 1 + 3 and rig.drops() == {}


# --- every drop path: nothing sent, one counter moved -------------------------------

def _malformed_check():
    data = bytearray(check())
    data[4] ^= 0xFF                     # the magic cookie
    return bytes(data)


CLIENT_DROPS = [
    ("NOT_WEBRTC", lambda rig: [(b"\xc8\x01\x02", client(7))]),
    ("NOT_WEBRTC", lambda rig: [(b"", client(7))]),
    ("UNKNOWN_FLOW", lambda rig: [(RTP, client(7))]),
    ("STUN_MALFORMED", lambda rig: [(_malformed_check(), client(7))]),
    ("STUN_NOT_BINDING_REQUEST", lambda rig: [(stun.encode(stun.BINDING_SUCCESS, os.urandom(12)), client(7))]),
    ("STUN_NO_USERNAME", lambda rig: [(stun.encode(stun.BINDING_REQUEST, os.urandom(12)), client(7))]),
    ("STUN_NO_USERNAME", lambda rig: [(stun.encode(stun.BINDING_REQUEST, os.urandom(12),
                                                   [(stun.USERNAME, b"no-colon")]), client(7))]),
    ("TOKEN_MALFORMED", lambda rig: [(check(ufrag="bad token!"), client(7))]),
    ("TOKEN_MAC", lambda rig: [(check(ring=OTHER_RING), client(7))]),
    ("TOKEN_KEY_ID", lambda rig: [(check(ring=keys.KeyRing({9: bytes(32)})), client(7))]),
    ("TOKEN_EXPIRED", lambda rig: [(check(lifetime=-60), client(7))]),
    ("TOKEN_FUTURE", lambda rig: [(check(lifetime=10 * 86400), client(7))]),
    ("UNKNOWN_TRANSCEIVER", lambda rig: [(check(9), client(7))]),
    ("SOURCE_PORT_ZERO", lambda rig: [(check(), sockaddr.from_tuple(("203.0.113.7", 0)))]),
    ("SOURCE_NOT_UNICAST", lambda rig: [(check(), sockaddr.from_tuple(("224.0.0.1", 5000)))]),
    ("SOURCE_INTERNAL", lambda rig: [(check(), sockaddr.from_tuple(("10.0.0.5", 6000)))]),
]


@pytest.mark.parametrize("reason, batch", CLIENT_DROPS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CLIENT_DROPS)])
def test_client_datagrams_that_open_nothing_are_counted(reason, batch):
    rig = Rig()
    assert rig.from_clients(batch(rig)) == 0
    assert rig.drops() == {reason: 1}
    assert len(rig.router.flows) == 0 and rig.router.stats[TO_TX_PACKETS] == 0


def test_draining_refuses_new_flows_and_keeps_forwarding():
    rig = Rig()
    rig.open(client(1))
    rig.router.draining = True
    assert rig.from_clients([(check(), client(2)), (RTP, client(1))]) == 1
    assert rig.drops() == {"DRAINING": 1} and len(rig.router.flows) == 1


@pytest.mark.parametrize("reason, rates, table", [
    ("RATE_SOURCE_NEW_FLOWS", {"new_flows_per_source_rate": 0.001, "new_flows_per_source_burst": 1}, {}),
    ("RATE_GLOBAL_NEW_FLOWS", {"new_flows_rate": 0.001, "new_flows_burst": 1}, {}),
    ("FLOW_TABLE_FULL", {}, {"max_flows": 1, "evict_pending": False}),
    ("PENDING_PER_SOURCE", {}, {"max_pending_per_source": 1}),
])
def test_the_second_new_flow_over_a_limit_is_counted(reason, rates, table):
    rig = Rig(rates, **table)
    sources = [client(1), sockaddr.from_tuple(("203.0.113.1", 50000))]     # one IP, two ports
    assert rig.from_clients([(check(), sources[0])]) == 1
    assert rig.from_clients([(check(), sources[1])]) == 0
    assert rig.drops() == {reason: 1} and len(rig.router.flows) == 1


def test_session_flows_cap_counts_a_flow_past_it():
    rig = Rig(max_flows_per_session=1)
    ufrag = token.mint(RING.signing, 1, WALL_MS // 1000 + 600)
    assert rig.from_clients([(check(ufrag=ufrag), client(1))]) == 1
    assert rig.from_clients([(check(ufrag=ufrag), client(2))]) == 0
    assert rig.drops() == {"SESSION_FLOWS": 1}


def test_a_flow_past_its_packet_rate_is_counted():
    rig = Rig({"flow_packets_rate": 0.001, "flow_packets_burst": 2})
    rig.open(client(1))
    sent = rig.from_clients([(RTP, client(1))] * 4)
    assert sent < 4 and rig.drops() == {"RATE_FLOW_PACKETS": 4 - sent}


def test_a_malformed_check_on_a_live_flow_is_counted():
    rig = Rig()
    rig.open(client(1))
    assert rig.from_clients([(stun.encode(stun.BINDING_REQUEST, os.urandom(12)), client(1))]) == 0
    assert rig.drops() == {"STUN_NO_USERNAME": 1}


def test_a_flow_whose_transceiver_left_the_config_is_counted():
    rig = Rig()
    rig.open(client(1), tx_id=2)
    r = rig.router
    r.configure(r.keyring, {1: TX[1]}, r.policy)
    assert rig.from_clients([(RTP, client(1))]) == 0
    assert rig.drops() == {"UNKNOWN_TRANSCEIVER": 1}


def test_restart_refusal_then_rate_and_hold_are_counted():
    rig = Rig()
    flow = rig.open(client(1))
    assert rig.from_clients([(check(2), client(1))]) == 1              # restart to 2 begins
    rig.at_transceiver(2)
    assert rig.from_transceivers([(to_client(client(1), b"\x01\x01" + bytes(18)), TX[2])], now=NOW + 1) == 0
    assert rig.drops() == {"RESTART_HELD": 1} and flow.transceiver == 1
    assert rig.from_transceivers([(to_client(client(1), b"\x01\x01" + bytes(18)), TX[1])], now=NOW + 2) == 1
    assert flow.restart_to is None                                      # the old owner still serves it
    assert rig.from_clients([(check(2), client(1))], now=NOW + 3) == 0
    assert rig.drops() == {"RESTART_HELD": 1, "RESTART_RATE": 1}


def _corrupt(offset, value):
    def make():
        data = bytearray(to_client(client(1), RTP))
        data[offset] = value
        return bytes(data)
    return make


TX_DROPS = [
    ("NOT_TRANSCEIVER", lambda: to_client(client(1), RTP), sockaddr.from_tuple(("10.0.0.99", 5000))),
    ("HEADER_SHORT", lambda: b"\x00" * 47, None),
    ("HEADER_MAGIC", _corrupt(0, 0), None),
    ("HEADER_VERSION", _corrupt(2, 99), None),
    ("HEADER_TYPE", lambda: to_client(client(1), RTP, msg_type=header.TO_TRANSCEIVER), None),
    ("HEADER_KEY_ID", lambda: to_client(client(1), RTP, ring=keys.KeyRing({9: bytes(32)})), None),
    ("HEADER_FAMILY", _corrupt(7, 5), None),
    ("HEADER_MAC", _corrupt(60, 1), None),
    ("HEADER_MAC", lambda: to_client(client(1), RTP, ring=OTHER_RING), None),
    ("HEADER_STALE", lambda: to_client(client(1), RTP, wall_ms=WALL_MS - 60_000), None),
    ("NO_FLOW", lambda: to_client(client(8), RTP), None),
    ("NO_FLOW", lambda: to_client(client(1), RTP, route=3), None),
    ("FLOW_OF_OTHER", lambda: to_client(client(1), RTP), TX[2]),
]


@pytest.mark.parametrize("reason, make, source", TX_DROPS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(TX_DROPS)])
def test_transceiver_datagrams_that_reach_no_client_are_counted(reason, make, source):
    rig = Rig()
    rig.open(client(1))
    assert rig.from_transceivers([(make(), source or TX[1])]) == 0
    assert rig.drops() == {reason: 1}
    assert rig.at_client(client(1)) == []


# --- the hot path's inlined pieces equal their reference implementations ----------

def test_the_per_flow_cap_forwards_exactly_what_flow_meter_allow_would():
    """from_clients inlines FlowMeter's fast path: same answers, counts and tables as allow(key, now)."""
    import random

    from edge_relay.ratelimit import FlowMeter
    rng = random.Random(7)
    for burst, cells in ((8, 4), (40, 16), (2000, 65536)):
        rig = Rig({"flow_packets_rate": burst / 0.5, "flow_packets_burst": burst})
        sas = [client(i) for i in range(1, 41)]
        for sa in sas:
            rig.open(sa)
        # small tables make the sketch collide and its heavy path run; the router reads them per batch state
        rig.router.limits.per_flow = FlowMeter(burst / 0.5, burst, cells)
        rig.router._set_batch_state()
        ref = FlowMeter(burst / 0.5, burst, cells)
        now = NOW
        for step in range(300):
            now += rng.choice((0.0, 0.001, 0.05, 0.3, 1.0)) * (1 if rng.random() < 0.95 else -1)
            batch = [rng.choice(sas[:3]) if rng.random() < 0.5 else rng.choice(sas)
                     for _ in range(rng.randrange(1, 33))]
            before = rig.router.drops[Drop.RATE_FLOW_PACKETS]
            ref.advance(now)
            expected = [ref.allow(sa, now) for sa in batch]
            assert rig.from_clients([(RTP, sa) for sa in batch], now=now) == sum(expected), step
            assert rig.router.drops[Drop.RATE_FLOW_PACKETS] - before == expected.count(False), step
            got = rig.router.limits.per_flow
            assert (got.current, got.heavy, got.row0, got.row1) == (ref.current, ref.heavy, ref.row0, ref.row1)
        rig.at_transceiver(1)


def test_what_from_clients_seals_is_header_seal_exactly():
    """The router's inlined MAC gives the very header header.seal gives, octet for octet."""
    rig = Rig()
    flow = rig.open(client(9))
    payloads = [RTP, DTLS, b"\x80\x00", RTP[:12] + os.urandom(200)]
    assert rig.from_clients([(p, client(9)) for p in payloads], wall_ms=WALL_MS + 5) == len(payloads)
    ts6 = header.timestamp_bytes(WALL_MS + 5)
    got = [bytes(data) for data, _ in rig.tx[1].received()]
    assert got == [header.seal(RING.signing.header_split, flow.route, ts6, p) + p for p in payloads]
