"""The test plays systemd: notify socket, watchdog, fd store, and a restart that loses no packet.

Like PID 1 it reads sd_notify datagrams (with SCM_RIGHTS fds) from an
AF_UNIX datagram socket named by $NOTIFY_SOCKET, keeps an fd store (FDSTORE=1
adds, FDSTOREREMOVE=1 removes, BARRIER=1 is answered by closing its fd), and
starts the next process with the stored fds at 3.. and LISTEN_PID set to the
pid that execs the relay (a small wrapper, as systemd's own exec does).
"""

import os
import signal
import socket
import sys

import pytest

from bench.fakesystemd import FakeSystemd
from relayproc import ROOT, Relay, Setup, Traffic, Transceiver, clients_for, metrics, run_args, value

pytestmark = pytest.mark.slow

# Moves the fds it was given to 3.. in order, sets LISTEN_* for its own pid, execs the relay.
WRAPPER = r"""
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")] if sys.argv[1] else []
names = sys.argv[2]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds) + 10) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
os.execv(sys.executable, [sys.executable] + sys.argv[3:])
"""


def test_notify_watchdog_fdstore_and_a_restart_without_loss(tmp_path):
    setup = Setup(tmp_path / "r", workers=2, drain=0.5)
    sysd = FakeSystemd(str(tmp_path / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=sysd.path, WATCHDOG_USEC="1000000")
    tx = Transceiver(setup.keyring, setup.tx_sock)
    clients = clients_for(setup, 6)
    traffic = Traffic(clients, tx, extra={sysd.sock: sysd.pump})
    relays = []
    try:
        first = Relay(setup, env=env)
        relays.append(first)
        assert traffic.run(20, until=lambda: sysd.seen("READY") or first.proc.poll() is not None)
        assert first.proc.poll() is None, first.log()
        ready = next(m for m in sysd.messages if "READY" in m)
        assert "2/2 workers up" in ready["STATUS"]
        assert sorted(sysd.store) == ["i0", "i1", "l0w0", "l0w1"]
        assert all(len(fds) == 1 for fds in sysd.store.values())
        assert traffic.run(10, until=lambda: all(c.connected for c in clients))
        assert traffic.run(5, until=lambda: sysd.seen("WATCHDOG", "1") and
                           any("flows" in m.get("STATUS", "") and m.get("READY") is None
                               for m in sysd.messages))

        mark = len(sysd.messages)
        first.signal(signal.SIGHUP)
        assert traffic.run(10, until=lambda: sysd.seen("READY", since=mark))
        reloading = [i for i, m in enumerate(sysd.messages) if i >= mark and "RELOADING" in m]
        ready_again = [i for i, m in enumerate(sysd.messages) if i >= mark and "READY" in m]
        assert reloading and reloading[0] < ready_again[0]
        assert int(sysd.messages[reloading[0]]["MONOTONIC_USEC"]) > 0

        # systemctl restart: SIGTERM, drain, flows to the fd store, then a new process
        mark = len(sysd.messages)
        first.signal(signal.SIGTERM)
        assert traffic.run(15, until=lambda: first.proc.poll() is not None)
        assert first.wait(1) == 0, first.log()
        assert sysd.seen("STOPPING", "1", since=mark)
        assert sysd.seen("BARRIER", "1", since=mark)
        assert {"flows0", "flows1"} <= set(sysd.store)

        names = sorted(sysd.store)
        fds = [sysd.store[n][0] for n in names]
        mark = len(sysd.messages)
        second = Relay(setup, env=env, pass_fds=fds,
                       args=[sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), ":".join(names),
                             *run_args(setup)[1:]])
        relays.append(second)
        assert traffic.run(20, until=lambda: sysd.seen("READY", since=mark) or second.proc.poll() is not None)
        assert second.proc.poll() is None, second.log()
        traffic.run(1.0)
        traffic.quiesce()
        sent = sum(c.sent for c in clients)
        received = sum(c.received for c in clients)
        print(f"\nacross the fd-store restart: sent {sent} media packets, received {received} echoes, "
              f"lost {sent - received}")
        assert sent > 0 and received == sent
        log = second.log()
        assert "took back 4 of 4 sockets and the flows of 2 workers" in log, log
        assert "flows0" not in sysd.store and "flows1" not in sysd.store      # consumed
        m = metrics(setup)
        assert value(m, "edge_relay_flows", state="confirmed") == len(clients)
        assert value(m, "edge_relay_drops_total", reason="unknown_flow") == 0
    finally:
        traffic.close()
        for r in relays:
            r.kill()
        sysd.close()
        setup.tx_sock.close()


def test_reload_verdict_goes_to_systemd_too(tmp_path):
    """RELOADING=1 (MONOTONIC_USEC), then READY=1 only with the verdict: the refusal's reason in
    STATUS=, or, for a good config, once every worker runs the new generation."""
    import json

    from relayproc import http_get
    from waiting import wait_for
    setup = Setup(tmp_path / "r", workers=2, drain=0.5)
    sysd = FakeSystemd(str(tmp_path / "notify"))
    relay = Relay(setup, env=dict(os.environ, NOTIFY_SOCKET=sysd.path))

    def status():
        return json.loads(http_get(setup.url + "/status")[1])

    def answer(since):
        sysd.pump()
        return next((m for m in sysd.messages[since:] if "READY" in m), None)

    try:
        wait_for(lambda: answer(0) or relay.proc.poll() is not None, 20, what="READY=1")
        assert relay.proc.poll() is None, relay.log()
        setup.write(signing_key_id=7)
        mark = len(sysd.messages)
        relay.signal(signal.SIGHUP)
        ready = wait_for(lambda: answer(mark), 10, what="READY=1 after the refused reload")
        assert ready["STATUS"].startswith("reload refused: ") and "7" in ready["STATUS"], ready
        reloading = next(m for m in sysd.messages[mark:] if "RELOADING" in m)
        verdict = status()["last_reload"]
        assert verdict["state"] == "refused"
        assert verdict["requested_usec"] <= int(reloading["MONOTONIC_USEC"]) <= verdict["finished_usec"]

        setup.write()
        mark = len(sysd.messages)
        relay.signal(signal.SIGHUP)
        ready = wait_for(lambda: answer(mark), 10, what="READY=1 after the good reload")
        st = status()
        assert st["last_reload"]["state"] == "ok" and st["generation"] == 2 == st["workers_generation"]
        assert "reload" not in ready["STATUS"]
    finally:
        relay.kill()
        sysd.close()
        setup.tx_sock.close()


def test_without_systemd_it_starts_fresh_and_says_so(tmp_path):
    setup = Setup(tmp_path / "r", workers=1)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
    relay = Relay(setup, env=env)
    try:
        tx = Transceiver(setup.keyring, setup.tx_sock)
        clients = clients_for(setup, 1)
        traffic = Traffic(clients, tx)
        assert traffic.run(20, until=lambda: clients[0].connected)
        traffic.close()
    finally:
        relay.kill()
        setup.tx_sock.close()
    assert "starting fresh" in relay.log()


def test_mismatched_stored_socket_is_closed_and_bound_again(tmp_path):
    """A stored socket on the wrong port is not reused; the relay binds the configured one."""
    setup = Setup(tmp_path / "r", workers=1)
    sysd = FakeSystemd(str(tmp_path / "notify"))
    stray = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stray.bind(("127.0.0.1", 0))
    env = dict(os.environ, NOTIFY_SOCKET=sysd.path)
    traffic = None
    relay = Relay(setup, env=env, pass_fds=[stray.fileno()],
                  args=[sys.executable, "-c", WRAPPER, str(stray.fileno()), "l0w0", *run_args(setup)[1:]])
    try:
        tx = Transceiver(setup.keyring, setup.tx_sock)
        clients = clients_for(setup, 1)
        traffic = Traffic(clients, tx, extra={sysd.sock: sysd.pump})
        assert traffic.run(20, until=lambda: clients[0].connected and sysd.seen("READY"))
        assert sysd.seen("FDSTOREREMOVE", "1")
        assert sorted(sysd.store) == ["i0", "l0w0"]
        assert "took back 0 of 2 sockets" in relay.log()
    finally:
        if traffic is not None:
            traffic.close()
        relay.kill()
        stray.close()
        sysd.close()
        setup.tx_sock.close()
    assert ROOT
