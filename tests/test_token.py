"""edge_relay.token: the routing token carried as the ICE ufrag (PROTOCOL.md section 3).

Vectors: tests/vectors/token.json, verified with the ring of keys.json.
"""

import base64
import hashlib
import hmac
import json
import random
import re
import struct
from pathlib import Path

import pytest

from edge_relay import keys, token
from edge_relay.drops import Drop

HERE = Path(__file__).parent / "vectors"
KEYS = json.loads((HERE / "keys.json").read_text())
VECTORS = json.loads((HERE / "token.json").read_text())
MASTERS = {v["key_id"]: bytes.fromhex(v["master"]) for v in KEYS["keys"]}
RING = keys.KeyRing(MASTERS, signing_key_id=2)
BASE = [v for v in VECTORS["valid"] if "why" not in v]       # the minted ones
ICE_CHAR = re.compile(r"[A-Za-z0-9+/]{4,256}")                # RFC 8839 section 5.4
TOKEN_DROPS = {Drop.TOKEN_MALFORMED, Drop.TOKEN_VERSION, Drop.TOKEN_KEY_ID, Drop.TOKEN_MAC,
               Drop.TOKEN_EXPIRED, Drop.TOKEN_FUTURE}


def check(vec, ufrag=None, ring=RING):
    return token.verify(vec["ufrag"] if ufrag is None else ufrag, ring, vec["wall"], vec["max_lifetime"],
                        vec["skew"])


def expected(vec):
    return Drop[vec["expect"]] if vec["expect"] != "OK" else None


# -- the vectors, both directions ------------------------------------------------------


@pytest.mark.parametrize("vec", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vectors_decode(vec):
    for form in (vec["ufrag"], vec["ufrag"].encode("ascii")):
        tok = check(vec, form)
        assert isinstance(tok, token.Token), tok
        assert tok == (vec["version"], vec["key_id"], vec["transceiver"], vec["expiry"],
                       bytes.fromhex(vec["nonce"]))


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_valid_vectors_encode(vec):
    ufrag = token.mint(RING.get(vec["key_id"]), vec["transceiver"], vec["expiry"], bytes.fromhex(vec["nonce"]))
    assert ufrag == vec["ufrag"]
    assert base64.b64decode(ufrag).hex() == vec["octets"]


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_vectors_from_the_spec(vec):
    """PROTOCOL.md section 3 alone, no edge_relay code: pack, HMAC, truncate, base64."""
    subkey = bytes.fromhex(KEYS["keys"][vec["key_id"] - 1]["token_key"])
    body = struct.pack(">BBHI8s", 1, vec["key_id"], vec["transceiver"], vec["expiry"], bytes.fromhex(vec["nonce"]))
    full = hmac.new(subkey, body, hashlib.sha256).digest()
    assert body.hex() == vec["mac_input"]
    assert full.hex() == vec["hmac"]
    assert full[:8].hex() == vec["tag"]
    assert (body + full[:8]).hex() == vec["octets"]
    assert base64.b64encode(body + full[:8]).decode() == vec["ufrag"]


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors(vec):
    assert check(vec) is expected(vec)
    try:
        raw = vec["ufrag"].encode("ascii")
    except UnicodeEncodeError:
        return
    assert check(vec, raw) is expected(vec)


def test_every_token_reason_has_a_vector():
    assert {Drop[v["expect"]] for v in VECTORS["invalid"]} == TOKEN_DROPS


def test_vectors_use_the_documented_ring():
    assert VECTORS["keyring"] == list(RING.ids)


# -- the format ------------------------------------------------------------------------


def test_token_constants():
    assert (token.TOKEN_VERSION, token.TOKEN_OCTETS, token.TOKEN_CHARS, token.TAG_LEN) == (1, 24, 32, 8)
    assert (token.MIN_UFRAG, token.MAX_UFRAG) == (4, 256)


def test_minted_ufrags_are_ice_chars():
    rng = random.Random(1)
    for _ in range(500):
        ufrag = token.mint(RING.get(rng.choice((1, 2))), rng.randrange(65536), rng.randrange(2 ** 32),
                           rng.randbytes(8))
        assert len(ufrag) == token.TOKEN_CHARS
        assert ICE_CHAR.fullmatch(ufrag), ufrag


def test_round_trip():
    ring = keys.KeyRing({0: MASTERS[1], 255: MASTERS[2]})
    rng = random.Random(2)
    for key_id in (0, 255):
        for transceiver in (0, 1, 0x0102, 0xFFFF):
            expiry = 1800000000 + rng.randrange(3600)
            nonce = rng.randbytes(8)
            ufrag = token.mint(ring.get(key_id), transceiver, expiry, nonce)
            assert token.verify(ufrag, ring, expiry - 60, 3600, 0) == (1, key_id, transceiver, expiry, nonce)
            assert token.peek_transceiver(ufrag) == transceiver


def test_mint_random_nonce():
    a = token.mint(RING.signing, 1, 1800000000)
    b = token.mint(RING.signing, 1, 1800000000)
    assert a != b
    assert token.verify(a, RING, 1800000000, 100, 0).key_id == 2


@pytest.mark.parametrize("transceiver", [-1, 65536])
def test_mint_rejects_transceiver_id(transceiver):
    with pytest.raises(ValueError):
        token.mint(RING.signing, transceiver, 1800000000)


@pytest.mark.parametrize("nonce", [b"", b"abc", b"123456789"], ids=["0", "3", "9"])
def test_mint_rejects_nonce_length(nonce):
    """Regression: struct '8s' padded a short nonce with zeros and cut a long one."""
    with pytest.raises(ValueError):
        token.mint(RING.signing, 1, 1800000000, nonce)


# -- each rule ---------------------------------------------------------------------------


V1 = BASE[0]
RAW1 = bytes.fromhex(V1["octets"])


def b64(raw):
    return base64.b64encode(raw).decode()


def patched(offset, value, raw=RAW1):
    b = bytearray(raw)
    b[offset] = value
    return b64(bytes(b))


@pytest.mark.parametrize("ufrag", [
    "", "A", "AQE", "A" * 257, "A" * 1000, V1["ufrag"] + "\n", "\n" + V1["ufrag"], V1["ufrag"][:-1] + "=",
    V1["ufrag"].replace("A", "-", 1), V1["ufrag"].replace("A", "_", 1), V1["ufrag"].replace("A", ".", 1),
    V1["ufrag"][:10] + "\t" + V1["ufrag"][11:], V1["ufrag"][:10] + "\x00" + V1["ufrag"][11:],
    V1["ufrag"][:31] + "\u00e9", "\u00e9" * 32, V1["ufrag"][:30], V1["ufrag"][:29], V1["ufrag"][:28],
    V1["ufrag"] + "AAAA", V1["ufrag"] + "AQ==", b64(RAW1[:23]), b64(RAW1 + b"\x00"),
])
def test_malformed(ufrag):
    assert token.verify(ufrag, RING, V1["wall"], V1["max_lifetime"], V1["skew"]) is Drop.TOKEN_MALFORMED


def test_malformed_bytes():
    for raw in (b"\xff" * 32, b"\x80" + V1["ufrag"].encode()[1:], V1["ufrag"].encode()[:31] + b"\x00"):
        assert token.verify(raw, RING, V1["wall"], 86400, 5) is Drop.TOKEN_MALFORMED


def test_length_limits_are_ice_ufrag_limits():
    """4 and 256 characters pass the length rule (and fail later); 3 and 257 do not."""
    four = b64(b"\x02\x00\x00")               # version 2 in 4 characters
    assert token.verify(four, RING, 0, 0, 0) is Drop.TOKEN_VERSION
    long = b64(b"\x02" + bytes(191))          # 256 characters
    assert len(long) == 256
    assert token.verify(long, RING, 0, 0, 0) is Drop.TOKEN_VERSION
    assert token.verify(long + "AAAA", RING, 0, 0, 0) is Drop.TOKEN_MALFORMED


@pytest.mark.parametrize("version", [0, 2, 0x80, 0xFF])
def test_version(version):
    assert token.verify(patched(0, version), RING, V1["wall"], 86400, 5) is Drop.TOKEN_VERSION


def test_version_checked_before_length():
    assert token.verify(b64(b"\x02" + bytes(20)), RING, 0, 0, 0) is Drop.TOKEN_VERSION
    assert token.verify(b64(b"\x01" + bytes(20)), RING, 0, 0, 0) is Drop.TOKEN_MALFORMED


@pytest.mark.parametrize("key_id", [0, 3, 255])
def test_key_id(key_id):
    assert token.verify(patched(1, key_id), RING, V1["wall"], 86400, 5) is Drop.TOKEN_KEY_ID


def test_key_id_removed_from_ring():
    only2 = keys.KeyRing({2: MASTERS[2]})
    assert token.verify(V1["ufrag"], only2, V1["wall"], 86400, 5) is Drop.TOKEN_KEY_ID


@pytest.mark.parametrize("offset", range(2, 24))
def test_mac_covers_every_octet(offset):
    assert token.verify(patched(offset, RAW1[offset] ^ 0x01), RING, V1["wall"], 86400, 5) is Drop.TOKEN_MAC


def test_mac_wrong_key_same_id():
    other = keys.KeyRing({1: MASTERS[2]})
    assert token.verify(V1["ufrag"], other, V1["wall"], 86400, 5) is Drop.TOKEN_MAC


def test_expiry_rules():
    exp = V1["expiry"]
    u = V1["ufrag"]
    assert token.verify(u, RING, exp, 86400, 0).expiry == exp
    assert token.verify(u, RING, exp + 1, 86400, 0) is Drop.TOKEN_EXPIRED
    assert token.verify(u, RING, exp + 5, 86400, 5).expiry == exp
    assert token.verify(u, RING, exp + 6, 86400, 5) is Drop.TOKEN_EXPIRED
    assert token.verify(u, RING, exp + 5.5, 86400, 5) is Drop.TOKEN_EXPIRED     # wall may be a float
    assert token.verify(u, RING, exp - 86400, 86400, 0).expiry == exp
    assert token.verify(u, RING, exp - 86401, 86400, 0) is Drop.TOKEN_FUTURE
    assert token.verify(u, RING, exp - 86405, 86400, 5).expiry == exp
    assert token.verify(u, RING, exp - 86406, 86400, 5) is Drop.TOKEN_FUTURE


def test_mac_checked_before_time():
    bad = patched(23, RAW1[23] ^ 1)
    assert token.verify(bad, RING, V1["expiry"] + 100, 86400, 5) is Drop.TOKEN_MAC
    assert token.verify(bad, RING, V1["expiry"] - 10 ** 6, 86400, 5) is Drop.TOKEN_MAC


# -- h11 style: whole, every prefix, trailing junk ---------------------------------------


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_prefixes_and_trailing_junk(vec):
    u = vec["ufrag"]
    assert isinstance(check(vec), token.Token)
    for n in range(len(u)):
        assert check(vec, u[:n]) in (Drop.TOKEN_MALFORMED,), n
        assert check(vec, u[:n].encode()) in (Drop.TOKEN_MALFORMED,), n
    for junk in ("A", "AA", "AAAA", "=", "==", "\n", " ", ":", ":abcd", "\x00", "\u00e9", "AQID" * 60):
        assert check(vec, u + junk) is Drop.TOKEN_MALFORMED, junk


# -- peek_transceiver ------------------------------------------------------------------


@pytest.mark.parametrize("vec", BASE, ids=lambda v: v["name"])
def test_peek(vec):
    assert token.peek_transceiver(vec["ufrag"]) == vec["transceiver"]
    assert token.peek_transceiver(vec["ufrag"].encode()) == vec["transceiver"]


def test_peek_does_not_check_the_tag():
    assert token.peek_transceiver(patched(23, RAW1[23] ^ 1)) == 0x0102


@pytest.mark.parametrize("ufrag", ["", "abcd", V1["ufrag"][:28], V1["ufrag"] + "AAAA", patched(0, 2),
                                   V1["ufrag"][:31] + "-", V1["ufrag"][:31] + "\u00e9", b"\xff" * 32])
def test_peek_rejects(ufrag):
    assert token.peek_transceiver(ufrag) is None
