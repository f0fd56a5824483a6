"""edge_relay.header: the 48-octet forwarding header (PROTOCOL.md section 4).

Vectors: tests/vectors/header.json, decoded with the ring of keys.json.
"""

import hashlib
import hmac
import json
import random
import socket
import struct
from pathlib import Path

import pytest

from edge_relay import header, keys, sockaddr
from edge_relay.drops import Drop
from edge_relay.flows import FlowTable
from edge_relay.router import Policy, Router

HERE = Path(__file__).parent / "vectors"
KEYS = json.loads((HERE / "keys.json").read_text())
VECTORS = json.loads((HERE / "header.json").read_text())
MASTERS = {v["key_id"]: bytes.fromhex(v["master"]) for v in KEYS["keys"]}
HEADER_KEYS = {v["key_id"]: bytes.fromhex(v["header_key"]) for v in KEYS["keys"]}
RING = keys.KeyRing(MASTERS, signing_key_id=2)
OTHER_RING = keys.KeyRing({1: MASTERS[1]})
SIDE = {"relay": header.RELAY_ACCEPTS, "transceiver": header.TRANSCEIVER_ACCEPTS}
VALID = VECTORS["valid"]
BASE = [v for v in VALID if not v["name"].startswith("probe_window")]
BY_NAME = {v["name"]: v for v in VALID}
HEADER_DROPS = {Drop.HEADER_SHORT, Drop.HEADER_MAGIC, Drop.HEADER_VERSION, Drop.HEADER_TYPE,
                Drop.HEADER_KEY_ID, Drop.HEADER_FAMILY, Drop.HEADER_MAC, Drop.HEADER_STALE}


def decode(vec, datagram=None, ring=RING):
    data = bytes.fromhex(vec["datagram"]) if datagram is None else datagram
    return header.decode(data, ring, vec["now_ms"], vec["window_ms"], SIDE[vec["accept"]])


# -- the vectors, both directions ------------------------------------------------------


@pytest.mark.parametrize("vec", VALID, ids=lambda v: v["name"])
def test_valid_vectors_decode(vec):
    raw = bytes.fromhex(vec["datagram"])
    for form in (raw, bytearray(raw), memoryview(raw)):
        hdr = decode(vec, form)
        assert isinstance(hdr, header.Header), hdr
        assert (hdr.type, hdr.key_id, hdr.flags, hdr.route, hdr.family, hdr.port, hdr.address.hex(),
                hdr.timestamp_ms) == (vec["type"], vec["key_id"], vec["flags"], vec["route"], vec["family"],
                                      vec["port"], vec["address"], vec["timestamp_ms"])
        assert bytes(hdr.payload).hex() == vec["payload"]
        assert hdr.client_block == raw[6:26]


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_valid_vectors_encode(vec):
    key = RING.get(vec["key_id"])
    payload = bytes.fromhex(vec["payload"])
    address = bytes.fromhex(vec["address"])
    head = header.encode(key, vec["type"], payload, route=vec["route"], family=vec["family"], port=vec["port"],
                         address=address, timestamp_ms=vec["timestamp_ms"], flags=vec["flags"])
    assert head.hex() == vec["header"]
    assert (head + payload).hex() == vec["datagram"]
    if vec["family"] == header.FAMILY_V4:          # the 4-octet form pads itself
        assert header.encode(key, vec["type"], payload, route=vec["route"], family=4, port=vec["port"],
                             address=address[:4], timestamp_ms=vec["timestamp_ms"], flags=vec["flags"]) == head


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_valid_vectors_seal_with_prefix(vec):
    key = RING.get(vec["key_id"])
    head26 = header.prefix(vec["key_id"], vec["type"], vec["flags"], vec["route"], vec["family"], vec["port"],
                           bytes.fromhex(vec["address"]))
    ts6 = header.timestamp_bytes(vec["timestamp_ms"])
    assert header.seal(key.header_mac, head26, ts6, bytes.fromhex(vec["payload"])).hex() == vec["header"]
    assert header.seal(key.header_mac, head26, ts6, memoryview(bytes.fromhex(vec["payload"]))).hex() == vec["header"]


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_vectors_from_the_spec(vec):
    """PROTOCOL.md section 4 alone, no edge_relay code."""
    if vec["family"] == 4:
        address = socket.inet_pton(socket.AF_INET, vec["host"]) + bytes(12)
    elif vec["family"] == 6:
        address = socket.inet_pton(socket.AF_INET6, vec["host"])
    else:
        address = bytes(16)
    head32 = (b"\xee\x52" + bytes([1, vec["type"], vec["key_id"], vec["flags"], vec["route"], vec["family"]])
              + struct.pack(">H", vec["port"]) + address + vec["timestamp_ms"].to_bytes(6, "big"))
    payload = bytes.fromhex(vec["payload"])
    full = hmac.new(HEADER_KEYS[vec["key_id"]], head32 + payload, hashlib.sha256).digest()
    assert (head32 + payload).hex() == vec["mac_input"]
    assert full.hex() == vec["hmac"]
    assert full[:16].hex() == vec["tag"]
    assert (head32 + full[:16] + payload).hex() == vec["datagram"]


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors(vec):
    raw = bytes.fromhex(vec["datagram"])
    for form in (raw, bytearray(raw), memoryview(raw)):
        assert decode(vec, form) is Drop[vec["expect"]]


def test_every_header_reason_has_a_vector():
    assert {Drop[v["expect"]] for v in VECTORS["invalid"]} == HEADER_DROPS


def test_accept_sets_match_the_vectors():
    assert VECTORS["accept"] == {side: sorted(types) for side, types in SIDE.items()}
    assert VECTORS["keyring"] == list(RING.ids)


# -- layout ----------------------------------------------------------------------------


def test_constants():
    assert header.MAGIC == b"\xee\x52"
    assert (header.HEADER_VERSION, header.HEADER_LEN, header.MAC_INPUT_LEN, header.TAG_LEN) == (1, 48, 32, 16)
    assert (header.TO_TRANSCEIVER, header.TO_CLIENT, header.PROBE, header.PROBE_ACK) == (1, 2, 3, 4)
    assert header.RELAY_ACCEPTS == {2, 4} and header.TRANSCEIVER_ACCEPTS == {1, 3}
    assert header.FLAG_FAILOVER == 1
    assert (header.FAMILY_NONE, header.FAMILY_V4, header.FAMILY_V6) == (0, 4, 6)


def test_timestamp_bytes():
    assert header.timestamp_bytes(0) == bytes(6)
    assert header.timestamp_bytes(1800000000000).hex() == "01a3185c5000"
    assert header.timestamp_bytes(2 ** 48 + 5) == header.timestamp_bytes(5)


def test_payload_is_a_view_not_a_copy():
    vec = BY_NAME["to_transceiver_ipv4"]
    raw = bytes.fromhex(vec["datagram"])
    hdr = decode(vec, raw)
    assert isinstance(hdr.payload, memoryview) and hdr.payload.obj is raw
    buf = bytearray(raw)
    view = memoryview(buf)
    assert decode(vec, view).payload.obj is buf


def test_encode_unknown_type():
    for t in (0, 5, 255):
        with pytest.raises(ValueError):
            header.encode(RING.signing, t, b"", timestamp_ms=0)


@pytest.mark.parametrize("address", [b"\x01\x02\x03\x04\x05", bytes(17), b""], ids=["5", "17", "0"])
def test_encode_rejects_address_length(address):
    """Regression: struct '16s' padded or cut an address of any other length."""
    with pytest.raises(ValueError):
        header.encode(RING.signing, header.TO_CLIENT, b"", family=4, port=1, address=address, timestamp_ms=0)


# -- round trips -------------------------------------------------------------------------


CLIENTS = [("192.0.2.1", 32853), ("198.51.100.255", 1), ("0.0.0.0", 65535),
           ("2001:db8::1", 5000), ("2001:db8:1234:5678:11:2233:4455:6677", 32853), ("::ffff:192.0.2.1", 443)]


def client_fields(host, port):
    if ":" in host:
        return header.FAMILY_V6, port, socket.inet_pton(socket.AF_INET6, host)
    return header.FAMILY_V4, port, socket.inet_pton(socket.AF_INET, host) + bytes(12)


@pytest.mark.parametrize("host, port", CLIENTS)
@pytest.mark.parametrize("msg_type", [header.TO_TRANSCEIVER, header.TO_CLIENT])
def test_round_trip_data(host, port, msg_type):
    rng = random.Random(f"{host}{port}{msg_type}")
    family, port, address = client_fields(host, port)
    side = header.TRANSCEIVER_ACCEPTS if msg_type == header.TO_TRANSCEIVER else header.RELAY_ACCEPTS
    for key_id in RING.ids:
        for size in (0, 1, 20, 160, 1200, 1452):
            payload = rng.randbytes(size)
            route, flags, ts = rng.randrange(256), rng.choice((0, 1, 0x81)), 1800000000000 + rng.randrange(10 ** 6)
            head = header.encode(RING.get(key_id), msg_type, payload, route=route, family=family, port=port,
                                 address=address, timestamp_ms=ts, flags=flags)
            assert len(head) == header.HEADER_LEN
            hdr = header.decode(head + payload, RING, ts + 10, 2000, side)
            assert hdr[:8] == (msg_type, key_id, flags, route, family, port, address, ts)
            assert bytes(hdr.payload) == payload
            if family == 4:
                assert socket.inet_ntop(socket.AF_INET, hdr.address[:4]) == host
            else:
                assert socket.inet_ntop(socket.AF_INET6, hdr.address) == host


@pytest.mark.parametrize("msg_type, side", [(header.PROBE, header.TRANSCEIVER_ACCEPTS),
                                            (header.PROBE_ACK, header.RELAY_ACCEPTS)])
def test_round_trip_probe(msg_type, side):
    for payload in (b"", b"x", bytes(range(16))):
        head = header.encode(RING.signing, msg_type, payload, timestamp_ms=123456)
        hdr = header.decode(head + payload, RING, 123456, 0, side)
        assert hdr.type == msg_type and hdr.family == 0 and bytes(hdr.payload) == payload


# -- each rule ---------------------------------------------------------------------------


PROBE = BY_NAME["probe"]
PROBE_RAW = bytes.fromhex(PROBE["datagram"])
V6 = BY_NAME["to_transceiver_ipv6_failover"]
V6_RAW = bytes.fromhex(V6["datagram"])


def edit(raw, **octets):
    b = bytearray(raw)
    for name, value in octets.items():
        b[int(name[1:])] = value
    return bytes(b)


def test_short():
    for n in range(header.HEADER_LEN):
        assert decode(PROBE, PROBE_RAW[:n]) is Drop.HEADER_SHORT
    assert decode(PROBE, b"") is Drop.HEADER_SHORT


def test_magic():
    for o0, o1 in ((0xEF, 0x52), (0xEE, 0x53), (0x52, 0xEE), (0, 0)):
        assert decode(PROBE, edit(PROBE_RAW, o0=o0, o1=o1)) is Drop.HEADER_MAGIC


@pytest.mark.parametrize("version", [0, 2, 255])
def test_version(version):
    assert decode(PROBE, edit(PROBE_RAW, o2=version)) is Drop.HEADER_VERSION


@pytest.mark.parametrize("msg_type", [0, 5, 6, 128, 255])
def test_type_unknown(msg_type):
    assert decode(PROBE, edit(PROBE_RAW, o3=msg_type)) is Drop.HEADER_TYPE


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_type_wrong_direction(vec):
    other = "relay" if vec["accept"] == "transceiver" else "transceiver"
    assert decode(dict(vec, accept=other)) is Drop.HEADER_TYPE


@pytest.mark.parametrize("key_id", [0, 3, 255])
def test_key_id(key_id):
    assert decode(PROBE, edit(PROBE_RAW, o4=key_id)) is Drop.HEADER_KEY_ID


def test_key_id_removed_from_ring():
    only1 = keys.KeyRing({1: MASTERS[1]})
    assert decode(V6, ring=only1) is Drop.HEADER_KEY_ID


@pytest.mark.parametrize("family", [1, 2, 4, 6, 255])
def test_family_probe(family):
    assert decode(PROBE, edit(PROBE_RAW, o7=family)) is Drop.HEADER_FAMILY


@pytest.mark.parametrize("family", [0, 1, 2, 5, 10, 41, 255])
def test_family_data(family):
    assert decode(V6, edit(V6_RAW, o7=family)) is Drop.HEADER_FAMILY


def test_family_4_and_6_swap_is_a_mac_failure():
    assert decode(V6, edit(V6_RAW, o7=4)) is Drop.HEADER_MAC


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_mac_covers_every_octet(vec):
    raw = bytes.fromhex(vec["datagram"])
    for i in range(len(raw)):
        if i in (0, 1, 2, 3, 4, 7):
            continue                                 # checked before the tag
        for bit in (0x01, 0x80):
            assert decode(vec, edit(raw, **{f"o{i}": raw[i] ^ bit})) is Drop.HEADER_MAC, (i, bit)


def test_mac_wrong_key_same_id():
    assert decode(PROBE, ring=keys.KeyRing({1: MASTERS[2]})) is Drop.HEADER_MAC


def test_stale():
    ts = PROBE["timestamp_ms"]
    for now, result in ((ts, True), (ts + 2000, True), (ts - 2000, True),
                        (ts + 2001, False), (ts - 2001, False), (ts + 10 ** 9, False), (0, False)):
        got = decode(dict(PROBE, now_ms=now))
        assert isinstance(got, header.Header) if result else got is Drop.HEADER_STALE, now
    assert isinstance(header.decode(PROBE_RAW, RING, ts, 0, header.TRANSCEIVER_ACCEPTS), header.Header)
    assert header.decode(PROBE_RAW, RING, ts + 1, 0, header.TRANSCEIVER_ACCEPTS) is Drop.HEADER_STALE


def test_reserved_flags_ignored():
    vec = BY_NAME["probe_reserved_flag"]
    hdr = decode(vec)
    assert hdr.flags == 0x80 and not hdr.flags & header.FLAG_FAILOVER


def test_order():
    """The first failing rule, in the documented order, is the reason."""
    assert decode(PROBE, PROBE_RAW[:47]) is Drop.HEADER_SHORT
    assert decode(PROBE, edit(PROBE_RAW, o0=0, o2=9)) is Drop.HEADER_MAGIC
    assert decode(PROBE, edit(PROBE_RAW, o2=9, o3=9)) is Drop.HEADER_VERSION
    assert decode(PROBE, edit(PROBE_RAW, o3=9, o4=9)) is Drop.HEADER_TYPE
    assert decode(PROBE, edit(PROBE_RAW, o4=9, o7=9)) is Drop.HEADER_KEY_ID
    assert decode(PROBE, edit(PROBE_RAW, o7=9, o47=0)) is Drop.HEADER_FAMILY
    assert decode(dict(PROBE, now_ms=0), edit(PROBE_RAW, o47=PROBE_RAW[47] ^ 1)) is Drop.HEADER_MAC


# -- h11 style: whole, every prefix, trailing junk ---------------------------------------


@pytest.mark.parametrize("vec", VALID, ids=lambda v: v["name"])
def test_prefixes_and_trailing_junk(vec):
    raw = bytes.fromhex(vec["datagram"])
    assert isinstance(decode(vec, raw), header.Header)
    for n in range(len(raw)):
        assert decode(vec, raw[:n]) is (Drop.HEADER_SHORT if n < 48 else Drop.HEADER_MAC), n
    for junk in (b"\x00", b"\x00" * 4, b"\xff" * 48, raw):
        assert decode(vec, raw + junk) is Drop.HEADER_MAC


# -- the relay's inlined check (Router.from_transceivers), held equal to decode ---------

TX_SA = sockaddr.from_tuple(("10.0.0.5", 5000))
LISTENER_FAMILIES = [socket.AF_INET, socket.AF_INET6]
_ROUTERS = {}


def _router(ring, window_ms):
    """One router per (ring, window), listener 0 IPv4 and listener 1 IPv6, transceiver 1 at TX_SA."""
    key = (id(ring), window_ms)
    if key not in _ROUTERS:
        table = FlowTable(n_listeners=2, max_flows=100_000, max_pending_per_source=1 << 20, max_flows_per_session=0)
        _ROUTERS[key] = Router(table, ring, {1: TX_SA}, LISTENER_FAMILIES, Policy(header_window=window_ms / 1000))
    return _ROUTERS[key]


def expected_verdict(data, ring, now_ms, window_ms):
    """What the relay must make of `data` from its transceiver, from decode itself (and a flow it names)."""
    hdr = header.decode(data, ring, now_ms, window_ms, header.RELAY_ACCEPTS)
    if hdr.__class__ is Drop:
        return hdr, None
    if hdr.type == header.PROBE_ACK:
        return "probe ack", None
    sa = None
    if hdr.route < len(LISTENER_FAMILIES):
        sa = sockaddr.from_fields(hdr.family, hdr.port.to_bytes(2, "big"), hdr.address, LISTENER_FAMILIES[hdr.route])
    if sa is None:
        return Drop.NO_FLOW, None
    return ("sent", hdr.route, sa, bytes(hdr.payload)), sa


def relay_verdict(data, ring, now_ms, window_ms, flow_sa=None, route=0):
    """What Router.from_transceivers does with `data` from TX_SA: the Drop it counted, "probe ack"
    (consumed, nothing counted or sent), or ("sent", listener, destination, payload). `flow_sa` gets a
    confirmed flow of transceiver 1 on listener `route` first."""
    router = _router(ring, window_ms)
    if flow_sa is not None and router.flows.get(route, flow_sa) is None:
        router.flows.confirm(router.flows.open(route, flow_sa, 1, 0.0), 0.0)
    before = list(router.drops)
    buf = bytearray(data) + b"tail"          # a view into a larger buffer, as batchio gives
    router.from_transceivers([memoryview(buf)[:len(data)]], [TX_SA], 1, 0.0, now_ms)
    moved = [(Drop(i), n - before[i]) for i, n in enumerate(router.drops) if n != before[i]]
    sent = [(i, box) for i, box in enumerate(router.to_clients) if box.n]
    try:
        if moved:
            assert moved[1:] == [] and moved[0][1] == 1 and not sent, (moved, sent)
            return moved[0][0]
        if not sent:
            return "probe ack"
        (listener, box), = sent
        assert box.n == 1 and box.head[0] is None and box.origin[0] == 0
        return "sent", listener, box.dest[0], bytes(box.body[0])
    finally:
        for box in router.to_clients:
            box.clear()


def assert_relay_agrees(data, ring=RING, now_ms=0, window_ms=2000):
    want, sa = expected_verdict(data, ring, now_ms, window_ms)
    route = want[1] if want.__class__ is tuple else 0
    assert relay_verdict(data, ring, now_ms, window_ms, sa, route) == want, (data.hex(), now_ms, window_ms)
    return want


@pytest.mark.parametrize("vec", VALID + VECTORS["invalid"], ids=lambda v: v["name"])
def test_the_relay_check_agrees_with_decode_on_the_vectors(vec):
    raw = bytes.fromhex(vec["datagram"])
    want = assert_relay_agrees(raw, RING, vec["now_ms"], vec["window_ms"])
    if vec["accept"] == "relay" and vec.get("expect", "OK") == "OK":
        assert want.__class__ is not Drop
        assert (want == "probe ack") == (vec["type"] == header.PROBE_ACK)
    for n in (0, 1, 47, 48, len(raw) - 1):
        assert_relay_agrees(raw[:n], RING, vec["now_ms"], vec["window_ms"])
    assert_relay_agrees(raw + b"\x00", RING, vec["now_ms"], vec["window_ms"])


def test_the_relay_forwards_to_the_named_client_of_either_family_from_either_listener():
    for host, port in (("203.0.113.7", 5000), ("2001:db8::7", 5001)):
        family, port, address = client_fields(host, port)
        payload = b"\x80\x6f" + bytes(30)
        for route in (0, 1):
            data = header.encode(RING.signing, header.TO_CLIENT, payload, route=route, family=family, port=port,
                                 address=address, timestamp_ms=1000) + payload
            want = assert_relay_agrees(data, RING, 1000, 2000)
            if family == 6 and route == 0:
                assert want is Drop.NO_FLOW         # an IPv6 client cannot be reached from an IPv4 listener
            else:
                assert want[:2] == ("sent", route) and want[3] == payload
                assert want[2] == sockaddr.from_fields(family, port.to_bytes(2, "big"), address,
                                                       LISTENER_FAMILIES[route])


def test_the_relay_check_fuzz():
    """Random edits of valid relay-side datagrams, and random bytes: same answer as decode."""
    rng = random.Random(7)
    seeds = [bytes.fromhex(v["datagram"]) for v in VALID if v["accept"] == "relay"]
    for host, port in CLIENTS:
        family, port, address = client_fields(host, port)
        for key in (RING.get(1), RING.get(2)):
            payload = rng.randbytes(rng.choice((0, 1, 12, 160)))
            route = rng.choice((0, 1, rng.randrange(256)))       # both listeners, and routes to none
            seeds.append(header.encode(key, header.TO_CLIENT, payload, route=route, family=family,
                                       port=port, address=address, timestamp_ms=1000, flags=rng.randrange(256))
                         + payload)
    seeds.append(header.encode(RING.signing, header.PROBE_ACK, b"ack", timestamp_ms=1000) + b"ack")
    outcomes = set()
    for _ in range(4000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            i = rng.randrange(min(len(raw), 48) if rng.random() < 0.8 else len(raw))
            raw[i] = rng.choice((0, 1, 2, 3, 4, 5, 6, 0xEE, 0x52, 0xFF, rng.randrange(256)))
        if rng.random() < 0.1:
            raw = raw[:rng.randrange(len(raw) + 1)]
        if rng.random() < 0.05:
            raw = bytearray(rng.randbytes(rng.randrange(80)))
        now = rng.choice((1000, 1000 + rng.randrange(-3000, 3000), rng.randrange(2 ** 49)))
        ts = int.from_bytes(raw[26:32], "big") if len(raw) >= 32 else 0
        if rng.random() < 0.3:
            now = ts + rng.choice((-2001, -2000, 0, 2000, 2001))
        want = assert_relay_agrees(bytes(raw), RING if rng.random() < 0.9 else OTHER_RING, now, rng.choice((0, 2000)))
        outcomes.add(want if want.__class__ is Drop else ("ok", want if want == "probe ack" else want[1]))
    # the fuzz reached every rule and both accepted types
    assert HEADER_DROPS <= outcomes
    assert {("ok", "probe ack"), ("ok", 0), ("ok", 1), Drop.NO_FLOW} <= outcomes     # both listeners


def test_seal_same_with_either_mac_state():
    """seal gives the same bytes with keys.Key.header_openssl_mac, header_mac, or a fresh hmac.HMAC."""
    for vec in BASE:
        key = RING.get(vec["key_id"])
        head26 = header.prefix(vec["key_id"], vec["type"], vec["flags"], vec["route"], vec["family"],
                               vec["port"], bytes.fromhex(vec["address"]))
        ts6 = header.timestamp_bytes(vec["timestamp_ms"])
        py_state = hmac.new(HEADER_KEYS[vec["key_id"]], digestmod=hashlib.sha256)
        payload = memoryview(bytearray.fromhex(vec["payload"]))
        assert header.seal(py_state, head26, ts6, payload).hex() == vec["header"]
        assert header.seal(key.header_mac, head26, ts6, payload).hex() == vec["header"]
        assert header.seal(key.header_openssl_mac, head26, ts6, payload).hex() == vec["header"]
        assert header.seal(key.header_split, head26, ts6, payload).hex() == vec["header"]
        assert header.seal(key.header_split, head26, ts6, bytes(payload)).hex() == vec["header"]


@pytest.mark.parametrize("key_len", [0, 1, 32, 63, 64, 65, 200])
def test_split_hmac_is_hmac_sha256(key_len):
    """keys.split_hmac's (inner, outer) states give HMAC-SHA256 exactly, for any key length,
    and copying them leaves them as they were (they are shared by every packet)."""
    rnd = random.Random(key_len)
    key = bytes(rnd.randrange(256) for _ in range(key_len))
    inner, outer = keys.split_hmac(key)
    for size in (0, 1, 55, 56, 64, 208, 1500):
        msg = bytes(rnd.randrange(256) for _ in range(size))
        h = inner.copy()
        h.update(msg)
        o = outer.copy()
        o.update(h.digest())
        assert o.digest() == hmac.new(key, msg, hashlib.sha256).digest()
