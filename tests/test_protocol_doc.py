"""docs/PROTOCOL.md and tests/vectors/*.json say the same thing.

Appendix A of PROTOCOL.md holds the test vectors as records (its syntax is
described there); this file parses them and checks, field by field, that each
record equals its JSON twin, that every JSON vector has a record, and that
no hex dump or token-shaped ufrag anywhere in the document is missing from
the JSON. It also runs the integration example of section 7.1 against a fake
socket, so the example cannot rot either.
"""

import base64
import binascii
import json
import re
import time
from pathlib import Path

import pytest

from edge_relay import header, keys, stun
from edge_relay.drops import Drop

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()
HERE = ROOT / "tests" / "vectors"
JSON = {name: json.loads((HERE / f"{name}.json").read_text())
        for name in ("keys", "token", "header", "stun_rfc5769")}

HEX_LINE = re.compile(r"^ {2,}((?:[0-9a-f]{2} )*[0-9a-f]{2})(?: {2,}\S.*)?$")
LABEL = re.compile(r"^([a-z_]+):$")
FIELD = re.compile(r"^([a-z_]+): (\S.*)$")
UFRAG_REPEAT = re.compile(r'^"(.)" \* (\d+)$')


# -- reading the document ----------------------------------------------------------------


def code_blocks(text):
    """(first line number, lines) of every fenced code block."""
    blocks, current, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current, start = [], n + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "unterminated code block"
    return blocks


def parse_ufrag(value):
    m = UFRAG_REPEAT.match(value)
    if m:
        return m.group(1) * int(m.group(2))
    ufrag, end = json.JSONDecoder().raw_decode(value)
    assert end == len(value) and isinstance(ufrag, str), value
    return ufrag


def parse_records(text):
    """The vector records of the document, and the hex or ufrag lines found outside any record."""
    records, stray = [], []
    for start, lines in code_blocks(text):
        record = run = None
        for n, line in enumerate(lines, start):
            if line.startswith("vector: "):
                record = {"_id": line[len("vector: "):].strip(), "_line": n}
                records.append(record)
                run = None
                continue
            if record is None:
                if HEX_LINE.match(line) or line.startswith("ufrag:"):
                    stray.append((n, line))
                continue
            if not line.strip():
                run = None
                continue
            m = HEX_LINE.match(line)
            if m and run is not None:
                record[run] += m.group(1).replace(" ", "")
                continue
            m = LABEL.match(line)
            if m:
                run = m.group(1)
                assert run not in record, f"line {n}: {run} repeated"
                record[run] = ""
                continue
            run = None
            if line.startswith("ufrag: "):
                record["ufrag"] = parse_ufrag(line[len("ufrag: "):])
                continue
            if line.startswith("why: "):
                record["why"] = line[len("why: "):]
                continue
            for piece in re.split(r" {2,}", line):
                m = FIELD.match(piece)
                assert m, f"line {n}: cannot read {line!r}"
                assert m.group(1) not in record, f"line {n}: {m.group(1)} repeated"
                record[m.group(1)] = m.group(2)
    return records, stray


RECORDS, STRAY = parse_records(DOC)


# -- the JSON side ---------------------------------------------------------------------


def json_vectors():
    """id -> (vector, fields the document must show)."""
    out = {}
    for vec in JSON["keys"]["keys"]:
        out[f"keys/{vec['name']}"] = (vec, {"master", "token_key", "header_key"})
    t = JSON["token"]
    for vec in t["valid"] + t["invalid"]:
        need = {"ufrag", "wall", "max_lifetime", "skew", "expect"}
        need |= {"why"} if "why" in vec else {"octets", "hmac"}
        out[f"token/{vec['name']}"] = (vec, need)
    h = JSON["header"]
    for vec in h["valid"] + h["invalid"]:
        need = {"why", "datagram", "now_ms", "window_ms", "accept", "expect"}
        if "mac_input" in vec and not vec["name"].startswith("probe_window"):
            need |= {"mac_input", "hmac"}
        out[f"header/{vec['name']}"] = (vec, need)
    s = JSON["stun_rfc5769"]
    for vec in s["messages"] + s["answers"]:
        out[f"stun/{vec['name']}"] = (vec, {"hex"})
    return out


VECTORS = json_vectors()


def json_strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_strings(v)


ALL_STRINGS = [s for doc in JSON.values() for s in json_strings(doc)]
ALL_HEX = [s for s in ALL_STRINGS if s and re.fullmatch(r"[0-9a-f]+", s) and len(s) % 2 == 0]
ALL_UFRAGS = {v["ufrag"] for v in JSON["token"]["valid"] + JSON["token"]["invalid"]}


# -- doc <-> JSON ----------------------------------------------------------------------


def test_the_document_has_vector_records():
    assert len(RECORDS) > 50


def test_every_record_is_a_json_vector():
    ids = [r["_id"] for r in RECORDS]
    assert len(ids) == len(set(ids)), "a vector appears twice"
    unknown = [(r["_line"], r["_id"]) for r in RECORDS if r["_id"] not in VECTORS]
    assert not unknown


def test_every_json_vector_is_in_the_document():
    missing = sorted(set(VECTORS) - {r["_id"] for r in RECORDS})
    assert not missing


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r["_id"])
def test_record_matches_json(record):
    vec, need = VECTORS[record["_id"]]
    fields = {k: v for k, v in record.items() if not k.startswith("_")}
    assert need <= set(fields), f"line {record['_line']}: missing {sorted(need - set(fields))}"
    for name, shown in fields.items():
        assert name in vec, f"line {record['_line']}: {name} is not a field of the JSON vector"
        want = vec[name]
        if isinstance(want, bool) or not isinstance(want, (int, str)):
            pytest.fail(f"line {record['_line']}: {name} cannot be shown")
        assert shown == (str(want) if isinstance(want, int) else want), (record["_line"], name)


def test_no_hex_dump_or_ufrag_outside_records():
    assert not STRAY


def test_hex_in_prose_is_in_the_json():
    """Any run of 16+ hex digits in the text (the key file example, the transaction id)."""
    text = "\n".join(line for _, lines in code_blocks(DOC) for line in lines if not HEX_LINE.match(line))
    prose = re.sub(r"```.*?```", "", DOC, flags=re.S)
    found = set(re.findall(r"(?<![0-9A-Za-z])[0-9a-f]{16,}(?![0-9A-Za-z])", text + "\n" + prose))
    assert found, "expected the key file example and the transaction id"
    missing = [h for h in found if not any(h in s for s in ALL_HEX)]
    assert not missing


def test_token_shaped_strings_are_json_ufrags():
    """Any 32-character base64 string in the document that decodes to a version 1 token."""
    found = set()
    for m in re.finditer(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{32}(?![A-Za-z0-9+/=])", DOC):
        try:
            raw = binascii.a2b_base64(m.group(0), strict_mode=True)
        except binascii.Error:
            continue
        if len(raw) == 24 and raw[0] == 1:
            found.add(m.group(0))
    assert found
    assert found <= ALL_UFRAGS


def test_doc_covers_every_drop_reason_of_the_vectors():
    shown = {r["expect"] for r in RECORDS if "expect" in r}
    assert shown == {v["expect"] for v, _ in VECTORS.values() if "expect" in v}
    for name in shown - {"OK"}:
        assert Drop[name].name in DOC


def test_rule_names_in_the_text_are_drop_reasons():
    """Every upper-case name the document gives as a reason exists in drops.py."""
    for name in re.findall(r"\b((?:TOKEN|HEADER|STUN)_[A-Z_]+)\b", DOC):
        assert name in Drop.__members__, name


def test_constants_in_the_text():
    assert '"edge-relay v1 token"' in DOC and '"edge-relay v1 header"' in DOC
    assert keys.LABEL_TOKEN == b"edge-relay v1 token" and keys.LABEL_HEADER == b"edge-relay v1 header"
    assert "0xEE 0x52" in DOC and header.MAGIC == b"\xee\x52"
    assert "0x5354554E" in DOC and stun.FINGERPRINT_XOR == 0x5354554E
    assert "0x2112A442" in DOC and stun.MAGIC_COOKIE == 0x2112A442


def test_generator_is_in_sync():
    """The JSON files are what generate.py writes today."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("generate", HERE / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for name, build in generate.BUILDERS.items():
        assert generate.render(build()) == (HERE / name).read_text(), name


# -- the integration example of section 7.1 ------------------------------------------------


def example_code():
    section = DOC[DOC.index("### 7.1 Integration example"):]
    m = re.search(r"```python\n(.*?)```", section, flags=re.S)
    return m.group(1)


class _Done(Exception):
    pass


class FakeSocket:
    def __init__(self, datagrams):
        self.inbox = list(datagrams)
        self.sent = []

    def recvfrom(self, size):
        if not self.inbox:
            raise _Done
        datagram, addr = self.inbox.pop(0)
        assert len(datagram) <= size
        return datagram, addr

    def sendto(self, data, addr):
        self.sent.append((bytes(data), addr))


def test_integration_example_runs(monkeypatch):
    ring = keys.KeyRing({v["key_id"]: bytes.fromhex(v["master"]) for v in JSON["keys"]["keys"]})
    monkeypatch.setattr(keys, "load_dir", lambda *args, **kwargs: ring)
    code = example_code()
    assert 15 <= len(code.strip().splitlines()) <= 30
    ns = {"__name__": "example"}
    exec(compile(code, "PROTOCOL.md section 7.1", "exec"), ns)

    creds = ns["endpoint"].new_session(time.time())
    ns["passwords"][creds.ufrag] = creds.password
    now_ms = time.time_ns() // 1_000_000
    client = ("192.0.2.1", 32853)
    txid = bytes(range(12))
    request = stun.encode(stun.BINDING_REQUEST, txid, [
        (stun.USERNAME, f"{creds.ufrag}:abcd".encode()), (stun.PRIORITY, b"\x6e\x00\x01\xff"),
        (stun.ICE_CONTROLLING, bytes(8))], integrity_key=creds.password.encode())
    forged = stun.encode(stun.BINDING_REQUEST, txid, [(stun.USERNAME, f"{creds.ufrag}:abcd".encode())],
                         integrity_key=b"not the password")
    stranger = stun.encode(stun.BINDING_REQUEST, txid, [(stun.USERNAME, b"\xff\xfe:abcd")], integrity_key=b"x")

    def to_transceiver(payload, route=1):
        address = bytes([192, 0, 2, 1]) + bytes(12)
        return header.encode(ring.signing, header.TO_TRANSCEIVER, payload, route=route, family=4,
                             port=client[1], address=address, timestamp_ms=now_ms) + payload

    probe_payload = b"probe-0001"
    probe = header.encode(ring.signing, header.PROBE, probe_payload, timestamp_ms=now_ms) + probe_payload
    relay_a, relay_b = ("10.0.0.1", 4478), ("10.0.0.1", 4479)
    sock = FakeSocket([
        (b"garbage", relay_a),
        (to_transceiver(forged), relay_a),
        (to_transceiver(stranger), relay_a),
        (to_transceiver(b""), relay_a),
        (to_transceiver(b"\x16\xfe\xfd" + bytes(10)), relay_a),     # DTLS: the application's part
        (to_transceiver(request, route=7), relay_b),
        (probe, relay_a),
    ])
    with pytest.raises(_Done):
        ns["serve"](sock)

    assert [addr for _, addr in sock.sent] == [relay_b, relay_a]
    (answer_dgram, _), (ack_dgram, _) = sock.sent
    hdr = header.decode(answer_dgram, ring, now_ms, 2000, header.RELAY_ACCEPTS)
    assert hdr.type == header.TO_CLIENT and hdr.route == 7 and hdr.port == client[1]
    answer = bytes(hdr.payload)
    msg = stun.decode(answer)
    assert msg.msg_type == stun.BINDING_SUCCESS and msg.transaction_id == txid
    assert stun.check_integrity(answer, msg, creds.password.encode())
    assert stun.decode_xor_address(msg.get(stun.XOR_MAPPED_ADDRESS), txid) == client
    ack = header.decode(ack_dgram, ring, now_ms, 2000, header.RELAY_ACCEPTS)
    assert ack.type == header.PROBE_ACK and bytes(ack.payload) == probe_payload


def test_base64_alphabet_claim():
    """Section 3.1: base64 of 24 octets never pads and uses only ice-chars."""
    for raw in (bytes(24), b"\xff" * 24, bytes(range(24))):
        text = base64.b64encode(raw).decode()
        assert len(text) == 32 and re.fullmatch(r"[A-Za-z0-9+/]{32}", text)
