"""edge_relay.transceiver: what a transceiver does with the wire protocol (PROTOCOL.md section 7).

Vectors: tests/vectors/header.json (the transceiver side of the header) and
tests/vectors/stun_rfc5769.json (the RFC 5769 request and our ICE-lite answers).
"""

import json
import random
import re
import socket
from pathlib import Path

import pytest

from edge_relay import header, keys, stun, token, transceiver
from edge_relay.drops import Drop

HERE = Path(__file__).parent / "vectors"
KEYS = json.loads((HERE / "keys.json").read_text())
HEADERS = json.loads((HERE / "header.json").read_text())
STUN = json.loads((HERE / "stun_rfc5769.json").read_text())
MASTERS = {v["key_id"]: bytes.fromhex(v["master"]) for v in KEYS["keys"]}
RING = keys.KeyRing(MASTERS, signing_key_id=2)       # key 2 signs
RING1 = keys.KeyRing(MASTERS, signing_key_id=1)       # key 1 signs
H = {v["name"]: v for v in HEADERS["valid"]}
MSG = {v["name"]: v for v in STUN["messages"] + STUN["answers"]}
REQUEST = bytes.fromhex(MSG["request"]["hex"])
PASSWORD = STUN["password"]
LOCAL_UFRAG = STUN["username"].split(":")[0]          # "evtj": the answering agent's ufrag
ICE_CHAR = re.compile(r"[A-Za-z0-9+/]+")


def raw(vec):
    return bytes.fromhex(vec["datagram"])


def receive(vec, endpoint=None):
    endpoint = endpoint or transceiver.Endpoint(RING, 0x0102, window_ms=vec["window_ms"])
    return endpoint.receive(raw(vec), vec["now_ms"])


# -- receive ---------------------------------------------------------------------------


def test_receive_ipv4():
    vec = H["to_transceiver_ipv4"]
    inbound = receive(vec)
    assert isinstance(inbound, transceiver.Inbound), inbound
    assert inbound.client == ("192.0.2.1", 32853)
    assert (inbound.route, inbound.family, inbound.port, inbound.failover) == (1, 4, 32853, False)
    assert inbound.address.hex() == vec["address"]
    assert bytes(inbound.payload) == REQUEST
    assert inbound.header.type == header.TO_TRANSCEIVER


def test_receive_ipv6_failover():
    vec = H["to_transceiver_ipv6_failover"]
    inbound = receive(vec)
    assert inbound.client == ("2001:db8::1", 5000)
    assert (inbound.route, inbound.family, inbound.failover) == (3, 6, True)
    assert bytes(inbound.payload).hex() == vec["payload"]


def test_receive_probe():
    inbound = receive(H["probe"])
    assert inbound.header.type == header.PROBE
    assert inbound.client == ("", 0) and inbound.family == 0
    assert bytes(inbound.payload).hex() == H["probe"]["payload"]


@pytest.mark.parametrize("vec", [v for v in HEADERS["invalid"] if v["accept"] == "transceiver"],
                         ids=lambda v: v["name"])
def test_receive_rejects_invalid_vectors(vec):
    endpoint = transceiver.Endpoint(RING, 0x0102, window_ms=vec["window_ms"])
    assert endpoint.receive(raw(vec), vec["now_ms"]) is Drop[vec["expect"]]


@pytest.mark.parametrize("name", ["to_client_ipv4", "probe_ack"])
def test_receive_rejects_relay_bound_types(name):
    assert receive(H[name]) is Drop.HEADER_TYPE


def test_receive_every_header_reason():
    vec = H["probe"]
    d = raw(vec)
    ep = transceiver.Endpoint(RING, 1, window_ms=2000)
    now = vec["now_ms"]

    def flip(i, v):
        b = bytearray(d)
        b[i] = v
        return bytes(b)

    assert ep.receive(d[:47], now) is Drop.HEADER_SHORT
    assert ep.receive(flip(0, 0), now) is Drop.HEADER_MAGIC
    assert ep.receive(flip(2, 2), now) is Drop.HEADER_VERSION
    assert ep.receive(flip(3, 2), now) is Drop.HEADER_TYPE
    assert ep.receive(flip(4, 7), now) is Drop.HEADER_KEY_ID
    assert ep.receive(flip(7, 4), now) is Drop.HEADER_FAMILY
    assert ep.receive(flip(47, d[47] ^ 1), now) is Drop.HEADER_MAC
    assert ep.receive(d, now + 10 ** 6) is Drop.HEADER_STALE


def test_receive_uses_its_window():
    vec = H["probe"]
    late = vec["timestamp_ms"] + 500
    assert isinstance(transceiver.Endpoint(RING, 1, window_ms=500).receive(raw(vec), late), transceiver.Inbound)
    assert transceiver.Endpoint(RING, 1, window_ms=499).receive(raw(vec), late) is Drop.HEADER_STALE


# -- sending: exact bytes --------------------------------------------------------------


def test_to_client_reproduces_vector():
    """The answer to to_transceiver_ipv4, sealed with key 1, is the to_client_ipv4 vector."""
    inbound = receive(H["to_transceiver_ipv4"])
    answer = bytes.fromhex(MSG["answer_ipv4"]["hex"])
    out = transceiver.Endpoint(RING1, 0x0102).to_client(inbound, answer, H["to_client_ipv4"]["timestamp_ms"])
    assert out.hex() == H["to_client_ipv4"]["datagram"]


def test_to_client_echoes_route_and_client_block():
    vec = H["to_transceiver_ipv6_failover"]
    inbound = receive(vec)
    out = transceiver.Endpoint(RING, 1).to_client(inbound, memoryview(b"\x16\xfe\xfd"), vec["timestamp_ms"] + 1)
    hdr = header.decode(out, RING, vec["timestamp_ms"], 2000)
    assert hdr.type == header.TO_CLIENT
    assert hdr.client_block == raw(vec)[6:26]
    assert hdr.route == 3 and hdr.key_id == 2
    assert hdr.flags == 0                   # FAILOVER is relay -> transceiver information, not echoed
    assert bytes(hdr.payload) == b"\x16\xfe\xfd"


def test_answer_probe_reproduces_vector():
    inbound = receive(H["probe"])
    out = transceiver.Endpoint(RING, 0x0102).answer_probe(inbound, H["probe_ack"]["timestamp_ms"])
    assert out.hex() == H["probe_ack"]["datagram"]
    hdr = header.decode(out, RING, H["probe_ack"]["now_ms"], 2000)
    assert hdr.type == header.PROBE_ACK and bytes(hdr.payload) == bytes(inbound.payload)


# -- ICE-lite ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["answer_ipv4", "answer_ipv6"])
def test_answer_binding_reproduces_vector(name):
    vec = MSG[name]
    request = stun.decode(REQUEST)
    client = (vec["xor_mapped_address"]["host"], vec["xor_mapped_address"]["port"])
    assert transceiver.answer_binding(request, client, PASSWORD, software=b"test vector").hex() == vec["hex"]


@pytest.mark.parametrize("client", [("192.0.2.1", 32853), ("2001:db8:1234:5678:11:2233:4455:6677", 32853),
                                    ("2001:db8::1", 5000), ("198.51.100.7", 1)])
@pytest.mark.parametrize("software", [b"edge-relay demo", b"", None])
def test_answer_binding_decodes(client, software):
    request = transceiver.check_request(REQUEST, LOCAL_UFRAG, PASSWORD)
    kwargs = {} if software == b"edge-relay demo" else {"software": software}
    answer = transceiver.answer_binding(request, client, PASSWORD, **kwargs)
    msg = stun.decode(answer)
    assert isinstance(msg, stun.Message)
    assert msg.msg_type == stun.BINDING_SUCCESS
    assert msg.transaction_id == request.transaction_id
    assert stun.check_integrity(answer, msg, PASSWORD.encode())
    assert not stun.check_integrity(answer, msg, b"wrong")
    assert msg.get(stun.FINGERPRINT) is not None
    assert stun.decode_xor_address(msg.get(stun.XOR_MAPPED_ADDRESS), msg.transaction_id) == client
    assert (msg.get(stun.SOFTWARE) is not None) == bool(software)
    assert stun.USERNAME not in msg.attributes
    assert len(answer) < len(REQUEST)                   # an answer never amplifies the request


def test_check_request_accepts_rfc_request():
    msg = transceiver.check_request(REQUEST, LOCAL_UFRAG, PASSWORD)
    assert isinstance(msg, stun.Message)
    assert msg.transaction_id.hex() == STUN["transaction_id"]
    assert isinstance(transceiver.check_request(memoryview(REQUEST), LOCAL_UFRAG, PASSWORD), stun.Message)


@pytest.mark.parametrize("ufrag", ["evtk", "evt", "evtj:", "h6vY", "EVTJ", "evtjx"])
def test_check_request_wrong_ufrag(ufrag):
    assert transceiver.check_request(REQUEST, ufrag, PASSWORD) is Drop.STUN_NO_USERNAME


@pytest.mark.parametrize("password", ["", "VOkJxbRl1RmTxUk/WvJxBT", PASSWORD + "x", PASSWORD[:-1]])
def test_check_request_wrong_password(password):
    assert transceiver.check_request(REQUEST, LOCAL_UFRAG, password) is Drop.STUN_INTEGRITY


def test_check_request_not_a_binding_request():
    for name in ("response_ipv4", "response_ipv6", "answer_ipv4"):
        assert transceiver.check_request(bytes.fromhex(MSG[name]["hex"]), LOCAL_UFRAG, PASSWORD) \
            is Drop.STUN_NOT_BINDING_REQUEST
    ind = stun.encode(stun.BINDING_INDICATION, bytes(12), [(stun.USERNAME, b"evtj:x")], PASSWORD.encode())
    assert transceiver.check_request(ind, LOCAL_UFRAG, PASSWORD) is Drop.STUN_NOT_BINDING_REQUEST


@pytest.mark.parametrize("username", [None, b"evtj", b"evtj:", b":h6vY", b""])
def test_check_request_bad_username(username):
    attrs = [] if username is None else [(stun.USERNAME, username)]
    req = stun.encode(stun.BINDING_REQUEST, bytes(12), attrs, integrity_key=PASSWORD.encode())
    assert transceiver.check_request(req, LOCAL_UFRAG, PASSWORD) is Drop.STUN_NO_USERNAME


def test_check_request_without_integrity():
    req = stun.encode(stun.BINDING_REQUEST, bytes(12), [(stun.USERNAME, b"evtj:h6vY")])
    assert transceiver.check_request(req, LOCAL_UFRAG, PASSWORD) is Drop.STUN_INTEGRITY


def test_check_request_malformed():
    for bad in (b"", REQUEST[:-1], REQUEST + b"\x00\x00\x00\x00", b"\x16\xfe\xfd" + bytes(40)):
        assert transceiver.check_request(bad, LOCAL_UFRAG, PASSWORD) is Drop.STUN_MALFORMED


# -- sessions --------------------------------------------------------------------------


def test_new_session():
    ep = transceiver.Endpoint(RING, 0xBEEF)
    wall = 1800000000
    creds = ep.new_session(wall)
    assert len(creds.ufrag) == token.TOKEN_CHARS and ICE_CHAR.fullmatch(creds.ufrag)
    tok = token.verify(creds.ufrag, RING, wall, transceiver.DEFAULT_SESSION_LIFETIME, 0)
    assert tok.transceiver == 0xBEEF and tok.key_id == 2
    assert tok.expiry == wall + transceiver.DEFAULT_SESSION_LIFETIME
    assert len(creds.password) == 24 and ICE_CHAR.fullmatch(creds.password)   # RFC 8839: >= 22 ice-chars
    assert token.verify(creds.ufrag, RING, wall, transceiver.DEFAULT_SESSION_LIFETIME - 1, 0) is Drop.TOKEN_FUTURE
    other = ep.new_session(wall)
    assert other.ufrag != creds.ufrag and other.password != creds.password


def test_new_session_lifetime_and_signing_key():
    creds = transceiver.Endpoint(RING1, 7).new_session(1000.9, lifetime=60)
    tok = token.verify(creds.ufrag, RING, 1000, 60, 1)
    assert (tok.key_id, tok.transceiver, tok.expiry) == (1, 7, 1060)


# -- the whole loop, relay simulated ---------------------------------------------------------


def client_block(host, port):
    if ":" in host:
        return header.FAMILY_V6, socket.inet_pton(socket.AF_INET6, host)
    return header.FAMILY_V4, socket.inet_pton(socket.AF_INET, host) + bytes(12)


@pytest.mark.parametrize("client", [("192.0.2.1", 32853), ("2001:db8::1", 5000), ("203.0.113.9", 61000)])
@pytest.mark.parametrize("route", [0, 1, 200])
def test_relay_transceiver_loop(client, route):
    rng = random.Random(f"{client}{route}")
    now_ms = 1800000000000
    ep = transceiver.Endpoint(RING, 0x0102)
    creds = ep.new_session(now_ms // 1000)
    # the client's connectivity check (RFC 8445 section 7.2.2), as a browser sends it
    txid = rng.randbytes(12)
    request = stun.encode(stun.BINDING_REQUEST, txid, [
        (stun.USERNAME, f"{creds.ufrag}:abcd".encode()),
        (stun.PRIORITY, (0x6E0001FF).to_bytes(4, "big")),
        (stun.ICE_CONTROLLING, rng.randbytes(8)),
        (stun.USE_CANDIDATE, b""),
    ], integrity_key=creds.password.encode())
    # relay: first-packet routing
    assert stun.classify(request[0]) == stun.STUN
    username = stun.binding_username(request)
    server, _ = stun.split_username(username)
    tok = token.verify(server, RING, now_ms // 1000, 86400, 5)
    assert tok.transceiver == 0x0102
    family, address = client_block(*client)
    datagram = header.encode(RING.signing, header.TO_TRANSCEIVER, request, route=route, family=family,
                             port=client[1], address=address, timestamp_ms=now_ms) + request
    # transceiver
    inbound = ep.receive(datagram, now_ms + 3)
    assert inbound.client == client
    msg = transceiver.check_request(inbound.payload, creds.ufrag, creds.password)
    assert isinstance(msg, stun.Message)
    out = ep.to_client(inbound, transceiver.answer_binding(msg, inbound.client, creds.password), now_ms + 4)
    # relay: back to the client
    hdr = header.decode(out, RING, now_ms + 5, 2000, header.RELAY_ACCEPTS)
    assert hdr.type == header.TO_CLIENT and hdr.route == route
    assert hdr.client_block == datagram[6:26]
    answer = bytes(hdr.payload)
    reply = stun.decode(answer)
    assert reply.transaction_id == txid
    assert stun.check_integrity(answer, reply, creds.password.encode())
    assert stun.decode_xor_address(reply.get(stun.XOR_MAPPED_ADDRESS), txid) == client
    # a wrong password or another session's ufrag gets nothing
    assert transceiver.check_request(inbound.payload, creds.ufrag, "x" * 24) is Drop.STUN_INTEGRITY
    assert transceiver.check_request(inbound.payload, ep.new_session(0).ufrag, creds.password) \
        is Drop.STUN_NO_USERNAME
