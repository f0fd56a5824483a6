"""edge-relay benchmark: the relay against three baselines, in the same run, same harness.

Usage: python -m bench.run [--quick] [--out bench/results.json]
(BENCH_QUICK=1 in the environment is the same as --quick.)

Theory of operation
  One orchestrator (this process) forks the roles of bench/roles.py, each
  pinned: every forwarder on CPU 0, the load generator and the sink on the
  last CPU. All forwarders run side by side on their own ports and sleep in
  epoll while another is measured, so pairs interleave without restarts:

    relay    edge_relay.worker.Worker as shipped (MAC on), one worker
    null     edge_relay.batchio with no per-packet decision: the design's ceiling
    naive    recvfrom/sendto in Python, no authentication
    cfwd     bench/cfwd.c, recvmmsg/sendmmsg in C (gcc -O2), an instrument
    relay1/relay2  `python -m edge_relay run --workers 1|2` (the supervisor)

  Figures come in interleaved pairs (relay, baseline, relay, baseline, ...):
  on a shared VM absolute rates drift, the ratio inside a pair does not, so
  the ratio's median and range are the result. CPU use of every process is
  read from /proc/<pid>/stat over each measurement window. The sans-IO
  figures (per-packet cost by flow count, memory per flow, new flows per
  second, the profile) come from bench/micro.py in a separate pinned process.
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_relay import demo, keys, sockets

from . import roles, vs_coturn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / ".build"
TX_ID = 1
WINDOW_MS = 2000
BUF = 4 * 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "relay_vs_cfwd_pps": 0.7, "relay_vs_cfwd_pps_stretch": 0.8, "null_vs_cfwd_pps": 0.95,
    "latency_p50_added_vs_cfwd": 1.1, "latency_p99_added_vs_cfwd": 1.5,
    "cost_100k_vs_1_flow": 1.1, "bytes_per_flow_100k": 300, "new_flows_per_s": 20000,
    "two_vs_one_worker": 1.4,
}


def params(quick):
    if quick:
        return dict(flows=256, duration=0.8, warm=0.2, pairs=2, lat_pairs=1, lat_duration=1.0,
                    rates=(10000, 20000, 50000), worker_pairs=1, window=1024, micro=["--quick"])
    return dict(flows=512, duration=2.5, warm=0.5, pairs=5, lat_pairs=5, lat_duration=3.0,
                rates=(10000, 20000, 50000), worker_pairs=5, window=1024, micro=[])


# ---------------------------------------------------------------------------
# machine and build

def machine():
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pythons = {"bench": f"{sys.executable} {platform.python_version()}"}
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if exe and os.path.exists(exe):
            try:
                out = subprocess.run([exe, "-c", "import platform;print(platform.python_version())"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
                pythons[exe] = out
            except (OSError, subprocess.SubprocessError):
                pass
    try:
        gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        gcc = None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(ROOT), capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "edge_relay"], cwd=str(ROOT),
                               capture_output=True, text=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except OSError:
        head, dirty = None, None
    return {"nproc": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)), "cpu_model": model,
            "git_head": head, "edge_relay_uncommitted": dirty,
            "kernel": platform.release(), "machine": platform.machine(), "pythons": pythons, "gcc": gcc,
            "loadavg_at_start": os.getloadavg()}


def build_c(name, build_dir=BUILD):
    """Compile bench/<name>.c with gcc -O2 into build_dir; returns the executable's path."""
    build_dir = Path(build_dir)
    build_dir.mkdir(exist_ok=True)
    exe = build_dir / name
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / f"{name}.c")], check=True)
    return exe


def build_cfwd(build_dir=BUILD):
    """Compile bench/cfwd.c; returns the executable's path."""
    return build_c("cfwd", build_dir)


# ---------------------------------------------------------------------------
# processes

def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])        # utime + stime (fields 14 and 15)
    except (OSError, IndexError, ValueError):
        return 0


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def udp(port=0, reuseport=False):
    return sockets.udp_socket("127.0.0.1", port, reuseport=reuseport, rcvbuf=BUF, sndbuf=BUF)


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Target:
    def __init__(self, name, public, internal=None, procs=(), pids=()):
        self.name = name
        self.public = public
        self.internal = internal
        self.procs = list(procs)          # mp.Process or Popen, for shutdown
        self.pids = list(pids)            # whose CPU counts as the forwarder's


def relay_config(key_dir, port, sink_port, workers=1, coalesce_us=0):
    return {
        "relay": {"io": "mmsg", "batch_size": 32, "drain_seconds": 0.0, "workers": workers,
                  "coalesce_us": coalesce_us},
        "listeners": [{"address": "127.0.0.1", "port": port}],
        "internal": {"address": "127.0.0.1", "port": 0},
        "keys": {"dir": str(key_dir)},
        "transceivers": [{"id": TX_ID, "address": "127.0.0.1", "port": sink_port}],
        # Shipped limits but for idle_timeout (pairs run for minutes) and the
        # per-token flow cap: every bench client shares one session (one
        # ufrag), which max_flows_per_session (16) would hold to 16 flows at
        # the per-flow packet rate, measuring the limits instead of the relay.
        # There are enough flows that none exceeds limits.flow_packets_rate (1000 pps).
        "limits": {"idle_timeout": 3600.0, "max_flows": 200000, "max_flows_per_session": 0},
        "management": {"port": 0},
        "log": {"level": "err"},
        # the sink counts every datagram it receives: no health probes (edge_relay [probes])
        "probes": {"enabled": False},
    }


def toml_of(cfg):
    lines = []
    for section in ("relay", "internal", "keys", "limits", "management", "log", "probes"):
        lines.append(f"[{section}]")
        for k, v in cfg[section].items():
            lines.append(f"{k} = {json.dumps(v)}")
    for section in ("listeners", "transceivers"):
        for row in cfg[section]:
            lines.append(f"[[{section}]]")
            for k, v in row.items():
                lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, p, tmp, cfwd_exe, log=print):
        self.p = p
        self.tmp = Path(tmp)
        self.log = log
        self.ctx = mp.get_context("fork")
        ncpu = len(os.sched_getaffinity(0))
        cpus = sorted(os.sched_getaffinity(0))
        self.fwd_cpu = cpus[0]
        self.gen_cpu = cpus[-1] if ncpu > 1 else cpus[0]
        self.key_dir = self.tmp / "keys"
        self.key_dir.mkdir(mode=0o700)
        keys.write_key_file(self.key_dir, 1)
        self.keyring = keys.load_dir(self.key_dir)
        self.counters = self.ctx.RawArray("q", roles.N_COUNTERS)
        self.sink_sock = udp()
        self.sink_addr = self.sink_sock.getsockname()
        self.client_socks = []
        for i in range(p["flows"]):
            s = sockets.udp_socket(f"127.1.{i // 250}.{1 + i % 250}", 0, rcvbuf=BUF, sndbuf=BUF)
            self.client_socks.append(s)
        self.client_addrs = [s.getsockname() for s in self.client_socks]
        self.targets = {}
        self.sink_flows_known = set()      # targets whose flows the sink knows (setup or learn)
        self.gen_ctl, child = self.ctx.Pipe()
        self.gen = self.ctx.Process(target=roles.loadgen_main, name="bench-loadgen",
                                    args=(child, self.client_socks, self.counters, self.gen_cpu), daemon=True)
        self.sink_ctl, child2 = self.ctx.Pipe()
        self.sink = self.ctx.Process(target=roles.sink_main, name="bench-sink",
                                     args=(child2, self.sink_sock, self.counters, str(self.key_dir), TX_ID,
                                           WINDOW_MS, self.gen_cpu), daemon=True)
        self.gen.start()
        self.sink.start()
        self.cfwd_exe = cfwd_exe

    # -- forwarders ---------------------------------------------------------

    def start_relay(self, name="relay", coalesce_us=0):
        pub, internal = udp(reuseport=True), udp()
        cfg = relay_config(self.key_dir, pub.getsockname()[1], self.sink_addr[1], coalesce_us=coalesce_us)
        proc = self.ctx.Process(target=roles.relay_main, name=f"bench-{name}", daemon=True,
                                args=(cfg, str(self.tmp), str(self.key_dir), [pub], internal, self.fwd_cpu))
        proc.start()
        self.targets[name] = Target(name, pub.getsockname(), internal.getsockname(), [proc], [proc.pid])
        pub.close()
        internal.close()

    def start_null(self):
        pub, internal = udp(), udp()
        proc = self.ctx.Process(target=roles.null_main, name="bench-null", daemon=True,
                                args=(pub, internal, self.sink_addr, self.client_addrs, self.fwd_cpu))
        proc.start()
        self.targets["null"] = Target("null", pub.getsockname(), internal.getsockname(), [proc], [proc.pid])
        pub.close()
        internal.close()

    def start_naive(self):
        pub, internal = udp(), udp()
        proc = self.ctx.Process(target=roles.naive_main, name="bench-naive", daemon=True,
                                args=(pub, internal, self.sink_addr, self.fwd_cpu))
        proc.start()
        self.targets["naive"] = Target("naive", pub.getsockname(), internal.getsockname(), [proc], [proc.pid])
        pub.close()
        internal.close()

    def start_cfwd(self):
        pub, internal = udp(), udp()
        proc = subprocess.Popen([str(self.cfwd_exe), str(pub.fileno()), str(internal.fileno()),
                                 self.sink_addr[0], str(self.sink_addr[1])], pass_fds=(pub.fileno(), internal.fileno()))
        os.sched_setaffinity(proc.pid, {self.fwd_cpu})
        self.targets["cfwd"] = Target("cfwd", pub.getsockname(), internal.getsockname(), [proc], [proc.pid])
        pub.close()
        internal.close()

    def start_supervised(self, workers):
        """`python -m edge_relay run --workers N` (the supervisor forks and pins the workers)."""
        name = f"relay{workers}"
        port = free_port()
        cfg = relay_config(self.key_dir, port, self.sink_addr[1], workers)
        path = self.tmp / f"{name}.toml"
        path.write_text(toml_of(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "edge_relay", "run", "--config", str(path),
                                 "--workers", str(workers)], cwd=str(ROOT),
                                stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"{name}.log", "w"))
        deadline = time.monotonic() + 10
        pids = []
        while time.monotonic() < deadline and len(pids) < workers:
            time.sleep(0.1)
            pids = children(proc.pid)
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: exited with {proc.returncode}; see {self.tmp / (name + '.log')}")
        if len(pids) < workers:
            raise RuntimeError(f"{name}: {len(pids)} of {workers} workers started")
        time.sleep(0.3)
        self.targets[name] = Target(name, ("127.0.0.1", port), None, [proc], [proc.pid, *pids])

    # -- phases ---------------------------------------------------------------

    def _ask(self, conn, cmd):
        conn.send(cmd)

    def setup(self, name, timeout=8.0):
        """Every client completes its ICE check through the relay `name`: its flows are confirmed."""
        t = self.targets[name]
        ufrag, password = demo.mint_session(self.keyring, TX_ID, time.time(), 3600)
        self.counters[roles.SETUP_DONE] = 0
        self.sink_ctl.send({"op": "setup", "name": name, "timeout": timeout})
        self.gen_ctl.send({"op": "setup", "target": t.public, "ufrag": ufrag, "password": password,
                           "timeout": timeout})
        gen = self.gen_ctl.recv()
        sink = self.sink_ctl.recv()
        self.sink_flows_known.add(name)
        return {"connected": gen["connected"], "clients": gen["clients"], "flows_seen_by_sink": sink["flows"],
                "check_failures": gen["check_failures"], "sink_drops": sink["drops"]}

    def learn(self, name):
        t = self.targets[name]
        self.sink_ctl.send({"op": "learn", "name": name, "internal": t.internal, "clients": self.client_addrs})
        self.sink_ctl.recv()
        self.sink_flows_known.add(name)

    def measure(self, name, direction, rate=None, duration=None):
        """One measurement window; returns pps, CPU use per process and (paced) latency samples."""
        p = self.p
        t = self.targets[name] if name != "direct" else Target("direct", self.sink_addr)
        duration = duration or (p["lat_duration"] if rate else p["duration"])
        warm = p["warm"]
        t0 = time.monotonic() + 0.05
        base = {"t0": t0, "duration": duration, "warm": warm, "window": p["window"], "name": name}
        if direction == "c2t":
            self.sink_ctl.send({**base, "op": "count", "latency": rate is not None})
            if rate is None:
                self.gen_ctl.send({**base, "op": "send", "target": t.public})
            else:
                self.gen_ctl.send({**base, "op": "paced", "target": t.public, "rate": rate})
        else:
            self.gen_ctl.send({**base, "op": "receive"})
            self.sink_ctl.send({**base, "op": "send"})
        pids = {"forwarder": t.pids, "loadgen": [self.gen.pid], "sink": [self.sink.pid]}
        time.sleep(max(0.0, t0 + warm - time.monotonic()))
        a = {k: sum(cpu_ticks(x) for x in v) for k, v in pids.items()}
        ta = time.monotonic()
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        b = {k: sum(cpu_ticks(x) for x in v) for k, v in pids.items()}
        tb = time.monotonic()
        gen = self.gen_ctl.recv()
        sink = self.sink_ctl.recv()
        receiver = sink if direction == "c2t" else gen
        sender = gen if direction == "c2t" else sink
        span = duration - warm
        out = {"target": name, "direction": direction, "pps": receiver["counted"] / span,
               "loadavg_1m": os.getloadavg()[0],
               "sent": sender["sent"], "received": receiver["received"],
               "written_off": sender.get("written_off", 0),
               "cpu": {k: (b[k] - a[k]) / CLK_TCK / (tb - ta) for k in pids}}
        if rate is not None:
            import array
            lat = array.array("q")
            lat.frombytes(sink["latency_ns"])
            out["rate"] = rate
            out["latency_us"] = percentiles(lat)
        fwd_cpu_s = out["cpu"]["forwarder"] * (tb - ta)
        out["cpu_per_packet_us"] = fwd_cpu_s / max(1, receiver["counted"]) * 1e6 if name != "direct" else None
        # Capacity: packets per second of forwarder CPU, i.e. the rate with a whole core.
        # Needed because on 2 CPUs the generator's core can saturate before a fast forwarder does.
        out["capacity_pps"] = receiver["counted"] / fwd_cpu_s if name != "direct" and fwd_cpu_s > 0 else None
        time.sleep(0.05)
        return out

    def close(self):
        for conn in (self.gen_ctl, self.sink_ctl):
            try:
                conn.send({"op": "stop"})
            except OSError:
                pass
        for t in self.targets.values():
            for proc in t.procs:
                if isinstance(proc, subprocess.Popen):
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                else:
                    os.kill(proc.pid, signal.SIGTERM)
                    proc.join(5)
                    if proc.is_alive():
                        proc.kill()
        self.gen.join(5)
        self.sink.join(5)


def percentiles(samples):
    if not samples:
        return None
    s = sorted(samples)
    n = len(s)

    def q(x):
        return s[min(n - 1, int(x * n))] / 1000.0
    return {"n": n, "p50": q(0.50), "p99": q(0.99), "p999": q(0.999), "max": s[-1] / 1000.0}


def ratio_summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


# ---------------------------------------------------------------------------
# the run

def run_e2e(b, p, results, log):
    b.start_relay()
    b.start_null()
    b.start_naive()
    b.start_cfwd()
    time.sleep(0.5)
    results["setup"] = {"relay": b.setup("relay")}
    log(f"setup: {results['setup']['relay']}")
    for name in ("null", "naive", "cfwd"):
        b.learn(name)

    # throughput pairs: A then B, each direction, A B A B ...
    pairs = {}
    for a, base in (("relay", "cfwd"), ("relay", "null"), ("relay", "naive"), ("null", "cfwd")):
        for i in range(p["pairs"]):
            for direction in ("c2t", "t2c"):
                r = b.measure(a, direction)
                x = b.measure(base, direction)
                pairs.setdefault(f"{a}|{base}:{direction}", []).append((r, x))
                log(f"  pair {i} {direction}: {a} {r['pps']:9.0f} pps  {base:5s} {x['pps']:9.0f} pps"
                    f"  ratio {r['pps'] / max(1, x['pps']):.2f}"
                    f"  cpu fwd {r['cpu']['forwarder']:.2f}/{x['cpu']['forwarder']:.2f}"
                    f" gen {r['cpu']['loadgen']:.2f}/{x['cpu']['loadgen']:.2f}"
                    f" sink {r['cpu']['sink']:.2f}/{x['cpu']['sink']:.2f}")
    results["throughput_pairs"] = pairs

    # latency at fixed rates: direct, cfwd, relay in each round
    lat = {}
    for rate in p["rates"]:
        n = p["lat_pairs"] if rate == 20000 else max(1, (p["lat_pairs"] + 1) // 3)
        for i in range(n):
            d = b.measure("direct", "c2t", rate=rate)
            c = b.measure("cfwd", "c2t", rate=rate)
            r = b.measure("relay", "c2t", rate=rate)
            lat.setdefault(str(rate), []).append({"direct": d, "cfwd": c, "relay": r})
            log(f"  latency {rate} pps round {i}: p50/p99/p99.9 us direct "
                f"{_lat(d)}  cfwd {_lat(c)}  relay {_lat(r)}")
    results["latency_rounds"] = lat


def run_workers(b, p, results, log):
    out = {}
    try:
        b.start_supervised(1)
        b.start_supervised(2)
        time.sleep(0.5)
        out["setup"] = {"relay1": b.setup("relay1"), "relay2": b.setup("relay2")}
        log(f"setup workers: {out['setup']}")
        rounds = []
        for i in range(p["worker_pairs"]):
            for direction in ("c2t", "t2c"):
                one = b.measure("relay1", direction)
                two = b.measure("relay2", direction)
                rounds.append({"direction": direction, "one": one, "two": two})
                log(f"  workers pair {i} {direction}: 1 worker {one['pps']:9.0f}  2 workers {two['pps']:9.0f}"
                    f"  ratio {two['pps'] / max(1, one['pps']):.2f}")
        out["rounds"] = rounds
        out["how"] = "python -m edge_relay run --workers N (supervisor, forked pinned workers)"
    except RuntimeError as exc:
        out["error"] = str(exc)
        log(f"workers: {exc}")
    results["workers"] = out


def _lat(m):
    lat = m.get("latency_us") or {}
    return f"{lat.get('p50', 0):6.1f}/{lat.get('p99', 0):6.1f}/{lat.get('p999', 0):7.1f}"


def run_micro(p, cpu, log):
    cmd = [sys.executable, "-m", "bench.micro", "--cpu", str(cpu), *p["micro"]]
    log("micro: " + " ".join(cmd))
    out = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        log(out.stderr)
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------
# summary

def summarize(results):
    s = {}
    pairs = results.get("throughput_pairs", {})
    for key, rows in pairs.items():
        names, direction = key.split(":")
        a, b = names.split("|")
        s[f"{a}_vs_{b}_pps_{direction}"] = ratio_summary([r["pps"] / x["pps"] for r, x in rows if x["pps"]])
        s[f"{a}_vs_{b}_capacity_{direction}"] = ratio_summary(
            [r["capacity_pps"] / x["capacity_pps"] for r, x in rows if r.get("capacity_pps") and x.get("capacity_pps")])
    lat = results.get("latency_rounds", {})
    for rate, rounds in lat.items():
        for q in ("p50", "p99", "p999"):
            vals = []
            for rd in rounds:
                d, c, r = (rd[k]["latency_us"] for k in ("direct", "cfwd", "relay"))
                if d and c and r:
                    ca, ra = c[q] - d[q], r[q] - d[q]
                    vals.append(ra / ca if ca > 0 else None)
            s[f"latency_{q}_added_vs_cfwd_{rate}"] = ratio_summary(vals)
    w = results.get("workers", {}).get("rounds", [])
    for direction in ("c2t", "t2c"):
        vals = [r["two"]["pps"] / r["one"]["pps"] for r in w if r["direction"] == direction and r["one"]["pps"]]
        s[f"two_vs_one_worker_{direction}"] = ratio_summary(vals)
        # what two workers would give with a core each: 2 x their per-CPU-second rate vs one worker's
        vals = [2 * r["two"]["capacity_pps"] / r["one"]["capacity_pps"] for r in w
                if r["direction"] == direction and r["one"].get("capacity_pps") and r["two"].get("capacity_pps")]
        s[f"two_vs_one_worker_capacity_{direction}"] = ratio_summary(vals)
    s.update(vs_coturn.summarize(results))
    return s


def verdicts(results, s):
    m = results.get("micro", {})
    v = {}

    def med(key):
        x = s.get(key)
        return x["median"] if x else None

    def add(name, value, target, higher_is_better=True):
        ok = None if value is None else (value >= target if higher_is_better else value <= target)
        v[name] = {"value": value, "target": target, "met": ok,
                   "rule": (">=" if higher_is_better else "<=")}

    for d in ("c2t", "t2c"):
        add(f"relay >= 0.7x cfwd, capacity pps/CPU-s ({d})", med(f"relay_vs_cfwd_capacity_{d}"), 0.7)
        add(f"relay >= 0.8x cfwd, capacity, stretch ({d})", med(f"relay_vs_cfwd_capacity_{d}"), 0.8)
        add(f"relay >= 0.7x cfwd, measured pps ({d})", med(f"relay_vs_cfwd_pps_{d}"), 0.7)
        add(f"null >= 0.95x cfwd, capacity pps/CPU-s ({d})", med(f"null_vs_cfwd_capacity_{d}"), 0.95)
        add(f"null >= 0.95x cfwd, measured pps ({d})", med(f"null_vs_cfwd_pps_{d}"), 0.95)
    add("added latency p50 at 20k pps <= 1.1x cfwd", med("latency_p50_added_vs_cfwd_20000"), 1.1, False)
    add("added latency p99 at 20k pps <= 1.5x cfwd", med("latency_p99_added_vs_cfwd_20000"), 1.5, False)
    cost = m.get("cost_ratio_100k_vs_1", {})
    for d in ("c2t", "t2c"):
        x = cost.get(d)
        add(f"per-packet cost 100k flows <= 1.1x 1 flow ({d})", x["median"] if x else None, 1.1, False)
    mem = m.get("memory", {})
    add("memory per confirmed flow at 100k <= 300 B", mem.get("bytes_per_flow_steady", mem.get("bytes_per_flow")),
        300, False)
    nf = m.get("new_flows", {})
    add(">= 20k new flows/s/worker (router CPU + measured I/O cost)", nf.get("flows_per_s_with_io"), 20000)
    for d in ("c2t", "t2c"):
        add(f"2 workers >= 1.4x one worker, measured ({d})", med(f"two_vs_one_worker_{d}"), 1.4)
        add(f"2 workers >= 1.4x one, per-CPU extrapolation ({d})", med(f"two_vs_one_worker_capacity_{d}"), 1.4)
    vs_coturn.verdicts(s, add)
    return v


def table(results, s, v):
    lines = []
    P = lines.append
    mach = results["machine"]
    P(f"machine: {mach['nproc']} CPU ({mach['cpu_model']}), kernel {mach['kernel']}, "
      f"python {mach['pythons']}, mode {'quick' if results['quick'] else 'full'}")
    loads = [m["loadavg_1m"] for rows in results.get("throughput_pairs", {}).values() for pair in rows for m in pair
             if "loadavg_1m" in m]
    if loads:
        P(f"load average (1 min) during the pairs: {min(loads):.1f}..{max(loads):.1f} on {mach['nproc']} CPUs "
          f"(the bench itself adds about 2; more means other work shared the CPUs)")
    P("")
    P("Throughput, closed loop (median of the pairs; cpu = share of one core over the window;")
    P("  capacity = packets per forwarder CPU-second, the rate with a whole core; us/pkt = forwarder CPU per packet)")
    P(f"  {'forwarder':8s} {'dir':4s} {'pps':>9s} {'capacity':>9s} {'fwd cpu':>7s} {'us/pkt':>7s}"
      f" {'gen cpu':>7s} {'sink cpu':>8s}")
    pairs = results.get("throughput_pairs", {})
    by = {}
    for key, rows in pairs.items():
        names, direction = key.split(":")
        a, base = names.split("|")
        for r, x in rows:
            by.setdefault((a, direction), []).append(r)
            by.setdefault((base, direction), []).append(x)
    for r in results.get("workers", {}).get("rounds", []):
        by.setdefault(("relay1", r["direction"]), []).append(r["one"])
        by.setdefault(("relay2", r["direction"]), []).append(r["two"])
    for name in ("relay", "null", "naive", "cfwd", "relay1", "relay2"):
        for d in ("c2t", "t2c"):
            ms = by.get((name, d), [])
            if not ms:
                continue
            med = statistics.median
            cap = [m["capacity_pps"] for m in ms if m.get("capacity_pps")]
            P(f"  {name:8s} {d:4s} {med([m['pps'] for m in ms]):9.0f} {med(cap) if cap else 0:9.0f}"
              f" {med([m['cpu']['forwarder'] for m in ms]):7.2f}"
              f" {med([m['cpu_per_packet_us'] for m in ms]):7.2f} {med([m['cpu']['loadgen'] for m in ms]):7.2f}"
              f" {med([m['cpu']['sink'] for m in ms]):8.2f}")
    P("  (c2t = client -> relay -> transceiver, t2c = transceiver -> relay -> client; relay1/relay2 =")
    P("   `edge_relay run --workers 1|2`, whose pps and cpu are summed over the workers)")
    P("")
    cost = {}
    for (name, d), ms in by.items():
        vals = [m["cpu_per_packet_us"] for m in ms if m.get("cpu_per_packet_us")]
        if vals:
            cost[name, d] = statistics.median(vals)
    if all((n, d) in cost for n in ("relay", "null", "cfwd") for d in ("c2t", "t2c")):
        P("Where a forwarded packet's CPU goes (forwarder us/pkt, medians above): kernel + syscalls ~ cfwd;")
        P("  batchio's Python ~ null - cfwd; the router's Python (decisions, MAC) ~ relay - null")
        for d in ("c2t", "t2c"):
            P(f"  {d}: kernel+C {cost['cfwd', d]:.2f}  batchio {cost['null', d] - cost['cfwd', d]:.2f}"
              f"  router {cost['relay', d] - cost['null', d]:.2f}  = relay {cost['relay', d]:.2f} us")
    P("")
    P("Ratios (median [min..max] over interleaved pairs)")
    for key, x in s.items():
        if x:
            P(f"  {key:40s} {x['median']:6.2f}  [{x['min']:.2f}..{x['max']:.2f}]  n={x['n']}")
    P("")
    lat = results.get("latency_rounds", {})
    if lat:
        P("One-way latency client -> forwarder -> sink, us (median over rounds of p50 / p99 / p99.9)")
        for rate, rounds in lat.items():
            for name in ("direct", "cfwd", "relay"):
                ls = [rd[name]["latency_us"] for rd in rounds if rd[name].get("latency_us")]
                if ls:
                    med = statistics.median
                    P(f"  {int(rate):6d} pps {name:7s} {med([l['p50'] for l in ls]):7.1f}"
                      f" {med([l['p99'] for l in ls]):7.1f}"
                      f" {med([l['p999'] for l in ls]):8.1f}")
        P("")
    lines += vs_coturn.table(results)
    m = results.get("micro", {})
    if m and "error" not in m:
        P("Router, sans-IO (bench/micro.py, pinned): ns per packet by live flows (median of rounds)")
        for d in ("c2t", "t2c"):
            row = m["cost_ns"][d]
            P(f"  {d}: " + "  ".join(f"{n} flows {row[n]:7.0f}" for n in row))
        mem = m.get("memory", {})
        P(f"  memory at {mem.get('flows')} confirmed flows: {mem.get('bytes_per_flow_steady', 0):.0f} "
          f"B/flow steady state "
          f"(after expire() forgot the refilled per-source buckets);"
          f" right after the burst {mem.get('bytes_per_flow'):.0f} B/flow tracemalloc "
          f"(after confirm {mem.get('bytes_per_flow_after_confirm', 0):.0f};"
          f" without rate-limit buckets {mem.get('bytes_per_flow_excluding_ratelimit', 0):.0f}),"
          f" RSS delta {mem.get('rss_bytes_per_flow', 0):.0f} B/flow")
        for d in ("c2t", "t2c"):
            prof = m.get("profile", {}).get(d)
            if prof:
                P(f"  profile {d}: Worker.pump_* in-process, {prof['ns_per_packet_unprofiled']:.0f} ns/pkt unprofiled; "
                  f"top by own time (ns/pkt under cProfile, which inflates small calls):")

                def short(name):
                    return name.replace('<built-in method ', '').replace('<method ', '').rstrip('>')
                P("    " + ", ".join(f"{short(r['function'])} {r['tottime_ns_per_packet']:.0f}"
                                     for r in prof["top"][:10]))
        wk = m.get("wakeups")
        if wk:
            P("  one loop wake-up (Worker.turn, in-process) with b datagrams queued: ns per packet by b")
            for d in ("c2t", "t2c"):
                P(f"    {d}: " + "  ".join(f"b={b} {ns:6.0f}" for b, ns in wk[d].items()))
        nf = m.get("new_flows", {})
        P(f"  new flows: {nf.get('us_per_flow'):.2f} us router CPU each = {nf.get('flows_per_s_router'):.0f}/s; "
          f"with measured I/O cost {nf.get('io_us_per_packet', 0):.2f} us/pkt"
          f" -> {nf.get('flows_per_s_with_io', 0):.0f}/s")
        P("")
    P("Targets")
    for name, x in v.items():
        val = x["value"]
        shown = "n/a" if val is None else (f"{val:.2f}" if val < 1000 else f"{val:.0f}")
        mark = {True: "MET", False: "NOT MET", None: "not measured"}[x["met"]]
        P(f"  {mark:12s} {name:58s} {shown:>8s} (target {x['rule']} {x['target']})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"))
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--skip", default="", help="comma list of parts to skip: e2e,coturn,workers,micro")
    ap.add_argument("--table-only", action="store_true", help="re-read --out, recompute ratios, print the table")
    ap.add_argument("--coalesce-us", type=int, default=vs_coturn.COALESCE_US,
                    help="[relay] coalesce_us of the second relay in the coturn fixed-rate rounds (0: none)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.table_only:
        results = json.loads(Path(args.out).read_text())
        s, v = summarize(results), None
        v = verdicts(results, s)
        results["ratios"], results["targets"] = s, v
        results["table"] = table(results, s, v)
        print(results["table"])
        Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
        return 0
    skip = set(filter(None, args.skip.split(",")))
    p = params(args.quick)
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    results = {"quick": args.quick, "params": {k: v for k, v in p.items() if k != "micro"},
               "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}
    log(f"machine: {results['machine']}")
    cfwd = build_cfwd()
    with tempfile.TemporaryDirectory(prefix="edge-relay-bench-") as tmp:
        b = Bench(p, tmp, cfwd, log)
        try:
            if "e2e" not in skip:
                run_e2e(b, p, results, log)
            if "coturn" not in skip:
                vs_coturn.run(b, args.quick, results, log, coalesce_us=args.coalesce_us)
            if "workers" not in skip:
                run_workers(b, p, results, log)
        finally:
            b.close()
    if "micro" not in skip:
        results["micro"] = run_micro(p, b.fwd_cpu, log)
        io_us = _null_io_cost(results)
        nf = results["micro"].get("new_flows")
        if nf and io_us is not None:
            nf["io_us_per_packet"] = io_us
            nf["flows_per_s_with_io"] = 1e6 / (nf["us_per_flow"] + io_us)
    s = summarize(results)
    v = verdicts(results, s)
    results["ratios"] = s
    results["targets"] = v
    results["elapsed_s"] = time.time() - started
    text = table(results, s, v)
    results["table"] = text
    print(text)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    log(f"wrote {args.out}")
    return 0


def _null_io_cost(results):
    """Forwarder CPU per packet of the null forwarder, client -> transceiver: the I/O a new flow pays too."""
    rows = results.get("throughput_pairs", {}).get("relay|null:c2t", [])
    vals = [x["cpu_per_packet_us"] for _, x in rows if x.get("cpu_per_packet_us")]
    return statistics.median(vals) if vals else None


if __name__ == "__main__":
    sys.exit(main())
