"""Relay process + adapter + a synthetic stock ICE-full server, on loopback.

The client and the "stock server" are `adapterkit.IcePeer`s on their own UDP
sockets: the server picks its own ufrag and password, speaks plain UDP, sends
its own checks and echoes media; the client is ICE-full and controlling. The
signaling goes through the adapter's HTTP hook. The relay is a real
`edge-relay run` (tests/relayproc.py); the adapter runs in-process
(adapter_run.AdapterShell) on the relay's configured transceiver socket.
"""

import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import urllib.request

import pytest

import relayproc
from adapterkit import ANSWER, OFFER, IcePeer
from edge_relay import adapter, adapter_run, keys, stun, transceiver
from waiting import WaitTimeout, wait_for

pytestmark = pytest.mark.slow


def post(url, body, ctype):
    req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Shell:
    """An in-process adapter for transceiver `tx_id` on `sock` (default: the relay setup's transceiver socket)."""

    def __init__(self, setup, health=None, sock=None, tx_id=1):
        ad = adapter.Adapter(transceiver.Endpoint(setup.keyring, tx_id), [setup.public])
        self.shell = adapter_run.AdapterShell(ad, None, ("127.0.0.1", 0), sock=sock or setup.tx_sock, health=health)
        self.stop = threading.Event()
        self.shell.start_hook()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.url = "http://%s:%d" % self.shell.hook_address

    def _run(self):
        while not self.stop.is_set():
            self.shell.run_once(0.05)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.shell.close()


class StockServer:
    """Plain-UDP ICE-full controlled peer: answers checks, sends its own, echoes RTP/DTLS."""

    def __init__(self, ufrag="SRVR", pwd="serverpassword0123456789"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()
        self.peer = IcePeer(ufrag, pwd, controlling=False)
        self.peer.remote_ufrag, self.peer.remote_pwd = b"CLNT", b"clientpassword0123456789"
        self.mapped = []            # XOR-MAPPED-ADDRESS of responses to its checks
        self.my_checks = set()
        self.echoed = 0
        self.bad = []

    def answer_sdp(self):
        return (ANSWER.replace("10.0.0.2 41000", "%s %d" % self.addr).replace("a=candidate:9", "a=x-no:9")
                .replace("a=ice-ufrag:SRVR", "a=ice-ufrag:" + self.peer.ufrag.decode()))

    def pump(self):
        while True:
            try:
                data, src = self.sock.recvfrom(4096)
            except BlockingIOError:
                return
            msg = stun.decode(data) if stun.classify(data[0]) == stun.STUN else None
            if msg is None:
                self.echoed += 1
                self.sock.sendto(data, src)
            elif msg.msg_type == stun.BINDING_REQUEST:
                resp = self.peer.answer(data, src)
                if resp.__class__ is not bytes:
                    self.bad.append(("check", resp))
                    continue
                self.sock.sendto(resp, src)
                txid = os.urandom(12)
                self.my_checks.add(txid)
                self.sock.sendto(self.peer.check(txid), src)          # triggered check (RFC 8445 7.3.1.4)
            elif msg.msg_type == stun.BINDING_SUCCESS and msg.transaction_id in self.my_checks:
                self.mapped.append(self.peer.accept_response(data, msg.transaction_id))
            else:
                self.bad.append(("unexpected", data.hex()))


class Client:
    def __init__(self, relay_addr, answer_sdp, ufrag="CLNT", pwd="clientpassword0123456789"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(relay_addr)
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()
        self.peer = IcePeer(ufrag, pwd, controlling=True)
        tok, pwd2 = adapter.ice_credentials(answer_sdp)
        self.peer.remote_ufrag, self.peer.remote_pwd = tok.encode(), pwd2.encode()
        self.pending = {}
        self.mapped = []
        self.checks_answered = 0
        self.media_in = 0
        self.bad = []

    def check(self):
        txid = os.urandom(12)
        self.pending[txid] = True
        self.sock.send(self.peer.check(txid))

    def rtp(self, seq):
        self.sock.send(struct.pack(">BBHII", 0x80, 111, seq, seq * 960, 0x1234) + bytes(120))

    def pump(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if stun.classify(data[0]) != stun.STUN:
                self.media_in += 1
                continue
            msg = stun.decode(data)
            if msg.msg_type == stun.BINDING_SUCCESS and self.pending.pop(msg.transaction_id, None):
                self.mapped.append(self.peer.accept_response(data, msg.transaction_id))
            elif msg.msg_type == stun.BINDING_REQUEST:
                user = bytes(msg.get(stun.USERNAME))
                if user != self.peer.ufrag + b":" + self.peer.remote_ufrag:
                    self.bad.append(("username", user))
                resp = self.peer.answer(data, self.sock.getpeername())
                if resp.__class__ is bytes:
                    self.checks_answered += 1
                    self.sock.send(resp)
                else:
                    self.bad.append(("check", resp))
            else:
                self.bad.append(("unexpected", data.hex()))


def run(parts, seconds, until):
    """Pump every part's socket until `until()` (True), or False after `seconds`."""
    sel = selectors.DefaultSelector()
    for p in parts:
        sel.register(p.sock, selectors.EVENT_READ, p)

    def step():
        for key, _ in sel.select(0.05):
            key.data.pump()
        return until()
    try:
        return wait_for(step, seconds, interval=0, what="parts to reach the condition")
    except WaitTimeout:
        return False
    finally:
        sel.close()


def negotiate(shell, server, offer=OFFER):
    status, stripped = post(shell.url + "/v1/offer", offer, "application/sdp")
    assert status == 200, stripped
    assert "a=candidate" not in stripped
    status, body = post(shell.url + "/v1/answer", json.dumps({"offer": offer, "answer": server.answer_sdp()}),
                        "application/json")
    assert status == 200, body
    return json.loads(body)


@pytest.fixture
def relay(start_relay):
    return start_relay(workers=1)[0]


def test_call_through_relay_and_adapter(relay):
    shell = Shell(relay)
    server = StockServer()
    try:
        doc = negotiate(shell, server)
        assert doc["answer"].count("a=candidate") == 1 and "%s %d typ host" % relay.public in doc["answer"]
        client = Client(relay.public, doc["answer"])
        assert doc["ufrag"] == client.peer.remote_ufrag.decode()
        client.check()
        assert run([client, server], 10, lambda: client.mapped and server.mapped and client.checks_answered)
        assert client.mapped == [client.addr]          # the client's own address, not the adapter's
        assert server.mapped == [server.addr]          # as if the adapter's socket were the client
        for seq in range(50):
            client.rtp(seq)
        assert run([client, server], 10, lambda: client.media_in == 50)
        assert server.echoed == 50 and client.bad == [] and server.bad == []
        stats = shell.shell.stats()
        assert stats["drops"] == {} and stats["flows"] == 1
        assert stats["counts"]["client_to_server"] == 50 and stats["counts"]["server_to_client"] == 50

        def relay_settled():
            fams = relayproc.metrics(relay)
            ok = (relayproc.value(fams, "edge_relay_flow_events_total", event="confirmed") == 1
                  and relayproc.value(fams, "edge_relay_packets_total", direction="to_client") >= 52)
            return fams if ok else None
        fams = wait_for(relay_settled, 5, 0.1, "relay counters")
        assert sum(fams["edge_relay_drops_total"]["samples"].values()) == 0
    finally:
        shell.close()


def test_hook_rejects_bad_sdp_with_one_line(relay):
    shell = Shell(relay)
    try:
        status, body = post(shell.url + "/v1/offer", "hello", "application/sdp")
        assert status == 400 and body.strip().count("\n") == 0 and "SDP" in body
        status, body = post(shell.url + "/v1/answer", "{}", "application/json")
        assert status == 400 and "JSON" in body
    finally:
        shell.close()


def test_probes_answered_only_while_server_health_check_passes(tmp_path):
    setup = relayproc.Setup(tmp_path, workers=1, sections={"probes": {"enabled": True}})
    health = socket.socket()
    health.bind(("127.0.0.1", 0))
    health.listen(128)      # never accepted: the connects only need the backlog
    proc = relayproc.Relay(setup)
    shell = Shell(setup, health=health.getsockname())
    try:
        wait_for(lambda: shell.shell.stats()["counts"]["probes_answered"] > 3, 15, what="probes answered")
        health.close()
        wait_for(lambda: shell.shell.stats()["counts"]["probes_unanswered"] > 3, 15,
                 what="probes unanswered once the server is gone")
        assert shell.shell.stats()["server_up"] is False
    finally:
        shell.close()
        proc.kill()


def cli_adapter(tmp_path, listen, *extra):
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o700)
    keys.write_key_file(key_dir, 1)
    args = [sys.executable, "-m", "edge_relay", "adapter", "--listen", listen, "--id", "3",
            "--public", "192.0.2.1:3478", "--hook", "127.0.0.1:0", "--keys", str(key_dir), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=relayproc.ROOT,
                          env=dict(os.environ, PYTHONPATH=relayproc.ROOT))


def test_cli_adapter_prints_ready_line_and_stops(tmp_path):
    proc = cli_adapter(tmp_path, "127.0.0.1:0", "--duration", "0.5")
    assert proc.returncode == 0, proc.stderr
    ready = json.loads(proc.stdout.splitlines()[0])
    assert ready["adapter"] == 3 and ready["public"] == ["192.0.2.1:3478"] and ready["hook"].startswith("http://")


def test_cli_adapter_unbindable_address_is_one_line_error(tmp_path):
    proc = cli_adapter(tmp_path, "192.0.2.1:5000")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("edge-relay adapter: cannot bind 192.0.2.1:5000")


def test_a_refused_send_is_counted_not_raised(tmp_path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    ad = adapter.Adapter(transceiver.Endpoint(keys.KeyRing({1: bytes(32)}), 1), [("192.0.2.1", 3478)])
    shell = adapter_run.AdapterShell(ad, None, ("127.0.0.1", 0), sock=sock)
    try:
        flow = type("F", (), {"upstream": None})()
        # broadcast without SO_BROADCAST: the kernel refuses it (EACCES), nothing leaves
        shell._send(adapter.Out(adapter.TO_SERVER, flow, ("255.255.255.255", 9), b"\x80" + bytes(11)))
        assert ad.drop_counts() == {"SEND_FAILED": 1} and flow.upstream is not None
    finally:
        shell.close()


# transceiver 1 (relayproc's) is the backup of transceiver 2, the primary
def failover_sections(primary):
    return {"transceivers": [{"id": 2, "address": "127.0.0.1", "port": primary, "backup": 1}],
            "probes": {"interval": 0.1, "down_after": 3}}


def test_failover_to_a_backup_adapter_needs_an_ice_restart(tmp_path):
    """docs/ADAPTER.md section 7: the primary's server goes away, its adapter stops answering
    probes, the relay sends the flow to the backup adapter, which cannot resume the call (it
    drops what it does not know, counted); an ICE restart through the backup's hook resumes it."""
    primary_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    primary_sock.bind(("127.0.0.1", 0))
    setup = relayproc.Setup(tmp_path, workers=1, sections=failover_sections(primary_sock.getsockname()[1]))
    health = socket.socket()
    health.bind(("127.0.0.1", 0))
    health.listen(128)
    proc = relayproc.Relay(setup)
    backup = Shell(setup)                                   # transceiver 1 on relayproc's socket
    primary = Shell(setup, health=health.getsockname(), sock=primary_sock, tx_id=2)
    try:
        wait_for(lambda: relayproc.http_get(setup.url + "/metrics")[0] == 200, 15, what="relay up")
        server1 = StockServer()
        client = Client(setup.public, negotiate(primary, server1)["answer"])
        client.check()
        assert run([client, server1], 10, lambda: client.mapped and client.checks_answered)
        client.rtp(0)
        assert run([client, server1], 5, lambda: client.media_in == 1)

        health.close()          # the primary's server is gone
        wait_for(lambda: relayproc.value(relayproc.metrics(setup), "edge_relay_transceiver_up",
                                         transceiver="tx2") == 0, 15, what="primary marked down")
        client.rtp(1)
        client.check()
        wait_for(lambda: sum(backup.shell.stats()["drops"].values()) >= 2, 5, what="backup drops")
        assert backup.shell.stats()["drops"] == {"UNKNOWN_FLOW": 1, "STUN_NO_USERNAME": 1}
        assert client.media_in == 1                 # nothing came back: the backup cannot resume

        # ICE restart: a new offer/answer through the backup's hook, a new server behind it
        server2 = StockServer(ufrag="SRV2")
        offer2 = OFFER.replace("CLNT", "CLN2")
        server2.peer.remote_ufrag = b"CLN2"
        doc = negotiate(backup, server2, offer2)
        client.peer = IcePeer("CLN2", "clientpassword0123456789", controlling=True)
        tok, pwd = adapter.ice_credentials(doc["answer"])
        client.peer.remote_ufrag, client.peer.remote_pwd = tok.encode(), pwd.encode()
        client.check()
        assert run([client, server1, server2], 10, lambda: len(client.mapped) == 2 and server2.mapped)
        client.rtp(2)
        assert run([client, server1, server2], 5, lambda: client.media_in == 2)
        assert server2.echoed == 1 and server1.echoed == 1 and client.bad == [] and server2.bad == []
        wait_for(lambda: relayproc.value(relayproc.metrics(setup), "edge_relay_flow_events_total",
                                         event="failed_over") >= 1, 5, what="failed_over counted")
    finally:
        primary.close()
        backup.close()
        proc.kill()
