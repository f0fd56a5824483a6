"""The adapter's sans-IO core: SDP rewrites, STUN rewrites both ways, passthrough, drops, expiry, vectors."""

import json
import os
from pathlib import Path

import pytest

from adapterkit import (ANSWER, CLIENT, OFFER, PUBLIC, RELAY, RING, SERVER, Call, IcePeer, from_adapter, make_adapter,
                        to_transceiver)
from edge_relay import adapter, header, keys, stun, token
from edge_relay.drops import Drop

VECTORS = json.loads((Path(__file__).parent / "vectors" / "adapter.json").read_text())


# -- SDP ----------------------------------------------------------------------

def test_offer_for_server_drops_client_candidates_only():
    out = make_adapter().offer_for_server(OFFER)
    assert "a=candidate" not in out and "a=end-of-candidates" not in out
    kept = [ln for ln in OFFER.split("\r\n") if ln and not ln.startswith("a=candidate")
            and ln != "a=end-of-candidates"]
    assert out.split("\r\n")[:-1] == kept
    assert "a=ice-ufrag:CLNT" in out and "a=ice-pwd:clientpassword0123456789" in out


def test_answer_for_client_token_password_and_relay_candidates():
    ad = make_adapter()
    answer, s = ad.answer_for_client(OFFER, ANSWER, 1_700_000_000, 5.0)
    ufrag, pwd = adapter.ice_credentials(answer)
    tok = token.verify(ufrag.encode(), RING, 1_700_000_000, 86400, 5)
    assert tok.__class__ is token.Token and tok.transceiver == 1
    assert pwd != "serverpassword0123456789" and len(pwd) >= 22
    assert (s.token, s.password) == (ufrag.encode(), pwd.encode())
    assert (s.client_ufrag, s.client_pwd) == (b"CLNT", b"clientpassword0123456789")
    assert (s.server_ufrag, s.server_pwd) == (b"SRVR", b"serverpassword0123456789")
    assert s.server == SERVER             # highest-priority UDP candidate with an IP address
    cands = [ln for ln in answer.split("\r\n") if ln.startswith("a=candidate")]
    assert cands == [f"a=candidate:1 1 udp 2130706431 {PUBLIC[0][0]} {PUBLIC[0][1]} typ host"]
    assert "a=end-of-candidates" in answer
    assert f"m=audio {PUBLIC[0][1]} " in answer and f"c=IN IP4 {PUBLIC[0][0]}" in answer
    assert "10.0.0.2" not in answer and "server.local" not in answer
    assert ad.sessions[s.token] is s and ad.by_server[(b"SRVR", b"CLNT")] is s


def test_answer_lists_every_public_address_in_order():
    ad = adapter.Adapter(make_adapter().endpoint, [("198.51.100.7", 3478), ("2001:db8::7", 3479)])
    answer, _ = ad.answer_for_client(OFFER, ANSWER, 1_700_000_000, 5.0)
    cands = [ln.split() for ln in answer.split("\r\n") if ln.startswith("a=candidate")]
    assert [(c[4], c[5]) for c in cands] == [("198.51.100.7", "3478"), ("2001:db8::7", "3479")]
    assert int(cands[0][3]) > int(cands[1][3])


@pytest.mark.parametrize("sdp, problem", [
    ("hello", "not an SDP"),
    (OFFER.replace("a=ice-pwd:clientpassword0123456789\r\n", ""), "exactly one"),
    (OFFER.replace("a=mid:0", "a=ice-ufrag:OTHER"), "exactly one"),
])
def test_bad_offer_is_one_line_error(sdp, problem):
    with pytest.raises(adapter.AdapterError, match=problem) as exc:
        make_adapter().offer_for_server(sdp)
    assert "\n" not in str(exc.value)


def test_answer_without_usable_candidate_is_refused():
    answer = "\r\n".join(ln for ln in ANSWER.split("\r\n") if "10.0.0." not in ln)
    with pytest.raises(adapter.AdapterError, match="no UDP candidate"):
        make_adapter().answer_for_client(OFFER, answer, 1_700_000_000, 5.0)


def test_session_table_is_bounded():
    ad = make_adapter(max_sessions=2)
    for _ in range(2):
        ad.answer_for_client(OFFER, ANSWER, 1_700_000_000, 5.0)
    with pytest.raises(adapter.AdapterError, match="session table full"):
        ad.answer_for_client(OFFER, ANSWER, 1_700_000_000, 5.0)
    # stale ones make room
    ad.answer_for_client(OFFER, ANSWER, 1_700_000_000, 5.0 + ad.session_ttl + 1)


# -- the rewrites -------------------------------------------------------------

def test_client_check_reaches_server_as_server_ufrag_signed_with_server_password():
    c = Call()
    txid = os.urandom(12)
    out = c.relay_in(c.client.check(txid))
    assert out.to == adapter.TO_SERVER and out.dest == SERVER
    msg = stun.decode(out.data)
    assert bytes(msg.get(stun.USERNAME)) == b"SRVR:CLNT"
    assert stun.check_integrity(out.data, msg, b"serverpassword0123456789")
    assert msg.transaction_id == txid
    for attr in (stun.PRIORITY, stun.ICE_CONTROLLING, stun.USE_CANDIDATE, 0xC057):
        assert attr in msg.attributes, hex(attr)
    assert stun.FINGERPRINT in msg.attributes
    assert c.server.answer(out.data, ("127.0.0.1", 1)).__class__ is bytes


def test_server_answer_reaches_client_with_client_address_and_adapter_password():
    c = Call()
    txid = os.urandom(12)
    out = c.relay_in(c.client.check(txid))
    resp = c.server.answer(out.data, ("192.0.2.200", 55555))      # the adapter's socket as the server saw it
    back = c.server_in(out.flow, resp)
    assert back.to == adapter.TO_RELAY and back.dest == RELAY
    payload, hdr = from_adapter(back)
    assert hdr.type == header.TO_CLIENT and hdr.port == CLIENT[1]
    assert c.client.accept_response(payload, txid) == CLIENT
    assert not stun.check_integrity(payload, stun.decode(payload), b"serverpassword0123456789")


def test_server_check_reaches_client_as_token_and_client_answer_reaches_server():
    c = Call()
    flow = c.connect()
    txid = os.urandom(12)
    out = c.server_in(flow, c.server.check(txid), src=SERVER)
    payload, _ = from_adapter(out)
    msg = stun.decode(payload)
    assert bytes(msg.get(stun.USERNAME)) == b"CLNT:" + c.session.token
    assert stun.check_integrity(payload, msg, b"clientpassword0123456789")
    assert stun.ICE_CONTROLLED in msg.attributes and stun.USE_CANDIDATE not in msg.attributes
    answer = c.client.answer(payload, PUBLIC[0])          # the client saw it from the relay's address
    up = c.relay_in(answer)
    assert up.to == adapter.TO_SERVER and up.dest == SERVER
    assert c.server.accept_response(up.data, txid) == SERVER


def test_dtls_and_rtp_pass_unchanged_both_ways():
    c = Call()
    flow = c.connect()
    for data in (b"\x16\xfe\xfd" + os.urandom(60), b"\x80\x6f" + os.urandom(150)):
        out = c.relay_in(data)
        assert (out.to, out.dest, out.data) == (adapter.TO_SERVER, SERVER, data)
        back = c.server_in(flow, data)
        assert from_adapter(back)[0] == data and back.dest == RELAY
    assert c.ad.counts["client_to_server"] == 2 and c.ad.counts["server_to_client"] == 2
    assert c.ad.drop_counts() == {}


def test_media_follows_the_server_source_once_it_proved_itself():
    c = Call()
    flow = c.connect()
    other = ("10.0.0.3", 41002)
    assert c.server_in(flow, b"\x80" + bytes(40), src=other) is None       # not proven: no hijack
    assert c.ad.drop_counts() == {"NOT_TRANSCEIVER": 1}
    assert c.relay_in(b"\x80" + bytes(40)).dest == SERVER
    payload, _ = from_adapter(c.server_in(flow, c.server.check(), src=other))   # a valid check proves it
    c.relay_in(c.client.answer(payload, PUBLIC[0]))
    assert c.server_in(flow, b"\x80" + bytes(40), src=other) is not None
    assert c.relay_in(b"\x80" + bytes(40)).dest == other


def test_each_client_gets_its_own_flow():
    c = Call()
    f1 = c.connect()
    out = c.relay_in(c.client.check(), client=("203.0.113.10", 1))
    assert out.flow is not f1 and len(c.ad.flows) == 2


def test_probes_answered_only_while_server_up():
    ad = make_adapter()
    now = 1_700_000_000_000
    probe = header.encode(RING.signing, header.PROBE, b"p" * 24, timestamp_ms=now) + b"p" * 24
    out = ad.from_relay(probe, RELAY, now, 1.0)
    hdr = header.decode(out.data, RING, now, 2000, accept=header.RELAY_ACCEPTS)
    assert hdr.type == header.PROBE_ACK and bytes(hdr.payload) == b"p" * 24 and out.dest == RELAY
    ad.server_up = False
    assert ad.from_relay(probe, RELAY, now, 1.0) is None
    assert ad.counts["probes_unanswered"] == 1 and ad.drop_counts() == {}


def test_ice_restart_new_session_same_flow():
    c = Call()
    flow = c.connect()
    answer2, s2 = c.ad.answer_for_client(OFFER.replace("CLNT", "CLN2"), ANSWER.replace("SRVR", "SRV2")
                                         .replace("41000", "41010"), c.NOW / 1000, c.mono)
    assert s2.token != c.session.token
    client = IcePeer("CLN2", "clientpassword0123456789", True)
    client.remote_ufrag, client.remote_pwd = [x.encode() for x in adapter.ice_credentials(answer2)]
    txid = os.urandom(12)
    out = c.relay_in(client.check(txid))
    assert out.flow is flow and out.dest == ("10.0.0.2", 41010)
    assert bytes(stun.decode(out.data).get(stun.USERNAME)) == b"SRV2:CLN2"
    server = IcePeer("SRV2", "serverpassword0123456789", False)
    server.remote_ufrag = b"CLN2"
    back = c.server_in(flow, server.answer(out.data, ("1.2.3.4", 5)), src=("10.0.0.2", 41010))
    assert client.accept_response(from_adapter(back)[0], txid) == CLIENT
    assert flow.session is s2 and flow.server == ("10.0.0.2", 41010)


# -- drops: every rejection is counted, never answered -------------------------

def _drop_case(name):
    c = Call()
    flow = c.connect()
    base = dict(c.ad.drop_counts())
    if name == "bad header":
        out = c.ad.from_relay(to_transceiver(b"\x00" * 20, key=keys.Key(1, os.urandom(32))),
                              RELAY, c.NOW, c.mono)
        reason = Drop.HEADER_MAC
    elif name == "unknown token":
        other = IcePeer("CLNT", "x" * 24, True)
        other.remote_ufrag, other.remote_pwd = b"NOTATOKEN", c.session.password
        out, reason = c.relay_in(other.check()), Drop.STUN_NO_USERNAME
    elif name == "wrong client ufrag":
        other = IcePeer("ZZZZ", "x" * 24, True)
        other.remote_ufrag, other.remote_pwd = c.session.token, c.session.password
        out, reason = c.relay_in(other.check()), Drop.STUN_NO_USERNAME
    elif name == "wrong password":
        c.client.remote_pwd = b"y" * 24
        out, reason = c.relay_in(c.client.check()), Drop.STUN_INTEGRITY
    elif name == "malformed stun":
        out, reason = c.relay_in(b"\x00\x01\x00\x04" + bytes(20)), Drop.STUN_MALFORMED
    elif name == "not webrtc":
        out, reason = c.relay_in(b"\x50" + bytes(30)), Drop.NOT_WEBRTC
    elif name == "empty":
        out, reason = c.relay_in(b""), Drop.NOT_WEBRTC
    elif name == "dtls without flow":
        out, reason = c.relay_in(b"\x16" + bytes(30), client=("203.0.113.50", 9)), Drop.UNKNOWN_FLOW
    elif name == "unmatched response from client":
        resp = stun.encode(stun.BINDING_SUCCESS, os.urandom(12), [], integrity_key=c.session.client_pwd)
        out, reason = c.relay_in(resp), Drop.STUN_UNMATCHED
    elif name == "unmatched response from server":
        resp = stun.encode(stun.BINDING_SUCCESS, os.urandom(12), [], integrity_key=c.session.server_pwd)
        out, reason = c.server_in(flow, resp), Drop.STUN_UNMATCHED
    elif name == "server error response":
        txid = os.urandom(12)
        c.relay_in(c.client.check(txid))
        err = stun.encode(stun.BINDING_ERROR, txid, [(stun.ERROR_CODE, b"\x00\x00\x04\x57")],
                          integrity_key=c.session.server_pwd)
        out, reason = c.server_in(flow, err), Drop.STUN_ERROR_RESPONSE
    elif name == "client error response":
        err = stun.encode(stun.BINDING_ERROR, os.urandom(12), [(stun.ERROR_CODE, b"\x00\x00\x04\x57")])
        out, reason = c.relay_in(err), Drop.STUN_ERROR_RESPONSE
    elif name == "forged server response":
        txid = os.urandom(12)
        c.relay_in(c.client.check(txid))
        resp = stun.encode(stun.BINDING_SUCCESS, txid, [], integrity_key=b"not the server password")
        out, reason = c.server_in(flow, resp), Drop.STUN_INTEGRITY
    elif name == "server check with unknown ufrags":
        c.server.remote_ufrag = b"NOPE"
        out, reason = c.server_in(flow, c.server.check()), Drop.STUN_NO_USERNAME
    elif name == "server check with wrong password":
        c.server.remote_pwd = b"z" * 24
        out, reason = c.server_in(flow, c.server.check()), Drop.STUN_INTEGRITY
    elif name == "media from an unproven server address":
        out, reason = c.server_in(flow, b"\x16" + bytes(20), src=("10.9.9.9", 9)), Drop.NOT_TRANSCEIVER
    elif name == "server garbage":
        out, reason = c.server_in(flow, b"\xff" * 10), Drop.NOT_WEBRTC
    elif name == "server stun non-binding":
        out, reason = c.server_in(flow, stun.encode(0x0003, os.urandom(12), [])), Drop.STUN_NOT_BINDING_REQUEST
    elif name == "flow forgotten":
        c.ad.expire(c.mono + c.ad.idle_timeout + 1, c.NOW / 1000)
        out, reason = c.server_in(flow, b"\x80" + bytes(20)), Drop.UNKNOWN_FLOW
    elif name == "flow table full":
        c.ad.max_flows = 1
        out, reason = c.relay_in(c.client.check(), client=("203.0.113.77", 7)), Drop.FLOW_TABLE_FULL
    else:
        raise AssertionError(name)
    assert out is None
    after = c.ad.drop_counts()
    assert after.get(reason.name, 0) == base.get(reason.name, 0) + 1, (name, after)
    assert sum(after.values()) == sum(base.values()) + 1


DROP_CASES = ["bad header", "unknown token", "wrong client ufrag", "wrong password", "malformed stun",
              "not webrtc", "empty", "dtls without flow", "unmatched response from client",
              "unmatched response from server", "server error response", "client error response",
              "forged server response", "server check with unknown ufrags",
              "server check with wrong password", "media from an unproven server address", "server garbage",
              "server stun non-binding",
              "flow forgotten", "flow table full"]


@pytest.mark.parametrize("name", DROP_CASES)
def test_rejections_are_dropped_and_counted(name):
    _drop_case(name)


def test_response_is_used_once():
    c = Call()
    txid = os.urandom(12)
    out = c.relay_in(c.client.check(txid))
    resp = c.server.answer(out.data, ("1.2.3.4", 5))
    assert c.server_in(out.flow, resp) is not None
    assert c.server_in(out.flow, resp) is None
    assert c.ad.drop_counts() == {"STUN_UNMATCHED": 1}


def test_pending_transactions_are_bounded():
    c = Call()
    flow = c.connect()
    for _ in range(adapter.MAX_PENDING_TRANSACTIONS * 3):
        c.relay_in(c.client.check())
    assert len(flow.pending) == adapter.MAX_PENDING_TRANSACTIONS


# -- timeouts -----------------------------------------------------------------

def test_idle_flows_and_stale_sessions_are_forgotten():
    c = Call(idle_timeout=10.0, session_ttl=60.0)
    flow = c.connect()
    assert c.ad.expire(c.mono + 9, c.NOW / 1000) == []
    assert c.ad.expire(c.mono + 11, c.NOW / 1000) == [flow]
    assert c.ad.flows == {} and c.session.token in c.ad.sessions
    c.ad.expire(c.mono + 61, c.NOW / 1000)
    assert c.ad.sessions == {} and c.ad.by_server == {}
    assert c.ad.counts["flows_expired"] == 1 and c.ad.counts["sessions_expired"] == 1


def test_session_of_a_live_flow_stays_and_expired_token_goes():
    c = Call(idle_timeout=1000.0, session_ttl=10.0)
    c.connect()
    c.ad.expire(c.mono + 50, c.NOW / 1000)
    assert c.session.token in c.ad.sessions
    c.ad.expire(c.mono + 50, c.session.expiry + 1)
    assert c.session.token not in c.ad.sessions


# -- vectors (docs/ADAPTER.md appendix) ---------------------------------------

@pytest.mark.parametrize("vec", VECTORS["stun"], ids=lambda v: v["name"])
def test_stun_vectors(vec):
    raw = bytes.fromhex(vec["in"])
    msg = stun.decode(raw)
    assert stun.check_integrity(raw, msg, vec["in_key"].encode())
    mapped = tuple(vec["mapped"]) if vec.get("mapped") else None
    username = vec["username"].encode() if vec.get("username") else None
    out = adapter.resign(raw, msg, vec["out_key"].encode(), username=username, mapped=mapped)
    assert out.hex() == vec["out"]
    m2 = stun.decode(out)
    assert stun.check_integrity(out, m2, vec["out_key"].encode())
    if username:
        assert bytes(m2.get(stun.USERNAME)) == username
    if mapped:
        assert stun.decode_xor_address(m2.get(stun.XOR_MAPPED_ADDRESS), m2.transaction_id) == mapped


@pytest.mark.parametrize("vec", VECTORS["sdp"], ids=lambda v: v["name"])
def test_sdp_vectors(vec):
    if vec["op"] == "strip":
        assert adapter.strip_candidates(vec["in"]) == vec["out"]
    else:
        public = [tuple(p) for p in vec["public"]]
        assert adapter.rewrite_answer(vec["in"], vec["ufrag"], vec["pwd"], public) == vec["out"]


def test_adapter_md_carries_every_stun_vector():
    text = (Path(__file__).parent.parent / "docs" / "ADAPTER.md").read_text()
    flat = "".join(ln.strip() for ln in text.splitlines() if ln.startswith("  "))
    for vec in VECTORS["stun"]:
        assert f"vector: adapter/{vec['name']}" in text
        assert vec["in"] in flat and vec["out"] in flat, vec["name"]
