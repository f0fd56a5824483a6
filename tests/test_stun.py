"""edge_relay.stun: RFC 7983 demultiplexing and the STUN subset (RFC 8489) relay and transceiver read.

Vectors: RFC 5769 sections 2.1-2.3 (https://www.rfc-editor.org/rfc/rfc5769), in
tests/vectors/stun_rfc5769.json with edge_relay's own answers to the request.
"""

import hashlib
import hmac
import json
import random
import struct
import zlib
from pathlib import Path

import pytest

from edge_relay import stun
from edge_relay.drops import Drop

VECTORS = json.loads((Path(__file__).parent / "vectors" / "stun_rfc5769.json").read_text())
MESSAGES = {v["name"]: v for v in VECTORS["messages"]}
ANSWERS = {v["name"]: v for v in VECTORS["answers"]}
ALL = VECTORS["messages"] + VECTORS["answers"]
PASSWORD = VECTORS["password"].encode()
TXID = bytes.fromhex(VECTORS["transaction_id"])
REQUEST = bytes.fromhex(MESSAGES["request"]["hex"])
COOKIE = 0x2112A442


def build(msg_type=stun.BINDING_REQUEST, attrs=(), txid=TXID, cookie=COOKIE, length=None,
          integrity=None, fingerprint=False, after=()):
    """A STUN message built by hand (not by stun.encode): attrs, then MESSAGE-INTEGRITY keyed
    with `integrity`, then the `after` attributes, then FINGERPRINT. `length` overrides the
    header's length field."""
    def tlv(t, v):
        return struct.pack(">HH", t, len(v)) + v + bytes(-len(v) & 3)

    body = b"".join(tlv(t, v) for t, v in attrs)
    if integrity is not None:
        head = struct.pack(">HHI12s", msg_type, len(body) + 24, cookie, txid)
        body += tlv(stun.MESSAGE_INTEGRITY, hmac.new(integrity, head + body, hashlib.sha1).digest())
    body += b"".join(tlv(t, v) for t, v in after)
    if fingerprint:
        head = struct.pack(">HHI12s", msg_type, len(body) + 8, cookie, txid)
        body += tlv(stun.FINGERPRINT, struct.pack(">I", zlib.crc32(head + body) ^ 0x5354554E))
    return struct.pack(">HHI12s", msg_type, len(body) if length is None else length, cookie, txid) + body


# -- RFC 7983 ------------------------------------------------------------------------


def rfc7983(b):
    """RFC 7983 section 7, written out."""
    if 0 <= b <= 3:
        return stun.STUN
    if 20 <= b <= 63:
        return stun.DTLS
    if 128 <= b <= 191:
        return stun.RTP
    return stun.OTHER            # ZRTP 16..19, TURN channels 64..79, the rest unassigned


def test_classify_every_octet():
    for b in range(256):
        assert stun.classify(b) == rfc7983(b), b


@pytest.mark.parametrize("first, kind", [
    (0, stun.STUN), (1, stun.STUN), (3, stun.STUN), (4, stun.OTHER), (15, stun.OTHER),
    (16, stun.OTHER), (19, stun.OTHER),                     # ZRTP
    (20, stun.DTLS), (22, stun.DTLS), (63, stun.DTLS),
    (64, stun.OTHER), (79, stun.OTHER), (127, stun.OTHER),  # TURN channels 64..79, unassigned
    (128, stun.RTP), (0x80, stun.RTP), (191, stun.RTP),
    (192, stun.OTHER), (255, stun.OTHER),
])
def test_classify_boundaries(first, kind):
    assert stun.classify(first) == kind


def test_classify_the_vectors():
    for vec in ALL:
        assert stun.classify(bytes.fromhex(vec["hex"])[0]) == stun.STUN


# -- RFC 5769 vectors, both directions ----------------------------------------------------


@pytest.mark.parametrize("vec", ALL, ids=lambda v: v["name"])
def test_vectors_decode(vec):
    raw = bytes.fromhex(vec["hex"])
    for form in (raw, bytearray(raw), memoryview(raw)):
        msg = stun.decode(form)
        assert isinstance(msg, stun.Message), msg
        assert msg.msg_type == vec["msg_type"]
        assert msg.transaction_id.hex() == vec["transaction_id"] == VECTORS["transaction_id"]
        assert msg.integrity_offset == vec["integrity_offset"]
        assert stun.check_integrity(form, msg, PASSWORD) is True
        assert stun.check_integrity(form, msg, PASSWORD + b"x") is False
        assert stun.check_integrity(form, msg, b"") is False
        for attr in vec["attributes"]:
            assert bytes(msg.get(attr["type"])).hex() == attr["value"]
        assert msg.get(stun.FINGERPRINT) is not None
    assert len(raw) == vec["length"]


def test_request_fields():
    vec = MESSAGES["request"]
    msg = stun.decode(REQUEST)
    assert msg.msg_type == stun.BINDING_REQUEST
    assert bytes(msg.get(stun.USERNAME)) == VECTORS["username"].encode() == vec["username"].encode()
    assert bytes(msg.get(stun.SOFTWARE)) == b"STUN test client"
    assert struct.unpack(">I", msg.get(stun.PRIORITY))[0] == 0x6E0001FF
    assert bytes(msg.get(stun.ICE_CONTROLLED)).hex() == "932ff9b151263b36"
    assert stun.binding_username(REQUEST) == b"evtj:h6vY"
    assert stun.split_username(b"evtj:h6vY") == (b"evtj", b"h6vY")


@pytest.mark.parametrize("name", ["response_ipv4", "response_ipv6", "answer_ipv4", "answer_ipv6"])
def test_xor_mapped_address(name):
    vec = MESSAGES.get(name) or ANSWERS[name]
    raw = bytes.fromhex(vec["hex"])
    msg = stun.decode(raw)
    assert msg.msg_type == stun.BINDING_SUCCESS
    xma = msg.get(stun.XOR_MAPPED_ADDRESS)
    expect = (vec["xor_mapped_address"]["host"], vec["xor_mapped_address"]["port"])
    assert stun.decode_xor_address(xma, TXID) == expect
    # the encoder reproduces the RFC's attribute value exactly
    assert stun.encode_xor_address(expect[0], expect[1], TXID) == bytes(xma)


def test_rfc_addresses():
    assert MESSAGES["response_ipv4"]["xor_mapped_address"] == {"host": "192.0.2.1", "port": 32853}
    assert MESSAGES["response_ipv6"]["xor_mapped_address"] == {
        "host": "2001:db8:1234:5678:11:2233:4455:6677", "port": 32853}
    assert VECTORS["source"] == "https://www.rfc-editor.org/rfc/rfc5769"


@pytest.mark.parametrize("name", ["answer_ipv4", "answer_ipv6"])
def test_encode_reproduces_answers(name):
    vec = ANSWERS[name]
    client = vec["xor_mapped_address"]
    raw = stun.encode(stun.BINDING_SUCCESS, TXID, [
        (stun.SOFTWARE, b"test vector"),
        (stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(client["host"], client["port"], TXID)),
    ], integrity_key=PASSWORD)
    assert raw.hex() == vec["hex"]


@pytest.mark.parametrize("rfc, ours", [("response_ipv4", "answer_ipv4"), ("response_ipv6", "answer_ipv6")])
def test_answers_differ_from_rfc_only_in_padding_and_checks(rfc, ours):
    a, b = bytes.fromhex(MESSAGES[rfc]["hex"]), bytes.fromhex(ANSWERS[ours]["hex"])
    assert len(a) == len(b)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    mi = MESSAGES[rfc]["integrity_offset"]
    assert diff[0] == 35                              # the SOFTWARE padding octet: 0x20 vs 0x00
    assert all(i == 35 or i >= mi + 4 for i in diff)  # and MESSAGE-INTEGRITY, FINGERPRINT


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("host, port", [("192.0.2.1", 32853), ("0.0.0.0", 0), ("255.255.255.255", 65535),
                                        ("2001:db8::1", 5000), ("::", 1), ("::ffff:192.0.2.1", 443),
                                        ("2001:db8:1234:5678:11:2233:4455:6677", 32853)])
def test_round_trip_xor_address(host, port):
    rng = random.Random(host)
    for _ in range(20):
        txid = rng.randbytes(12)
        value = stun.encode_xor_address(host, port, txid)
        assert len(value) == (8 if ":" not in host else 20)
        assert stun.decode_xor_address(value, txid) == (host, port)
        raw = stun.encode(stun.BINDING_SUCCESS, txid, [(stun.XOR_MAPPED_ADDRESS, value)], integrity_key=b"pw")
        msg = stun.decode(raw)
        assert stun.check_integrity(raw, msg, b"pw")
        assert stun.decode_xor_address(msg.get(stun.XOR_MAPPED_ADDRESS), txid) == (host, port)


def test_round_trip_random_attributes():
    rng = random.Random(7)
    for _ in range(300):
        attrs = {}
        for _ in range(rng.randrange(6)):
            atype = rng.choice([stun.SOFTWARE, stun.PRIORITY, stun.USE_CANDIDATE, stun.ICE_CONTROLLING,
                                0x7FFF, 0xC001])
            attrs.setdefault(atype, rng.randbytes(rng.randrange(40)))
        txid = rng.randbytes(12)
        key = rng.choice([None, rng.randbytes(16)])
        fp = rng.random() < 0.7
        raw = stun.encode(stun.BINDING_REQUEST, txid, list(attrs.items()), integrity_key=key, fingerprint=fp)
        msg = stun.decode(raw)
        assert msg.transaction_id == txid
        assert {t: bytes(v) for t, v in msg.attributes.items()
                if t not in (stun.MESSAGE_INTEGRITY, stun.FINGERPRINT)} == attrs
        assert (stun.FINGERPRINT in msg.attributes) == fp
        assert stun.check_integrity(raw, msg, key) if key else msg.integrity_offset == -1


def test_encode_rejects_bad_transaction_id():
    for txid in (b"", bytes(11), bytes(13)):
        with pytest.raises(ValueError):
            stun.encode(stun.BINDING_REQUEST, txid)


def test_encode_without_fingerprint_or_integrity():
    raw = stun.encode(stun.BINDING_REQUEST, TXID, fingerprint=False)
    assert raw == struct.pack(">HHI", 1, 0, COOKIE) + TXID
    assert stun.decode(raw) == (1, TXID, {}, -1)


# -- malformed -------------------------------------------------------------------------


GOOD = build(attrs=[(stun.USERNAME, b"evtj:h6vY")], integrity=PASSWORD, fingerprint=True)


def test_hand_built_message_is_good():
    msg = stun.decode(GOOD)
    assert stun.check_integrity(GOOD, msg, PASSWORD)
    assert stun.binding_username(GOOD) == b"evtj:h6vY"


def with_fp_crc(raw, delta):
    b = bytearray(raw)
    b[-1] ^= delta
    return bytes(b)


def _after_fingerprint():
    """A correct FINGERPRINT followed by a SOFTWARE attribute (length field includes it)."""
    raw = build(attrs=[(stun.USERNAME, b"a:bc")], fingerprint=True)
    extra = struct.pack(">HH", stun.SOFTWARE, 4) + b"junk"
    raw = raw[:2] + struct.pack(">H", len(raw) - 20 + len(extra)) + raw[4:] + extra
    return raw


MALFORMED = {
    "empty": b"",
    "19 octets": REQUEST[:19],
    "bad cookie": build(cookie=0x2112A443, attrs=[(stun.USERNAME, b"a:b")]),
    "cookie zero": build(cookie=0),
    "top bit 0x80": build(msg_type=0x8001),
    "top bit 0x40": build(msg_type=0x4001),
    "length not multiple of 4": build(length=2) + b"\x00\x06",
    "length 1": build(length=1) + b"\x00",
    "length larger than datagram": build(attrs=[(stun.USERNAME, b"a:bc")], length=12),
    "length smaller than datagram": build(attrs=[(stun.USERNAME, b"a:bc")], length=4),
    "length zero with attributes": build(attrs=[(stun.USERNAME, b"a:bc")], length=0),
    "truncated attribute header": build(length=4) + b"\x00\x06\x00",
    "attribute value overruns": build(length=8) + struct.pack(">HH", stun.USERNAME, 100) + b"a:bc",
    "attribute padding overruns": build(length=8) + struct.pack(">HH", stun.USERNAME, 5) + b"a:bc",
    "second attribute overruns": (build(attrs=[(stun.SOFTWARE, b"x")], length=16)
                                  + struct.pack(">HH", stun.USERNAME, 5) + b"a:bc"),
    "attribute after FINGERPRINT": _after_fingerprint(),
    "bad FINGERPRINT": with_fp_crc(GOOD, 0x01),
    "FINGERPRINT of another message": GOOD[:-4] + REQUEST[-4:],
    "FINGERPRINT length 8": build(after=[(stun.FINGERPRINT, bytes(8))]),
    "FINGERPRINT length 0": build(after=[(stun.FINGERPRINT, b"")]),
    "FINGERPRINT length 3": build(after=[(stun.FINGERPRINT, b"abc")]),
    "MESSAGE-INTEGRITY length 16": build(attrs=[(stun.MESSAGE_INTEGRITY, bytes(16))]),
    "MESSAGE-INTEGRITY length 32": build(attrs=[(stun.MESSAGE_INTEGRITY, bytes(32))]),
    "MESSAGE-INTEGRITY length 0": build(attrs=[(stun.MESSAGE_INTEGRITY, b"")]),
    "USERNAME 514 octets": build(attrs=[(stun.USERNAME, b"a:" + b"b" * 512)]),
    "USERNAME 2000 octets": build(attrs=[(stun.USERNAME, b"a:" + b"b" * 1998)]),
    "larger than 65535 + 20": build(length=0xFFFF) + bytes(0xFFFF + 4),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed(name):
    raw = MALFORMED[name]
    assert stun.decode(raw) is Drop.STUN_MALFORMED
    assert stun.decode(memoryview(raw)) is Drop.STUN_MALFORMED
    assert stun.binding_username(raw) is Drop.STUN_MALFORMED


def test_limits_that_pass():
    assert stun.decode(build(attrs=[(stun.USERNAME, b"a:" + b"b" * 511)])).get(stun.USERNAME) is not None
    assert stun.decode(build(attrs=[(0x7FFF, bytes(0xFFFC - 4))])).msg_type == 1     # largest aligned body
    assert stun.decode(build(attrs=[(stun.SOFTWARE, b"")])).get(stun.SOFTWARE) == b""


def test_padding_content_is_not_checked():
    """RFC 8489 section 14: padding may hold any value; RFC 5769 pads with 0x20."""
    raw = bytearray(build(attrs=[(stun.USERNAME, b"a:b")]))
    raw[-1] = 0x20
    assert bytes(stun.decode(bytes(raw)).get(stun.USERNAME)) == b"a:b"


def test_fingerprint_must_be_last_even_when_correct():
    raw = build(attrs=[(stun.USERNAME, b"a:bc")], fingerprint=True)
    assert stun.decode(raw).get(stun.FINGERPRINT) is not None
    assert stun.decode(_after_fingerprint()) is Drop.STUN_MALFORMED


# -- MESSAGE-INTEGRITY and what follows it --------------------------------------------------


def test_attributes_after_integrity_are_ignored():
    raw = build(attrs=[(stun.PRIORITY, b"\x00\x00\x00\x01")], integrity=PASSWORD,
                after=[(stun.USERNAME, b"evil:x"), (stun.SOFTWARE, b"late")], fingerprint=True)
    msg = stun.decode(raw)
    assert stun.USERNAME not in msg.attributes and stun.SOFTWARE not in msg.attributes
    assert msg.get(stun.FINGERPRINT) is not None
    assert stun.check_integrity(raw, msg, PASSWORD)
    assert stun.binding_username(raw) is Drop.STUN_NO_USERNAME


def test_oversized_username_after_integrity_is_ignored_not_malformed():
    raw = build(integrity=PASSWORD, after=[(stun.USERNAME, b"x" * 600)])
    assert stun.USERNAME not in stun.decode(raw).attributes


def test_second_integrity_is_ignored():
    raw = build(attrs=[(stun.USERNAME, b"a:b")], integrity=PASSWORD,
                after=[(stun.MESSAGE_INTEGRITY, bytes(20))])
    msg = stun.decode(raw)
    assert msg.integrity_offset == 28
    assert stun.check_integrity(raw, msg, PASSWORD)


def test_integrity_sha256_after_integrity_is_kept():
    raw = build(integrity=PASSWORD, after=[(stun.MESSAGE_INTEGRITY_SHA256, bytes(32))])
    assert bytes(stun.decode(raw).get(stun.MESSAGE_INTEGRITY_SHA256)) == bytes(32)


def test_attributes_after_integrity_sha256_are_ignored():
    """RFC 8489 section 14.6; regression: a USERNAME after it once routed a packet."""
    raw = build(attrs=[(stun.MESSAGE_INTEGRITY_SHA256, bytes(32)), (stun.USERNAME, b"a:b"),
                       (stun.MESSAGE_INTEGRITY, bytes(20))], fingerprint=True)
    msg = stun.decode(raw)
    assert stun.USERNAME not in msg.attributes and stun.MESSAGE_INTEGRITY not in msg.attributes
    assert msg.integrity_offset == -1 and msg.get(stun.FINGERPRINT) is not None
    assert stun.binding_username(raw) is Drop.STUN_NO_USERNAME


def test_only_fingerprint_after_integrity_then_sha256():
    raw = build(attrs=[(stun.USERNAME, b"a:b")], integrity=PASSWORD,
                after=[(stun.MESSAGE_INTEGRITY_SHA256, bytes(32)), (stun.SOFTWARE, b"late")], fingerprint=True)
    msg = stun.decode(raw)
    assert stun.MESSAGE_INTEGRITY_SHA256 in msg.attributes and stun.SOFTWARE not in msg.attributes
    assert stun.check_integrity(raw, msg, PASSWORD)


def test_integrity_is_over_the_patched_length():
    """RFC 8489 section 14.5: the length covers up to MESSAGE-INTEGRITY, not the FINGERPRINT."""
    raw = build(attrs=[(stun.USERNAME, b"a:b")], integrity=PASSWORD, fingerprint=True)
    msg = stun.decode(raw)
    assert stun.check_integrity(raw, msg, PASSWORD)
    b = bytearray(raw)
    b[28 + 4] ^= 1                                    # a bit of the MAC itself
    b[-4:] = struct.pack(">I", zlib.crc32(bytes(b[:-8])) ^ 0x5354554E)
    msg = stun.decode(bytes(b))
    assert isinstance(msg, stun.Message) and not stun.check_integrity(bytes(b), msg, PASSWORD)


def test_check_integrity_without_integrity():
    raw = build(attrs=[(stun.USERNAME, b"a:b")])
    assert stun.check_integrity(raw, stun.decode(raw), PASSWORD) is False


def test_repeated_attribute_first_counts():
    raw = build(attrs=[(stun.USERNAME, b"first:a"), (stun.USERNAME, b"second:b")])
    assert stun.binding_username(raw) == b"first:a"


# -- binding_username --------------------------------------------------------------------


@pytest.mark.parametrize("msg_type", [stun.BINDING_INDICATION, stun.BINDING_SUCCESS, stun.BINDING_ERROR,
                                      0x0003, 0x0002])
def test_binding_username_not_a_binding_request(msg_type):
    raw = build(msg_type=msg_type, attrs=[(stun.USERNAME, b"a:b")])
    assert stun.binding_username(raw) is Drop.STUN_NOT_BINDING_REQUEST


def test_binding_username_on_rfc_responses():
    for name in ("response_ipv4", "response_ipv6"):
        assert stun.binding_username(bytes.fromhex(MESSAGES[name]["hex"])) is Drop.STUN_NOT_BINDING_REQUEST


def test_binding_username_no_username():
    assert stun.binding_username(build()) is Drop.STUN_NO_USERNAME
    assert stun.binding_username(build(attrs=[(stun.SOFTWARE, b"x")], fingerprint=True)) is Drop.STUN_NO_USERNAME


def test_binding_username_returns_bytes():
    assert type(stun.binding_username(memoryview(REQUEST))) is bytes


@pytest.mark.parametrize("username, parts", [
    (b"a:b", (b"a", b"b")), (b"evtj:h6vY", (b"evtj", b"h6vY")), (b"a:b:c", (b"a", b"b:c")),
    (b"", None), (b"abc", None), (b":b", None), (b"a:", None), (b":", None),
])
def test_split_username(username, parts):
    assert stun.split_username(username) == parts
    assert stun.split_username(memoryview(username)) == parts


# -- decode_xor_address rejects -------------------------------------------------------------


@pytest.mark.parametrize("value", [b"", b"\x00\x01\xa1", b"\x00\x01\xa1\x47", bytes.fromhex("0001a147e112a6"),
                                   bytes.fromhex("0002a147e112a643"), bytes.fromhex("0001a147e112a64300"),
                                   bytes.fromhex("0003a147e112a643"), bytes(20)])
def test_decode_xor_address_rejects(value):
    assert stun.decode_xor_address(value, TXID) is None


# -- h11 style: whole, every prefix, trailing junk ---------------------------------------


@pytest.mark.parametrize("vec", ALL, ids=lambda v: v["name"])
def test_prefixes_and_trailing_junk(vec):
    raw = bytes.fromhex(vec["hex"])
    assert isinstance(stun.decode(raw), stun.Message)
    for n in range(len(raw)):
        assert stun.decode(raw[:n]) is Drop.STUN_MALFORMED, n
        assert stun.binding_username(raw[:n]) is Drop.STUN_MALFORMED, n
    for junk in (b"\x00", b"\x00" * 4, b"\x80\x28\x00\x04" + raw[-4:], raw):
        assert stun.decode(raw + junk) is Drop.STUN_MALFORMED
