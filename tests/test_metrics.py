"""Counters in shared memory, their Prometheus text, and /metrics matching the traffic sent."""

import json
import os
import subprocess
import sys

import pytest

from edge_relay import metrics
from edge_relay.drops import N_DROPS, Drop
from edge_relay.router import N_STATS
from relayproc import (ROOT, Relay, Setup, Traffic, Transceiver, clients_for, http_get, parse_prometheus,
                       value, wait_for)

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
        wait_for(lambda: http_get(setup.url + "/healthz")[0] == 200 or relay.proc.poll() is not None, 20)
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
        r = subprocess.run([sys.executable, "-m", "edge_relay", "stats", "--url", setup.url + "/metrics", "--json"],
                           capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
        assert json.loads(r.stdout)["edge_relay_packets_total{direction=client_in}"] == out
    finally:
        traffic.close()
        relay.kill()
        setup.tx_sock.close()
