"""The transceiver adapter's sans-IO core: a stock WebRTC endpoint behind the relay.

Theory of operation (docs/ADAPTER.md is the full spec)

  client --(token:cufrag, header)--> relay --> ADAPTER --(sufrag:cufrag, plain UDP)--> server

A stock media server picks its own ICE ufrag and password and speaks plain
UDP. The adapter sits beside it and makes it look like an edge-relay
transceiver:

  * Signaling (`Adapter.offer_for_server`, `Adapter.answer_for_client`): the
    client's offer goes to the server without its candidates (the server
    reaches the client only through the adapter); the server's answer goes
    to the client with a fresh routing token as a=ice-ufrag, the adapter's
    own ICE password as a=ice-pwd and the relay's public address(es) as the
    only candidates. The session (token, adapter password, client and server
    credentials, the server's address) is remembered, bounded, with expiry.
  * Data plane (`Adapter.from_relay`, `Adapter.from_server`): one `Flow` per
    client (the header's client block); the I/O shell gives each flow its own
    upstream UDP socket, so the server sees each client as its own peer.
    STUN Binding messages are rewritten and re-signed so that each side sees
    the credentials it expects (tables in docs/ADAPTER.md section 4); every
    other datagram (DTLS, SRTP, RTCP) passes unchanged.

Invariants
  * Nothing here touches a socket or reads a clock: datagrams, `now_ms` (wall,
    for headers) and `mono` (seconds, for timeouts) come in; `Out` values
    (where to send which bytes) come out.
  * A datagram that is not forwarded is counted in `drops[reason]` (a
    `drops.Drop`), never raised. Nothing ever sends a STUN error response
    toward the relay, and nothing unauthenticated is re-signed: every
    MESSAGE-INTEGRITY is checked with the right password before the adapter
    signs the rewritten message (the adapter is no signing oracle).
  * Operator and signaling errors (bad SDP, table full) raise
    `AdapterError`, one line.
"""

import ipaddress
import re
from typing import NamedTuple

from . import header, stun, transceiver
from .drops import N_DROPS, Drop
from .errors import EdgeRelayError

DEFAULT_IDLE_TIMEOUT = 30.0         # s without a client datagram before a flow is forgotten
DEFAULT_SESSION_TTL = 300.0         # s a session lives without a connectivity check
DEFAULT_MAX_SESSIONS = 10000
DEFAULT_MAX_FLOWS = 10000
MAX_PENDING_TRANSACTIONS = 64       # per flow: forwarded requests awaiting their response
MAX_SERVER_PEERS = 16               # per flow: server addresses allowed to send media

# Out.to
TO_RELAY = 1                        # send `data` to the relay address `dest` (already sealed)
TO_SERVER = 2                       # send `data` to the server address `dest` from the flow's socket

COUNTERS = ("client_to_server", "server_to_client", "checks_from_client", "checks_from_server",
            "responses_to_client", "responses_to_server", "probes_answered", "probes_unanswered",
            "sessions_created", "sessions_expired", "flows_opened", "flows_expired")


class AdapterError(EdgeRelayError):
    """A signaling input the adapter cannot use (bad SDP, tables full); str() is one line."""


class Out(NamedTuple):
    to: int             # TO_RELAY or TO_SERVER
    flow: object        # the Flow (None for a probe answer)
    dest: tuple         # (host, port)
    data: bytes


class Session:
    """One offer/answer: the credentials of both sides and the token the client was given."""

    __slots__ = ("token", "password", "client_ufrag", "client_pwd", "server_ufrag", "server_pwd",
                 "server", "serial", "last", "expiry")

    def __init__(self, token, password, client_ufrag, client_pwd, server_ufrag, server_pwd,
                 server, serial, mono, expiry):
        self.token = token                  # a=ice-ufrag the client got: a routing token
        self.password = password            # a=ice-pwd the client got: the adapter's own
        self.client_ufrag = client_ufrag    # from the offer
        self.client_pwd = client_pwd
        self.server_ufrag = server_ufrag    # from the server's answer
        self.server_pwd = server_pwd
        self.server = server                # (host, port): the server candidate checks go to
        self.serial = serial                # creation order: a higher one is a later ICE generation
        self.last = mono                    # last connectivity check (mono seconds)
        self.expiry = expiry                # the token's expiry (Unix seconds)


class Flow:
    """One client (as the relay saw it) and the server peer it talks to."""

    __slots__ = ("key", "client", "inbound", "relay", "server", "peers", "session", "pending", "last", "upstream")

    def __init__(self, key, inbound, relay, session, mono):
        self.key = key                      # octets 6..25 of the header: the client block
        self.client = inbound.client        # (host, port), the client's real address
        self.inbound = inbound              # the latest TO_TRANSCEIVER (for sealing TO_CLIENT)
        self.relay = relay                  # relay address last heard from for this client
        self.server = session.server        # where DTLS/SRTP go
        self.peers = {session.server}       # server addresses proven by MESSAGE-INTEGRITY (or from the answer)
        self.session = session              # latest ICE generation seen on this flow
        self.pending = {}                   # txid -> (Session, direction, reply address)
        self.last = mono
        self.upstream = None                # the I/O shell's socket for this flow


# -- SDP ---------------------------------------------------------------------

_CAND = re.compile(r"a=candidate:\S+ \d+ (\S+) (\d+) (\S+) (\d+) typ (\S+)")


def _lines(sdp):
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise AdapterError("not an SDP description (must start with v=0)")
    return [ln for ln in re.split(r"\r?\n", sdp) if ln]


def _join(lines):
    return "\r\n".join(lines) + "\r\n"


def ice_credentials(sdp):
    """(ufrag, pwd) of a description; AdapterError if missing or different between sections."""
    ufrags, pwds = set(), set()
    for ln in _lines(sdp):
        if ln.startswith("a=ice-ufrag:"):
            ufrags.add(ln[12:].strip())
        elif ln.startswith("a=ice-pwd:"):
            pwds.add(ln[10:].strip())
    if len(ufrags) != 1 or len(pwds) != 1:
        raise AdapterError("SDP needs exactly one a=ice-ufrag and one a=ice-pwd value "
                           f"(found {len(ufrags)} and {len(pwds)})")
    ufrag, pwd = ufrags.pop(), pwds.pop()
    if not ufrag or ":" in ufrag or not pwd:
        raise AdapterError("SDP a=ice-ufrag/a=ice-pwd empty or with ':'")
    return ufrag, pwd


def server_candidate(sdp):
    """(host, port) of the best UDP candidate with an IP literal (highest priority); AdapterError if none."""
    best = None
    for ln in _lines(sdp):
        m = _CAND.match(ln)
        if not m or m.group(1).lower() != "udp":
            continue
        prio, host, port = int(m.group(2)), m.group(3), int(m.group(4))
        try:
            ipaddress.ip_address(host)
        except ValueError:
            continue            # an mDNS .local name: the adapter does not resolve names
        if 0 < port < 65536 and (best is None or prio > best[0]):
            best = (prio, host, port)
    if best is None:
        raise AdapterError("the server's answer has no UDP candidate with an IP address")
    return best[1], best[2]


def strip_candidates(sdp):
    """The description without a=candidate and a=end-of-candidates lines."""
    return _join([ln for ln in _lines(sdp)
                  if not ln.startswith("a=candidate:") and ln != "a=end-of-candidates"])


def rewrite_answer(sdp, ufrag, pwd, public):
    """The server's answer as the client gets it: ICE credentials replaced, candidates = `public`.

    `public` is a list of the relay's public (host, port). In every media
    section with a non-zero port the m= port and c= address name the first
    public address, and the candidates follow its other lines.
    """
    if not public:
        raise AdapterError("no relay public address configured")
    host0, port0 = public[0]
    cands = []
    for i, (host, port) in enumerate(public):
        prio = (126 << 24) | ((65535 - i) << 8) | 255       # RFC 8445 section 5.1.2.1, host
        cands.append(f"a=candidate:{i + 1} 1 udp {prio} {host} {port} typ host")
    cands.append("a=end-of-candidates")
    ipv = "IP6" if ":" in host0 else "IP4"
    out, in_media = [], False
    for ln in _lines(sdp):
        if ln.startswith("m="):
            if in_media:
                out += cands
            parts = ln.split(" ")
            in_media = len(parts) > 1 and parts[1] != "0"
            if in_media:
                parts[1] = str(port0)
                ln = " ".join(parts)
        elif ln.startswith("a=candidate:") or ln == "a=end-of-candidates":
            continue
        elif ln.startswith("a=ice-ufrag:"):
            ln = "a=ice-ufrag:" + ufrag
        elif ln.startswith("a=ice-pwd:"):
            ln = "a=ice-pwd:" + pwd
        elif ln.startswith("c=") and in_media:
            ln = f"c=IN {ipv} {host0}"
        out.append(ln)
    if in_media:
        out += cands
    return _join(out)


# -- STUN rewriting ----------------------------------------------------------

def _attributes(buf):
    """(type, value) pairs of a decoded-valid STUN message, up to its integrity attributes."""
    out, off, n = [], stun.HEADER_LEN, len(buf)
    while off + 4 <= n:
        atype = (buf[off] << 8) | buf[off + 1]
        alen = (buf[off + 2] << 8) | buf[off + 3]
        if atype in (stun.MESSAGE_INTEGRITY, stun.MESSAGE_INTEGRITY_SHA256, stun.FINGERPRINT):
            break
        out.append((atype, bytes(buf[off + 4:off + 4 + alen])))
        off += 4 + ((alen + 3) & ~3)
    return out


def resign(buf, msg, key, username=None, mapped=None):
    """`msg` (decoded from `buf`) re-encoded: USERNAME / XOR-MAPPED-ADDRESS replaced, MI with `key`.

    `mapped` is the (host, port) XOR-MAPPED-ADDRESS must carry. Attribute
    order and every other attribute (PRIORITY, USE-CANDIDATE,
    ICE-CONTROLLING/CONTROLLED, vendor ones) are kept; FINGERPRINT is redone
    when the original had one; MESSAGE-INTEGRITY-SHA256 is not kept (the
    adapter signs with SHA-1 as RFC 8445 section 7.2.2 requires).
    """
    attrs = []
    for atype, value in _attributes(buf):
        if atype == stun.USERNAME and username is not None:
            value = username
        elif atype == stun.XOR_MAPPED_ADDRESS and mapped is not None:
            value = stun.encode_xor_address(mapped[0], mapped[1], msg.transaction_id)
        attrs.append((atype, value))
    return stun.encode(msg.msg_type, msg.transaction_id, attrs, integrity_key=key,
                       fingerprint=stun.FINGERPRINT in msg.attributes)


# -- the adapter -------------------------------------------------------------

class Adapter:
    """Sessions and flows of one adapter (one transceiver id, one stock server)."""

    def __init__(self, endpoint, public, idle_timeout=DEFAULT_IDLE_TIMEOUT,
                 session_ttl=DEFAULT_SESSION_TTL, max_sessions=DEFAULT_MAX_SESSIONS,
                 max_flows=DEFAULT_MAX_FLOWS, lifetime=transceiver.DEFAULT_SESSION_LIFETIME):
        self.endpoint = endpoint            # transceiver.Endpoint: key ring and transceiver id
        self.public = list(public)          # the relay's public (host, port) for the answer
        self.idle_timeout = idle_timeout
        self.session_ttl = session_ttl
        self.max_sessions = max_sessions
        self.max_flows = max_flows
        self.lifetime = lifetime
        self.server_up = True               # answer relay probes only while true (failover)
        self.sessions = {}                  # token (bytes) -> Session
        self.by_server = {}                 # (server ufrag, client ufrag) bytes -> Session
        self.flows = {}                     # client block (bytes) -> Flow
        self.drops = [0] * N_DROPS
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._serial = 0

    # -- signaling
    def offer_for_server(self, offer_sdp):
        """The client's offer as the server gets it: no candidates (checked to have ICE credentials)."""
        ice_credentials(offer_sdp)
        return strip_candidates(offer_sdp)

    def answer_for_client(self, offer_sdp, answer_sdp, wall, mono):
        """(the answer for the client, its Session): mints a token and remembers the session."""
        cufrag, cpwd = ice_credentials(offer_sdp)
        sufrag, spwd = ice_credentials(answer_sdp)
        server = server_candidate(answer_sdp)
        if len(self.sessions) >= self.max_sessions:
            self.expire(mono, wall)
            if len(self.sessions) >= self.max_sessions:
                raise AdapterError(f"session table full ({self.max_sessions} sessions)")
        creds = self.endpoint.new_session(wall, self.lifetime)
        self._serial += 1
        s = Session(creds.ufrag.encode("ascii"), creds.password.encode("utf-8"),
                    cufrag.encode("utf-8"), cpwd.encode("utf-8"), sufrag.encode("utf-8"),
                    spwd.encode("utf-8"), server, self._serial, mono, int(wall + self.lifetime))
        self.sessions[s.token] = s
        self.by_server[(s.server_ufrag, s.client_ufrag)] = s
        self.counts["sessions_created"] += 1
        return rewrite_answer(answer_sdp, creds.ufrag, creds.password, self.public), s

    # -- data plane
    def _drop(self, reason):
        self.drops[reason] += 1
        return None

    def from_relay(self, datagram, relay, now_ms, mono):
        """The Out for one datagram from a relay (`relay` = its source address), or None (counted)."""
        inb = self.endpoint.receive(datagram, now_ms)
        if inb.__class__ is Drop:
            return self._drop(inb)
        if inb.header.type == header.PROBE:
            if not self.server_up:
                self.counts["probes_unanswered"] += 1
                return None
            self.counts["probes_answered"] += 1
            return Out(TO_RELAY, None, relay, self.endpoint.answer_probe(inb, now_ms))
        payload = inb.payload
        if not len(payload):
            return self._drop(Drop.NOT_WEBRTC)
        key = bytes(datagram[6:26])
        flow = self.flows.get(key)
        kind = stun.classify(payload[0])
        if kind == stun.STUN:
            return self._client_stun(key, flow, inb, relay, mono)
        if kind != stun.DTLS and kind != stun.RTP:
            return self._drop(Drop.NOT_WEBRTC)
        if flow is None:
            return self._drop(Drop.UNKNOWN_FLOW)
        flow.inbound, flow.relay, flow.last = inb, relay, mono
        self.counts["client_to_server"] += 1
        return Out(TO_SERVER, flow, flow.server, bytes(payload))

    def _client_stun(self, key, flow, inb, relay, mono):
        payload = inb.payload
        msg = stun.decode(payload)
        if msg.__class__ is Drop:
            return self._drop(msg)
        mtype = msg.msg_type
        if mtype == stun.BINDING_REQUEST:
            username = msg.get(stun.USERNAME)
            parts = stun.split_username(username) if username is not None else None
            session = self.sessions.get(parts[0]) if parts else None
            if session is None or parts[1] != session.client_ufrag:
                return self._drop(Drop.STUN_NO_USERNAME)
            if not stun.check_integrity(payload, msg, session.password):
                return self._drop(Drop.STUN_INTEGRITY)
            if flow is None:
                if len(self.flows) >= self.max_flows:
                    return self._drop(Drop.FLOW_TABLE_FULL)
                flow = self.flows[key] = Flow(key, inb, relay, session, mono)
                self.counts["flows_opened"] += 1
            flow.inbound, flow.relay, flow.last = inb, relay, mono
            session.last = mono
            data = resign(payload, msg, session.server_pwd,
                          username=session.server_ufrag + b":" + session.client_ufrag)
            self._remember(flow, msg.transaction_id, session, session.server)
            self.counts["checks_from_client"] += 1
            return Out(TO_SERVER, flow, session.server, data)
        if flow is None:
            return self._drop(Drop.UNKNOWN_FLOW)
        if mtype == stun.BINDING_SUCCESS:
            # the client's answer to one of the server's checks
            t = flow.pending.pop(msg.transaction_id, None)
            if t is None or t[1] != TO_RELAY:
                return self._drop(Drop.STUN_UNMATCHED)
            session, _, reply_to = t
            if not stun.check_integrity(payload, msg, session.client_pwd):
                return self._drop(Drop.STUN_INTEGRITY)
            flow.inbound, flow.relay, flow.last = inb, relay, mono
            data = resign(payload, msg, session.client_pwd, mapped=reply_to)
            self.counts["responses_to_server"] += 1
            return Out(TO_SERVER, flow, reply_to, data)
        if mtype == stun.BINDING_ERROR:
            return self._drop(Drop.STUN_ERROR_RESPONSE)
        if mtype == stun.BINDING_INDICATION:
            flow.inbound, flow.relay, flow.last = inb, relay, mono
            self.counts["client_to_server"] += 1
            return Out(TO_SERVER, flow, flow.server, bytes(payload))
        return self._drop(Drop.STUN_NOT_BINDING_REQUEST)

    def _remember(self, flow, txid, session, reply_to, direction=TO_SERVER):
        pending = flow.pending
        if len(pending) >= MAX_PENDING_TRANSACTIONS and txid not in pending:
            del pending[next(iter(pending))]
        pending[txid] = (session, direction, reply_to)

    def from_server(self, flow, datagram, src, now_ms):
        """The Out for one datagram the server sent to `flow`'s upstream socket from `src`, or None."""
        if self.flows.get(flow.key) is not flow:
            return self._drop(Drop.UNKNOWN_FLOW)
        if not len(datagram):
            return self._drop(Drop.NOT_WEBRTC)
        kind = stun.classify(datagram[0])
        if kind == stun.STUN:
            msg = stun.decode(datagram)
            if msg.__class__ is Drop:
                return self._drop(msg)
            data = self._server_stun(flow, datagram, msg, src)
            if data is None:
                return None
        elif kind == stun.DTLS or kind == stun.RTP:
            if src not in flow.peers:
                return self._drop(Drop.NOT_TRANSCEIVER)     # not an address the server proved it has
            flow.server = src          # follow the server's selected pair
            data = datagram
            self.counts["server_to_client"] += 1
        else:
            return self._drop(Drop.NOT_WEBRTC)
        return Out(TO_RELAY, flow, flow.relay, self.endpoint.to_client(flow.inbound, data, now_ms))

    def _server_stun(self, flow, buf, msg, src):
        mtype = msg.msg_type
        if mtype == stun.BINDING_REQUEST:
            # the server's check toward the client: USERNAME "<client ufrag>:<server ufrag>"
            username = msg.get(stun.USERNAME)
            parts = stun.split_username(username) if username is not None else None
            session = self.by_server.get((parts[1], parts[0])) if parts else None
            if session is None:
                return self._drop(Drop.STUN_NO_USERNAME)
            if not stun.check_integrity(buf, msg, session.client_pwd):
                return self._drop(Drop.STUN_INTEGRITY)
            self._remember(flow, msg.transaction_id, session, src, TO_RELAY)
            self._peer(flow, src)
            self.counts["checks_from_server"] += 1
            return resign(buf, msg, session.client_pwd, username=session.client_ufrag + b":" + session.token)
        if mtype == stun.BINDING_SUCCESS:
            t = flow.pending.pop(msg.transaction_id, None)
            if t is None or t[1] != TO_SERVER:
                return self._drop(Drop.STUN_UNMATCHED)
            session = t[0]
            if not stun.check_integrity(buf, msg, session.server_pwd):
                return self._drop(Drop.STUN_INTEGRITY)
            self._peer(flow, src)
            if session.serial >= flow.session.serial:
                flow.session, flow.server = session, src
            self.counts["responses_to_client"] += 1
            return resign(buf, msg, session.password, mapped=flow.client)
        if mtype == stun.BINDING_ERROR:
            return self._drop(Drop.STUN_ERROR_RESPONSE)    # never toward the relay (PROTOCOL.md 7)
        if mtype == stun.BINDING_INDICATION:
            if src not in flow.peers:
                return self._drop(Drop.NOT_TRANSCEIVER)
            self.counts["server_to_client"] += 1
            return bytes(buf)
        return self._drop(Drop.STUN_NOT_BINDING_REQUEST)

    @staticmethod
    def _peer(flow, src):
        if src not in flow.peers and len(flow.peers) < MAX_SERVER_PEERS:
            flow.peers.add(src)

    # -- timers
    def expire(self, mono, wall):
        """Forget idle flows and stale sessions; returns the flows forgotten (close their sockets)."""
        gone = [f for f in self.flows.values() if mono - f.last > self.idle_timeout]
        for f in gone:
            del self.flows[f.key]
        self.counts["flows_expired"] += len(gone)
        live = {id(f.session) for f in self.flows.values()}
        for tok, s in list(self.sessions.items()):
            if s.expiry < wall or (mono - s.last > self.session_ttl and id(s) not in live):
                del self.sessions[tok]
                self.by_server.pop((s.server_ufrag, s.client_ufrag), None)
                self.counts["sessions_expired"] += 1
        return gone

    def drop_counts(self):
        """{reason name: count} of the non-zero drop counters."""
        return {Drop(i).name: n for i, n in enumerate(self.drops) if n}
