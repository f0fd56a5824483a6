"""Restart latency: from exec to the first forwarded packet of a restarted relay, and where the time goes.

Usage: python -m bench.startup [--runs 5] [--flows 200] [--workers 2] [--out bench/startup.json]
                               [--relay-path DIR]

Theory of operation
  This process plays systemd (a notify socket and an fd store, as
  bench/fakesystemd.py's FakeSystemd, shared with the tests), a transceiver (the demo
  one: it answers ICE and echoes media) and the callers: `--flows` voice
  clients that keep a flow each, and one probe caller sending a stamped
  datagram every PROBE_INTERVAL whose echo gives the round-trip time of every
  packet. It starts a relay, then restarts it `--runs` times the way
  `systemctl restart` does: SIGTERM, wait for the exit, exec the next process
  on the stored fds.

  The next process runs under a small driver (DRIVER below) that wraps the
  relay's start-up steps and writes one "@@startup <step> <CLOCK_MONOTONIC>"
  line to stderr after each, so the breakdown needs nothing in the relay
  itself. The fd wrapper writes the "exec" line just before it execs Python
  (its own start-up is an artifact of playing systemd and is left out).
  Steps: interpreter, imports (cli, then what `run` needs), config, keys,
  sockets (taken from the store), fork (first worker), worker serving (its
  loop is open), ready (READY=1), first forwarded (the probe's first echo
  through the new process, seen here).

  The package is byte-compiled first (compileall, as the .deb's py3compile
  does at install): without .pyc files every start compiles every module.

  --relay-path runs another tree's edge_relay (e.g. a checkout of main) for
  a before/after comparison; step names it lacks are left out.

  Figures are medians over the runs (min and max beside them). Timing on a
  shared machine varies: compare runs made back to back.
"""

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .fakesystemd import FakeSystemd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROBE_INTERVAL = 0.002          # seconds between the probe caller's datagrams
SETTLE = 1.0                    # seconds of steady traffic between restarts

# Moves the stored fds to 3.., sets LISTEN_* for its own pid, says when it execs, execs the driver.
WRAPPER = r"""
import fcntl, os, sys, time
fds = [int(x) for x in sys.argv[1].split(",")] if sys.argv[1] else []
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds) + 10) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])
os.write(2, b"@@startup exec %.6f\n" % time.monotonic())
os.execv(sys.executable, [sys.executable] + sys.argv[3:])
"""

DRIVER = r"""
import os, sys, time
def stamp(what):
    os.write(2, b"@@startup %s %.6f\n" % (what.encode(), time.monotonic()))
stamp("interpreter")
from edge_relay import cli
stamp("import-cli")
from edge_relay import config, flows, sdnotify, supervisor, worker
stamp("import-run")
def wrap(owner, name, label):
    f = getattr(owner, name, None)
    if f is None:
        return
    def wrapped(*a, **k):
        r = f(*a, **k)
        stamp(label)
        return r
    setattr(owner, name, wrapped)
wrap(config, "load", "config")
wrap(config, "load_keys", "keys")
try:
    from edge_relay import fdstore, workerproc
    wrap(fdstore.FdStore, "adopt", "sockets")
    wrap(workerproc, "spawn", "fork")
except ImportError:                       # before the supervisor split
    wrap(supervisor.Supervisor, "_adopt", "sockets")
    wrap(supervisor.Supervisor, "_spawn", "fork")
wrap(flows.FlowTable, "restore", "flows-restored")
wrap(worker.Worker, "_open_loop", "worker-serving")
wrap(sdnotify.Notifier, "ready", "ready")
sys.exit(cli.main(sys.argv[1:]))
"""

STEPS = ["interpreter", "import-cli", "import-run", "config", "keys", "sockets", "fork", "flows-restored",
         "worker-serving", "ready", "first-forwarded"]


def free_port(kind=socket.SOCK_DGRAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder, workers, tx_port):
    from edge_relay import keys
    key_dir = folder / "keys"
    key_dir.mkdir(mode=0o700)
    keys.write_key_file(key_dir, 1)
    ports = {"public": free_port(), "management": free_port(socket.SOCK_STREAM)}
    # internal ports: a run of `workers` free ones
    while True:
        base = free_port()
        try:
            held = []
            for i in range(workers):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind(("127.0.0.1", base + i))
            break
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    text = f"""[relay]
workers = {workers}

[[listeners]]
address = "127.0.0.1"
port = {ports["public"]}

[internal]
address = "127.0.0.1"
port = {base}

[keys]
dir = "{key_dir}"

[[transceivers]]
id = 1
address = "127.0.0.1"
port = {tx_port}

[management]
address = "127.0.0.1"
port = {ports["management"]}

[probes]
enabled = false
"""
    path = folder / "edge-relay.toml"
    path.write_text(text)
    return path, keys.load_dir(key_dir), ("127.0.0.1", ports["public"])


class Bench:
    def __init__(self, args):
        from edge_relay import demo
        self.args = args
        self.demo = demo
        self.tmp = Path(tempfile.mkdtemp(prefix="edge-relay-startup-"))
        self.sysd = FakeSystemd(str(self.tmp / "notify"))
        self.tx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx_sock.bind(("127.0.0.1", 0))
        self.tx_sock.setblocking(False)
        self.env = dict(os.environ, NOTIFY_SOCKET=self.sysd.path,
                        PYTHONPATH=str(args.relay_path or ROOT))
        self.env.pop("LISTEN_FDS", None)
        self.config, self.keyring, self.public = write_config(self.tmp, args.workers,
                                                              self.tx_sock.getsockname()[1])
        self.tx = demo.DemoTransceiver(self.keyring, 1, self.tx_sock, io_mode="plain")
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.tx_sock, selectors.EVENT_READ, self._pump_tx)
        self.sel.register(self.sysd.sock, selectors.EVENT_READ, self.sysd.pump)
        self.echoes = []        # (arrival, sent_at) of every probe echo
        self.clients = [self._client() for _ in range(args.flows)]
        self.probe = self._client(probe=True)
        self.proc = None
        self.logs = []

    def _client(self, probe=False):
        ufrag, password = self.demo.mint_session(self.keyring, 1, time.time(), 3600)
        c = self.demo.VoiceClient(self.public, ufrag, password)
        if probe:
            plain = c.receive

            def receive(data, now, plain=plain, c=c):
                before = len(c.rtts)
                plain(data, now)
                if len(c.rtts) > before:
                    self.echoes.append((now, now - c.rtts[-1]))
            c.receive = receive
        self.sel.register(c.sock, selectors.EVENT_READ, lambda c=c: c.pump(time.monotonic()))
        return c

    def _pump_tx(self):
        while True:
            try:
                data, addr = self.tx_sock.recvfrom(4096)
            except (BlockingIOError, ConnectionRefusedError):
                return
            reply = self.tx.handle(data, int(time.time() * 1000))
            if reply is not None:
                try:
                    self.tx_sock.sendto(reply, addr)
                except (BlockingIOError, ConnectionRefusedError):
                    pass

    def loop(self, seconds, until=None):
        """Drive the callers for `seconds` (or until `until()`); the probe sends every PROBE_INTERVAL."""
        deadline = time.monotonic() + seconds
        next_probe = time.monotonic()
        next_keepalive = time.monotonic()
        while True:
            now = time.monotonic()
            if until is not None and until():
                return True
            if now >= deadline:
                return until is None
            if now >= next_probe:
                if self.probe.connected:
                    self.probe.send_media(now)
                else:
                    self.probe.send_check(now)
                next_probe = now + PROBE_INTERVAL
            if now >= next_keepalive:           # one datagram a second keeps each flow alive
                for c in self.clients:
                    (c.send_media if c.connected else c.send_check)(now)
                next_keepalive = now + 1.0
            for key, _ in self.sel.select(max(0.0, min(next_probe, deadline) - time.monotonic())):
                key.data()

    def start(self, fds=None, names=""):
        log = open(self.tmp / f"relay{len(self.logs)}.log", "w+")
        self.logs.append(log)
        run = ["-c", DRIVER, "run", "--config", str(self.config)]
        if fds is None:
            args = [sys.executable, *run]
        else:
            args = [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), names, *run]
        self.proc = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL, stderr=log,
                                     pass_fds=fds or (), cwd=str(self.tmp))

    def stamps(self, log):
        log.flush()
        log.seek(0)
        out = {}
        for line in log:
            if line.startswith("@@startup "):
                _, step, t = line.split()
                out.setdefault(step, float(t))      # the first one: a worker or a later reload repeats them
        return out

    def restart(self):
        """One `systemctl restart`; the figures of this run."""
        ready_before = self.sysd.ready
        t_term = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        if not self.loop(30, until=lambda: self.proc.poll() is not None):
            raise SystemExit("the relay did not exit after SIGTERM")
        t_exit = time.monotonic()
        code = self.proc.returncode
        names = sorted(self.sysd.store)
        fds = [self.sysd.store[n][0] for n in names]
        n_echoes = len(self.echoes)
        self.start(fds, ":".join(names))
        if not self.loop(30, until=lambda: len(self.echoes) > n_echoes and self.sysd.ready > ready_before):
            raise SystemExit(f"the restarted relay did not serve; its log: {self.logs[-1].name}")
        first = self.echoes[n_echoes][0]
        self.loop(SETTLE)
        st = self.stamps(self.logs[-1])
        exec_t = st.pop("exec", None)
        if exec_t is None:
            raise SystemExit(f"no exec stamp in {self.logs[-1].name}")
        st["first-forwarded"] = first
        window = [(arr, sent) for arr, sent in self.echoes if sent >= t_term - 0.2 and arr <= first + 0.2]
        return {"exit_status": code, "stop_ms": (t_exit - t_term) * 1e3,
                "gap_ms": (exec_t - t_exit) * 1e3,
                "steps_ms": {k: (v - exec_t) * 1e3 for k, v in st.items()},
                "exec_to_first_forwarded_ms": (first - exec_t) * 1e3,
                "sigterm_to_first_forwarded_ms": (first - t_term) * 1e3,
                "max_rtt_ms": max(((arr - sent) * 1e3 for arr, sent in window), default=None),
                "flows": len(self.clients) + 1}

    def run(self):
        self.start()
        if not self.loop(30, until=lambda: self.sysd.ready and self.probe.connected and
                         all(c.connected for c in self.clients)):
            raise SystemExit(f"the relay did not serve every caller; its log: {self.logs[-1].name}")
        self.loop(SETTLE)
        return [self.restart() for _ in range(self.args.runs)]

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sel.close()
        for c in self.clients + [self.probe]:
            c.sock.close()
        self.tx_sock.close()
        self.sysd.close()
        for log in self.logs:
            log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def summarize(runs):
    def stats(values):
        values = [v for v in values if v is not None]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
    steps = {s: stats([r["steps_ms"].get(s) for r in runs]) for s in STEPS}
    totals = ("stop_ms", "exec_to_first_forwarded_ms", "sigterm_to_first_forwarded_ms", "max_rtt_ms")
    return {"steps_ms": {k: v for k, v in steps.items() if v is not None},
            **{k: stats([r[k] for r in runs]) for k in totals}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--flows", type=int, default=200, help="flows held across each restart (plus the probe's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "startup.json"))
    p.add_argument("--relay-path", default=None, help="the tree whose edge_relay to run (default this one)")
    args = p.parse_args(argv)
    import compileall
    compileall.compile_dir(str(Path(args.relay_path or ROOT) / "edge_relay"), quiet=1)
    bench = Bench(args)
    try:
        runs = bench.run()
    finally:
        bench.close()
    summary = summarize(runs)
    print(f"restart of a relay with {args.workers} workers and {args.flows + 1} flows, "
          f"{args.runs} runs (median, min..max, ms after exec):")
    previous = 0.0
    for step, s in summary["steps_ms"].items():
        print(f"  {step:<16} {s['median']:8.1f}   (+{s['median'] - previous:6.1f})   "
              f"{s['min']:.1f}..{s['max']:.1f}")
        previous = s["median"]
    for key in ("stop_ms", "sigterm_to_first_forwarded_ms", "max_rtt_ms"):
        s = summary[key]
        if s is not None:
            print(f"  {key:<32} {s['median']:8.1f}   {s['min']:.1f}..{s['max']:.1f}")
    doc = {"relay_path": str(args.relay_path or ROOT), "workers": args.workers, "flows": args.flows + 1,
           "runs": runs, "summary": summary, "python": sys.version.split()[0]}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
