"""The supervisor as a real process: several workers, a killed worker, reloads, stopping."""

import signal
import time

import pytest

from edge_relay import keys
from relayproc import Traffic, Transceiver, clients_for, http_get, metrics, value
from waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def started(start_relay):
    """start(workers=..) -> (setup, relay, tx): start_relay's serving relay and its transceiver."""
    def start(workers=2, drain=0.5):
        setup, relay = start_relay(workers=workers, drain=drain)
        return setup, relay, Transceiver(setup.keyring, setup.tx_sock)
    return start


def all_connected(clients):
    return lambda: all(c.connected for c in clients)


def test_workers_are_forked_pinned_and_serve(started):
    setup, relay, tx = started(workers=2)
    pids = wait_for(lambda: len(relay.worker_pids()) == 2 and relay.worker_pids(), 10, what="2 workers")
    import os
    cpus = [os.sched_getaffinity(pid) for pid in pids.values()]
    assert all(len(c) == 1 for c in cpus), cpus
    clients = clients_for(setup, 8)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=all_connected(clients))
        traffic.run(0.5)
        traffic.quiesce()
        assert sum(c.sent for c in clients) == sum(c.received for c in clients) > 0
    finally:
        traffic.close()
    m = metrics(setup)
    assert value(m, "edge_relay_workers_up") == 2


def test_sigkill_one_worker_loses_no_flow_of_the_others(started):
    setup, relay, tx = started(workers=2)
    base = setup.ports["internal_port"]
    clients = clients_for(setup, 16)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=all_connected(clients))
        traffic.run(0.5)
        worker_of = {c: tx.worker_of[tuple(c.address)] - base for c in clients}
        victims = [c for c in clients if worker_of[c] == 0]
        others = [c for c in clients if worker_of[c] != 0]
        assert victims and others, f"reuseport put every client on one worker: {worker_of}"
        pid = relay.worker_pids()[0]
        before = {c: c.received for c in victims}
        import os
        os.kill(pid, signal.SIGKILL)
        # the others keep flowing while worker 0 is dead and restarted

        def restarted():
            return relay.worker_pids().get(0) not in (None, pid)
        assert traffic.run(10, until=restarted)
        wait_for(lambda: value(metrics(setup), "edge_relay_workers_up") == 2, 10, what="workers_up 2")
        m = metrics(setup)
        assert value(m, "edge_relay_worker_restarts_total") == 1
        # the victims' next consent check opens their flows again on the new worker
        now = time.monotonic()
        for c in victims:
            c.next_consent = now
        traffic.run(1.5)
        traffic.quiesce()
        lost_others = sum(c.sent - c.received for c in others)
        print(f"\nothers: sent {sum(c.sent for c in others)} received {sum(c.received for c in others)}; "
              f"victims resumed: {[c.received - before[c] for c in victims]}")
        drops = {labels: n for labels, n in metrics(setup)["edge_relay_drops_total"]["samples"].items() if n}
        assert lost_others == 0, f"relay drops: {drops}; per client: {[(c.sent, c.received) for c in others]}"

        assert all(c.received - before[c] >= 40 for c in victims)   # >= 0.8 s of media after the restart
    finally:
        traffic.close()
    log = relay.log()
    assert "died (signal SIGKILL)" in log


def test_sighup_adds_a_signing_key_and_refuses_a_broken_config(started):
    setup, relay, tx = started(workers=2)
    first = clients_for(setup, 4)
    traffic = Traffic(first, tx)
    try:
        assert traffic.run(10, until=all_connected(first))
        # rotation: the transceivers learn key 2 first (still signing with 1), then the relay
        # signs with it, then the transceivers do
        keys.write_key_file(setup.key_dir, 2)
        assert keys.load_dir(setup.key_dir).signing.key_id == 1     # a new key alone changes nothing
        ring = keys.load_dir(setup.key_dir, 2)
        tx.set_keyring(keys.load_dir(setup.key_dir, 1))
        setup.write(signing_key_id=2)
        relay.signal(signal.SIGHUP)
        assert traffic.run(10, until=lambda: value(metrics(setup), "edge_relay_workers_config_generation") == 2)
        assert value(metrics(setup), "edge_relay_reloads_total") == 1
        tx.set_keyring(ring)
        assert value(metrics(setup), "edge_relay_config_generation") == 2
        new_key = clients_for(setup, 2, keyring=ring)                       # tokens by key 2
        old_key = clients_for(setup, 2, keyring=keys.load_dir(setup.key_dir, 1))   # still key 1
        for c in new_key + old_key:
            traffic.add(c)
        assert traffic.run(10, until=all_connected(new_key + old_key))
        traffic.run(0.5)
        # a broken config is refused; the running one keeps serving
        with open(setup.path, "a") as f:
            f.write("\n[limits]\nidle_timeout = -1\n")
        relay.signal(signal.SIGHUP)
        assert traffic.run(10, until=lambda: value(metrics(setup), "edge_relay_reload_failures_total") == 1)
        traffic.run(0.5)
        traffic.quiesce()
        everyone = first + new_key + old_key
        assert all(c.received > 0 for c in everyone)
        assert sum(c.sent for c in everyone) == sum(c.received for c in everyone)
        m = metrics(setup)
        assert value(m, "edge_relay_reloads_total") == 1
        assert value(m, "edge_relay_config_generation") == 2
        assert value(m, "edge_relay_workers_up") == 2
    finally:
        traffic.close()
    refused = [line for line in relay.log().splitlines() if "reload refused" in line]
    assert len(refused) == 1 and "limits.idle_timeout" in refused[0], refused


def test_sigterm_stops_at_once_without_draining_then_exit_0(started):
    """SIGTERM hands over (tests/test_restart.py); it never drains, however long drain_seconds is."""
    setup, relay, tx = started(workers=2, drain=3600.0)
    clients = clients_for(setup, 2)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=all_connected(clients))
        assert http_get(setup.url + "/healthz") == (200, "ok\n")
        relay.signal(signal.SIGTERM)
        assert traffic.run(15, until=lambda: relay.proc.poll() is not None)
    finally:
        traffic.close()
    assert relay.wait(5) == 0, relay.log()
    log = relay.log()
    assert "serving -> stopping" in log and "stopped" in log
    assert "refusing new flows" not in log


def test_management_http_is_strict(started):
    import socket
    setup, relay, tx = started(workers=1)
    assert http_get(setup.url + "/nope")[0] == 404
    port = setup.ports["management_port"]

    def raw(request):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(request)
            data = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:    # closed with our unread bytes: the kernel resets
                    return data or b"RESET"
                if not chunk:
                    return data
                data += chunk

    assert raw(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 405")
    too_big = raw(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
    assert too_big.startswith(b"HTTP/1.0 400") or too_big == b"RESET"
    assert raw(b"garbage\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw(b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\nok\n")


def test_a_crash_loop_is_reported_and_backed_off(started):
    setup, relay, tx = started(workers=2)
    import os
    killed = set()
    for _ in range(5):
        pid = wait_for(lambda: (p := relay.worker_pids().get(0)) not in (None, *killed) and p, 20,
                       what="worker 0 restarted")
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    wait_for(lambda: value(metrics(setup), "edge_relay_workers_crash_looping") == 1, 10, what="crash loop")
    m = metrics(setup)
    assert value(m, "edge_relay_worker_restarts_total") == 4
    assert value(m, "edge_relay_ready") == 0
    assert http_get(setup.url + "/healthz")[0] == 503
    assert "crash loop" in relay.log()
    # backed off, not spinning: the next start is 1.6 s away; then it serves again
    wait_for(lambda: value(metrics(setup), "edge_relay_workers_up") == 2, 10, what="worker 0 back")
    assert value(metrics(setup), "edge_relay_worker_restarts_total") == 5


def test_sighup_with_a_new_listener_hands_flows_to_new_workers(started):
    setup, relay, tx = started(workers=1)
    clients = clients_for(setup, 3)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=lambda: all(c.connected for c in clients))
        old_pid = relay.worker_pids()[0]
        from relayproc import free_port
        extra = free_port()
        setup.sections["listeners"] = [{"address": "127.0.0.1", "port": extra}]      # a second listener
        setup.write()
        relay.signal(signal.SIGHUP)
        assert traffic.run(10, until=lambda: relay.worker_pids().get(0) not in (None, old_pid))
        wait_for(lambda: value(metrics(setup), "edge_relay_workers_up") == 1, 10, what="new worker up")
        from edge_relay import demo
        from relayproc import CountingClient
        ufrag, password = demo.mint_session(setup.keyring, 1, time.time())
        newcomer = CountingClient(("127.0.0.1", extra), ufrag, password)
        traffic.add(newcomer)
        assert traffic.run(10, until=lambda: newcomer.connected)
        traffic.run(0.5)
        traffic.quiesce()
        assert sum(c.sent for c in clients) == sum(c.received for c in clients)
        assert newcomer.received > 0
        m = metrics(setup)
        assert value(m, "edge_relay_drops_total", reason="unknown_flow") == 0
        assert value(m, "edge_relay_config_generation") == 2
    finally:
        traffic.close()
