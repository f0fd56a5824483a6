"""Fuzz and mutation tests for every parser that sees untrusted bytes.

The invariant (errors.py, drops.py): for any input, a decoder returns either a
valid result or a documented Drop reason; any exception is a bug. On top of
that, a datagram or token that differs from a valid one in any octet must
never verify, since every octet is under a MAC (or, for STUN, under
MESSAGE-INTEGRITY and FINGERPRINT).

Inputs: seeded random bytes and structured random messages; for every valid
vector in tests/vectors, every truncation, every single-octet substitution,
every bit flip, random multi-octet mutations and random extensions. Seeds are
fixed, so a failure reproduces; EDGE_RELAY_FUZZ_SCALE=10 runs ten times as
many random cases.
"""

import base64
import json
import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from edge_relay import header, keys, stun, token, transceiver
from edge_relay.drops import Drop

HERE = Path(__file__).parent / "vectors"
KEYS = json.loads((HERE / "keys.json").read_text())
TOKENS = json.loads((HERE / "token.json").read_text())
HEADERS = json.loads((HERE / "header.json").read_text())
STUN = json.loads((HERE / "stun_rfc5769.json").read_text())
RING = keys.KeyRing({v["key_id"]: bytes.fromhex(v["master"]) for v in KEYS["keys"]})
SCALE = int(os.environ.get("EDGE_RELAY_FUZZ_SCALE", "1"))

TOKEN_DROPS = {Drop.TOKEN_MALFORMED, Drop.TOKEN_VERSION, Drop.TOKEN_KEY_ID, Drop.TOKEN_MAC,
               Drop.TOKEN_EXPIRED, Drop.TOKEN_FUTURE}
HEADER_DROPS = {Drop.HEADER_SHORT, Drop.HEADER_MAGIC, Drop.HEADER_VERSION, Drop.HEADER_TYPE,
                Drop.HEADER_KEY_ID, Drop.HEADER_FAMILY, Drop.HEADER_MAC, Drop.HEADER_STALE}
STUN_DROPS = {Drop.STUN_MALFORMED}
USERNAME_DROPS = {Drop.STUN_MALFORMED, Drop.STUN_NOT_BINDING_REQUEST, Drop.STUN_NO_USERNAME}
CHECK_DROPS = USERNAME_DROPS | {Drop.STUN_INTEGRITY}
SIDES = (header.RELAY_ACCEPTS, header.TRANSCEIVER_ACCEPTS)
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def mutations(raw, rng, n_random):
    """Every truncation, octet substitution and bit flip of `raw`, then random mutations and extensions.

    Yields only inputs that differ from `raw`.
    """
    for k in range(len(raw)):
        yield raw[:k]
    for i in range(len(raw)):
        b = bytearray(raw)
        b[i] = (raw[i] + rng.randrange(1, 256)) & 0xFF
        yield bytes(b)
        for bit in range(8):
            b[i] = raw[i] ^ (1 << bit)
            yield bytes(b)
    for _ in range(n_random):
        b = bytearray(raw)
        for _ in range(rng.randrange(1, 5)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if bytes(b) != raw:
            yield bytes(b)
        yield raw + rng.randbytes(rng.randrange(1, 65))
        cut = rng.randrange(len(raw))
        yield raw[:cut] + rng.randbytes(rng.randrange(1, 8)) + raw[cut:]


# -- token.verify ----------------------------------------------------------------------


def verify(ufrag, vec):
    result = token.verify(ufrag, RING, vec["wall"], vec["max_lifetime"], vec["skew"])
    assert result.__class__ is token.Token or result in TOKEN_DROPS, (ufrag, result)
    return result


@pytest.mark.parametrize("vec", [v for v in TOKENS["valid"] if "why" not in v], ids=lambda v: v["name"])
def test_token_mutations_never_verify(vec):
    rng = random.Random(vec["ufrag"])
    u = vec["ufrag"].encode()
    assert isinstance(verify(u, vec), token.Token)
    count = 0
    for m in mutations(u, rng, 2000 * SCALE):
        assert verify(m, vec).__class__ is Drop, m
        assert verify(m.decode("latin-1"), vec).__class__ is Drop, m
        count += 1
    # substitutions inside the base64 alphabet: the decoded octets change, the tag does not
    for i in range(len(u)):
        for c in rng.sample(B64, 8):
            if c != u[i]:
                assert verify(u[:i] + bytes([c]) + u[i + 1:], vec).__class__ is Drop
                count += 1
    assert count > 1000


def test_token_random_inputs():
    rng = random.Random(1)
    vec = TOKENS["valid"][0]
    seen = set()
    for _ in range(20000 * SCALE):
        kind = rng.randrange(4)
        if kind == 0:
            s = rng.randbytes(rng.randrange(300))
        elif kind == 1:
            s = bytes(rng.choice(B64) for _ in range(rng.randrange(300)))
        elif kind == 2:                      # well-formed v1 shape with random key id and tag
            s = base64.b64encode(b"\x01" + rng.randbytes(23))
        else:
            s = "".join(chr(rng.randrange(0x2FF)) for _ in range(rng.randrange(40)))
        seen.add(verify(s, vec))
    assert {Drop.TOKEN_MALFORMED, Drop.TOKEN_VERSION, Drop.TOKEN_KEY_ID, Drop.TOKEN_MAC} <= seen


def test_peek_transceiver_random_inputs():
    rng = random.Random(2)
    for _ in range(10000 * SCALE):
        s = bytes(rng.choice(B64 + b"=-_ \n\x00\xff") for _ in range(rng.choice((31, 32, 33, rng.randrange(80)))))
        result = token.peek_transceiver(s)
        assert result is None or 0 <= result <= 0xFFFF


# -- header.decode ---------------------------------------------------------------------


def decode(datagram, vec, accept):
    result = header.decode(datagram, RING, vec["now_ms"], vec["window_ms"], accept)
    assert result.__class__ is header.Header or result in HEADER_DROPS, result
    return result


@pytest.mark.parametrize("vec", [v for v in HEADERS["valid"] if not v["name"].startswith("probe_window")],
                         ids=lambda v: v["name"])
def test_header_mutations_never_verify(vec):
    rng = random.Random(vec["datagram"])
    raw = bytes.fromhex(vec["datagram"])
    accept = header.RELAY_ACCEPTS if vec["accept"] == "relay" else header.TRANSCEIVER_ACCEPTS
    assert isinstance(decode(raw, vec, accept), header.Header)
    count = 0
    for m in mutations(raw, rng, 2000 * SCALE):
        for side in SIDES:
            assert decode(m, vec, side).__class__ is Drop, m.hex()
        assert decode(memoryview(m), vec, accept).__class__ is Drop
        count += 1
    assert count > 1000


def test_header_random_inputs():
    rng = random.Random(3)
    vec = HEADERS["valid"][0]
    seen = set()
    for _ in range(20000 * SCALE):
        n = rng.randrange(120)
        d = bytearray(rng.randbytes(n))
        if n >= 8 and rng.random() < 0.8:        # get past the cheap checks most of the time
            d[0:3] = b"\xee\x52" + bytes([rng.choice((1, 1, 1, 2))])
            d[3] = rng.choice((0, 1, 2, 3, 4, 5))
            d[4] = rng.choice((0, 1, 2, 3))
            d[7] = rng.choice((0, 4, 6, 5))
        for side in SIDES:
            seen.add(decode(bytes(d), vec, side))
    assert seen <= HEADER_DROPS
    assert HEADER_DROPS - {Drop.HEADER_STALE} <= seen


def test_header_random_sealed_round_trip():
    """Random well-formed headers: decode(encode(x)) == x, and any flip of it is a Drop."""
    rng = random.Random(4)
    for _ in range(5000 * SCALE):
        key = RING.get(rng.choice(RING.ids))
        msg_type = rng.choice(header.TYPES)
        probe = msg_type in (header.PROBE, header.PROBE_ACK)
        family = 0 if probe else rng.choice((4, 6))
        address = bytes(16) if probe else (rng.randbytes(4) + bytes(12) if family == 4 else rng.randbytes(16))
        port, route, flags = (0 if probe else rng.randrange(65536)), rng.randrange(256), rng.randrange(256)
        ts = rng.randrange(2 ** 48)
        payload = rng.randbytes(rng.randrange(200))
        datagram = header.encode(key, msg_type, payload, route=route, family=family, port=port,
                                 address=address, timestamp_ms=ts, flags=flags) + payload
        side = header.RELAY_ACCEPTS if msg_type in header.RELAY_ACCEPTS else header.TRANSCEIVER_ACCEPTS
        hdr = header.decode(datagram, RING, ts, 0, side)
        assert hdr[:8] == (msg_type, key.key_id, flags, route, family, port, address, ts)
        assert bytes(hdr.payload) == payload
        b = bytearray(datagram)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        assert header.decode(bytes(b), RING, ts, 0, side).__class__ is Drop


# -- stun.decode and binding_username --------------------------------------------------------


def stun_decode(buf):
    msg = stun.decode(buf)
    if msg.__class__ is Drop:
        assert msg in STUN_DROPS
        return msg
    assert msg.__class__ is stun.Message
    n = len(buf)
    assert len(msg.transaction_id) == 12
    for value in msg.attributes.values():
        assert isinstance(value, memoryview) and len(value) <= n - 24
    assert msg.integrity_offset == -1 or 20 <= msg.integrity_offset <= n - 24
    assert stun.check_integrity(buf, msg, b"VOkJxbRl1RmTxUk/WvJxBt") in (True, False)
    xma = msg.get(stun.XOR_MAPPED_ADDRESS)
    if xma is not None:
        assert stun.decode_xor_address(xma, msg.transaction_id) is None or \
            isinstance(stun.decode_xor_address(xma, msg.transaction_id), tuple)
    return msg


def username(buf):
    result = stun.binding_username(buf)
    assert result.__class__ is bytes or result in USERNAME_DROPS, result
    if result.__class__ is bytes:
        parts = stun.split_username(result)
        assert parts is None or (len(parts) == 2 and all(parts))
    return result


STUN_VECTORS = STUN["messages"] + STUN["answers"]


@pytest.mark.parametrize("vec", STUN_VECTORS, ids=lambda v: v["name"])
def test_stun_mutations(vec):
    rng = random.Random(vec["hex"])
    raw = bytes.fromhex(vec["hex"])
    password = STUN["password"].encode()
    count = 0
    end = vec["integrity_offset"] + 24          # the octets MESSAGE-INTEGRITY covers, and itself
    for m in mutations(raw, rng, 2000 * SCALE):
        msg = stun_decode(m)
        username(m)
        if msg.__class__ is stun.Message:
            # FINGERPRINT covers every octet, but it is optional and it follows
            # MESSAGE-INTEGRITY: a mutant that turned it into another (ignored)
            # attribute parses. It still never passes the integrity check unless
            # every octet under MESSAGE-INTEGRITY is intact.
            assert stun.FINGERPRINT not in msg.attributes, m.hex()
            intact = len(m) == len(raw) and m[:end] == raw[:end]
            assert stun.check_integrity(m, msg, password) == intact, m.hex()
        count += 1
    assert count > 1000


def random_message(rng):
    """A structurally plausible STUN message: right cookie, random TLVs, sometimes MI and FP."""
    msg_type = rng.choice((0x0001, 0x0001, 0x0101, 0x0011, 0x0111, rng.randrange(0x4000), rng.randrange(0x10000)))
    attrs = []
    for _ in range(rng.randrange(6)):
        atype = rng.choice((stun.USERNAME, stun.SOFTWARE, stun.PRIORITY, stun.MESSAGE_INTEGRITY,
                            stun.FINGERPRINT, stun.XOR_MAPPED_ADDRESS, stun.MESSAGE_INTEGRITY_SHA256,
                            rng.randrange(0x10000)))
        alen = rng.choice((0, 1, 4, 8, 20, 32, rng.randrange(600)))
        value = rng.randbytes(alen)
        attrs.append(struct.pack(">HH", atype, alen if rng.random() < 0.9 else rng.randrange(0x10000))
                     + value + bytes(-alen & 3 if rng.random() < 0.9 else rng.randrange(4)))
    body = b"".join(attrs)
    length = len(body) if rng.random() < 0.85 else rng.randrange(0x10000)
    if rng.random() < 0.3:       # append a correct FINGERPRINT
        head = struct.pack(">HHI12s", msg_type, len(body) + 8, 0x2112A442, rng.randbytes(12))
        crc = zlib.crc32(head + body) ^ 0x5354554E
        return head + body + struct.pack(">HHI", stun.FINGERPRINT, 4, crc)
    return struct.pack(">HHI12s", msg_type & 0xFFFF, length, 0x2112A442, rng.randbytes(12)) + body


def test_stun_random_inputs():
    rng = random.Random(5)
    seen_ok = 0
    for _ in range(20000 * SCALE):
        if rng.random() < 0.2:
            buf = rng.randbytes(rng.randrange(100))
        else:
            buf = random_message(rng)
        msg = stun_decode(buf)
        username(buf)
        stun_decode(memoryview(buf))
        if msg.__class__ is stun.Message:
            seen_ok += 1
            # decode -> encode -> decode keeps the attributes (pion/turn style)
            attrs = [(t, bytes(v)) for t, v in msg.attributes.items()
                     if t not in (stun.MESSAGE_INTEGRITY, stun.FINGERPRINT)]
            again = stun.decode(stun.encode(msg.msg_type, msg.transaction_id, attrs, fingerprint=False))
            assert again.__class__ is stun.Message
            assert {t: bytes(v) for t, v in again.attributes.items()} == dict(attrs)
    assert seen_ok > 500


def test_classify_total():
    for b in range(256):
        assert stun.classify(b) in (stun.OTHER, stun.STUN, stun.DTLS, stun.RTP)


# -- transceiver.check_request ---------------------------------------------------------


def check(buf, ufrag, password):
    result = transceiver.check_request(buf, ufrag, password)
    assert result.__class__ is stun.Message or result in CHECK_DROPS, result
    return result


def test_check_request_mutations_never_pass():
    request = bytes.fromhex(STUN["messages"][0]["hex"])
    password = STUN["password"]
    rng = random.Random(6)
    assert check(request, "evtj", password).__class__ is stun.Message
    # and a request as a browser sends it, with a routing token as the local ufrag
    creds = transceiver.Endpoint(RING, 9).new_session(1800000000)
    browser = stun.encode(stun.BINDING_REQUEST, rng.randbytes(12), [
        (stun.USERNAME, f"{creds.ufrag}:x7Yq".encode()), (stun.PRIORITY, b"\x6e\x00\x01\xff"),
        (stun.ICE_CONTROLLING, rng.randbytes(8)), (stun.USE_CANDIDATE, b"")], creds.password.encode())
    assert check(browser, creds.ufrag, creds.password).__class__ is stun.Message
    count = 0
    for raw, ufrag, pwd in ((request, "evtj", password), (browser, creds.ufrag, creds.password)):
        end = stun.decode(raw).integrity_offset + 24
        for m in mutations(raw, rng, 2000 * SCALE):
            result = check(m, ufrag, pwd)
            if result.__class__ is stun.Message:
                # only a mutant of the FINGERPRINT that made it an ignored attribute
                assert len(m) == len(raw) and m[:end] == raw[:end], m.hex()
                assert stun.FINGERPRINT not in result.attributes
            count += 1
    assert count > 2000


def test_check_request_random_inputs():
    rng = random.Random(7)
    for _ in range(10000 * SCALE):
        buf = random_message(rng) if rng.random() < 0.8 else rng.randbytes(rng.randrange(64))
        check(buf, rng.choice(("evtj", "a", "x" * 32)), rng.choice(("", "VOkJxbRl1RmTxUk/WvJxBt")))


def test_endpoint_receive_random_inputs():
    rng = random.Random(8)
    ep = transceiver.Endpoint(RING, 1)
    for _ in range(10000 * SCALE):
        d = bytearray(rng.randbytes(rng.randrange(100)))
        if len(d) >= 8 and rng.random() < 0.8:
            d[0:5] = b"\xee\x52\x01" + bytes([rng.choice((1, 3)), rng.choice((1, 2))])
            d[7] = rng.choice((0, 4, 6))
        result = ep.receive(bytes(d), 1800000000000)
        assert result in HEADER_DROPS
