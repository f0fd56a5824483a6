"""End to end on loopback with real sockets: every forwarding rule, and every drop counted.

Each test runs over both I/O paths (recvmmsg/sendmmsg and the plain fallback).
"""

import functools
import os
import time

import pytest

from edge_relay import header, stun, token, transceiver
from edge_relay.flows import CONFIRMED
from edge_relay.keys import Key, KeyRing
from relayharness import drain
from waiting import wait_for


@pytest.fixture(params=["mmsg", "plain"])
def io_mode(request):
    return request.param


@pytest.fixture
def make(make_harness, io_mode):
    """make_harness on this test's I/O path."""
    return functools.partial(make_harness, io_mode=io_mode)


def binding_request(ufrag, txid=None, extra=()):
    txid = txid or os.urandom(12)
    attrs = [(stun.USERNAME, ufrag.encode() + b":clnt" if isinstance(ufrag, str) else ufrag + b":clnt"), *extra]
    return stun.encode(stun.BINDING_REQUEST, txid, attrs)


def now_ms():
    return int(time.time() * 1000)


def assert_silent(h, *socks):
    """Nothing reached any sink transceiver or any of `socks`."""
    for s in [*h.sinks.values(), *socks]:
        assert drain(s) == []


def open_flow(h, client, tx_id=1):
    """Open a flow from `client` to sink `tx_id`; returns the Inbound the sink decoded."""
    ufrag, _ = h.session(tx_id)
    client.sendto(binding_request(ufrag), h.public)
    h.settle()
    got = drain(h.sinks[tx_id])
    assert len(got) == 1
    ep = transceiver.Endpoint(h.keyring, tx_id)
    inb = ep.receive(got[0][0], now_ms())
    assert not isinstance(inb, int), inb
    return inb, ep


# -- the happy path ---------------------------------------------------------

def test_ice_check_and_media_through_demo_transceiver(make):
    h = make()
    vc = h.voice_client()
    assert h.connect(vc)
    assert vc.mapped == tuple(vc.address)           # XOR-MAPPED-ADDRESS is the client's own address
    assert h.demos[1].checks_answered == 1
    assert tuple(vc.address) in h.demos[1].clients  # the header told the transceiver the true address
    for i in range(20):
        vc.send_media(float(i))
    h.settle()
    vc.pump(100.0)
    assert vc.received == 20 and vc.sent == 20
    assert h.router.flows.confirmed == 1 and h.router.flows.pending == 0
    assert h.drops() == {}


def test_header_carries_client_address_and_reply_leaves_from_public_address(make):
    h = make(transceivers={1: "sink"})
    client = h.client()
    inb, ep = open_flow(h, client)
    assert inb.client == client.getsockname()
    assert inb.header.type == header.TO_TRANSCEIVER
    assert h.router.flows.pending == 1
    # the transceiver answers to the relay's internal address; the client hears the relay's public address
    h.sinks[1].sendto(ep.to_client(inb, b"\x80" + b"x" * 159, now_ms()), h.internal)
    h.settle()
    got = drain(client)
    assert got == [(b"\x80" + b"x" * 159, h.public)]
    assert h.router.flows.confirmed == 1 and h.router.flows.pending == 0


def test_known_flow_forwards_dtls_rtp_and_stun(make):
    h = make(transceivers={1: "sink"})
    client = h.client()
    inb, ep = open_flow(h, client)
    for payload in (b"\x16\xfe\xfd" + bytes(40), b"\x80\x6f" + bytes(158), b"\x81\xc8" + bytes(30)):
        client.sendto(payload, h.public)
    h.settle()
    got = [ep.receive(d, now_ms()) for d, _ in drain(h.sinks[1])]
    assert [bytes(g.payload)[:2] for g in got] == [b"\x16\xfe", b"\x80\x6f", b"\x81\xc8"]


def test_ipv6_listener_and_client(make):
    h = make(listeners=("::1",))
    vc = h.voice_client(host="::1")
    assert h.connect(vc)
    assert vc.mapped == ("::1", vc.address[1])
    vc.send_media(0.0)
    h.settle()
    vc.pump(1.0)
    assert vc.received == 1


def test_two_listeners_reply_from_the_listener_the_client_used(make):
    h = make(listeners=("127.0.0.1", "127.0.0.1"), transceivers={1: "sink"})
    client = h.client()
    ufrag, _ = h.session()
    second = h.listen_socks[1].getsockname()
    client.sendto(binding_request(ufrag), second)
    h.settle()
    (data, _), = drain(h.sinks[1])
    ep = transceiver.Endpoint(h.keyring, 1)
    inb = ep.receive(data, now_ms())
    assert inb.route == 1
    h.sinks[1].sendto(ep.to_client(inb, b"\x80hello", now_ms()), h.internal)
    h.settle()
    assert drain(client) == [(b"\x80hello", second)]


def test_ice_restart_moves_flow_only_when_new_transceiver_answers(make):
    """A genuine restart: the old owner has stopped answering, so the flow moves after the hold."""
    t = [1000.0]
    h = make(transceivers={1: "sink", 2: "sink"}, clock=lambda: t[0])
    client = h.client()
    inb, ep1 = open_flow(h, client, 1)
    h.sinks[1].sendto(ep1.to_client(inb, b"\x80ok", now_ms()), h.internal)
    h.settle()
    drain(client)
    ufrag2, _ = h.session(2)
    client.sendto(binding_request(ufrag2), h.public)
    client.sendto(b"\x80media", h.public)
    h.settle()
    ep2 = transceiver.Endpoint(h.keyring, 2)
    (to2, _), = drain(h.sinks[2])
    (to1, _), = drain(h.sinks[1])
    assert bytes(ep1.receive(to1, now_ms()).payload) == b"\x80media"    # media stays with the owner
    inb2 = ep2.receive(to2, now_ms())
    assert stun.decode(inb2.payload).msg_type == stun.BINDING_REQUEST
    flow = h.router.flows.get(0, h.router.flows.by_listener[0].__iter__().__next__())
    assert flow.transceiver == 1 and flow.restart_to == 2
    # The new owner's first answer comes within the hold: the old owner may still serve the call.
    h.sinks[2].sendto(ep2.to_client(inb2, b"\x80early", now_ms()), h.internal)
    h.settle()
    assert drain(client) == [] and flow.transceiver == 1
    assert h.drops() == {"RESTART_HELD": 1}
    # The hold passes without the old owner answering a check: the client's retransmission moves it.
    t[0] += h.router.restart_hold
    client.sendto(binding_request(ufrag2), h.public)
    h.settle()
    (to2, _), = drain(h.sinks[2])
    inb2 = ep2.receive(to2, now_ms())
    h.sinks[2].sendto(ep2.to_client(inb2, b"\x80new", now_ms()), h.internal)
    h.settle()
    assert drain(client) == [(b"\x80new", h.public)]
    assert flow.transceiver == 2 and flow.restart_to is None
    assert h.router.restarts == {}
    client.sendto(b"\x80after", h.public)
    h.settle()
    assert len(drain(h.sinks[2])) == 1 and drain(h.sinks[1]) == []
    # the old owner can no longer reach the client
    h.sinks[1].sendto(ep1.to_client(inb, b"\x80stale", now_ms()), h.internal)
    h.settle()
    assert drain(client) == []
    assert h.drops() == {"RESTART_HELD": 1, "FLOW_OF_OTHER": 1}


def test_ice_restart_of_a_pending_flow_moves_at_the_first_answer(make):
    h = make(transceivers={1: "sink", 2: "sink"})
    client = h.client()
    open_flow(h, client, 1)                         # nobody answered: the flow is pending
    ufrag2, _ = h.session(2)
    client.sendto(binding_request(ufrag2), h.public)
    h.settle()
    ep2 = transceiver.Endpoint(h.keyring, 2)
    (to2, _), = drain(h.sinks[2])
    h.sinks[2].sendto(ep2.to_client(ep2.receive(to2, now_ms()), b"\x80new", now_ms()), h.internal)
    h.settle()
    assert drain(client) == [(b"\x80new", h.public)]
    flow, = h.router.flows
    assert flow.transceiver == 2 and flow.state == CONFIRMED and h.drops() == {}


# -- expiry -----------------------------------------------------------------

def test_pending_flow_expires_and_confirmed_flow_idles_out(make):
    t = [1000.0]
    h = make(transceivers={1: "sink"}, clock=lambda: t[0],
             limits={"pending_ttl": 5.0, "idle_timeout": 30.0})
    a, b = h.client(), h.client()
    inb, ep = open_flow(h, a)
    open_flow(h, b)
    h.sinks[1].sendto(ep.to_client(inb, b"\x80", now_ms()), h.internal)
    h.settle()
    assert (h.router.flows.pending, h.router.flows.confirmed) == (1, 1)
    t[0] += 6.0
    h.router.expire(t[0])
    assert (h.router.flows.pending, h.router.flows.confirmed) == (0, 1)
    t[0] += 20.0
    a.sendto(b"\x80keepalive", h.public)            # client traffic refreshes a confirmed flow
    h.settle()
    t[0] += 20.0
    h.router.expire(t[0])
    assert h.router.flows.confirmed == 1
    t[0] += 31.0
    h.router.expire(t[0])
    assert len(h.router.flows) == 0
    drain(h.sinks[1])
    a.sendto(b"\x80late", h.public)                 # after expiry the flow is unknown
    h.settle()
    assert_silent(h)
    assert h.drops()["UNKNOWN_FLOW"] == 1


# -- every client-side drop -------------------------------------------------

def forged_token(h, mutate):
    ufrag, _ = h.session()
    return mutate(ufrag)


CLIENT_DROPS = {
    "NOT_WEBRTC": lambda h: b"\xff" + os.urandom(30),
    "NOT_WEBRTC_EMPTY": lambda h: b"",
    "UNKNOWN_FLOW_DTLS": lambda h: b"\x16\xfe\xfd" + bytes(40),
    "UNKNOWN_FLOW_RTP": lambda h: b"\x80\x6f" + bytes(158),
    "STUN_MALFORMED": lambda h: b"\x00\x01\x00\x00\x21\x12\xa4\x43" + bytes(12),
    "STUN_NOT_BINDING_REQUEST": lambda h: stun.encode(stun.BINDING_INDICATION, os.urandom(12)),
    "STUN_NO_USERNAME": lambda h: stun.encode(stun.BINDING_REQUEST, os.urandom(12)),
    "STUN_NO_USERNAME_NO_COLON": lambda h: stun.encode(stun.BINDING_REQUEST, os.urandom(12),
                                                       [(stun.USERNAME, h.session()[0].encode())]),
    "TOKEN_MALFORMED": lambda h: binding_request("not*ice*chars"),
    "TOKEN_VERSION": lambda h: binding_request("AgEAAQAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    "TOKEN_MAC": lambda h: binding_request(forged_token(h, lambda u: u[:-2] + ("AA" if u[-2:] != "AA" else "BB"))),
    "TOKEN_KEY_ID": lambda h: binding_request(token.mint(Key(9, bytes(32)), 1, time.time() + 60)),
    "TOKEN_EXPIRED": lambda h: binding_request(token.mint(h.keyring.signing, 1, time.time() - 3600)),
    "TOKEN_FUTURE": lambda h: binding_request(token.mint(h.keyring.signing, 1, time.time() + 10 * 86400)),
    "UNKNOWN_TRANSCEIVER": lambda h: binding_request(token.mint(h.keyring.signing, 99, time.time() + 60)),
}


@pytest.mark.parametrize("case", sorted(CLIENT_DROPS))
def test_client_side_drop_is_counted_and_silent(make, case):
    h = make(transceivers={1: "sink"})
    client = h.client()
    client.sendto(CLIENT_DROPS[case](h), h.public)
    h.settle()
    assert_silent(h, client)
    reason = {"UNKNOWN_FLOW_DTLS": "UNKNOWN_FLOW", "NOT_WEBRTC_EMPTY": "NOT_WEBRTC", "UNKNOWN_FLOW_RTP": "UNKNOWN_FLOW",
              "STUN_NO_USERNAME_NO_COLON": "STUN_NO_USERNAME"}.get(case, case)
    assert h.drops() == {reason: 1}
    assert len(h.router.flows) == 0


def test_truncated_datagram_is_dropped_and_counted(make):
    h = make(transceivers={1: "sink"})
    client = h.client()
    client.sendto(b"\x80" + bytes(5000), h.public)
    h.settle()
    assert_silent(h, client)
    assert h.drops() == {"TRUNCATED": 1}


def test_known_flow_drops_non_webrtc_and_malformed_stun(make):
    h = make(transceivers={1: "sink"})
    client = h.client()
    open_flow(h, client)
    client.sendto(b"\x45" + bytes(20), h.public)                  # TURN channel range: not ours
    client.sendto(b"", h.public)                                   # empty: no first octet to demux
    client.sendto(b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12), h.public)   # binding request, bad length
    h.settle()
    assert_silent(h, client)
    assert h.drops() == {"NOT_WEBRTC": 2, "STUN_MALFORMED": 1}


def test_full_table_refuses_new_flows_and_keeps_old(make):
    h = make(transceivers={1: "sink"}, limits={"max_flows": 1})
    first, second = h.client(), h.client()
    inb, ep = open_flow(h, first)
    h.sinks[1].sendto(ep.to_client(inb, b"\x80ok", now_ms()), h.internal)    # confirmed: never evicted
    h.settle()
    assert drain(first) == [(b"\x80ok", h.public)]
    ufrag, _ = h.session()
    second.sendto(binding_request(ufrag), h.public)
    h.settle()
    assert_silent(h, second)
    assert h.drops() == {"FLOW_TABLE_FULL": 1}
    first.sendto(b"\x80still", h.public)
    h.settle()
    assert len(drain(h.sinks[1])) == 1


def test_pending_per_source_cap(make):
    h = make(transceivers={1: "sink"}, limits={"max_pending_per_source": 1})
    first, second = h.client(), h.client()     # same source IP, different ports
    open_flow(h, first)
    ufrag, _ = h.session()
    second.sendto(binding_request(ufrag), h.public)
    h.settle()
    assert_silent(h, second)
    assert h.drops() == {"PENDING_PER_SOURCE": 1}


def test_draining_refuses_new_flows_but_forwards_existing(make):
    h = make(transceivers={1: "sink"})
    old, new = h.client(), h.client()
    open_flow(h, old)
    h.worker.drain()
    ufrag, _ = h.session()
    new.sendto(binding_request(ufrag), h.public)
    old.sendto(b"\x80old", h.public)
    h.settle()
    assert len(drain(h.sinks[1])) == 1
    assert h.drops() == {"DRAINING": 1}


# -- every transceiver-side drop --------------------------------------------

def tx_datagram(h, inb, ep, case):
    payload = b"\x80reply"
    if case == "HEADER_SHORT":
        return b"\xee\x52\x01\x02" + bytes(10)
    good = ep.to_client(inb, payload, now_ms())
    if case == "HEADER_MAGIC":
        return b"\xee\x53" + good[2:]
    if case == "HEADER_VERSION":
        return good[:2] + b"\x02" + good[3:]
    if case == "HEADER_MAC":
        return good[:-1] + bytes([good[-1] ^ 1])
    if case == "HEADER_TYPE":
        return header.encode(h.keyring.signing, header.TO_TRANSCEIVER, payload, route=inb.route,
                             family=inb.family, port=inb.port, address=inb.address,
                             timestamp_ms=now_ms()) + payload
    if case == "HEADER_KEY_ID":
        other = KeyRing({7: bytes(32)})
        return header.encode(other.signing, header.TO_CLIENT, payload, route=inb.route, family=inb.family,
                             port=inb.port, address=inb.address, timestamp_ms=now_ms()) + payload
    if case == "HEADER_FAMILY":
        return header.encode(h.keyring.signing, header.TO_CLIENT, payload, route=inb.route, family=5,
                             port=inb.port, address=inb.address, timestamp_ms=now_ms()) + payload
    if case == "HEADER_STALE":
        return header.encode(h.keyring.signing, header.TO_CLIENT, payload, route=inb.route, family=inb.family,
                             port=inb.port, address=inb.address, timestamp_ms=now_ms() - 60_000) + payload
    if case == "NO_FLOW":
        return header.encode(h.keyring.signing, header.TO_CLIENT, payload, route=inb.route, family=4,
                             port=9, address=bytes([127, 0, 0, 1]), timestamp_ms=now_ms()) + payload
    if case == "NO_FLOW_ROUTE":
        return header.encode(h.keyring.signing, header.TO_CLIENT, payload, route=7, family=inb.family,
                             port=inb.port, address=inb.address, timestamp_ms=now_ms()) + payload
    raise AssertionError(case)


TX_DROPS = ["HEADER_SHORT", "HEADER_MAGIC", "HEADER_VERSION", "HEADER_MAC", "HEADER_TYPE", "HEADER_KEY_ID",
            "HEADER_FAMILY", "HEADER_STALE", "NO_FLOW", "NO_FLOW_ROUTE"]


@pytest.mark.parametrize("case", TX_DROPS)
def test_transceiver_side_drop_is_counted_and_silent(make, case):
    h = make(transceivers={1: "sink"})
    client = h.client()
    inb, ep = open_flow(h, client)
    h.sinks[1].sendto(tx_datagram(h, inb, ep, case), h.internal)
    h.settle()
    assert_silent(h, client)
    assert h.drops() == {"NO_FLOW" if case == "NO_FLOW_ROUTE" else case: 1}
    assert h.router.flows.pending == 1          # nothing unauthenticated confirmed the flow


def test_header_from_an_address_that_is_not_a_transceiver(make):
    h = make(transceivers={1: "sink"})
    client = h.client()
    inb, ep = open_flow(h, client)
    intruder = h.client()
    intruder.sendto(ep.to_client(inb, b"\x80evil", now_ms()), h.internal)    # even a valid header
    client.sendto(b"\x80to-internal", h.internal)                            # a client at the internal port
    h.settle()
    assert_silent(h, client, intruder)
    assert h.drops() == {"NOT_TRANSCEIVER": 2}


def test_header_for_a_flow_of_another_transceiver(make):
    h = make(transceivers={1: "sink", 2: "sink"})
    client = h.client()
    inb, _ = open_flow(h, client, 1)
    ep2 = transceiver.Endpoint(h.keyring, 2)
    h.sinks[2].sendto(ep2.to_client(inb, b"\x80hijack", now_ms()), h.internal)
    h.settle()
    assert_silent(h, client)
    assert h.drops() == {"FLOW_OF_OTHER": 1}


def test_probe_ack_is_consumed_not_forwarded(make):
    h = make(transceivers={1: "sink"})
    client = h.client()
    open_flow(h, client)
    ack = header.encode(h.keyring.signing, header.PROBE_ACK, b"p", timestamp_ms=now_ms()) + b"p"
    h.sinks[1].sendto(ack, h.internal)
    h.settle()
    assert_silent(h, client)
    assert h.drops() == {}


def test_config_rate_limits_reach_the_router(make):
    """[limits] new_flows_per_source_* from the config file govern the running router."""
    h = make(transceivers={1: "sink"},
             limits={"new_flows_per_source_burst": 1, "new_flows_per_source_rate": 0.001})
    first, second = h.client(), h.client()
    open_flow(h, first)
    ufrag, _ = h.session()
    second.sendto(binding_request(ufrag), h.public)
    h.settle()
    assert_silent(h, second)
    assert h.drops() == {"RATE_SOURCE_NEW_FLOWS": 1}


# -- the event loop (Worker.turn) -------------------------------------------

@pytest.mark.parametrize("coalesce_us", [0, 300])
def test_event_loop_forwards_both_ways_with_and_without_coalescing(make, io_mode, coalesce_us):
    """Worker.turn(): one wake-up moves what is queued each way, with [relay] coalesce_us off or on."""
    h = make(transceivers={1: "sink"}, sections={"relay": {"io": io_mode, "batch_size": 8,
                                                           "coalesce_us": coalesce_us}})
    client = h.client()
    inb, ep = open_flow(h, client)
    w = h.worker
    w._open_loop(False, None)
    try:
        assert w._coalesce == coalesce_us / 1e6
        for i in range(3):
            client.sendto(bytes([0x80, 111]) + bytes(158), h.public)
        got, back = [], []

        def turn_into(out, sock):
            w.turn()                    # waits (bounded by the loop's timers) for its sockets
            out.extend(d for d, _ in drain(sock))
            return out
        wait_for(lambda: len(turn_into(got, h.sinks[1])) >= 3, 5, interval=0,
                 what="3 coalesced datagrams at the transceiver")
        assert len(got) == 3
        sink = h.sinks[1]
        reply = ep.to_client(inb, b"\x80\x6f" + bytes(30), now_ms())
        sink.sendto(reply, h.internal)
        wait_for(lambda: turn_into(back, client), 5, interval=0, what="the reply at the client")
        assert back == [b"\x80\x6f" + bytes(30)]
    finally:
        w._close_loop()
