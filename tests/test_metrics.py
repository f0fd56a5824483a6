"""Counters in shared memory, their Prometheus text, and /metrics matching the traffic sent."""

import json
import os
import subprocess
import sys

import pytest

from edge_relay import metrics
from edge_relay.drops import N_DROPS, Drop
from edge_relay.router import N_STATS
from relayproc import ROOT, Relay, Setup, Traffic, Transceiver, clients_for, http_get, parse_prometheus, value
from waiting import wait_for

REQUIRED = ("edge_relay_packets_total", "edge_relay_bytes_total", "edge_relay_drops_total", "edge_relay_flows",
            "edge_relay_workers_up", "edge_relay_worker_restarts_total", "edge_relay_reloads_total",
            "edge_relay_reload_failures_total", "edge_relay_config_generation", "edge_relay_build_info")


class FakeFlows:
    pending, confirmed = 2, 3


class FakeRouter:
    def __init__(self, k):
        self.flows = FakeFlows()
        self.stats = [k * (i + 1) for i in range(N_STATS)]
        self.drops = [k] * N_DROPS


def test_render_is_strict_prometheus_with_every_drop_reason():
    shared = metrics.SharedCounters(2)
    try:
        metrics.publish(shared.slot(0), FakeRouter(1), generation=1)
        metrics.publish(shared.slot(1), FakeRouter(10), generation=1)
        t = metrics.totals(shared, up={0, 1})
        fams = parse_prometheus(metrics.render(t))
    finally:
        shared.close()
    for name in REQUIRED:
        assert name in fams, name
    assert fams["edge_relay_packets_total"]["type"] == "counter"
    assert fams["edge_relay_flows"]["type"] == "gauge"
    reasons = {dict(k)["reason"] for k in fams["edge_relay_drops_total"]["samples"]}
    assert reasons == {d.label for d in Drop if d != Drop.OK}
    assert value(fams, "edge_relay_drops_total", reason="token_mac") == 11
    assert value(fams, "edge_relay_packets_total", direction="client_in") == 1 + 10
    assert value(fams, "edge_relay_flows", state="confirmed") == 6
    assert value(fams, "edge_relay_workers_up") == 2
    info = dict(next(iter(fams["edge_relay_build_info"]["samples"])))
    assert set(info) == {"version", "python"}


def test_restarted_worker_never_makes_counters_go_backwards():
    shared = metrics.SharedCounters(1)
    try:
        metrics.publish(shared.slot(0), FakeRouter(5), generation=1)
        before = metrics.totals(shared, up={0}).stats
        shared.retire(0)                                      # the worker died
        assert metrics.totals(shared, up=set()).stats == before
        assert shared.read(0)[metrics.HEARTBEAT] == 0
        metrics.publish(shared.slot(0), FakeRouter(1), generation=1)   # its successor starts at zero
        after = metrics.totals(shared, up={0}).stats
        assert all(a == b + k for a, b, k in zip(after, before, FakeRouter(1).stats))
    finally:
        shared.close()


class JournaledRouter(FakeRouter):
    """A router stand-in whose flow table writes a crash journal over `buf`."""

    def __init__(self, buf, restore_seconds=0.0):
        from edge_relay.flows import FlowTable
        from edge_relay.journal import Journal
        super().__init__(0)
        self.flows = FlowTable(max_flows=8)
        journal = Journal(buf)
        journal.attach(self.flows, 100.0)
        journal.restore_seconds = restore_seconds


def test_the_crash_journal_is_published_per_worker_and_its_counters_survive_the_worker():
    from edge_relay import sockaddr
    from edge_relay.journal import HEADER_SIZE, RECORD_SIZE, region_size
    buf = bytearray(region_size(2))         # a journal smaller than the table: the third flow finds it full
    shared = metrics.SharedCounters(2)
    try:
        first = JournaledRouter(buf)
        for i in range(3):
            f = first.flows.open(0, sockaddr.from_tuple((f"198.51.100.{i + 1}", 4000)), 7, 1.0)
            first.flows.confirm(f, 1.0)
        metrics.publish(shared.slot(0), first, generation=1)
        metrics.publish(shared.slot(1), FakeRouter(1), generation=1)      # a worker without a journal
        fams = parse_prometheus(metrics.render(metrics.totals(shared, up={0, 1})))
        assert fams["edge_relay_journal_records"]["type"] == "gauge"
        assert fams["edge_relay_journal_unjournaled_total"]["type"] == "counter"
        assert value(fams, "edge_relay_journal_records", worker="0") == 2
        assert value(fams, "edge_relay_journal_capacity", worker="0") == 2
        assert ("worker", "1") not in {k for key in fams["edge_relay_journal_records"]["samples"] for k in key}
        assert value(fams, "edge_relay_journal_unjournaled_total", reason="full") == 1
        assert value(fams, "edge_relay_journal_unjournaled_total", reason="transceiver_id") == 0
        assert value(fams, "edge_relay_journal_restored_flows", worker="0") == 0
        # worker 0 is SIGKILLed with one of its two records torn; its successor restores the other
        shared.retire(0)
        buf[HEADER_SIZE + RECORD_SIZE + 21] ^= 0xFF
        second = JournaledRouter(buf, restore_seconds=0.0025)
        metrics.publish(shared.slot(0), second, generation=1)
        fams = parse_prometheus(metrics.render(metrics.totals(shared, up={0, 1})))
        assert value(fams, "edge_relay_journal_unjournaled_total", reason="full") == 1      # carried over
        assert value(fams, "edge_relay_journal_restore_records_total", result="restored") == 1
        assert value(fams, "edge_relay_journal_restore_records_total", result="bad") == 1
        assert value(fams, "edge_relay_journal_restore_records_total", result="duplicate") == 0
        assert value(fams, "edge_relay_journal_restore_records_total", result="refused") == 0
        assert value(fams, "edge_relay_journal_reformatted_total") == 0
        assert value(fams, "edge_relay_journal_restored_flows", worker="0") == 1
        assert value(fams, "edge_relay_journal_restore_seconds", worker="0") == 0.0025
        assert value(fams, "edge_relay_journal_records", worker="0") == 1
        # a dead worker's gauges go with it; the counters stay
        shared.retire(0)
        fams = parse_prometheus(metrics.render(metrics.totals(shared, up={1})))
        assert not fams["edge_relay_journal_records"]["samples"]
        assert value(fams, "edge_relay_journal_restore_records_total", result="bad") == 1
        del first, second       # their journals' views of buf
    finally:
        shared.close()


def test_parse_reads_what_render_writes_and_rejects_garbage():
    shared = metrics.SharedCounters(1)
    try:
        text = metrics.render(metrics.totals(shared))
    finally:
        shared.close()
    samples = metrics.parse(text)
    assert samples[("edge_relay_drops_total", (("reason", "draining"),))] == 0
    with pytest.raises(ValueError):
        metrics.parse("edge_relay_x{a=\"1\"} notanumber\n")


def test_strict_parser_rejects_what_prometheus_would():
    for bad in ("x 1", "# TYPE x counter\nx 1\n", "# HELP x h\n# TYPE x counter\nx{a=1} 1\n",
                "# HELP x h\n# TYPE x counter\nx 1\nx 2\n", "# HELP x h\n# TYPE x counter\nx one\n"):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


@pytest.mark.slow
def test_metrics_match_the_traffic_and_stats_prints_them(tmp_path):
    setup = Setup(tmp_path / "r", workers=2)
    relay = Relay(setup)
    tx = Transceiver(setup.keyring, setup.tx_sock)
    clients = clients_for(setup, 6)
    traffic = Traffic(clients, tx)
    try:
        relay.wait_serving()
        assert traffic.run(10, until=lambda: all(c.connected for c in clients))
        traffic.run(1.0)
        # stop sending, then count exactly; an unsolicited datagram from a stranger is one drop
        traffic.quiesce()
        import socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(b"\x80" + bytes(40), setup.public)
        out = sum(c.datagrams_out for c in clients) + 1
        back = sum(c.datagrams_in for c in clients)

        def settled():
            status, body = http_get(setup.url + "/metrics")
            fams = parse_prometheus(body)
            return fams if value(fams, "edge_relay_packets_total", direction="client_in") == out else None

        fams = wait_for(settled, 5, what="counters to reach the traffic sent")
        assert value(fams, "edge_relay_packets_total", direction="to_transceiver") == tx.received == out - 1
        assert value(fams, "edge_relay_packets_total", direction="transceiver_in") == tx.sent
        assert value(fams, "edge_relay_packets_total", direction="to_client") == back == tx.sent
        assert value(fams, "edge_relay_drops_total", reason="unknown_flow") == 1
        assert sum(fams["edge_relay_drops_total"]["samples"].values()) == 1
        assert value(fams, "edge_relay_flows", state="confirmed") == len(clients)
        assert value(fams, "edge_relay_bytes_total", direction="client_in") >= 160 * sum(c.sent for c in clients)
        assert value(fams, "edge_relay_config_generation") == 1

        env = dict(os.environ, PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-m", "edge_relay", "stats", "--config", setup.path],
                           capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert "2/2 up" in r.stdout and f"{len(clients)} confirmed" in r.stdout and "unknown_flow 1" in r.stdout
        capacity = 2 * int(value(fams, "edge_relay_flows_max"))       # two workers, one journal each
        assert f"journal      {len(clients)} of {capacity} records, 0 not journaled (full)" in r.stdout, r.stdout
        r = subprocess.run([sys.executable, "-m", "edge_relay", "stats", "--url", setup.url + "/metrics", "--json"],
                           capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
        assert json.loads(r.stdout)["edge_relay_packets_total{direction=client_in}"] == out
    finally:
        traffic.close()
        relay.kill()
        setup.tx_sock.close()


def test_directory_counters_cover_every_key_the_directory_and_its_redis_client_count():
    import re

    from edge_relay import directory
    src = {name: open(os.path.join(ROOT, "edge_relay", f"{name}.py")).read() for name in ("directory", "resp")}
    R, H = directory.Result, directory.Hold
    counted = {"published", "held", "lookups", "late_replies", R.HIT, R.MISS, R.ERROR,
               R.INVALID, R.TIMEOUT, H.DROP_NEGATIVE, H.DROP_FLOW_FULL,
               H.DROP_TOTAL_FULL, H.DROP_LOOKUPS_FULL}
    assert set(re.findall(r'stats\["(\w+)"\]', src["directory"])) <= counted
    counted |= {f"redis_{k}" for k in re.findall(r'stats\["(\w+)"\]', src["resp"])}
    table = [k for _, _, _, keys in metrics.DIRECTORY_COUNTERS for k in keys]
    assert sorted(table) == sorted(counted)
    total = {k: i + 1 for i, k in enumerate(table)}
    t = metrics.Totals()
    t.extra = [{"dir": dict(total, redis_connected=1)}]
    fams = parse_prometheus(metrics.render(t))
    assert "edge_relay_directory_events_total" not in fams
    assert value(fams, "edge_relay_directory_lookup_results_total", result="hit") == total["hit"]
    assert value(fams, "edge_relay_directory_not_held_total", reason="flow_full") == total["directory_flow_full"]
    assert value(fams, "edge_relay_directory_redis_refused_total", reason="down") == total["redis_refused_down"]
    assert value(fams, "edge_relay_directory_publications_total") == total["published"]
    assert value(fams, "edge_relay_directory_connected") == 1


def test_bytes_help_says_which_directions_count_the_header():
    help_line = next(line for line in metrics.render(metrics.Totals()).splitlines()
                     if line.startswith("# HELP edge_relay_bytes_total"))
    assert "48-octet" in help_line and "to_transceiver" in help_line


def test_process_stats_read_proc_of_another_process():
    import time
    child = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"          # the interpreter runs: its RSS is settled
        cpu, rss, fds, start = metrics.process_stats(child.pid)
        with open(f"/proc/{child.pid}/status") as f:
            vmrss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        # stat's rss and status's VmRSS come from per-CPU counters synced at different times (proc(5))
        assert abs(rss - vmrss) < vmrss / 4 and cpu >= 0
        assert fds == len(os.listdir(f"/proc/{child.pid}/fd"))
        assert abs(start - time.time()) < 60
    finally:
        child.stdin.close()
        child.wait(10)
        child.stdout.close()
    assert metrics.process_stats(child.pid) is None           # reaped: no /proc entry


def test_process_open_fds_counts_each_open_file():
    cpu, _, before, _ = metrics.process_stats(os.getpid())
    files = [open(os.devnull) for _ in range(3)]
    try:
        assert metrics.process_stats(os.getpid())[2] == before + 3
        for _ in range(100000):         # burn CPU until a clock tick shows (bounded)
            if metrics.process_stats(os.getpid())[0] > cpu:
                break
            sum(range(10000))
        assert metrics.process_stats(os.getpid())[0] > cpu
    finally:
        for f in files:
            f.close()


def test_socket_drops_counts_datagrams_the_full_receive_buffer_refused():
    import socket
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_DGRAM) as rx, socket.socket(family, socket.SOCK_DGRAM) as tx:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            rx.bind((host, 0))
            inode = os.fstat(rx.fileno()).st_ino
            assert metrics.socket_drops({inode}) == {inode: 0}
            for _ in range(200):                  # never read: the buffer fills, the kernel drops the rest
                tx.sendto(bytes(1000), rx.getsockname())
            dropped = metrics.socket_drops({inode})[inode]
            received = 0
            rx.setblocking(False)
            while True:
                try:
                    rx.recv(2048)
                except BlockingIOError:
                    break
                received += 1
            assert dropped > 0 and dropped + received == 200
            t = metrics.Totals()
            t.sockets = [("l0w0", inode)]
            fams = parse_prometheus(metrics.render(t))
            assert value(fams, "edge_relay_socket_drops_total", socket="l0w0") == dropped
