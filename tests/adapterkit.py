"""Shared pieces for the adapter tests: a synthetic ICE-full peer, SDP samples, a relay stand-in.

`IcePeer` is a full ICE agent reduced to what the adapter sees: it sends
connectivity checks (USERNAME "<remote>:<local>", PRIORITY,
ICE-CONTROLLING/CONTROLLED, USE-CANDIDATE, MESSAGE-INTEGRITY with the remote
password, FINGERPRINT) and answers checks (Binding success, XOR-MAPPED-ADDRESS
= the source it saw, MESSAGE-INTEGRITY with its own password), checking the
integrity of everything it receives, as a browser does.
"""

import os
import struct

from edge_relay import adapter, header, keys, stun, transceiver
from edge_relay.drops import Drop

MASTER = bytes(range(32))
RING = keys.KeyRing({1: MASTER})
PUBLIC = [("198.51.100.7", 3478)]
CLIENT = ("203.0.113.9", 50000)
RELAY = ("192.0.2.1", 40000)
SERVER = ("10.0.0.2", 41000)

OFFER = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=audio 50000 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 203.0.113.9\r\n"
    "a=candidate:1 1 udp 2122260223 203.0.113.9 50000 typ host generation 0\r\n"
    "a=candidate:2 1 tcp 1518280447 203.0.113.9 9 typ host tcptype active\r\n"
    "a=ice-ufrag:CLNT\r\na=ice-pwd:clientpassword0123456789\r\na=ice-options:trickle\r\n"
    "a=fingerprint:sha-256 00:11\r\na=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\n"
    "a=rtpmap:111 opus/48000/2\r\na=end-of-candidates\r\n")
ANSWER = (
    "v=0\r\no=- 3 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=audio 41000 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 10.0.0.2\r\n"
    "a=candidate:7 1 udp 2122260223 10.0.0.2 41000 typ host generation 0\r\n"
    "a=candidate:8 1 udp 2122194687 server.local 41001 typ host generation 0\r\n"
    "a=candidate:9 1 udp 100 10.0.0.3 41002 typ host generation 0\r\n"
    "a=ice-ufrag:SRVR\r\na=ice-pwd:serverpassword0123456789\r\n"
    "a=fingerprint:sha-256 22:33\r\na=setup:active\r\na=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\n"
    "a=rtpmap:111 opus/48000/2\r\n")


class IcePeer:
    def __init__(self, ufrag, pwd, controlling):
        self.ufrag = ufrag.encode()
        self.pwd = pwd.encode()
        self.controlling = controlling
        self.remote_ufrag = self.remote_pwd = None

    def check(self, txid=None, use_candidate=True):
        txid = txid or os.urandom(12)
        attrs = [(stun.USERNAME, self.remote_ufrag + b":" + self.ufrag),
                 (0xC057, b"\x00\x01\x00\x0a"),            # GOOG-NETWORK-INFO, as Chromium sends
                 (stun.PRIORITY, struct.pack(">I", 1853817087)),
                 (stun.ICE_CONTROLLING if self.controlling else stun.ICE_CONTROLLED, os.urandom(8))]
        if use_candidate and self.controlling:
            attrs.append((stun.USE_CANDIDATE, b""))
        return stun.encode(stun.BINDING_REQUEST, txid, attrs, integrity_key=self.remote_pwd)

    def answer(self, data, src):
        """Binding success for a check `data` seen from `src`, or the Drop (as a browser would ignore it)."""
        req = transceiver.check_request(data, self.ufrag.decode(), self.pwd.decode())
        if req.__class__ is Drop:
            return req
        user = stun.split_username(req.get(stun.USERNAME))
        assert user[1] == self.remote_ufrag, user
        return transceiver.answer_binding(req, src, self.pwd.decode(), software=None)

    def accept_response(self, data, txid):
        """The XOR-MAPPED-ADDRESS of a valid response to `txid` (checked with the remote password)."""
        msg = stun.decode(data)
        assert msg.__class__ is stun.Message, msg
        assert msg.msg_type == stun.BINDING_SUCCESS and msg.transaction_id == txid
        assert stun.check_integrity(data, msg, self.remote_pwd), "response integrity"
        return stun.decode_xor_address(msg.get(stun.XOR_MAPPED_ADDRESS), txid)


def make_adapter(**kw):
    return adapter.Adapter(transceiver.Endpoint(RING, 1), PUBLIC, **kw)


def to_transceiver(payload, client=CLIENT, now_ms=None, route=0, key=None):
    """What a relay sends the adapter for `payload` from `client`."""
    import socket
    now_ms = now_ms if now_ms is not None else 1_700_000_000_000
    raw = socket.inet_pton(socket.AF_INET, client[0]) + bytes(12)
    return header.encode(key or RING.signing, header.TO_TRANSCEIVER, payload, route=route,
                         family=header.FAMILY_V4, port=client[1], address=raw,
                         timestamp_ms=now_ms) + bytes(payload)


def from_adapter(out, now_ms=1_700_000_000_000):
    """The payload of a TO_CLIENT the adapter sealed (checked as a relay would)."""
    hdr = header.decode(out.data, RING, now_ms, 2000, accept=header.RELAY_ACCEPTS)
    assert hdr.__class__ is header.Header, hdr
    return bytes(hdr.payload), hdr


class Call:
    """An adapter with one negotiated session, a client peer and a server peer."""

    NOW = 1_700_000_000_000

    def __init__(self, **kw):
        self.ad = make_adapter(**kw)
        self.mono = 100.0
        self.server_offer = self.ad.offer_for_server(OFFER)
        self.answer, self.session = self.ad.answer_for_client(OFFER, ANSWER, self.NOW / 1000, self.mono)
        cufrag, cpwd = adapter.ice_credentials(self.answer)
        self.client = IcePeer("CLNT", "clientpassword0123456789", controlling=True)
        self.client.remote_ufrag, self.client.remote_pwd = cufrag.encode(), cpwd.encode()
        self.server = IcePeer("SRVR", "serverpassword0123456789", controlling=False)
        self.server.remote_ufrag, self.server.remote_pwd = b"CLNT", b"clientpassword0123456789"

    def relay_in(self, payload, client=CLIENT):
        return self.ad.from_relay(to_transceiver(payload, client, self.NOW), RELAY, self.NOW, self.mono)

    def server_in(self, flow, data, src=SERVER):
        return self.ad.from_server(flow, data, src, self.NOW)

    def connect(self):
        """Client check -> server, server's answer -> client; returns the flow."""
        txid = os.urandom(12)
        out = self.relay_in(self.client.check(txid))
        assert out is not None and out.to == adapter.TO_SERVER, self.ad.drop_counts()
        resp = self.server.answer(out.data, ("192.0.2.200", 55555))
        back = self.server_in(out.flow, resp)
        payload, _ = from_adapter(back)
        assert self.client.accept_response(payload, txid) == CLIENT
        return out.flow
