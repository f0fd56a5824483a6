"""`edge-relay run` as a real process on loopback, with voice clients and a transceiver in the test.

Every wait is bounded (a deadline and select()); every process started here is
killed by `Relay.kill()` (call it in a finally or a fixture).
"""

import copy
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import tomlconf
from edge_relay import demo, keys, transceiver
from waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Probes are off unless a test asks for them: most tests count every datagram
# the transceiver receives and sends, and probes would be extra ones.
NO_PROBES = {"probes": {"enabled": False}}


def free_port(kind=socket.SOCK_DGRAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_run(n):
    """A base port with n free consecutive UDP ports after it (free a moment ago)."""
    for _ in range(200):
        base = free_port()
        if base + n > 65535:
            continue
        held = []
        try:
            for i in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no run of free UDP ports")


class Setup:
    """Keys, config file and ports for one relay under `folder`.

    The file is `config()`: a relay on loopback with one transceiver, with
    `sections` laid over it (tomlconf.merged: tables merge, arrays of tables
    append). Without sections, probes are off (NO_PROBES). Change
    `workers`, `drain` or `sections` and call write() to rewrite it.
    """

    def __init__(self, folder, workers=2, drain=0.5, sections=None):
        self.folder = str(folder)
        self.sections = copy.deepcopy(NO_PROBES if sections is None else sections)
        self.key_dir = os.path.join(self.folder, "keys")
        os.makedirs(self.key_dir, mode=0o700, exist_ok=True)
        keys.write_key_file(self.key_dir, 1)
        self.keyring = keys.load_dir(self.key_dir)
        self.workers = workers
        self.drain = drain
        self.tx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx_sock.bind(("127.0.0.1", 0))
        self.ports = {"public_port": free_port(), "internal_port": free_udp_run(workers),
                      "management_port": free_port(socket.SOCK_STREAM),
                      "transceiver_port": self.tx_sock.getsockname()[1]}
        self.path = os.path.join(self.folder, "edge-relay.toml")
        self.write()

    def config(self, signing_key_id=None):
        """The config as a dict (what config.parse takes)."""
        keys_section = {"dir": self.key_dir}
        if signing_key_id is not None:
            keys_section["signing_key_id"] = signing_key_id
        base = {
            "relay": {"workers": self.workers, "drain_seconds": self.drain},
            "listeners": [{"address": "127.0.0.1", "port": self.ports["public_port"]}],
            "internal": {"address": "127.0.0.1", "port": self.ports["internal_port"]},
            "keys": keys_section,
            "transceivers": [{"id": 1, "address": "127.0.0.1", "port": self.ports["transceiver_port"]}],
            "management": {"address": "127.0.0.1", "port": self.ports["management_port"]},
        }
        return tomlconf.merged(base, self.sections)

    def write(self, signing_key_id=None):
        with open(self.path, "w") as f:
            f.write(tomlconf.dumps(self.config(signing_key_id)))

    @property
    def public(self):
        return ("127.0.0.1", self.ports["public_port"])

    @property
    def url(self):
        return f"http://127.0.0.1:{self.ports['management_port']}"


def run_args(setup, workers=None):
    args = [sys.executable, "-m", "edge_relay", "run", "--config", setup.path]
    return args + (["--workers", str(workers)] if workers else [])


class Relay:
    """`edge-relay run` in a child process; stderr goes to a file (read with .log())."""

    def __init__(self, setup, env=None, args=None, pass_fds=(), pythonpath=ROOT, cwd=ROOT):
        """`pythonpath`: the folder holding the edge_relay package to run; `cwd` (which `-m` searches
        first) must then not hold another one."""
        self.setup = setup
        self.log_path = os.path.join(setup.folder, f"relay-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "w")
        full_env = dict(os.environ if env is None else env, PYTHONPATH=pythonpath)
        self.proc = subprocess.Popen(args or run_args(setup), env=full_env, cwd=cwd, stderr=self._log,
                                     stdout=subprocess.DEVNULL, pass_fds=pass_fds)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def worker_pids(self):
        """{worker index: pid} from the children's /proc/<pid>/comm ("edge-relay w<i>")."""
        out = {}
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                children = [int(x) for x in f.read().split()]
        except OSError:
            return out
        for pid in children:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    m = re.fullmatch(r"edge-relay w(\d+)", f.read().strip())
            except OSError:
                continue
            if m:
                out[int(m.group(1))] = pid
        return out

    def wait_serving(self, timeout=20, path="/healthz"):
        """Wait (bounded) until the relay answers 200 on `path`; fail with its log if it exits instead."""
        url = self.setup.url + path
        wait_for(lambda: http_get(url)[0] == 200 or self.proc.poll() is not None, timeout,
                 what=f"the relay to answer 200 on {path}")
        assert self.proc.poll() is None, self.log()
        return self

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        return self.proc.wait(timeout=timeout)

    def kill(self):
        pids = list(self.worker_pids().values())
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        finally:
            self._log.close()


def http_get(url, timeout=2.0):
    """(status, body) of a GET; status 0 when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return 0, ""


class Transceiver:
    """The demo transceiver over `sock`, recording which relay worker (internal port) each client came through."""

    def __init__(self, keyring, sock, tx_id=1):
        self.sock = sock
        sock.setblocking(False)
        self.tx_id = tx_id
        self.demo = demo.DemoTransceiver(keyring, tx_id, sock, io_mode="plain")
        self.worker_of = {}       # client (host, port) -> relay internal port it came from
        self.received = 0
        self.sent = 0

    def set_keyring(self, keyring):
        self.demo.keyring = keyring
        self.demo.endpoint = transceiver.Endpoint(keyring, self.tx_id)

    def pump(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except (BlockingIOError, ConnectionRefusedError):
                return
            self.received += 1
            now_ms = int(time.time() * 1000)
            inb = self.demo.endpoint.receive(data, now_ms)
            if not isinstance(inb, int):
                self.worker_of[tuple(inb.client)] = addr[1]
            reply = self.demo.handle(data, now_ms)
            if reply is not None:
                try:
                    self.sock.sendto(reply, addr)
                    self.sent += 1
                except (BlockingIOError, ConnectionRefusedError):
                    pass


class CountingClient(demo.VoiceClient):
    """A VoiceClient that also counts every datagram it sends and receives, and
    records in `arrivals` the time (the `now` it was given) of each new media
    datagram: the gaps of a call that moved or failed over are read from it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.datagrams_out = 0
        self.datagrams_in = 0
        self.arrivals = []
        self.paused = False

    def _send(self, data):
        super()._send(data)
        self.datagrams_out += 1

    def receive(self, data, now):
        self.datagrams_in += 1
        before = self.received
        super().receive(data, now)
        if self.received > before:
            self.arrivals.append(now)


def clients_for(setup, n, keyring=None):
    keyring = keyring or setup.keyring
    out = []
    for _ in range(n):
        ufrag, password = demo.mint_session(keyring, 1, time.time())
        out.append(CountingClient(setup.public, ufrag, password))
    return out


def carries_a_call(setup, tx, n=2, timeout=10):
    """True once `n` new voice clients connected through the relay and got media back (bounded)."""
    clients = clients_for(setup, n)
    traffic = Traffic(clients, tx)
    try:
        if not traffic.run(timeout, until=lambda: all(c.connected for c in clients)):
            return False
        traffic.run(0.3)
        traffic.quiesce()
        return sum(c.received for c in clients) > 0
    finally:
        traffic.close()


class Traffic:
    """Drives clients and the in-test transceiver (and optional extra fds) in one bounded select loop."""

    def __init__(self, clients, tx, extra=None):
        self.clients = list(clients)
        self.tx = tx
        self.sel = selectors.DefaultSelector()
        self.sel.register(tx.sock, selectors.EVENT_READ, tx.pump)
        for c in self.clients:
            self.sel.register(c.sock, selectors.EVENT_READ, lambda c=c: c.pump(time.monotonic()))
        for fileobj, cb in (extra or {}).items():
            self.sel.register(fileobj, selectors.EVENT_READ, cb)

    def add(self, client):
        self.clients.append(client)
        self.sel.register(client.sock, selectors.EVENT_READ, lambda: client.pump(time.monotonic()))

    def run(self, seconds, until=None, send=True):
        """Run `seconds` (or until `until()` is true, then return True); False at the deadline."""
        deadline = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            due = deadline
            if send:
                for c in self.clients:
                    if not c.paused:
                        due = min(due, c.tick(now))
            for key, _ in self.sel.select(max(0.0, min(due, deadline) - time.monotonic())):
                key.data()
            if until is not None and until():
                return True
            if time.monotonic() >= deadline:
                return until is None

    def quiesce(self, quiet=0.5, limit=5.0):
        """Stop sending; collect what is in flight until `quiet` s pass with nothing received."""
        deadline = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet:
            events = self.sel.select(min(0.05, deadline - time.monotonic()))
            for key, _ in events:
                key.data()
            if events:
                last = time.monotonic()

    def close(self):
        self.sel.close()
        for c in self.clients:
            c.sock.close()


# -- a strict Prometheus text format 0.0.4 parser ---------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_VALUE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|Inf|NaN)")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_prometheus(text):
    """{name: {"type", "help", "samples": {labels tuple: float}}}; AssertionError on anything off-format."""
    assert text.endswith("\n"), "exposition must end with a newline"
    families = {}
    current = None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        assert line, f"line {n}: empty line"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert _NAME.fullmatch(name), f"line {n}: bad name {name!r}"
            assert name not in families, f"line {n}: {name} described twice"
            current = families[name] = {"help": help_text, "type": None, "samples": {}}
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current is families.get(name), f"line {n}: TYPE without HELP"
            assert current["type"] is None, f"line {n}: second TYPE"
            assert kind in _TYPES, f"line {n}: bad type {kind!r}"
            current["type"] = kind
            continue
        assert not line.startswith("#"), f"line {n}: unknown comment"
        m = _NAME.match(line)
        assert m, f"line {n}: no metric name"
        name, rest = m.group(), line[m.end():]
        labels = []
        if rest.startswith("{"):
            end = rest.index("}")
            body, rest = rest[1:end], rest[end + 1:]
            pos = 0
            while pos < len(body):
                lm = _LABEL.match(body, pos)
                assert lm, f"line {n}: bad label at {body[pos:]!r}"
                labels.append((lm.group(1), lm.group(2)))
                pos = lm.end()
                if pos < len(body):
                    assert body[pos] == ",", f"line {n}: labels not comma-separated"
                    pos += 1
            assert len({k for k, _ in labels}) == len(labels), f"line {n}: repeated label"
        assert rest.startswith(" "), f"line {n}: no space before the value"
        value = rest[1:]
        assert _VALUE.fullmatch(value), f"line {n}: bad value {value!r}"
        family_name = next(reversed(families)) if families else None
        suffix = None
        if current is not None and current["type"] == "histogram" and name != family_name:
            for suffix in ("_bucket", "_sum", "_count"):
                if name == f"{family_name}{suffix}":
                    break
            else:
                suffix = None
            assert suffix is not None, f"line {n}: {name} outside its histogram family"
            assert (suffix == "_bucket") == any(k == "le" for k, _ in labels), f"line {n}: le label"
            name = family_name
        assert current is not None and name == family_name, f"line {n}: {name} outside its family"
        assert current["type"] is not None, f"line {n}: sample before TYPE"
        key = tuple(labels) if suffix is None else ((("suffix", suffix),) + tuple(labels))
        assert key not in current["samples"], f"line {n}: duplicate sample"
        current["samples"][key] = float(value)
    return families


def metrics(setup):
    status, body = http_get(setup.url + "/metrics")
    assert status == 200, status
    return parse_prometheus(body)


def value(fams, name, **labels):
    return fams[name]["samples"][tuple(labels.items())]
