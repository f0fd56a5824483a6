"""A relay worker driven step by step on loopback, for deterministic end-to-end tests.

On loopback a datagram is queued at the receiver before `sendto` returns, so
"step until no socket is readable (select with timeout 0)" reaches a fixed
point without sleeping. The harness pumps the worker's listener and internal
sockets and, when present, a demo transceiver, until quiet (bounded).
"""

import os
import select
import socket
import time

from edge_relay import config, demo, keys
from edge_relay.drops import Drop
from edge_relay.log import Log
from edge_relay.worker import Worker

MAX_ROUNDS = 1000


def bind(host="127.0.0.1"):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def drain(sock):
    """Every datagram queued on `sock` now, as (data, addr) pairs."""
    out = []
    while True:
        try:
            out.append(sock.recvfrom(65536))
        except (BlockingIOError, ConnectionRefusedError):
            return out


class Harness:
    """A worker with real sockets on loopback plus its transceivers.

    transceivers: {id: "demo" | "sink"} — a demo transceiver answers ICE and
    echoes; a sink is a bare socket whose received datagrams the test reads.
    """

    def __init__(self, tmp_path, transceivers=None, listeners=("127.0.0.1",), io_mode="auto",
                 limits=None, internal_host="127.0.0.1", key_ids=(1,), clock=None, wall=None,
                 backups=None, sections=None):
        self.tmp = tmp_path
        self.key_dir = tmp_path / "keys"
        self.key_dir.mkdir(mode=0o700)
        for key_id in key_ids:
            keys.write_key_file(self.key_dir, key_id)
        self.keyring = keys.load_dir(self.key_dir)
        transceivers = transceivers or {1: "demo"}
        self.tx_socks = {tx_id: bind(internal_host) for tx_id in transceivers}
        self.listen_socks = [bind(h) for h in listeners]
        self.internal_sock = bind(internal_host)
        data = {
            "relay": {"io": io_mode, "batch_size": 8},
            "listeners": [{"address": h, "port": s.getsockname()[1]} for h, s in zip(listeners, self.listen_socks)],
            "internal": {"address": internal_host, "port": 0},
            "keys": {"dir": str(self.key_dir)},
            "transceivers": [{"id": tx_id, "address": internal_host, "port": s.getsockname()[1],
                              **({"backup": (backups or {})[tx_id]} if tx_id in (backups or {}) else {})}
                             for tx_id, s in self.tx_socks.items()],
            "limits": dict(limits or {}),
            "management": {"port": 0},
            # probes are off unless asked for: most tests count every datagram exactly
            "probes": {"enabled": False},
        }
        data.update(sections or {})
        self.config_data = data
        self.cfg = config.parse(data, tmp_path)
        self.log = Log(level="debug", stream=open(os.devnull, "w"))
        self.now = clock
        kwargs = {}
        if clock is not None:
            kwargs["clock"] = clock
        if wall is not None:
            kwargs["wall"] = wall
        self.worker = Worker(self.cfg, self.keyring, self.listen_socks, self.internal_sock, self.log, **kwargs)
        self.router = self.worker.router
        self.demos = {tx_id: demo.DemoTransceiver(self.keyring, tx_id, s, io_mode=io_mode)
                      for tx_id, s in self.tx_socks.items() if transceivers[tx_id] == "demo"}
        self.sinks = {tx_id: s for tx_id, s in self.tx_socks.items() if transceivers[tx_id] == "sink"}
        self.clients = []

    @property
    def public(self):
        return self.listen_socks[0].getsockname()[:2]

    @property
    def internal(self):
        return self.internal_sock.getsockname()[:2]

    def client(self, host="127.0.0.1"):
        s = bind(host)
        self.clients.append(s)
        return s

    def settle(self):
        """Pump every socket until none is readable; returns rounds taken."""
        watched = {s.fileno(): ("listener", i) for i, s in enumerate(self.listen_socks)}
        watched[self.internal_sock.fileno()] = ("internal", None)
        for tx_id, d in self.demos.items():
            watched[d.sock.fileno()] = ("demo", tx_id)
        for rounds in range(MAX_ROUNDS):
            ready, _, _ = select.select(list(watched), [], [], 0)
            if not ready:
                return rounds
            for fd in ready:
                kind, arg = watched[fd]
                if kind == "listener":
                    self.worker.pump_listener(arg)
                elif kind == "internal":
                    self.worker.pump_internal()
                else:
                    self.demos[arg].pump()
        raise AssertionError("relay did not settle")

    def session(self, tx_id=1, lifetime=3600):
        return demo.mint_session(self.keyring, tx_id, time.time(), lifetime)

    def voice_client(self, tx_id=1, host="127.0.0.1", listener=0):
        ufrag, password = self.session(tx_id)
        relay = self.listen_socks[listener].getsockname()[:2]
        c = demo.VoiceClient(relay, ufrag, password, sock=self.client(host))
        return c

    def connect(self, vc, now=0.0):
        """Run the connectivity check of VoiceClient `vc` through the relay."""
        vc.send_check(now)
        self.settle()
        vc.pump(now)
        return vc.connected

    def drops(self):
        """{reason name: count} for non-zero drop counters."""
        self.worker._publish()
        return {Drop(i).name: n for i, n in enumerate(self.router.drops) if n}

    def close(self):
        for s in [*self.listen_socks, self.internal_sock, *self.tx_socks.values(), *self.clients]:
            s.close()
