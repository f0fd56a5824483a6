"""edge-relay side by side with coturn, driven by one C generator (bench/cgen.c).

Theory of operation
  Both relays run pinned to the forwarder CPU: the relay worker of bench/run.py
  (its 512 clients through the ICE check, MAC on) and Debian's turnserver
  (bench/turn.py: one relay thread, 512 allocations with a ChannelBind to the
  sink socket). bench/cgen.c, compiled here and pinned to the generator CPU,
  sends and receives for either: this module builds every datagram ahead of
  time (relay: raw RTP from a client, or a sealed TO_CLIENT header + payload
  from the transceiver's socket; coturn: ChannelData from a client, or the
  raw payload from the peer to the relayed address) so the generator does the
  same work per datagram for both, and the Python roles of bench/run.py stay
  idle. A payload carries its index at octet 12 (after the RTP header), by
  which cgen matches a received datagram with its send time.

  Per direction (c2t = client -> relay -> transceiver/peer, t2c back):
    capacity   closed loop, interleaved pairs (edge-relay, coturn, ...):
               packets per forwarder CPU-second
    fixed rate 5k / 20k / 50k pps, rounds of (direct, edge-relay, coturn):
               forwarder CPU per packet and one-way latency; "added" latency
               is a target's p50 minus direct's (generator to receiver with
               no relay) in the same round
  CPU is read from /proc/<pid>/task/*/schedstat (ns, every thread) over the
  counted window, for the forwarder and for cgen; the forwarder's kernel
  share (system / (user + system) ticks of /proc/<pid>/stat, same window)
  says how much of its CPU per packet is system calls and loopback delivery.
"""

import os
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from edge_relay import header, sockaddr

from . import roles, turn

ID_AT = roles.RTP.size                  # payload octet where the datagram's index goes
COALESCE_US = 200        # the second relay's [relay] coalesce_us in the fixed-rate rounds ("relay_c")
TARGETS = {"capacity": 1.0, "capacity_stretch": 1.2, "cpu_per_packet_20k": 1.0, "latency_p50_added_20k_us": 100.0}


def params(quick):
    if quick:
        return dict(pairs=2, duration=0.8, warm=0.2, lat_duration=1.0, rates=(5000, 20000, 50000),
                    rounds={5000: 1, 20000: 1, 50000: 1}, window=1024, per_sock=8, coalesce_us=COALESCE_US)
    return dict(pairs=5, duration=2.5, warm=0.5, lat_duration=2.5, rates=(5000, 20000, 50000),
                rounds={5000: 1, 20000: 3, 50000: 1}, window=1024, per_sock=8, coalesce_us=COALESCE_US)


def build_cgen(build_dir):
    from .run import build_c  # run imports this module
    return build_c("cgen", build_dir)


def cpu_ns(pid):
    """CPU time (ns) of every thread of `pid` so far, from schedstat; 0 when gone."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        return 0
    return total


def user_sys_ticks(pid):
    """(user, system) clock ticks of every thread of `pid` so far, from /proc/<pid>/stat; (0, 0) when gone.

    Tick-sampled, so coarse, but over a window of a second or more its split
    says how much of a forwarder's CPU is the kernel's (the system calls and
    the loopback delivery they carry) and how much its own code.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0, 0


def kernel_share(before, after):
    """System time / (user + system) between two user_sys_ticks sums, or None without ticks."""
    user, system = after[0] - before[0], after[1] - before[1]
    return system / (user + system) if user + system > 0 else None


def _ticks(pids):
    pairs = [user_sys_ticks(p) for p in pids]
    return sum(u for u, _ in pairs), sum(s for _, s in pairs)


def payload(i, ssrc_base=0x3000):
    body = bytearray(roles.rtp_payload(ssrc_base + i % 65536))
    struct.pack_into(">I", body, ID_AT, i)
    return bytes(body)


class SideBySide:
    """The coturn process and the datagram sets for cgen, on a bench.run.Bench."""

    def __init__(self, bench, cp, cgen_exe, log):
        self.b = bench
        self.cp = cp
        self.cgen = cgen_exe
        self.log = log
        self.coturn = None
        self.relayed = []
        self.tmp = Path(tempfile.mkdtemp(prefix="coturn-", dir=str(bench.tmp)))

    def start_coturn(self):
        b = self.b
        port = _free_port()
        proc = turn.start_coturn(str(self.tmp), port, b.fwd_cpu)
        server = ("127.0.0.1", port)
        probe = b.client_socks[0]
        if not turn.wait_listening(probe, server):
            proc.kill()
            raise RuntimeError(f"coturn did not answer on {server}; see {self.tmp}/turn.stderr")
        t = time.monotonic()
        self.relayed = turn.allocate_all(b.client_socks, server, b.sink_addr)
        self.coturn = proc
        b.targets["coturn"] = roles_target("coturn", server, [proc], [proc.pid])
        return {"allocations": len(self.relayed), "setup_s": time.monotonic() - t, "port": port}

    def close(self):
        if self.coturn is not None:
            self.coturn.terminate()
            try:
                self.coturn.wait(5)
            except subprocess.TimeoutExpired:
                self.coturn.kill()
            self.coturn = None

    # -- datagram sets -----------------------------------------------------

    def _set(self, name, direction, paced, wall_ms):
        """(send fds, recv fds, [(fd index, sockaddr, data)], id offset) for one phase."""
        b = self.b
        n = len(b.client_socks)
        clients = [s.fileno() for s in b.client_socks]
        sink = b.sink_sock.fileno()
        reps = 1 if paced else self.cp["per_sock"]
        msgs = []
        if direction == "c2t":
            if name.startswith("relay"):
                dst, wrap, off = b.targets[name].public, None, header.HEADER_LEN + ID_AT
            elif name == "coturn":
                dst, wrap, off = b.targets["coturn"].public, turn.channel_data, ID_AT
            else:
                dst, wrap, off = b.sink_addr, None, ID_AT
            dst = sockaddr.from_tuple(dst)
            for i in range(n):
                data = payload(i)
                data = wrap(data) if wrap else data
                msgs += [(i, dst, data)] * reps
            return clients, [sink], msgs, off
        key = b.keyring.signing
        for i, (host, port) in enumerate(b.client_addrs):
            p = payload(i, 0x4000)
            if name.startswith("relay"):
                dst = b.targets[name].internal
                head = header.encode(key, header.TO_CLIENT, p, route=0, family=header.FAMILY_V4, port=port,
                                     address=_v4(host), timestamp_ms=wall_ms)
                data, off = head + p, ID_AT
            elif name == "coturn":
                dst, data, off = self.relayed[i], p, turn.CHANNEL_HEAD.size + ID_AT
            else:
                dst, data, off = (host, port), p, ID_AT
            msgs.append((0, sockaddr.from_tuple(dst), data))
        return [sink], clients, msgs, off

    # -- one phase -----------------------------------------------------------

    def measure(self, name, direction, rate=None):
        cp = self.cp
        b = self.b
        duration = cp["lat_duration"] if rate else cp["duration"]
        warm = cp["warm"]
        t0 = time.monotonic() + 0.3           # spec written and cgen started before t0
        wall_ms = int((time.time() + 0.3 + duration / 2) * 1000)     # mid-window: well inside +-2 s
        send_fds, recv_fds, msgs, off = self._set(name, direction, rate is not None, wall_ms)
        spec = bytearray(b"CGEN")
        spec += struct.pack("<IIII", 1 if rate else 0, rate or 0, cp["window"], off)
        spec += struct.pack("<QQQ", int(t0 * 1e9), int((t0 + warm) * 1e9), int((t0 + duration) * 1e9))
        spec += struct.pack("<III", len(send_fds), len(recv_fds), len(msgs))
        spec += struct.pack(f"<{len(send_fds)}i", *send_fds)
        spec += struct.pack(f"<{len(recv_fds)}i", *recv_fds)
        for fi, sa, data in msgs:
            spec += struct.pack("<I", fi) + sa.ljust(16, b"\0") + struct.pack("<I", len(data)) + data
        path = self.tmp / "spec"
        path.write_bytes(spec)
        cpu = b.gen_cpu
        gen = subprocess.Popen([str(self.cgen), str(path)], stdout=subprocess.PIPE,
                               pass_fds=tuple(set(send_fds) | set(recv_fds)),
                               preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        fwd_pids = b.targets[name].pids if name != "direct" else []
        time.sleep(max(0.0, t0 + warm - time.monotonic()))
        a_f, a_g, ta, a_t = sum(cpu_ns(p) for p in fwd_pids), cpu_ns(gen.pid), time.monotonic(), _ticks(fwd_pids)
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        b_f, b_g, tb, b_t = sum(cpu_ns(p) for p in fwd_pids), cpu_ns(gen.pid), time.monotonic(), _ticks(fwd_pids)
        out, _ = gen.communicate(timeout=30)
        r = _json(out)
        span = tb - ta
        counted = r["counted"]
        fwd_s = (b_f - a_f) / 1e9
        m = {"target": name, "direction": direction, "rate": rate, "pps": counted / (duration - warm),
             "sent": r["sent"], "received": r["received"], "written_off": r["written_off"],
             "cpu": {"forwarder": fwd_s / span, "cgen": (b_g - a_g) / 1e9 / span,
                     "forwarder_kernel_share": kernel_share(a_t, b_t)},
             "loadavg_1m": os.getloadavg()[0]}
        if name != "direct":
            m["cpu_per_packet_us"] = fwd_s / max(1, counted) * 1e6
            m["capacity_pps"] = counted / fwd_s if fwd_s > 0 else None
        if rate:
            m["latency_us"] = {"n": r["latency_n"], "p50": r["p50"], "p99": r["p99"], "p999": r["p999"],
                               "max": r["max"]}
        time.sleep(0.05)
        return m


def _v4(host):
    import socket
    return socket.inet_aton(host)


def _json(out):
    import json
    return json.loads(out.decode())


def _free_port():
    from .run import free_port  # run imports this module
    return free_port()


def roles_target(name, public, procs, pids):
    from .run import Target
    return Target(name, public, None, procs, pids)


# ---------------------------------------------------------------------------
# the run

def run(b, quick, results, log, coalesce_us=COALESCE_US):
    cp = dict(params(quick), coalesce_us=coalesce_us)
    out = {"params": {k: v for k, v in cp.items() if k != "rounds"},
           "rounds_per_rate": {str(k): v for k, v in cp["rounds"].items()},
           "unit_before": turn.ensure_unit_off()}
    if not turn.available():
        out["error"] = f"{turn.TURNSERVER} is missing (make bench installs coturn)"
        log(out["error"])
        results["coturn"] = out
        return
    side = SideBySide(b, cp, build_cgen(b.tmp / "cgen-build"), log)
    try:
        if "relay" not in b.targets:
            b.start_relay()
            time.sleep(0.5)
        if "relay" not in b.sink_flows_known:
            out["relay_setup"] = b.setup("relay")
        if cp["coalesce_us"]:
            b.start_relay("relay_c", coalesce_us=cp["coalesce_us"])
            time.sleep(0.5)
            out["relay_c_setup"] = b.setup("relay_c")
        out["setup"] = side.start_coturn()
        log(f"coturn: {out['setup']}")
        cap = {}
        for i in range(cp["pairs"]):
            for d in ("c2t", "t2c"):
                r = side.measure("relay", d)
                c = side.measure("coturn", d)
                cap.setdefault(d, []).append((r, c))
                log(f"  vs coturn pair {i} {d}: capacity relay {r['capacity_pps'] or 0:8.0f} coturn "
                    f"{c['capacity_pps'] or 0:8.0f}"
                    f"  ratio {(r['capacity_pps'] or 0) / max(1, c['capacity_pps'] or 1):.2f}"
                    f"  pps {r['pps']:7.0f}/{c['pps']:7.0f}"
                    f"  cpu fwd {r['cpu']['forwarder']:.2f}/{c['cpu']['forwarder']:.2f}"
                    f" cgen {r['cpu']['cgen']:.2f}/{c['cpu']['cgen']:.2f}")
        out["capacity_pairs"] = cap
        fixed = {}
        for rate in cp["rates"]:
            for i in range(cp["rounds"][rate]):
                for d in ("c2t", "t2c"):
                    names = ("direct", "relay", "coturn") + (("relay_c",) if cp["coalesce_us"] else ())
                    rd = {n: side.measure(n, d, rate=rate) for n in names}
                    fixed.setdefault(str(rate), {}).setdefault(d, []).append(rd)
                    log(f"  vs coturn {rate} pps {d} round {i}: us/pkt relay {rd['relay']['cpu_per_packet_us']:.1f}"
                        f" coturn {rd['coturn']['cpu_per_packet_us']:.1f}"
                        f"; p50 us direct {rd['direct']['latency_us']['p50']:.0f}"
                        f" relay {rd['relay']['latency_us']['p50']:.0f} coturn {rd['coturn']['latency_us']['p50']:.0f}"
                        + (f"; relay_c us/pkt {rd['relay_c']['cpu_per_packet_us']:.1f}"
                           f" p50 {rd['relay_c']['latency_us']['p50']:.0f}"
                           if "relay_c" in rd else ""))
        out["fixed_rate_rounds"] = fixed
    except RuntimeError as exc:
        out["error"] = str(exc)
        log(f"coturn: {exc}")
    finally:
        side.close()
        out["unit_after"] = turn.ensure_unit_off()
    results["coturn"] = out


def _ratio_summary(values):
    from .run import ratio_summary
    return ratio_summary(values)


def summarize(results):
    c = results.get("coturn", {})
    s = {}
    for d, rows in c.get("capacity_pairs", {}).items():
        s[f"relay_vs_coturn_capacity_{d}"] = _ratio_summary(
            [r["capacity_pps"] / x["capacity_pps"] for r, x in rows if r.get("capacity_pps") and x.get("capacity_pps")])
    for rate, by_dir in c.get("fixed_rate_rounds", {}).items():
        for d, rounds in by_dir.items():
            s[f"relay_vs_coturn_cpu_per_packet_{rate}_{d}"] = _ratio_summary(
                [rd["relay"]["cpu_per_packet_us"] / rd["coturn"]["cpu_per_packet_us"] for rd in rounds
                 if rd["coturn"].get("cpu_per_packet_us")])
            # added p50 latency, relay minus coturn, us (not a ratio: the target is +100 us)
            s[f"relay_minus_coturn_added_p50_us_{rate}_{d}"] = _ratio_summary(
                [rd["relay"]["latency_us"]["p50"] - rd["coturn"]["latency_us"]["p50"] for rd in rounds
                 if rd["relay"]["latency_us"]["n"] and rd["coturn"]["latency_us"]["n"]])
            if all("relay_c" in rd for rd in rounds):      # the same relay with [relay] coalesce_us
                s[f"relay_c_vs_coturn_cpu_per_packet_{rate}_{d}"] = _ratio_summary(
                    [rd["relay_c"]["cpu_per_packet_us"] / rd["coturn"]["cpu_per_packet_us"] for rd in rounds
                     if rd["coturn"].get("cpu_per_packet_us")])
                s[f"relay_c_minus_coturn_added_p50_us_{rate}_{d}"] = _ratio_summary(
                    [rd["relay_c"]["latency_us"]["p50"] - rd["coturn"]["latency_us"]["p50"] for rd in rounds
                     if rd["relay_c"]["latency_us"]["n"] and rd["coturn"]["latency_us"]["n"]])
    return s


def verdicts(s, add):
    def med(key):
        x = s.get(key)
        return x["median"] if x else None
    for d in ("c2t", "t2c"):
        add(f"edge-relay >= 1.0x coturn, capacity pps/CPU-s ({d})", med(f"relay_vs_coturn_capacity_{d}"),
            TARGETS["capacity"])
        add(f"edge-relay >= 1.2x coturn, capacity, stretch ({d})", med(f"relay_vs_coturn_capacity_{d}"),
            TARGETS["capacity_stretch"])
        add(f"CPU per packet at 20k pps <= 1.0x coturn ({d})", med(f"relay_vs_coturn_cpu_per_packet_20000_{d}"),
            TARGETS["cpu_per_packet_20k"], False)
        add(f"added latency p50 at 20k pps <= coturn + 100 us ({d})",
            med(f"relay_minus_coturn_added_p50_us_20000_{d}"), TARGETS["latency_p50_added_20k_us"], False)
        if s.get(f"relay_c_vs_coturn_cpu_per_packet_20000_{d}"):
            add(f"with coalesce_us: CPU per packet at 20k pps <= 1.0x coturn ({d})",
                med(f"relay_c_vs_coturn_cpu_per_packet_20000_{d}"), TARGETS["cpu_per_packet_20k"], False)
            add(f"with coalesce_us: added latency p50 at 20k <= coturn + 100 us ({d})",
                med(f"relay_c_minus_coturn_added_p50_us_20000_{d}"), TARGETS["latency_p50_added_20k_us"], False)


def _kshare(measures):
    """Median kernel share of the forwarder's CPU over `measures`, as text ("-" when not sampled)."""
    v = [m["cpu"].get("forwarder_kernel_share") for m in measures]
    v = [x for x in v if x is not None]
    return f"{statistics.median(v):.2f}" if v else "-"


def table(results):
    c = results.get("coturn")
    if not c:
        return []
    lines = ["edge-relay vs coturn (same C generator, bench/cgen.c; medians; cpu = share of one core)"]
    P = lines.append
    if "error" in c:
        P(f"  error: {c['error']}")
    if "setup" in c:
        P(f"  coturn {turn.TURNSERVER}: {c['setup']['allocations']} allocations with ChannelBind; "
          f"unit before/after: {c.get('unit_before')} / {c.get('unit_after')}")
    med = statistics.median
    P(f"  {'capacity':10s} {'dir':4s} {'relay pps/CPU-s':>15s} {'coturn':>9s}"
      f" {'ratio':>6s} {'fwd cpu r/c':>11s} {'cgen cpu r/c':>12s} {'kernel r/c':>10s}")
    for d, rows in c.get("capacity_pairs", {}).items():
        rc = [r["capacity_pps"] for r, _ in rows if r.get("capacity_pps")]
        cc = [x["capacity_pps"] for _, x in rows if x.get("capacity_pps")]
        ratio = [a["capacity_pps"] / b["capacity_pps"] for a, b in rows
                 if a.get("capacity_pps") and b.get("capacity_pps")]
        P(f"  {'':10s} {d:4s} {med(rc) if rc else 0:15.0f} {med(cc) if cc else 0:9.0f}"
          f" {med(ratio) if ratio else 0:6.2f}"
          f" {med([r['cpu']['forwarder'] for r, _ in rows]):5.2f}/{med([x['cpu']['forwarder'] for _, x in rows]):.2f}"
          f" {med([r['cpu']['cgen'] for r, _ in rows]):6.2f}/{med([x['cpu']['cgen'] for _, x in rows]):.2f}"
          f" {_kshare([r for r, _ in rows]):>5s}/{_kshare([x for _, x in rows])}")
    P(f"  {'fixed rate':10s} {'dir':4s} {'us/pkt relay':>12s} {'coturn':>7s} {'ratio':>6s}   "
      f"{'p50 us direct':>13s} {'relay':>6s} {'coturn':>6s} {'added r-c':>9s}  {'fwd cpu r/c':>11s} {'cgen r/c':>9s}"
      f" {'kernel r/c':>10s}")
    for rate, by_dir in c.get("fixed_rate_rounds", {}).items():
        for d, rounds in by_dir.items():
            rp = med([rd["relay"]["cpu_per_packet_us"] for rd in rounds])
            cpp = med([rd["coturn"]["cpu_per_packet_us"] for rd in rounds])
            p50 = {n: med([rd[n]["latency_us"]["p50"] for rd in rounds]) for n in ("direct", "relay", "coturn")}
            P(f"  {int(rate):10d} {d:4s} {rp:12.2f} {cpp:7.2f} {rp / cpp if cpp else 0:6.2f}   "
              f"{p50['direct']:13.1f} {p50['relay']:6.1f} {p50['coturn']:6.1f} {p50['relay'] - p50['coturn']:9.1f}"
              f"  {med([rd['relay']['cpu']['forwarder'] for rd in rounds]):5.2f}"
              f"/{med([rd['coturn']['cpu']['forwarder'] for rd in rounds]):.2f}"
              f" {med([rd['relay']['cpu']['cgen'] for rd in rounds]):4.2f}"
              f"/{med([rd['coturn']['cpu']['cgen'] for rd in rounds]):.2f}"
              f" {_kshare([rd['relay'] for rd in rounds]):>5s}/{_kshare([rd['coturn'] for rd in rounds])}")
            if all("relay_c" in rd for rd in rounds):
                cc = med([rd["relay_c"]["cpu_per_packet_us"] for rd in rounds])
                lc = med([rd["relay_c"]["latency_us"]["p50"] for rd in rounds])
                P(f"  {'':10s} {d:4s} {cc:12.2f} {'':7s} {cc / cpp if cpp else 0:6.2f}   {'':13s} {lc:6.1f} {'':6s}"
                  f" {lc - p50['coturn']:9.1f}  {med([rd['relay_c']['cpu']['forwarder'] for rd in rounds]):5.2f}"
                  f"       (relay with coalesce_us = {c['params'].get('coalesce_us')})")
    P("")
    return lines
