"""The operator's drain (edge-relay drain): in a worker with the clock passed in, then on a running relay."""

import signal
import subprocess
import sys
import time

import pytest

from relayproc import ROOT, Relay, Setup, Traffic, Transceiver, clients_for, http_get, metrics, value, wait_for
from tests.relayharness import Harness


@pytest.fixture
def clocked(tmp_path):
    t = [100.0]
    h = Harness(tmp_path, clock=lambda: t[0])
    yield h, t
    h.close()


def test_new_flows_are_accepted_until_the_drain_refuses_them_then_counted(clocked):
    h, t = clocked
    early, late = h.voice_client(), h.voice_client()
    h.worker.refuse_new_flows(110.0)
    assert h.connect(early, t[0])                  # the grace: routing still sends calls here
    t[0] = 110.0
    h.worker.check_drain(t[0])
    assert not h.connect(late, t[0])
    assert h.drops() == {"DRAINING": 1}
    early.send_media(t[0])                         # an existing flow keeps forwarding
    h.settle()
    early.pump(t[0])
    assert early.received == 1
    h.worker.refuse_new_flows(None)                # cancelled
    assert h.connect(late, t[0])
    assert h.drops() == {"DRAINING": 1}
    assert not h.worker.stopping                   # a drain never ends the worker


def test_a_drain_whose_time_has_passed_refuses_at_once(clocked):
    h, t = clocked
    h.worker.refuse_new_flows(t[0] - 1)            # e.g. restored from the fd store after a restart
    assert not h.connect(h.voice_client(), t[0])
    assert h.drops() == {"DRAINING": 1}


def test_sigterm_to_a_worker_stops_it_without_refusing_anything(clocked):
    h, t = clocked
    h.worker.handle_signal(signal.SIGTERM)
    assert h.worker.stopping and not h.router.draining
    assert h.connect(h.voice_client(), t[0])       # what it still reads before leaving is served
    assert h.drops() == {}


# -- on a running relay ------------------------------------------------------------------------

def edge_relay(*args):
    return subprocess.Popen([sys.executable, "-m", "edge_relay", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(traffic, proc, timeout=60):
    """Keep the calls going while the command runs; its (exit status, stdout + stderr)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the command did not finish"
        traffic.run(0.05)       # in slices: with every client paused, one long run would not look
    out, err = proc.communicate()
    return proc.returncode, out + err


@pytest.mark.slow
def test_drain_refuses_new_flows_keeps_the_old_ones_and_cancel_undoes_it(tmp_path):
    # drain_seconds = 0: refusing starts at once (the grace is the worker test's business above);
    # idle_timeout at its floor so that --wait sees the flows end
    setup = Setup(tmp_path / "r", workers=2, drain=0,
                  sections={"probes": {"enabled": False}, "limits": {"idle_timeout": 6}})
    relay = Relay(setup)
    tx = Transceiver(setup.keyring, setup.tx_sock)
    clients = clients_for(setup, 4)
    newcomer = clients_for(setup, 1)[0]
    newcomer.paused = True                         # it sends only the checks the test sends
    traffic = Traffic(clients + [newcomer], tx)
    try:
        wait_for(lambda: http_get(setup.url + "/healthz")[0] == 200 or relay.proc.poll() is not None, 20,
                 what="/healthz 200")
        assert traffic.run(10, until=lambda: all(c.connected for c in clients))
        code, out = finish(traffic, edge_relay("drain", "--config", setup.path))
        assert code == 0 and "is draining" in out, out
        assert http_get(setup.url + "/healthz") == (503, "draining\n")
        assert http_get(setup.url + "/readyz") == (503, "draining\n")
        assert value(metrics(setup), "edge_relay_ready") == 0
        before = sum(c.received for c in clients)
        traffic.run(0.5)
        assert sum(c.received for c in clients) > before        # existing flows keep forwarding
        newcomer.send_check(time.monotonic())
        assert traffic.run(10, until=lambda: value(metrics(setup), "edge_relay_drops_total",
                                                   reason="draining") == 1)
        assert not newcomer.connected
        code, out = finish(traffic, edge_relay("drain", "--config", setup.path))     # again: idempotent
        assert code == 0, out

        for c in clients:                          # the calls end; --wait sees the last flow go
            c.paused = True
        code, out = finish(traffic, edge_relay("drain", "--wait", "--config", setup.path))
        assert code == 0 and "no flow left" in out, out

        code, out = finish(traffic, edge_relay("drain", "--cancel", "--config", setup.path))
        assert code == 0 and "accepts new flows again" in out, out
        assert http_get(setup.url + "/healthz") == (200, "ok\n")
        newcomer.send_check(time.monotonic())
        assert traffic.run(10, until=lambda: newcomer.connected)
        assert value(metrics(setup), "edge_relay_drops_total", reason="draining") == 1
        log = relay.log()
        assert "serving -> draining" in log and "draining -> serving" in log, log
    finally:
        traffic.close()
        relay.kill()
        setup.tx_sock.close()


def test_drain_fails_when_no_relay_took_it(tmp_path):
    from relayproc import free_port
    setup = Setup(tmp_path / "r", workers=1)        # written, never started
    for args in (["--config", setup.path], ["--url", f"http://127.0.0.1:{free_port()}/status"],
                 ["--cancel", "--config", setup.path]):
        proc = edge_relay("drain", *args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "is the relay running?" in err, (args, out, err)
    setup.tx_sock.close()
