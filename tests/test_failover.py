"""Transceiver failover: probes mark a dead transceiver down, its flows go to the backup.

First a deterministic run with the relay harness and a fake clock (the
router's decisions), then the real thing end to end: `edge-relay run`, a
primary and a backup demo transceiver (processes) sharing session state
through a throwaway redis-server, a voice call, SIGKILL of the primary mid
call; the media gap is printed (target < 1 s at a 250 ms probe interval).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from edge_relay import demo, header, router as router_mod
from edge_relay.demo import state as demo_state
from edge_relay.worker import Worker, flow_table
from redisserver import redis_server
from relayharness import Harness
from relayproc import ROOT, CountingClient, Relay, Setup, free_port, http_get, parse_prometheus


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(tmp_path, clock):
    return Harness(tmp_path, transceivers={1: "demo", 2: "demo"}, backups={1: 2}, clock=clock,
                   sections={"probes": {"enabled": True, "interval": 0.25}})


def tick(h, clock, seconds, step=0.05):
    """Advance the fake clock, running probes and answering them."""
    end = clock.t + seconds
    while clock.t < end:
        clock.t += step
        h.worker.run_timers(clock.t)
        h.settle()


def media_round(h, vc, clock):
    before = vc.received
    vc.send_media(clock.t)
    h.settle()
    vc.pump(clock.t)
    return vc.received - before


def test_probes_fail_over_and_only_new_flows_return(tmp_path):
    clock = Clock()
    h = make(tmp_path, clock)
    try:
        tick(h, clock, 1.0)
        prober = h.router.prober
        assert prober.is_up(1) and prober.is_up(2)
        assert prober.health[1].srtt is not None
        vc = h.voice_client(tx_id=1)
        assert h.connect(vc, clock.t)
        assert media_round(h, vc, clock) == 1
        flow = next(iter(h.router.flows))
        assert flow.transceiver == 1

        primary = h.demos.pop(1)              # the primary stops answering anything
        tick(h, clock, 1.5)
        assert not prober.is_up(1)
        assert h.router.redirect == {1: 2}
        h.drops()
        # the flow's next datagram goes to the backup, flagged, and the echo comes back
        assert media_round(h, vc, clock) == 1
        assert flow.transceiver == 2
        assert flow.route[5] & header.FLAG_FAILOVER
        assert any(h.demos[2].clients.values())            # the backup saw FLAG_FAILOVER
        assert h.router.stats[router_mod.FLOWS_FAILED_OVER] == 1
        # a consent check still naming the primary goes to the owner, not as an ICE restart
        vc.send_check(clock.t)
        h.settle()
        vc.pump(clock.t)
        assert vc.check_failures == 0 and flow.transceiver == 2 and flow.restart_to is None
        # a new session for the primary opens on the backup while it is down
        vc2 = h.voice_client(tx_id=1)
        assert h.connect(vc2, clock.t)
        assert [f.transceiver for f in h.router.flows if f is not flow] == [2]

        h.demos[1] = primary                  # back up
        tick(h, clock, 1.5)
        assert prober.is_up(1) and h.router.redirect == {}
        assert media_round(h, vc, clock) == 1
        assert flow.transceiver == 2          # moved flows stay with the backup
        vc3 = h.voice_client(tx_id=1)
        assert h.connect(vc3, clock.t)
        newest = [f for f in h.router.flows if f.transceiver == 1]
        assert len(newest) == 1               # only the new flow went to the primary
        lines = h.router.prober.render({1: "primary", 2: "backup"})
        assert 'edge_relay_transceiver_transitions_total{transceiver="primary"} 2' in lines
    finally:
        h.close()


def fail_over_call(h, clock, extra_tx=None):
    """A call to transceiver 1, whose primary then stops answering: its flow moves to the backup.

    Returns the voice clients: the failed-over one, and one of `extra_tx`'s own if asked for.
    """
    tick(h, clock, 0.5)
    vcs = [h.voice_client(tx_id=1)] + ([h.voice_client(tx_id=extra_tx)] if extra_tx else [])
    assert all([h.connect(vc, clock.t) for vc in vcs])
    h.demos.pop(1)
    tick(h, clock, 1.5)
    assert media_round(h, vcs[0], clock) == 1
    return vcs


def test_failover_flag_survives_a_reload_rebuild(tmp_path):
    clock = Clock()
    h = make(tmp_path, clock)
    try:
        vc, = fail_over_call(h, clock)
        flow = next(iter(h.router.flows))
        h.router.configure(h.router.keyring, h.router.transceivers, h.router.policy, {1: 2})
        # a second reload before the flow's next datagram rebuilt its prefix keeps the flag too
        h.router.configure(h.router.keyring, h.router.transceivers, h.router.policy, {1: 2})
        assert media_round(h, vc, clock) == 1
        assert flow.transceiver == 2 and flow.route[5] & header.FLAG_FAILOVER
    finally:
        h.close()


def test_failover_flag_survives_a_restart_through_the_snapshot(tmp_path):
    """A restart hands the flows over as a snapshot (supervisor): the moved flow keeps FLAG_FAILOVER."""
    clock = Clock()
    h = make(tmp_path, clock)
    try:
        vc, other = fail_over_call(h, clock, extra_tx=2)   # other: the backup's own client, never flagged
        data = h.worker.snapshot()
        # the next worker, as the supervisor starts it: a fresh table restored from the snapshot
        flows = flow_table(h.cfg)
        assert flows.restore(data, clock.t) == 2
        h.worker = Worker(h.cfg, h.keyring, h.listen_socks, h.internal_sock, h.log, clock=clock, flows=flows)
        h.router = h.worker.router
        backup = h.demos[2]
        backup.clients.clear()
        assert media_round(h, vc, clock) == 1 and media_round(h, other, clock) == 1
        assert backup.clients == {vc.sock.getsockname()[:2]: True, other.sock.getsockname()[:2]: False}
        assert sorted(f.transceiver for f in h.router.flows) == [2, 2]
    finally:
        h.close()


# -- end to end -------------------------------------------------------------------

TX_SCRIPT = """
import sys
from edge_relay import demo
demo.serve_stateful(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
"""


def failover_sections(backup_port):
    return {"transceivers": [{"id": 2, "address": "127.0.0.1", "port": backup_port}],
            "probes": {"interval": 0.25}}


def start_transceiver(key_dir, tx_id, port, redis_address, log_path):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-c", TX_SCRIPT, key_dir, str(tx_id), str(port),
                             redis_address],
                            env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, stdout=log, stderr=log)


@pytest.mark.slow
def test_kill_the_primary_mid_call_the_call_continues_through_the_backup(tmp_path):
    with redis_server(tmp_path) as redis:
        backup_port = free_port()
        setup = Setup(tmp_path, workers=2, sections=failover_sections(backup_port))
        primary_port = setup.ports["transceiver_port"]
        setup.tx_sock.close()             # the primary is a process of its own
        with open(setup.path) as f:
            text = f.read()
        # the primary names its backup
        text = text.replace(f"port = {primary_port}\n", f"port = {primary_port}\nbackup = 2\n", 1)
        with open(setup.path, "w") as f:
            f.write(text)
        procs = [start_transceiver(setup.key_dir, 1, primary_port, redis.address, tmp_path / "primary.log"),
                 start_transceiver(setup.key_dir, 2, backup_port, redis.address, tmp_path / "backup.log")]
        relay = Relay(setup)
        try:
            relay.wait_serving()
            ufrag, password = demo.mint_session(setup.keyring, 1, time.time())
            vc = CountingClient(setup.public, ufrag, password)
            killed = {}

            def on_second(elapsed):
                if elapsed >= 2.0 and not killed:
                    procs[0].send_signal(signal.SIGKILL)
                    killed["at"] = time.monotonic()
            demo.run_clients([vc], 6.0, on_second)
            assert vc.connected
            assert killed, "the primary was not killed"
            before = [t for t in vc.arrivals if t <= killed["at"]]
            after = [t for t in vc.arrivals if t > killed["at"]]
            assert before and after, "the call did not resume through the backup"
            gap = after[0] - before[-1]
            print(f"\nfailover gap: {gap * 1000:.0f} ms of media lost between the last echo from the "
                  f"primary and the first from the backup (probe interval 0.25 s); "
                  f"{len(after)} echoes after the failover")
            status, body = http_get(setup.url + "/metrics")
            fams = parse_prometheus(body)
            ups = fams["edge_relay_transceiver_up"]["samples"]
            assert ups[(("transceiver", "tx1"),)] == 0 and ups[(("transceiver", "tx2"),)] == 1
            events = fams["edge_relay_flow_events_total"]["samples"]
            assert events[(("event", "failed_over"),)] >= 1
            assert "transceiver tx1 is down" in relay.log()
            # the backup loaded the session from Redis and continued its media counters
            state = demo_state.DemoState(redis.address)
            try:
                counters = state.media(ufrag)
                owner = state.claim(ufrag, "2")
            finally:
                state.close()
            assert owner == "2"
            assert counters.get("rtp_in", 0) >= len(vc.arrivals) - 15
        finally:
            relay.kill()
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=10)


def test_router_accounts_for_every_datagram_while_failing_over():
    """The fuzz invariant of test_router_fuzz with a transceiver down and its flows moving."""
    import random

    from edge_relay import probes, sockaddr
    from test_router_fuzz import CASES, make_router, mutate, seeds
    rng = random.Random(8)
    r = make_router()
    r.prober = probes.Prober([1, 2], now=0.0)
    r.configure(r.keyring, r.transceivers, r.policy, {1: 2})
    wall = time.time()
    base = seeds(wall)
    addrs = [sockaddr.from_tuple((f"198.51.100.{i}", 1000 + i)) for i in range(8)]
    for case in range(CASES):
        if case == CASES // 3:
            r.prober.health[1].up = False          # as after three missed probes
            r._reroute()
        if case == 2 * CASES // 3:
            r.prober.health[1].up = True
            r._reroute()
        n = rng.randrange(1, 9)
        views = [memoryview(mutate(rng, rng.choice(base)) if rng.random() < 0.7 else rng.choice(base))
                 for _ in range(n)]
        drops_before, sent_before = sum(r.drops), r.stats[router_mod.TO_TX_PACKETS]
        r.from_clients(rng.randrange(2), views, [rng.choice(addrs) for _ in range(n)], n, case * 0.01,
                       int(wall * 1000))
        assert (sum(r.drops) - drops_before) + (r.stats[router_mod.TO_TX_PACKETS] - sent_before) == n
        for _, head, *_ in r.to_transceivers:
            assert head[5] in (0, header.FLAG_FAILOVER)
        r.clear_output()
    assert r.stats[router_mod.FLOWS_FAILED_OVER] > 0


def test_reload_applies_probe_settings_and_backups(tmp_path):
    from edge_relay import config as config_mod  # the harness has no file: reload a parsed config
    clock = Clock()
    h = make(tmp_path, clock)
    try:
        tick(h, clock, 0.5)
        data = dict(h.config_data, probes={"enabled": True, "interval": 0.5, "down_after": 2})
        data["transceivers"] = [dict(t) for t in data["transceivers"]]
        data["transceivers"][0].pop("backup")
        cfg = config_mod.parse(data, tmp_path)
        h.worker.config_path = "unused"
        orig = config_mod.load
        config_mod.load = lambda path: cfg
        try:
            assert h.worker.reload()
        finally:
            config_mod.load = orig
        assert h.router.prober.interval == 0.5 and h.router.prober.down_after == 2
        assert h.router.backups == {}
        h.demos.pop(1)
        tick(h, clock, 2.0)
        assert not h.router.prober.is_up(1) and h.router.redirect == {}    # no backup: nowhere to go
    finally:
        h.close()
