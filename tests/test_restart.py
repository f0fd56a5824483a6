"""`systemctl restart` is a hand-over: SIGTERM refuses nothing, and flows, sockets and a drain pass to the next process.

The test plays systemd with test_systemd_protocol's FakeSystemd (notify socket and fd store) and starts
the next process on the stored fds, as `systemctl restart` does.
"""

import os
import signal
import sys
import time

import pytest

from relayproc import Relay, Setup, Traffic, Transceiver, clients_for, http_get, metrics, run_args, value, wait_for
from test_systemd_protocol import WRAPPER, FakeSystemd

pytestmark = pytest.mark.slow


def successor(setup, sysd, env):
    """The next process, started on everything in the fake fd store (as systemd does)."""
    names = sorted(sysd.store)
    fds = [sysd.store[n][0] for n in names]
    return Relay(setup, env=env, pass_fds=fds,
                 args=[sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), ":".join(names),
                       *run_args(setup)[1:]])


@pytest.fixture
def systemd(tmp_path):
    """(setup, sysd, env, relays, traffic-maker); every relay started is killed afterwards."""
    setup = Setup(tmp_path / "r", workers=2, drain=3600)    # a drain would outlast the test by far
    sysd = FakeSystemd(str(tmp_path / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=sysd.path)
    relays, traffics = [], []
    tx = Transceiver(setup.keyring, setup.tx_sock)

    def traffic(clients):
        t = Traffic(clients, tx, extra={sysd.sock: sysd.pump})
        traffics.append(t)
        return t

    yield setup, sysd, env, relays, traffic
    for t in traffics:
        t.close()
    for r in relays:
        r.kill()
    sysd.close()
    setup.tx_sock.close()


def test_sigterm_hands_over_at_once_and_a_call_placed_meanwhile_connects(systemd):
    setup, sysd, env, relays, make_traffic = systemd
    clients = clients_for(setup, 4)
    newcomer = clients_for(setup, 1)[0]
    newcomer.paused = True              # it sends one Binding Request, no retransmission
    traffic = make_traffic(clients + [newcomer])
    first = Relay(setup, env=env)
    relays.append(first)
    assert traffic.run(20, until=lambda: sysd.seen("READY") or first.proc.poll() is not None)
    assert first.proc.poll() is None, first.log()
    assert traffic.run(10, until=lambda: all(c.connected for c in clients))
    traffic.run(0.5)

    mark = len(sysd.messages)
    first.signal(signal.SIGTERM)
    newcomer.send_check(time.monotonic())     # reaches a stopping worker, or waits in the socket buffer
    # drain_seconds is 3600: only a stop that does not drain ends within the test
    assert traffic.run(15, until=lambda: first.proc.poll() is not None)
    assert first.wait(1) == 0, first.log()
    assert sysd.seen("STOPPING", "1", since=mark) and sysd.seen("BARRIER", "1", since=mark)
    assert {"flows0", "flows1"} <= set(sysd.store)
    log = first.log()
    assert "serving -> stopping" in log and "refusing new flows" not in log, log

    second = successor(setup, sysd, env)
    relays.append(second)
    mark = len(sysd.messages)
    assert traffic.run(20, until=lambda: sysd.seen("READY", since=mark) or second.proc.poll() is not None)
    assert second.proc.poll() is None, second.log()
    assert traffic.run(10, until=lambda: newcomer.connected)
    assert newcomer.datagrams_out == 1        # its one request was served, not refused as DRAINING
    traffic.run(1.0)
    traffic.quiesce()
    assert sum(c.sent for c in clients) == sum(c.received for c in clients) > 0
    m = metrics(setup)
    assert value(m, "edge_relay_drops_total", reason="draining") == 0
    assert value(m, "edge_relay_drops_total", reason="unknown_flow") == 0
    assert value(m, "edge_relay_flows", state="confirmed") == len(clients) + 1


def test_a_drain_outlives_a_restart_until_cancelled(systemd):
    setup, sysd, env, relays, _ = systemd

    def soon(predicate, what):
        """Bounded wait that keeps the fake systemd reading (no calls here to wake a Traffic loop)."""
        return wait_for(lambda: (sysd.pump(), predicate())[1], 20, what=what)

    first = Relay(setup, env=env)
    relays.append(first)
    soon(lambda: sysd.seen("READY") or first.proc.poll() is not None, "READY=1")
    assert first.proc.poll() is None, first.log()
    first.signal(signal.SIGTTOU)
    soon(lambda: http_get(setup.url + "/healthz") == (503, "draining\n"), "/healthz draining")
    soon(lambda: "drain" in sysd.store, "the drain record in the fd store")
    first.signal(signal.SIGTERM)
    soon(lambda: first.proc.poll() is not None, "the first process to exit")
    assert first.wait(1) == 0, first.log()

    mark = len(sysd.messages)
    second = successor(setup, sysd, env)
    relays.append(second)
    soon(lambda: sysd.seen("READY", since=mark) or second.proc.poll() is not None, "READY=1 again")
    assert second.proc.poll() is None, second.log()
    assert http_get(setup.url + "/healthz") == (503, "draining\n")
    assert "still draining" in second.log()
    second.signal(signal.SIGTTIN)
    soon(lambda: http_get(setup.url + "/healthz") == (200, "ok\n"), "/healthz ok after the cancel")
    soon(lambda: "drain" not in sysd.store, "the drain record removed")


def test_the_startup_bench_runs_and_names_every_step(tmp_path):
    """`make bench-startup` (bench/startup.py) end to end, once, small: no figure is checked, only that
    it restarts a relay, sees it forward again and accounts for every step."""
    import json
    import subprocess

    from relayproc import ROOT
    out = tmp_path / "startup.json"
    done = subprocess.run([sys.executable, "-m", "bench.startup", "--runs", "1", "--flows", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert run["exit_status"] == 0 and run["flows"] == 3
    from bench.startup import STEPS
    assert set(run["steps_ms"]) == set(STEPS)
    assert run["steps_ms"]["interpreter"] < run["steps_ms"]["fork"] < run["steps_ms"]["first-forwarded"]
