"""A demo transceiver and a synthetic voice client, for demos, tests and smoke tests.

The edge_relay.demo package is never imported by the relay (tests/test_layers.py
checks it; cli imports it inside the demo subcommands only). It holds this
module, run.py (`edge-relay demo`: relay, transceiver and callers on
loopback), state.py (session state in Redis, for failover demos) and
blocking_resp.py (the blocking Redis client state.py uses).

Demo transceiver: an ICE-lite agent built only on edge_relay.transceiver. It
answers connectivity checks for any session whose ufrag is a valid token for
its transceiver id, and echoes every other WebRTC datagram (DTLS, RTP) back to
the client through the relay. It answers relay probes.

Demo only: a session's ICE password is derived from the ufrag with a key only
the transceiver side holds (`demo_password`), so that `edge-relay mint-ufrag`
can print a working ufrag/password pair without a signaling server. A real
transceiver keeps random passwords in its session state; the relay never
learns either.

Stateful demo transceiver (`StatefulDemoTransceiver`, `serve_stateful`): the
same, plus session state in Redis (demo/state.py) so that a primary and a
backup can share a call: the primary stores each session's ICE password, the
client address -> session mapping and media counters; the backup, receiving
a datagram flagged FLAG_FAILOVER for a client it does not know, loads the
session, claims it and continues the counters.

Voice client: sends a real ICE connectivity check (USERNAME, PRIORITY,
ICE-CONTROLLING, USE-CANDIDATE, MESSAGE-INTEGRITY, FINGERPRINT), checks the
answer (transaction id, integrity, XOR-MAPPED-ADDRESS = its own address),
then sends 50 packets per second of 160-byte RTP-shaped datagrams and
measures loss, round-trip time and RFC 3550 jitter from the echoes, with a
consent check every 5 s (RFC 7675).
"""

import binascii
import hashlib
import hmac
import os
import selectors
import socket
import struct
import time

from .. import batchio, header, stun, token, transceiver
from ..batch import Outbox
from ..drops import Drop
from .state import MediaCounters

DEMO_PWD_LABEL = b"edge-relay demo ice-pwd"
RTP_PAYLOAD_TYPE = 111            # Opus, dynamic payload type as browsers use it
PACKET_SIZE = 160                 # 20 ms Opus + SRTP overhead
PACKET_INTERVAL = 0.020           # 50 packets per second
CONSENT_INTERVAL = 5.0            # RFC 7675 section 5.1 (randomised 4..6 s in browsers)
_RTP = struct.Struct(">BBHII")    # V/P/X/CC, M/PT, sequence, timestamp, SSRC
_PROBE_STAMP = struct.Struct(">Qd")


def demo_password(key, ufrag):
    """The demo ICE password for `ufrag` (see the module docstring: demo only)."""
    secret = hmac.new(key.token_key, DEMO_PWD_LABEL, hashlib.sha256).digest()
    mac = hmac.new(secret, ufrag.encode("ascii"), hashlib.sha256).digest()
    return binascii.b2a_base64(mac[:18], newline=False).decode("ascii")


def mint_session(keyring, transceiver_id, wall, lifetime=transceiver.DEFAULT_SESSION_LIFETIME):
    """(ufrag, password) for a demo session on `transceiver_id`."""
    ufrag = token.mint(keyring.signing, transceiver_id, int(wall + lifetime))
    return ufrag, demo_password(keyring.signing, ufrag)


class DemoTransceiver:
    """The demo transceiver's logic over one UDP socket (sans decisions about I/O timing)."""

    def __init__(self, keyring, transceiver_id, sock, window_ms=2000, batch_size=32, io_mode="auto"):
        self.keyring = keyring
        self.endpoint = transceiver.Endpoint(keyring, transceiver_id, window_ms)
        self.sock = sock
        # a maximum-size client datagram (2048, worker.MAX_DATAGRAM) arrives with the header
        self.io = batchio.open_io(sock, batch_size, 2048 + header.HEADER_LEN, mode=io_mode)
        self.transceiver_id = transceiver_id
        self.checks_answered = 0
        self.media_echoed = 0
        self.probes_answered = 0
        self.drops = {}
        self.clients = {}          # client (host, port) -> failover flag of its last datagram

    def _drop(self, reason):
        self.drops[reason.name] = self.drops.get(reason.name, 0) + 1

    def handle(self, data, now_ms):
        """The reply datagram for one datagram from a relay, or None."""
        inb = self.endpoint.receive(data, now_ms)
        if inb.__class__ is Drop:
            self._drop(inb)
            return None
        if inb.header.type == header.PROBE:
            self.probes_answered += 1
            return self.endpoint.answer_probe(inb, now_ms)
        payload = inb.payload
        if not len(payload):
            return None
        self.clients[inb.client] = inb.failover
        kind = stun.classify(payload[0])
        if kind == stun.STUN:
            return self._answer_check(inb, now_ms)
        if kind in (stun.DTLS, stun.RTP):
            self.media_echoed += 1
            return self.endpoint.to_client(inb, payload, now_ms)
        self._drop(Drop.NOT_WEBRTC)
        return None

    def _answer_check(self, inb, now_ms):
        payload = inb.payload
        msg = stun.decode(payload)
        if msg.__class__ is Drop:
            self._drop(msg)
            return None
        if msg.msg_type != stun.BINDING_REQUEST:
            return None             # indications and responses need no answer
        username = msg.get(stun.USERNAME)
        parts = stun.split_username(username) if username is not None else None
        if parts is None:
            self._drop(Drop.STUN_NO_USERNAME)
            return None
        ufrag = parts[0].decode("ascii", "replace")
        tok = token.verify(parts[0], self.keyring, now_ms / 1000.0, 10 * 365 * 86400, 0)
        if tok.__class__ is Drop and tok != Drop.TOKEN_EXPIRED:
            self._drop(tok)
            return None
        key = self.keyring.get(tok.key_id) if tok.__class__ is not Drop else self.keyring.signing
        password = demo_password(key, ufrag)
        checked = transceiver.check_request(payload, ufrag, password)
        if checked.__class__ is Drop:
            self._drop(checked)
            return None
        self.checks_answered += 1
        answer = transceiver.answer_binding(checked, inb.client, password)
        return self.endpoint.to_client(inb, answer, now_ms)

    def pump(self, wall=time.time):
        """Answer everything queued on the socket; returns datagrams handled."""
        total = 0
        while True:
            n = self.io.recv()
            if not n:
                return total
            now_ms = int(wall() * 1000)
            out = Outbox(n)
            for i in range(n):
                reply = self.handle(self.io.views[i], now_ms)
                if reply is not None:
                    out.append(self.io.addrs[i], None, reply)
            if out.n:
                self.io.send(out)
            total += n

    def serve(self, stop_after=None, should_stop=lambda: False):
        """Run until `should_stop()` or `stop_after` seconds (the CLI runs it forever)."""
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        deadline = None if stop_after is None else time.monotonic() + stop_after
        try:
            while not should_stop():
                timeout = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
                if sel.select(timeout):
                    self.pump()
                if deadline is not None and time.monotonic() >= deadline:
                    return
        finally:
            sel.close()


class StatefulDemoTransceiver(DemoTransceiver):
    """A DemoTransceiver whose sessions live in Redis (state.DemoState), for failover demos."""

    def __init__(self, keyring, transceiver_id, sock, state, **kw):
        super().__init__(keyring, transceiver_id, sock, **kw)
        self.state = state
        self.sessions = {}          # client (host, port) -> ufrag
        self.counters = {}          # ufrag -> state.MediaCounters
        self.taken_over = 0
        self.clock = time.monotonic

    def _session(self, client, failover):
        ufrag = self.sessions.get(client)
        if ufrag is None and failover:
            ufrag = self.state.session_of(client)
            if ufrag is not None:
                self.state.claim(ufrag, str(self.transceiver_id))
                self.sessions[client] = ufrag
                self.taken_over += 1
        return ufrag

    def handle(self, data, now_ms):
        inb = self.endpoint.receive(data, now_ms)
        reply = super().handle(data, now_ms)
        if inb.__class__ is Drop or inb.header.type == header.PROBE or reply is None:
            return reply
        payload = inb.payload
        if len(payload) and stun.classify(payload[0]) == stun.RTP:
            ufrag = self._session(inb.client, inb.failover)
            if ufrag is not None:
                counters = self.counters.get(ufrag)
                if counters is None:
                    counters = self.counters[ufrag] = MediaCounters(self.state, ufrag)
                counters.add(self.clock(), rtp_in=1, rtp_out=1)
        return reply

    def _answer_check(self, inb, now_ms):
        reply = super()._answer_check(inb, now_ms)
        if reply is not None and inb.client not in self.sessions:
            msg = stun.decode(inb.payload)
            ufrag = stun.split_username(msg.get(stun.USERNAME))[0].decode("ascii")
            if inb.failover or self.state.password(ufrag) is not None:
                self.state.claim(ufrag, str(self.transceiver_id))
            else:
                tok = token.verify(ufrag.encode("ascii"), self.keyring, now_ms / 1000.0, 10 * 365 * 86400, 0)
                key = self.keyring.get(tok.key_id) if tok.__class__ is not Drop else self.keyring.signing
                self.state.put_session(ufrag, demo_password(key, ufrag), owner=str(self.transceiver_id))
            self.state.put_client(inb.client, ufrag)
            self.sessions[inb.client] = ufrag
        return reply


def serve_stateful(key_dir, transceiver_id, port, redis_address, parent_pid=None, host="127.0.0.1"):
    """Run a StatefulDemoTransceiver on host:port until the parent process is gone (tests, demos)."""
    from .. import keys
    from .state import DemoState
    keyring = keys.load_dir(key_dir)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.setblocking(False)
    state = DemoState(redis_address)
    tx = StatefulDemoTransceiver(keyring, transceiver_id, sock, state, io_mode="plain")
    parent = parent_pid if parent_pid is not None else os.getppid()
    print(f"stateful demo transceiver {transceiver_id} on {host}:{port}", flush=True)
    try:
        tx.serve(should_stop=lambda: os.getppid() != parent and os.getppid() == 1)
    finally:
        for c in tx.counters.values():
            c.flush(time.monotonic())
        state.close()


class VoiceClient:
    """One synthetic caller: connectivity check, then 50 pps of RTP-shaped datagrams."""

    def __init__(self, relay_addr, ufrag, password, sock=None, ssrc=None):
        self.relay_addr = relay_addr
        self.server_ufrag = ufrag
        self.password = password.encode("utf-8")
        family = socket.AF_INET6 if ":" in relay_addr[0] else socket.AF_INET
        if sock is None:
            # connect() makes the kernel pick the source address it routes
            # from, so getsockname() is the address XOR-MAPPED-ADDRESS must
            # carry, and only the relay's answers reach this socket
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect(relay_addr)
        sock.setblocking(False)
        self.sock = sock
        self.local_ufrag = binascii.b2a_hex(os.urandom(4)).decode("ascii")
        self.tie_breaker = os.urandom(8)
        self.ssrc = ssrc if ssrc is not None else int.from_bytes(os.urandom(4), "big")
        self.pending_checks = {}      # transaction id -> send time
        self.connected = False
        self.mapped = None
        self.check_failures = 0
        self.send_errors = 0
        self.seq = 0
        self.sent = 0
        self.received = 0
        self.rtts = []
        self.jitter = 0.0
        self._last_transit = None
        self._seen = set()
        self.duplicates = 0
        self.next_send = None
        self.next_consent = None

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    def binding_request(self):
        txid = os.urandom(12)
        attrs = [
            (stun.USERNAME, f"{self.server_ufrag}:{self.local_ufrag}".encode("ascii")),
            (stun.PRIORITY, struct.pack(">I", 0x6E0001FF)),
            (stun.ICE_CONTROLLING, self.tie_breaker),
            (stun.USE_CANDIDATE, b""),
        ]
        return txid, stun.encode(stun.BINDING_REQUEST, txid, attrs, integrity_key=self.password)

    def send_check(self, now):
        txid, msg = self.binding_request()
        self.pending_checks[txid] = now
        if len(self.pending_checks) > 16:     # bounded: forget the oldest unanswered checks
            self.pending_checks.pop(next(iter(self.pending_checks)))
        self._send(msg)

    def send_media(self, now):
        self.seq = (self.seq + 1) & 0xFFFF
        rtp_ts = (self.sent * 960) & 0xFFFFFFFF          # 48 kHz clock, 20 ms frames
        head = _RTP.pack(0x80, RTP_PAYLOAD_TYPE, self.seq, rtp_ts, self.ssrc)
        stamp = _PROBE_STAMP.pack(self.sent, now)
        body = head + stamp
        self._send(body + bytes(PACKET_SIZE - len(body)))
        self.sent += 1

    def _send(self, data):
        try:
            self.sock.sendto(data, self.relay_addr)
        except OSError:
            # a full buffer, an ICMP error from an earlier send, no route:
            # the datagram is lost and shows up in the loss figure
            self.send_errors += 1

    def receive(self, data, now):
        """Account for one datagram from the relay."""
        kind = stun.classify(data[0]) if data else stun.OTHER
        if kind == stun.STUN:
            self._check_answer(data)
        elif kind == stun.RTP and len(data) >= _RTP.size + _PROBE_STAMP.size:
            index, sent_at = _PROBE_STAMP.unpack_from(data, _RTP.size)
            if index in self._seen:
                self.duplicates += 1
                return
            self._seen.add(index)
            self.received += 1
            rtt = now - sent_at
            self.rtts.append(rtt)
            transit = rtt / 2
            if self._last_transit is not None:   # RFC 3550 A.8, in seconds
                self.jitter += (abs(transit - self._last_transit) - self.jitter) / 16
            self._last_transit = transit

    def _check_answer(self, data):
        msg = stun.decode(data)
        if msg.__class__ is Drop or msg.transaction_id not in self.pending_checks:
            self.check_failures += 1
            return
        self.pending_checks.pop(msg.transaction_id)
        mapped = msg.get(stun.XOR_MAPPED_ADDRESS)
        mapped = stun.decode_xor_address(mapped, msg.transaction_id) if mapped is not None else None
        if (msg.msg_type != stun.BINDING_SUCCESS or not stun.check_integrity(data, msg, self.password)
                or mapped != tuple(self.address)):
            self.check_failures += 1
            return
        self.mapped = mapped
        self.connected = True

    def pump(self, now, limit=4096):
        for _ in range(limit):      # bounded: a stream of ICMP errors cannot hold the loop
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                return
            except OSError:     # an ICMP error reported on this socket: nothing to read
                continue
            self.receive(data, now)

    def tick(self, now):
        """Send what is due at `now`; returns the next time something is due."""
        if not self.connected:
            if self.next_consent is None or now >= self.next_consent:
                self.send_check(now)
                self.next_consent = now + 0.1     # retransmit the first check quickly
            return self.next_consent
        if self.next_send is None:
            self.next_send = now
            self.next_consent = now + CONSENT_INTERVAL
        while now >= self.next_send:
            self.send_media(now)
            self.next_send += PACKET_INTERVAL
        if now >= self.next_consent:
            self.send_check(now)
            self.next_consent = now + CONSENT_INTERVAL
        return min(self.next_send, self.next_consent)

    def loss(self, grace=0.5, now=None):
        """Fraction of media lost, not counting the last `grace` seconds still in flight."""
        in_flight = int(grace / PACKET_INTERVAL) if now is not None else 0
        expected = max(0, self.sent - in_flight)
        return 0.0 if not expected else max(0.0, 1 - min(self.received, expected) / expected)


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_clients(clients, duration, on_second=None, clock=time.monotonic):
    """Drive `clients` for `duration` seconds; `on_second(elapsed)` once per second."""
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ, c)
    start = clock()
    next_report = start + 1.0
    try:
        while True:
            now = clock()
            if now - start >= duration:
                break
            due = min(c.tick(now) for c in clients)
            timeout = max(0.0, min(due, next_report, start + duration) - clock())
            for key, _ in sel.select(timeout):
                key.data.pump(clock())
            if clock() >= next_report:
                if on_second is not None:
                    on_second(next_report - start)
                next_report += 1.0
        # collect the echoes still in flight, bounded
        end = clock() + 0.3
        while clock() < end:
            for key, _ in sel.select(max(0.0, end - clock())):
                key.data.pump(clock())
    finally:
        sel.close()


def client_report(clients, now=None):
    """Totals across clients: what the demo prints and the tests assert."""
    rtts = [r for c in clients for r in c.rtts]
    sent = sum(c.sent for c in clients)
    received = sum(c.received for c in clients)
    return {
        "clients": len(clients),
        "connected": sum(1 for c in clients if c.connected),
        "sent": sent,
        "received": received,
        "loss": 0.0 if not sent else max(0.0, 1 - received / sent),
        "rtt_p50_ms": percentile(rtts, 0.50) * 1000 if rtts else None,
        "rtt_p99_ms": percentile(rtts, 0.99) * 1000 if rtts else None,
        "jitter_ms": max((c.jitter for c in clients), default=0.0) * 1000,
        "check_failures": sum(c.check_failures for c in clients),
        "duplicates": sum(c.duplicates for c in clients),
    }
