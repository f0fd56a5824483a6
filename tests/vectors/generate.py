#!/usr/bin/env python3
"""Write the wire-protocol test vectors (tests/vectors/*.json) from fixed inputs.

Theory of operation
  The JSON files are the reference vectors of docs/PROTOCOL.md: the tests
  decode them (bytes -> fields), re-encode them (fields -> the exact bytes)
  and compare them with the document, record by record. This script is the
  only thing that writes them, and it writes them with the code under test,
  from the fixed inputs below. Run it by hand, and only after a deliberate
  change of the wire format (which also means a new protocol version):

      python3 tests/vectors/generate.py             # rewrite the JSON files
      python3 tests/vectors/generate.py --check     # exit 1 if a file would change
      python3 tests/vectors/generate.py --markdown  # print the records for PROTOCOL.md

  Fixed inputs: master key 1 = octets 0x00..0x1f, master key 2 = 0x20..0x3f
  (the ring holds both; 2 signs). Every other value
  (transceiver ids, expiries, nonces, timestamps, payloads) is written out
  below; nothing is random, so a run reproduces the files bit for bit.

  Each vector carries an `expect` field: "OK" or the name of the Drop reason
  (edge_relay/drops.py) that a receiver applying the rules of PROTOCOL.md in
  order reports first.
"""

import argparse
import binascii
import hashlib
import hmac
import json
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from edge_relay import header, keys, stun, token, transceiver  # noqa: E402
from edge_relay.drops import Drop  # noqa: E402

MASTERS = {1: bytes(range(0x00, 0x20)), 2: bytes(range(0x20, 0x40))}
RING = keys.KeyRing(MASTERS, signing_key_id=2)
GENERATOR = "tests/vectors/generate.py"

# -- token (PROTOCOL.md section 3) ------------------------------------------------------

T_WALL = 1799990000            # verifier's Unix time for the valid vectors
T_MAX_LIFETIME = 86400         # relay limits.token_max_lifetime default
T_SKEW = 5                     # relay limits.clock_skew default
TOKENS = [
    # name, key id, transceiver, expiry, nonce
    ("key1", 1, 0x0102, 1800000000, "0001020304050607"),
    ("key2", 2, 0xBEEF, 1800003600, "8899aabbccddeeff"),
]

# -- forwarding header (PROTOCOL.md section 4) -------------------------------------------

H_TS = 1800000000000           # sender's clock, ms
H_DELAY = 250                  # receiver's clock is this much later
H_WINDOW = 2000                # limits.header_window default, in ms
# probe payloads as edge_relay/probes.py makes them (opaque to a transceiver):
# b"ERp1", sequence number (4), sender's monotonic clock in microseconds (8), nonce (8)
PROBE_1 = b"ERp1" + bytes.fromhex("00000001" "0000000000bc614e" "0001020304050607")
PROBE_2 = b"ERp1" + bytes.fromhex("00000002" "0000000000c031de" "08090a0b0c0d0e0f")

# -- STUN (RFC 5769) --------------------------------------------------------------------

RFC5769 = "https://www.rfc-editor.org/rfc/rfc5769"
RFC_USERNAME = "evtj:h6vY"
RFC_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
RFC_TXID = "b7e7a701bc34d686fa87dfae"
RFC_REQUEST = (
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36000600096576746a3a6836765920202000080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf")
RFC_RESPONSE_V4 = (
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96")
RFC_RESPONSE_V6 = (
    "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf1"
    "1784c97c8292c275bfe3ed4180280004c8fb0b4c")
RFC_CLIENT_V4 = ("192.0.2.1", 32853)
RFC_CLIENT_V6 = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
ATTR_NAMES = {v: k for k, v in vars(stun).items()
              if k.isupper() and isinstance(v, int) and 0 < v < 0x10000 and k not in (
                  "MAGIC_COOKIE", "HEADER_LEN", "MAX_USERNAME", "FINGERPRINT_XOR",
                  "BINDING_REQUEST", "BINDING_INDICATION", "BINDING_SUCCESS", "BINDING_ERROR",
                  "OTHER", "STUN", "DTLS", "RTP")}


def _expect(result):
    return result.name if result.__class__ is Drop else "OK"


# ---------------------------------------------------------------------------------------


def build_keys():
    out = []
    for key_id, master in MASTERS.items():
        key = RING.by_id[key_id]
        out.append({
            "name": f"key{key_id}",
            "key_id": key_id,
            "master": master.hex(),
            "file_name": f"{key_id}.key",
            "file_content": master.hex() + "\n",
            "token_key": key.token_key.hex(),
            "header_key": key.header_key.hex(),
        })
    return {
        "description": "Master keys and the per-purpose subkeys derived from them (PROTOCOL.md section 5).",
        "generator": GENERATOR,
        "kdf": "HKDF-Expand (RFC 5869 section 2.3) with SHA-256, PRK = master key, info = label, "
               "L = 32, i.e. HMAC-SHA256(master, label || 0x01)",
        "labels": {
            "token": {"ascii": keys.LABEL_TOKEN.decode(), "hmac_input": (keys.LABEL_TOKEN + b"\x01").hex()},
            "header": {"ascii": keys.LABEL_HEADER.decode(), "hmac_input": (keys.LABEL_HEADER + b"\x01").hex()},
        },
        "ring": {"key_ids": list(RING.ids), "signing_key_id": RING.signing.key_id},
        "keys": out,
    }


def _token_raw(ufrag):
    return binascii.a2b_base64(ufrag)


def _b64(raw):
    return binascii.b2a_base64(raw, newline=False).decode("ascii")


def _token_check(ufrag, wall, max_lifetime=T_MAX_LIFETIME, skew=T_SKEW):
    return _expect(token.verify(ufrag, RING, wall, max_lifetime, skew))


def build_token():
    valid, invalid, by_name = [], [], {}
    for name, key_id, transceiver_id, expiry, nonce in TOKENS:
        key = RING.by_id[key_id]
        ufrag = token.mint(key, transceiver_id, expiry, bytes.fromhex(nonce))
        raw = _token_raw(ufrag)
        full = hmac.new(key.token_key, raw[:16], hashlib.sha256).digest()
        vec = {
            "name": name, "version": token.TOKEN_VERSION, "key_id": key_id,
            "transceiver": transceiver_id, "expiry": expiry, "nonce": nonce,
            "mac_input": raw[:16].hex(), "hmac": full.hex(), "tag": raw[16:].hex(),
            "octets": raw.hex(), "ufrag": ufrag,
            "wall": T_WALL, "max_lifetime": T_MAX_LIFETIME, "skew": T_SKEW,
            "expect": _token_check(ufrag, T_WALL),
        }
        valid.append(vec)
        by_name[name] = vec

    v1 = by_name["key1"]
    u1, raw1, exp1 = v1["ufrag"], bytes.fromhex(v1["octets"]), v1["expiry"]
    raw2 = bytes.fromhex(by_name["key2"]["octets"])

    def patched(raw, offset, value):
        b = bytearray(raw)
        b[offset] = value
        return _b64(bytes(b))

    # boundaries: still valid at the edge of each time rule
    for name, wall, why in [
        ("key1_expiry_edge", exp1 + T_SKEW, "wall = expiry + skew: the last second it is accepted"),
        ("key1_lifetime_edge", exp1 - T_MAX_LIFETIME - T_SKEW,
         "wall = expiry - max_lifetime - skew: the earliest second it is accepted"),
    ]:
        vec = dict(v1, name=name, why=why, wall=wall)
        vec["expect"] = _token_check(u1, wall)
        valid.append(vec)

    cases = [
        ("empty", "", "length 0 < 4 (RFC 8839 ice-ufrag)"),
        ("too_short", "AQE", "3 characters < 4 (RFC 8839 ice-ufrag)"),
        ("too_long", "A" * 257, "257 characters > 256 (RFC 8839 ice-ufrag)"),
        ("base64url_minus", u1[:20] + "-" + u1[21:], "'-' is not ice-char (base64url alphabet)"),
        ("base64url_underscore", u1[:20] + "_" + u1[21:], "'_' is not ice-char (base64url alphabet)"),
        ("space", u1[:16] + " " + u1[17:], "space is not ice-char"),
        ("non_ascii", u1[:31] + "\u00e9", "non-ASCII character"),
        ("padding", _b64(raw1[:23]), "23 octets: base64 with '=' padding; '=' is not ice-char"),
        ("padding_appended", u1 + "=", "'=' appended"),
        ("not_multiple_of_4", u1[:31], "31 characters: not whole base64 quanta"),
        ("short_v1", u1[:28], "21 octets, version 1: wrong length for version 1"),
        ("long_v1", u1 + "AAAA", "27 octets, version 1: wrong length for version 1"),
        ("version_2", patched(raw1, 0, 2), "octet 0 (version) = 2"),
        ("version_0", patched(raw1, 0, 0), "octet 0 (version) = 0"),
        ("short_version_2", "AgAA", "3 octets, version 2: version is checked before length"),
        ("plain_ufrag", "abcd", "an ordinary ICE ufrag: decodes to 69 b7 1d, not version 1"),
        ("key_id_3", patched(raw1, 1, 3), "octet 1 (key id) = 3, not in the ring"),
        ("key_id_0", patched(raw1, 1, 0), "octet 1 (key id) = 0, not in the ring"),
        ("tag_flipped", patched(raw1, 23, raw1[23] ^ 0x01), "last tag octet xor 0x01"),
        ("transceiver_changed", patched(raw1, 3, 0x03), "transceiver 0x0102 -> 0x0103, tag kept"),
        ("expiry_changed", patched(raw1, 7, raw1[7] ^ 0x01), "expiry + 1 s, tag kept"),
        ("key_id_swapped", patched(raw2, 1, 1), "signed with key 2, octet 1 changed to 1"),
    ]
    for name, ufrag, why in cases:
        invalid.append({"name": name, "why": why, "ufrag": ufrag, "wall": T_WALL,
                        "max_lifetime": T_MAX_LIFETIME, "skew": T_SKEW,
                        "expect": _token_check(ufrag, T_WALL)})
    for name, ufrag, wall, why in [
        ("expired", u1, exp1 + T_SKEW + 1, "wall = expiry + skew + 1"),
        ("future", u1, exp1 - T_MAX_LIFETIME - T_SKEW - 1, "wall = expiry - max_lifetime - skew - 1"),
        ("expired_and_bad_tag", patched(raw1, 23, raw1[23] ^ 0x01), exp1 + T_SKEW + 1,
         "both expired and a bad tag: the tag is checked first"),
    ]:
        invalid.append({"name": name, "why": why, "ufrag": ufrag, "wall": wall,
                        "max_lifetime": T_MAX_LIFETIME, "skew": T_SKEW,
                        "expect": _token_check(ufrag, wall)})
    return {
        "description": "Routing tokens (ICE ufrags), PROTOCOL.md section 3. Verified with "
                       "token.verify(ufrag, ring of keys.json, wall, max_lifetime, skew).",
        "generator": GENERATOR,
        "keyring": list(RING.ids),
        "valid": valid,
        "invalid": invalid,
    }


# ---------------------------------------------------------------------------------------


def _address(host):
    if ":" in host:
        return header.FAMILY_V6, socket.inet_pton(socket.AF_INET6, host)
    return header.FAMILY_V4, socket.inet_pton(socket.AF_INET, host) + bytes(12)


TYPE_NAMES = {header.TO_TRANSCEIVER: "TO_TRANSCEIVER", header.TO_CLIENT: "TO_CLIENT",
              header.PROBE: "PROBE", header.PROBE_ACK: "PROBE_ACK"}
SIDE = {"relay": header.RELAY_ACCEPTS, "transceiver": header.TRANSCEIVER_ACCEPTS}


def _decode_check(datagram, now_ms, window_ms, accept):
    return _expect(header.decode(datagram, RING, now_ms, window_ms, SIDE[accept]))


def build_header():
    answer_v4 = transceiver_answer(RFC_CLIENT_V4)
    specs = [
        # name, key id, type, flags, route, client, ts offset, payload, accepting side, why
        ("to_transceiver_ipv4", 1, header.TO_TRANSCEIVER, 0, 1, RFC_CLIENT_V4, 0,
         bytes.fromhex(RFC_REQUEST), "transceiver",
         "relay -> transceiver: the RFC 5769 request from 192.0.2.1:32853, on route 1"),
        ("to_transceiver_ipv6_failover", 2, header.TO_TRANSCEIVER, header.FLAG_FAILOVER, 3,
         ("2001:db8::1", 5000), 0, bytes.fromhex("806f0001000000a012345678"), "transceiver",
         "relay -> transceiver: an RTP header from [2001:db8::1]:5000, route 3, FAILOVER"),
        ("to_client_ipv4", 1, header.TO_CLIENT, 0, 1, RFC_CLIENT_V4, 40, answer_v4, "relay",
         "transceiver -> relay: its answer (stun/answer_ipv4), route 1 echoed"),
        ("probe", 1, header.PROBE, 0, 0, None, 100, PROBE_1, "transceiver",
         "relay -> transceiver: health probe; the payload is opaque to the transceiver"),
        ("probe_ack", 2, header.PROBE_ACK, 0, 0, None, 103, PROBE_1, "relay",
         "transceiver -> relay: the answer to probe, payload echoed, sealed with key 2"),
        ("probe_reserved_flag", 1, header.PROBE, 0x80, 0, None, 350, PROBE_2, "transceiver",
         "reserved flag 0x80 set by the sender, under the tag: ignored"),
    ]
    valid, by_name = [], {}
    for name, key_id, msg_type, flags, route, client, dt, payload, side, why in specs:
        key = RING.by_id[key_id]
        if client is None:
            family, address, host, port = header.FAMILY_NONE, bytes(16), "", 0
        else:
            (family, address), (host, port) = _address(client[0]), client
        ts = H_TS + dt
        head = header.encode(key, msg_type, payload, route=route, family=family, port=port,
                             address=address, timestamp_ms=ts, flags=flags)
        datagram = head + payload
        mac_input = head[:header.MAC_INPUT_LEN] + payload
        full = hmac.new(key.header_key, mac_input, hashlib.sha256).digest()
        vec = {
            "name": name, "why": why, "key_id": key_id, "type": msg_type, "type_name": TYPE_NAMES[msg_type],
            "flags": flags, "route": route, "family": family, "host": host, "port": port,
            "address": address.hex(), "timestamp_ms": ts, "payload": payload.hex(),
            "header": head.hex(), "mac_input": mac_input.hex(), "hmac": full.hex(),
            "tag": head[header.MAC_INPUT_LEN:].hex(), "datagram": datagram.hex(),
            "now_ms": ts + H_DELAY, "window_ms": H_WINDOW, "accept": side,
        }
        vec["expect"] = _decode_check(datagram, vec["now_ms"], H_WINDOW, side)
        valid.append(vec)
        by_name[name] = vec

    probe = by_name["probe"]
    for name, now_ms, why in [
        ("probe_window_late_edge", probe["timestamp_ms"] + H_WINDOW, "now_ms = timestamp + window: accepted"),
        ("probe_window_early_edge", probe["timestamp_ms"] - H_WINDOW, "now_ms = timestamp - window: accepted"),
    ]:
        vec = dict(probe, name=name, why=why, now_ms=now_ms)
        vec["expect"] = _decode_check(bytes.fromhex(vec["datagram"]), now_ms, H_WINDOW, "transceiver")
        valid.append(vec)

    invalid = []

    def bad(name, base, why, edits=(), truncate=None, append=b"", accept=None, now_ms=None):
        d = bytearray.fromhex(base["datagram"])
        for offset, value in edits:
            d[offset] = value
        if truncate is not None:
            del d[truncate:]
        d += append
        vec = {"name": name, "why": why, "base": base["name"], "datagram": bytes(d).hex(),
               "now_ms": base["now_ms"] if now_ms is None else now_ms, "window_ms": H_WINDOW,
               "accept": accept or base["accept"]}
        vec["expect"] = _decode_check(bytes(d), vec["now_ms"], H_WINDOW, vec["accept"])
        invalid.append(vec)

    v6 = by_name["to_transceiver_ipv6_failover"]
    ack = by_name["probe_ack"]
    last = len(bytes.fromhex(probe["datagram"])) - 1
    pd = bytes.fromhex(probe["datagram"])
    bad("short", probe, "the first 47 octets of probe", truncate=47)
    bad("magic", probe, "octet 0 = 0xef", [(0, 0xEF)])
    bad("version_2", probe, "octet 2 (version) = 2", [(2, 2)])
    bad("type_0", probe, "octet 3 (type) = 0", [(3, 0)])
    bad("type_5", probe, "octet 3 (type) = 5, unassigned", [(3, 5)])
    bad("type_wrong_direction", ack, "a valid PROBE_ACK offered to a transceiver", accept="transceiver")
    bad("key_id_3", probe, "octet 4 (key id) = 3, not in the ring", [(4, 3)])
    bad("family_probe_4", probe, "octet 7 (family) = 4 in a PROBE", [(7, 4)])
    bad("family_5", v6, "octet 7 (family) = 5 in a TO_TRANSCEIVER", [(7, 5)])
    bad("family_0_data", v6, "octet 7 (family) = 0 in a TO_TRANSCEIVER", [(7, 0)])
    bad("mac_payload", probe, "last payload octet xor 0x01", [(last, pd[last] ^ 0x01)])
    bad("mac_tag", probe, "octet 47 (last tag octet) xor 0x01", [(47, pd[47] ^ 0x01)])
    bad("mac_port", v6, "octet 9 (port) 0x88 -> 0x89: the client block is under the tag",
        [(9, bytes.fromhex(v6["datagram"])[9] ^ 0x01)])
    bad("mac_reserved_flag", probe, "octet 5 (flags) = 0x80 after sealing: flags are under the tag", [(5, 0x80)])
    bad("mac_extended", probe, "one octet 0x00 appended: it becomes payload", append=b"\x00")
    bad("stale_late", probe, "now_ms = timestamp + window + 1", now_ms=probe["timestamp_ms"] + H_WINDOW + 1)
    bad("stale_early", probe, "now_ms = timestamp - window - 1", now_ms=probe["timestamp_ms"] - H_WINDOW - 1)
    bad("order_version_and_type", probe, "version 2 and type 9: version is checked first", [(2, 2), (3, 9)])
    bad("order_family_and_tag", probe, "family 6 in a PROBE and a bad tag: family is checked first",
        [(7, 6), (47, pd[47] ^ 0x01)])
    bad("order_tag_and_stale", probe, "bad tag and stale: the tag is checked first",
        [(47, pd[47] ^ 0x01)], now_ms=probe["timestamp_ms"] + H_WINDOW + 1)
    return {
        "description": "Forwarding headers, PROTOCOL.md section 4. Decoded with header.decode(datagram, "
                       "ring of keys.json, now_ms, window_ms, accept) where accept 'relay' = {TO_CLIENT, "
                       "PROBE_ACK} and 'transceiver' = {TO_TRANSCEIVER, PROBE}.",
        "generator": GENERATOR,
        "keyring": list(RING.ids),
        "accept": {side: sorted(types) for side, types in SIDE.items()},
        "valid": valid,
        "invalid": invalid,
    }


# ---------------------------------------------------------------------------------------


def transceiver_answer(client):
    """edge_relay's ICE-lite answer to the RFC 5769 request, for `client`."""
    request = stun.decode(bytes.fromhex(RFC_REQUEST))
    return transceiver.answer_binding(request, client, RFC_PASSWORD, software=b"test vector")


def _attributes(raw):
    """The attribute walk of a message, every attribute including those a decoder ignores."""
    out, off = [], stun.HEADER_LEN
    while off < len(raw):
        atype, alen = int.from_bytes(raw[off:off + 2], "big"), int.from_bytes(raw[off + 2:off + 4], "big")
        out.append({"type": atype, "name": ATTR_NAMES.get(atype, "?"), "offset": off,
                    "value": raw[off + 4:off + 4 + alen].hex()})
        off += 4 + ((alen + 3) & ~3)
    return out


def _stun_vector(name, section, hexstr, client=None, why=None):
    raw = bytes.fromhex(hexstr)
    msg = stun.decode(raw)
    assert msg.__class__ is not Drop, name
    vec = {"name": name}
    if section:
        vec["section"] = section
    if why:
        vec["why"] = why
    vec.update({
        "hex": hexstr, "msg_type": msg.msg_type, "length": len(raw), "transaction_id": msg.transaction_id.hex(),
        "attributes": _attributes(raw), "integrity_offset": msg.integrity_offset,
        "integrity_ok": stun.check_integrity(raw, msg, RFC_PASSWORD.encode()),
    })
    if msg.get(stun.USERNAME) is not None:
        vec["username"] = bytes(msg.get(stun.USERNAME)).decode()
    if msg.get(stun.SOFTWARE) is not None:
        vec["software"] = bytes(msg.get(stun.SOFTWARE)).decode()
    xma = msg.get(stun.XOR_MAPPED_ADDRESS)
    if xma is not None:
        host, port = stun.decode_xor_address(xma, msg.transaction_id)
        vec["xor_mapped_address"] = {"host": host, "port": port}
        assert (host, port) == client, (name, host, port)
    return vec


def build_stun():
    answers = []
    for name, client, section in [("answer_ipv4", RFC_CLIENT_V4, "2.2"), ("answer_ipv6", RFC_CLIENT_V6, "2.3")]:
        answers.append(_stun_vector(
            name, None, transceiver_answer(client).hex(), client,
            why=f"edge_relay.transceiver.answer_binding(request of section 2.1, {client[0]} port {client[1]}, "
                f"the RFC password, software=b'test vector'): the attributes of RFC 5769 section {section}, "
                f"but SOFTWARE padded with 0x00 (the RFC pads with 0x20), hence a different "
                f"MESSAGE-INTEGRITY and FINGERPRINT"))
    return {
        "description": "RFC 5769 sample STUN messages (short-term credentials), and edge_relay's own "
                       "ICE-lite answers to the sample request.",
        "source": RFC5769,
        "generator": GENERATOR,
        "username": RFC_USERNAME,
        "password": RFC_PASSWORD,
        "transaction_id": RFC_TXID,
        "messages": [
            _stun_vector("request", "2.1", RFC_REQUEST),
            _stun_vector("response_ipv4", "2.2", RFC_RESPONSE_V4, RFC_CLIENT_V4),
            _stun_vector("response_ipv6", "2.3", RFC_RESPONSE_V6, RFC_CLIENT_V6),
        ],
        "answers": answers,
    }


BUILDERS = {"keys.json": build_keys, "token.json": build_token, "header.json": build_header,
            "stun_rfc5769.json": build_stun}


def render(obj):
    return json.dumps(obj, indent=2, ensure_ascii=True) + "\n"


# -- markdown records for docs/PROTOCOL.md -----------------------------------------------


def _dump(raw, width=16, indent="  "):
    return [indent + " ".join(f"{b:02x}" for b in raw[i:i + width]) for i in range(0, len(raw), width)] or []


def _annotated(rows, col=52):
    out = []
    for raw, note in rows:
        text = "  " + " ".join(f"{b:02x}" for b in raw)
        out.append((text.ljust(col) + note).rstrip() if note else text)
    return out


def _token_rows(raw):
    return [
        (raw[0:1], f"version {raw[0]}"),
        (raw[1:2], f"key id {raw[1]}"),
        (raw[2:4], f"transceiver id 0x{int.from_bytes(raw[2:4], 'big'):04x}"),
        (raw[4:8], f"expiry {int.from_bytes(raw[4:8], 'big')} (Unix seconds)"),
        (raw[8:16], "nonce"),
        (raw[16:24], "tag = HMAC-SHA256(Kt, octets 0..15)[0..7]"),
    ]


def _header_rows(d):
    fam = {0: "none", 4: "IPv4", 6: "IPv6"}.get(d[7], "?")
    port = int.from_bytes(d[8:10], "big")
    if d[7] == 4:
        addr = socket.inet_ntop(socket.AF_INET, d[10:14])
    elif d[7] == 6:
        addr = socket.inet_ntop(socket.AF_INET6, d[10:26])
    else:
        addr = "none"
    rows = [
        (d[0:2], "magic"),
        (d[2:3], f"version {d[2]}"),
        (d[3:4], f"type {d[3]} {TYPE_NAMES.get(d[3], '?')}"),
        (d[4:5], f"key id {d[4]}"),
        (d[5:6], f"flags 0x{d[5]:02x}" + (" FAILOVER" if d[5] & 1 else "")),
        (d[6:7], f"route {d[6]}"),
        (d[7:8], f"family {d[7]} ({fam})"),
        (d[8:10], f"port {port}"),
        (d[10:26], f"address {addr}"),
        (d[26:32], f"timestamp {int.from_bytes(d[26:32], 'big')} ms"),
        (d[32:48], "tag"),
    ]
    payload = d[48:]
    for i in range(0, len(payload), 16):
        rows.append((payload[i:i + 16], f"payload ({len(payload)} octets)" if i == 0 else ""))
    return rows


def _stun_rows(raw):
    """RFC 5769 layout: four octets a line, each attribute annotated on its first line."""
    def quads(start, end, note):
        return [(raw[i:min(i + 4, end)], note if i == start else "") for i in range(start, end, 4)]

    rows = [(raw[0:4], f"type 0x{raw[0:2].hex()}, length {int.from_bytes(raw[2:4], 'big')}"),
            (raw[4:8], "magic cookie")] + quads(8, 20, "transaction id")
    txid = raw[8:20]
    for a in _attributes(raw):
        off, value = a["offset"], bytes.fromhex(a["value"])
        end = off + 4 + ((len(value) + 3) & ~3)
        name = a["name"].replace("_", "-")
        if a["type"] in (stun.USERNAME, stun.SOFTWARE):
            shown = f' "{value.decode()}"'
        elif a["type"] == stun.XOR_MAPPED_ADDRESS:
            host, port = stun.decode_xor_address(value, txid)
            shown = f" {host} port {port}"
        elif a["type"] == stun.PRIORITY:
            shown = f" {int.from_bytes(value, 'big')}"
        else:
            shown = ""
        rows.append((raw[off:off + 4], f"{name}, length {len(value)}"))
        rows += quads(off + 4, end, shown.strip() if shown else "")
    return rows


def _params(vec, names):
    return "  ".join(f"{n}: {vec[n]}" for n in names)


def markdown():
    """The vector records of PROTOCOL.md appendix A, in the syntax tests/test_protocol_doc.py reads."""
    k, t, h, s = build_keys(), build_token(), build_header(), build_stun()
    out = {}
    lines = out["keys"] = []
    for vec in k["keys"]:
        lines += [f"vector: keys/{vec['name']}", "master:"] + _dump(bytes.fromhex(vec["master"]))
        lines += ["token_key:"] + _dump(bytes.fromhex(vec["token_key"]))
        lines += ["header_key:"] + _dump(bytes.fromhex(vec["header_key"])) + [""]
    lines = out["token valid"] = []
    for vec in t["valid"]:
        lines.append(f"vector: token/{vec['name']}")
        if "why" in vec:
            lines.append(f"why: {vec['why']}")
        else:
            lines += ["octets:"] + _annotated(_token_rows(bytes.fromhex(vec["octets"])))
            lines += ["hmac:"] + _dump(bytes.fromhex(vec["hmac"]))
        lines += [f"ufrag: {json.dumps(vec['ufrag'])}", _params(vec, ("wall", "max_lifetime", "skew")),
                  f"expect: {vec['expect']}", ""]
    lines = out["token invalid"] = []
    for vec in t["invalid"]:
        u = vec["ufrag"]
        shown = f'"{u[0]}" * {len(u)}' if len(u) > 64 and len(set(u)) == 1 else json.dumps(u)
        lines += [f"vector: token/{vec['name']}", f"why: {vec['why']}", f"ufrag: {shown}",
                  _params(vec, ("wall", "max_lifetime", "skew")), f"expect: {vec['expect']}", ""]
    lines = out["header valid"] = []
    for vec in h["valid"]:
        lines += [f"vector: header/{vec['name']}", f"why: {vec['why']}"]
        if vec["name"].startswith("probe_window"):
            lines += ["datagram:"] + _dump(bytes.fromhex(vec["datagram"]))
        else:
            lines += ["datagram:"] + _annotated(_header_rows(bytes.fromhex(vec["datagram"])))
            lines += ["mac_input:"] + _dump(bytes.fromhex(vec["mac_input"]))
            lines += ["hmac:"] + _dump(bytes.fromhex(vec["hmac"]))
        lines += [_params(vec, ("now_ms", "window_ms", "accept")), f"expect: {vec['expect']}", ""]
    lines = out["header invalid"] = []
    for vec in h["invalid"]:
        lines += [f"vector: header/{vec['name']}", f"why: {vec['why']}", "datagram:"]
        lines += _dump(bytes.fromhex(vec["datagram"]))
        lines += [_params(vec, ("now_ms", "window_ms", "accept")), f"expect: {vec['expect']}", ""]
    for part, vectors in (("stun rfc", s["messages"]), ("stun answers", s["answers"])):
        lines = out[part] = []
        for vec in vectors:
            lines += [f"vector: stun/{vec['name']}", "hex:"]
            lines += _annotated(_stun_rows(bytes.fromhex(vec["hex"])), col=20) + [""]
    return out


def markdown_text():
    return "\n".join(f"----- {part}\n" + "\n".join(body) for part, body in markdown().items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a JSON file would change")
    parser.add_argument("--markdown", action="store_true", help="print the PROTOCOL.md vector records")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_text())
        return 0
    stale = []
    for name, build in BUILDERS.items():
        path = HERE / name
        text = render(build())
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(name)
            if not args.check:
                path.write_text(text)
    if args.check:
        for name in stale:
            print(f"{HERE / name}: out of date; run {GENERATOR}", file=sys.stderr)
        return 1 if stale else 0
    for name in stale:
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
