"""Upgrade in place (issue 12), against a real relay whose code is swapped under it as a package upgrade does.

The relay runs the edge_relay package found through a symlink (`code/` ->
`v1/`); "installing" a new version copies the tree to `vN/`, changes it, and
points the symlink there, so that the running process's own command line
(sys.executable, sys.orig_argv, PYTHONPATH) now names the new files, as
/usr/share/edge-relay does after dpkg unpacked a new package.

  - an upgrade keeps the PID and every socket (the same inodes: nothing is
    bound again), runs the new version on every worker, and a flow confirmed
    before it still forwards after it, nothing lost;
  - the workers are replaced one at a time: each new worker is ready before
    its old one stops reading, and takes over that worker's flows;
  - new code that cannot import, or a config or key it refuses, is refused:
    `edge-relay upgrade` exits 1 with the reason, the old process and its
    workers serve on untouched;
  - new code that starts but cannot read the handed-over state comes up
    serving on the inherited sockets (verdict "failed", exit 1).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from edge_relay import reexec
from relayproc import ROOT, Relay, Setup, Traffic, Transceiver, clients_for, http_get, metrics, value, wait_for

pytestmark = pytest.mark.slow


class Code:
    """Versions of the edge_relay package under `folder`, the running one behind the `code` symlink."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.link = os.path.join(self.folder, "code")
        self.count = 0
        self.install(lambda tree: None)

    def install(self, change):
        """Copy this tree's package to a new folder, apply change(package folder), point the link at it."""
        self.count += 1
        tree = os.path.join(self.folder, f"v{self.count}")
        shutil.copytree(os.path.join(ROOT, "edge_relay"), os.path.join(tree, "edge_relay"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        change(os.path.join(tree, "edge_relay"))
        tmp = self.link + ".new"
        os.symlink(tree, tmp)
        os.replace(tmp, self.link)      # atomic, like dpkg's rename of each file


def broken_worker(old, new):
    """Version 9.9.9 whose upgrade worker fails where workerproc.py says `old` (replaced by `new`)."""
    return lambda pkg: (set_version("9.9.9")(pkg), patch("workerproc.py", old, new)(pkg))


def set_version(version):
    def change(pkg):
        path = os.path.join(pkg, "__init__.py")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', text))
    return change


def patch(name, old, new):
    def change(pkg):
        path = os.path.join(pkg, name)
        with open(path) as f:
            text = f.read()
        assert old in text, (name, old)
        with open(path, "w") as f:
            f.write(text.replace(old, new, 1))
    return change


def upgrade(setup, traffic=None, timeout=120):
    """`edge-relay upgrade` (from this tree) while `traffic` keeps flowing; (returncode, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_relay", "upgrade", "--url", setup.url + "/status"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        if traffic is not None:
            assert traffic.run(timeout, until=lambda: proc.poll() is not None), "upgrade did not finish"
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def status(setup):
    code, body = http_get(setup.url + "/status")
    assert code == 200, (code, body)
    return json.loads(body)


def udp_inodes(pid):
    """Inodes of the UDP sockets process `pid` holds (its fds), from /proc."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                inodes |= {line.split()[9] for line in f.readlines()[1:]}
        except OSError:
            pass
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", link)
        if m and m.group(1) in inodes:
            held.add(m.group(1))
    return held


@pytest.fixture
def relay(tmp_path):
    """start(workers) -> (setup, relay, code, tx): a relay running code/ (a symlink), serving."""
    made = []

    def start(workers=2):
        code = Code(tmp_path / f"code{len(made)}")
        setup = Setup(tmp_path / f"r{len(made)}", workers=workers)
        r = Relay(setup, pythonpath=code.link, cwd=str(tmp_path))
        made.append((setup, r))
        wait_for(lambda: http_get(setup.url + "/healthz")[0] == 200 or r.proc.poll() is not None,
                 30, what="/healthz 200")
        assert r.proc.poll() is None, r.log()
        return setup, r, code, Transceiver(setup.keyring, setup.tx_sock)

    yield start
    for setup, r in made:
        r.kill()
        setup.tx_sock.close()


def connected(clients):
    return lambda: all(c.connected for c in clients)


def test_an_upgrade_keeps_the_pid_and_the_sockets_and_hands_every_flow_over(relay):
    setup, r, code, tx = relay(workers=2)
    base = setup.ports["internal_port"]
    clients = clients_for(setup, 8)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=connected(clients))
        traffic.run(0.5)
        on_worker = {tx.worker_of[tuple(c.address)] - base for c in clients}
        old_workers = r.worker_pids()
        sockets_before = udp_inodes(r.pid)
        assert len(sockets_before) == 4     # l0w0 l0w1 i0 i1
        before = status(setup)
        assert before["last_upgrade"]["state"] == "none"
        code.install(set_version("9.9.9"))
        for c in clients:
            c.rtts.clear()
        rc, out, err = upgrade(setup, traffic)
        assert rc == 0, (out, err, r.log()[-3000:])
        assert f"pid {r.pid} runs edge-relay 9.9.9" in out and f"(was {before['version']})" in out
        rtts = [x for c in clients for x in c.rtts]
        print(f"\nacross the upgrade: {len(rtts)} echoes, max RTT {max(rtts) * 1000:.1f} ms, "
              f"{sum(1 for x in rtts if x > 0.060)} over 60 ms")
        received = {c: c.received for c in clients}
        traffic.run(1.0)                    # the flows confirmed before forward on the new workers
        traffic.quiesce()
    finally:
        traffic.close()
    st = status(setup)
    assert st["pid"] == r.pid == before["pid"] and r.proc.poll() is None
    assert st["version"] == "9.9.9" and st["last_upgrade"]["state"] == "ok", st["last_upgrade"]
    assert st["last_upgrade"]["from_version"] == before["version"] and st["upgrades"] == 1
    assert before["last_upgrade"]["pauses_ms"] == []
    # one pause per replaced worker: STOP to the new worker's first publication, never negative
    pauses = st["last_upgrade"]["pauses_ms"]
    assert len(pauses) == 2 and all(p >= 0 for p in pauses), pauses
    assert st["workers_up"] == 2 and st["generation"] == before["generation"] == st["workers_generation"]
    assert udp_inodes(r.pid) == sockets_before, "a socket was bound again"
    new_workers = r.worker_pids()
    assert set(new_workers) == {0, 1} and not set(new_workers.values()) & set(old_workers.values())
    assert all(c.received > received[c] for c in clients)
    assert sum(c.sent for c in clients) == sum(c.received for c in clients), \
        [(c.sent, c.received) for c in clients]
    m = metrics(setup)
    assert value(m, "edge_relay_drops_total", reason="unknown_flow") == 0
    log = r.log()
    # one slot at a time, each new worker ready before its old one stops reading, then taking its flows
    events = [(kind, int(w)) for w, kind in
              re.findall(r"worker (\d+): new pid \d+ (starting|ready|took over)", log)]
    assert events == [("starting", 0), ("ready", 0), ("took over", 0),
                      ("starting", 1), ("ready", 1), ("took over", 1)], events
    served = re.findall(r"worker (\d+): new pid \d+ serves, ([\d.]+) ms after", log)
    assert [(int(w), float(ms)) for w, ms in served] == [(0, pauses[0]), (1, pauses[1])], served
    said = "\n".join(line for line in log.splitlines() if "upgrade" in line or "flows" in line)
    for w in on_worker:
        assert f"worker {w}: new pid {new_workers[w]} took over from old pid {old_workers[w]} with its flows" \
            in log, said
        assert re.search(rf"worker {w}: took over [1-9]\d* flows", log), said


def test_new_code_that_cannot_import_is_refused_and_the_old_process_serves_on(relay):
    setup, r, code, tx = relay(workers=2)
    clients = clients_for(setup, 4)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=connected(clients))
        workers = r.worker_pids()
        sockets_before = udp_inodes(r.pid)
        code.install(patch("router.py", '"""', 'raise ImportError("broken on purpose")\n"""'))
        rc, out, err = upgrade(setup, traffic)
        assert rc == 1, (out, err)
        assert "refused" in err and "ImportError: broken on purpose" in err, err
        st = status(setup)
        assert st["pid"] == r.pid and st["last_upgrade"]["state"] == "refused"
        assert "broken on purpose" in st["last_upgrade"]["reason"] and st["upgrade_failures"] == 1
        assert st["phase"] == "serving" and st["workers_up"] == 2
        assert r.worker_pids() == workers and udp_inodes(r.pid) == sockets_before
        # still serving: old calls flow, a new call connects
        newcomers = clients_for(setup, 2)
        for c in newcomers:
            traffic.add(c)
        assert traffic.run(10, until=connected(newcomers))
        traffic.run(0.5)
        traffic.quiesce()
        assert sum(c.sent for c in traffic.clients) == sum(c.received for c in traffic.clients)
    finally:
        traffic.close()
    assert "upgrade refused" in r.log()


def test_a_config_or_key_the_new_code_refuses_is_refused(relay):
    setup, r, code, tx = relay(workers=1)
    code.install(set_version("9.9.9"))
    setup.write(signing_key_id=7)           # key 7 does not exist
    rc, out, err = upgrade(setup)
    assert rc == 1 and "refused" in err and "7" in err, (out, err)
    st = status(setup)
    assert st["version"] != "9.9.9" and st["last_upgrade"]["state"] == "refused"
    # a config that moves the sockets is not an upgrade's business: reload it first
    setup.write()
    setup.workers = 2
    setup.write()
    rc, out, err = upgrade(setup)
    assert rc == 1 and "reload it first" in err, (out, err)
    assert carries_calls(setup, Transceiver(setup.keyring, setup.tx_sock))


def carries_calls(setup, tx):
    clients = clients_for(setup, 2)
    traffic = Traffic(clients, tx)
    try:
        return traffic.run(10, until=connected(clients))
    finally:
        traffic.close()


def test_new_code_that_cannot_read_the_state_still_comes_up_serving_on_the_same_sockets(relay):
    setup, r, code, tx = relay(workers=2)
    assert carries_calls(setup, tx)
    sockets_before = udp_inodes(r.pid)
    old_workers = r.worker_pids()
    check = "    if not (text.isascii() and text.isdigit()):"
    code.install(patch("reexec.py", check, "    raise HandoverError('unreadable on purpose')\n" + check))
    rc, out, err = upgrade(setup)
    assert rc == 1 and "failed" in err and "unreadable on purpose" in err, (out, err)
    wait_for(lambda: http_get(setup.url + "/healthz")[0] == 200, 20, what="/healthz 200 after the fallback")
    st = status(setup)
    assert st["pid"] == r.pid and st["last_upgrade"]["state"] == "failed" and st["workers_up"] == 2
    assert "started afresh on 4 of 4 inherited sockets" in st["last_upgrade"]["reason"]
    assert udp_inodes(r.pid) == sockets_before
    assert not set(r.worker_pids().values()) & set(old_workers.values())
    assert carries_calls(setup, tx)


def test_the_exec_target_is_the_command_line_that_started_the_relay(relay):
    setup, r, code, tx = relay(workers=1)
    with open(f"/proc/{r.pid}/cmdline", "rb") as f:
        argv = f.read().rstrip(b"\0").split(b"\0")
    assert [a.decode() for a in argv[1:]] == ["-m", "edge_relay", "run", "--config", setup.path]
    assert reexec.PREFLIGHT_FLAG not in (a.decode() for a in argv)


def test_systemd_sees_reloading_then_ready_and_the_fd_store_is_untouched(tmp_path):
    """RELOADING=1 (MONOTONIC_USEC) when the upgrade is asked, READY=1 only with its verdict (a refusal's
    reason in STATUS=); the stored sockets stay as they are (same pid, nothing stored or removed)."""
    from test_systemd_protocol import FakeSystemd
    code = Code(tmp_path / "code")
    setup = Setup(tmp_path / "r", workers=2)
    sysd = FakeSystemd(str(tmp_path / "notify"))
    r = Relay(setup, env=dict(os.environ, NOTIFY_SOCKET=sysd.path), pythonpath=code.link, cwd=str(tmp_path))
    tx = Transceiver(setup.keyring, setup.tx_sock)
    clients = clients_for(setup, 4)
    traffic = Traffic(clients, tx, extra={sysd.sock: sysd.pump})

    def answer(since):
        return next((m for m in sysd.messages[since:] if "READY" in m), None)

    try:
        assert traffic.run(30, until=lambda: answer(0) or r.proc.poll() is not None)
        assert r.proc.poll() is None, r.log()
        assert traffic.run(10, until=connected(clients))
        store = {name: [os.fstat(fd).st_ino for fd in fds] for name, fds in sysd.store.items()}
        # refused: the new code cannot import
        code.install(patch("__init__.py", '__version__', 'raise ImportError("broken on purpose")\n__version__'))
        mark = len(sysd.messages)
        rc, out, err = upgrade(setup, traffic)
        assert rc == 1, (out, err)
        assert traffic.run(10, until=lambda: answer(mark))
        ready = answer(mark)
        assert ready["STATUS"].startswith("upgrade refused: ") and "broken on purpose" in ready["STATUS"], ready
        reloading = [m for m in sysd.messages[mark:] if "RELOADING" in m]
        assert len(reloading) == 1 and int(reloading[0]["MONOTONIC_USEC"]) > 0
        # ok: one RELOADING=1, then READY=1 once every worker runs the new code
        code.install(set_version("9.9.9"))
        mark = len(sysd.messages)
        rc, out, err = upgrade(setup, traffic)
        assert rc == 0, (out, err, r.log()[-3000:])
        assert traffic.run(10, until=lambda: answer(mark))
        after = sysd.messages[mark:]
        first_reloading = next(i for i, m in enumerate(after) if "RELOADING" in m)
        first_ready = next(i for i, m in enumerate(after) if "READY" in m)
        assert first_reloading < first_ready and "upgrade" not in after[first_ready].get("STATUS", "")
        assert not any("FDSTORE" in m or "FDSTOREREMOVE" in m or "MAINPID" in m for m in after), after
        assert {name: [os.fstat(fd).st_ino for fd in fds] for name, fds in sysd.store.items()} == store
        assert status(setup)["pid"] == r.pid
        traffic.run(0.5)
        traffic.quiesce()
        assert sum(c.sent for c in clients) == sum(c.received for c in clients)
    finally:
        traffic.close()
        r.kill()
        sysd.close()
        setup.tx_sock.close()


def test_a_new_worker_that_never_gets_ready_fails_the_upgrade_and_the_old_workers_serve_on(relay):
    """After the execve: the first new worker dies before READY; the verdict is "failed", no old worker
    was asked to stop, and every call keeps flowing through them under the new supervisor."""
    setup, r, code, tx = relay(workers=2)
    clients = clients_for(setup, 6)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=connected(clients))
        old_workers = r.worker_pids()
        code.install(broken_worker("        ctl.send(control.READY)", "        raise SystemExit(3)"))
        rc, out, err = upgrade(setup, traffic)
        assert rc == 1 and "failed" in err and "exited before it was ready" in err, (out, err)
        st = status(setup)
        assert st["pid"] == r.pid and st["version"] == "9.9.9" and st["last_upgrade"]["state"] == "failed"
        assert "the old workers keep serving" in st["last_upgrade"]["reason"]
        assert st["phase"] == "serving" and st["workers_up"] == 2
        assert r.worker_pids() == old_workers
        traffic.run(1.0)
        traffic.quiesce()
        assert sum(c.sent for c in clients) == sum(c.received for c in clients)
    finally:
        traffic.close()
    assert "stops reading" not in r.log()


def test_the_packages_launcher_is_re_executed_as_it_was_started(tmp_path):
    """/usr/bin/edge-relay is `#!/usr/bin/python3 -I` with the package folder put first on sys.path:
    started that way (its folder swapped for a symlink to our code), the upgrade's preflight and execve
    run that same script with -I, so the new files under that folder are what runs."""
    code = Code(tmp_path / "code")
    launcher = tmp_path / "edge-relay"
    with open(os.path.join(ROOT, "packaging", "debian", "edge-relay.bin")) as f:
        text = f.read()
    assert 'sys.path.insert(0, "/usr/share/edge-relay")' in text
    launcher.write_text(text.replace("/usr/share/edge-relay", code.link))
    setup = Setup(tmp_path / "r", workers=1)
    r = Relay(setup, args=[sys.executable, "-I", str(launcher), "run", "--config", setup.path],
              pythonpath="/nonexistent", cwd=str(tmp_path))
    try:
        wait_for(lambda: http_get(setup.url + "/healthz")[0] == 200 or r.proc.poll() is not None,
                 30, what="/healthz 200")
        assert r.proc.poll() is None, r.log()
        code.install(set_version("9.9.9"))
        rc, out, err = upgrade(setup)
        assert rc == 0, (out, err, r.log()[-3000:])
        st = status(setup)
        assert st["pid"] == r.pid and st["version"] == "9.9.9"
        with open(f"/proc/{r.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[1:3] == [b"-I", str(launcher).encode()]
    finally:
        r.kill()
        setup.tx_sock.close()


def test_counters_carry_over_when_the_new_code_counts_more_things(relay):
    """A new version with another drop reason has another counter layout: the old workers' counters are
    moved across by name while they run and when they hand over; no counter goes backwards."""
    import socket

    from edge_relay.drops import Drop
    setup, r, code, tx = relay(workers=2)
    assert carries_calls(setup, tx)
    junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(20):
            junk.sendto(b"\xff" * 24, setup.public)      # not STUN, DTLS or RTP: a not_webrtc drop each
    finally:
        junk.close()
    wait_for(lambda: value(metrics(setup), "edge_relay_drops_total", reason="not_webrtc") == 20, 10,
             what="20 not_webrtc drops counted")
    before = metrics(setup)
    packets = {d: value(before, "edge_relay_packets_total", direction=d)
               for d in ("client_in", "to_transceiver", "transceiver_in", "to_client")}
    extra = max(Drop) + 1
    one_more = patch("drops.py", "    @property", f"    UPGRADE_TEST_REASON = {extra}\n\n    @property")
    code.install(lambda pkg: (set_version("9.9.9")(pkg), one_more(pkg)))
    rc, out, err = upgrade(setup)
    assert rc == 0, (out, err, r.log()[-3000:])
    after = metrics(setup)
    assert value(after, "edge_relay_drops_total", reason="not_webrtc") == 20
    assert value(after, "edge_relay_drops_total", reason="upgrade_test_reason") == 0
    for d, n in packets.items():
        assert value(after, "edge_relay_packets_total", direction=d) >= n > 0, d
    assert value(after, "edge_relay_workers_up") == 2
    assert carries_calls(setup, tx)


def test_a_new_worker_that_dies_while_taking_over_is_restarted_with_the_flows(relay):
    """After READY its old worker has stopped: the slot is restarted as after any death (new code, the
    handed-over flows restored), the verdict is "failed", the other slot's old worker serves on."""
    setup, r, code, tx = relay(workers=2)
    clients = clients_for(setup, 6)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=connected(clients))
        old_workers = r.worker_pids()
        code.install(broken_worker("        handed = await_turn(ctl)\n",
                                   "        handed = await_turn(ctl)\n        raise SystemExit(3)\n"))
        rc, out, err = upgrade(setup, traffic)
        assert rc == 1 and "died while taking over" in err, (out, err)
        assert traffic.run(20, until=lambda: status(setup)["workers_up"] == 2)
        st = status(setup)
        assert st["pid"] == r.pid and st["last_upgrade"]["state"] == "failed"
        now = r.worker_pids()
        assert now[0] != old_workers[0] and now[1] == old_workers[1]
        assert re.search(r"worker 0: restored [1-9]\d* flows", r.log()) or \
            all(tx.worker_of[tuple(c.address)] != setup.ports["internal_port"] for c in clients)
    finally:
        traffic.close()
    assert carries_calls(setup, tx)


def test_a_draining_relay_is_still_draining_after_an_upgrade(relay):
    # the operator's drain (edge-relay drain) rides across the execve in the state document:
    # an upgrade must not silently put a host that is leaving the pool back into it
    setup, r, code, tx = relay(workers=1)
    drain = subprocess.run([sys.executable, "-m", "edge_relay", "drain", "--url", setup.url + "/status"],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                           timeout=60)
    assert drain.returncode == 0, drain.stderr
    before = status(setup)
    assert before["draining"] and before["phase"] == "draining"
    code.install(set_version("9.9.9"))
    rc, out, err = upgrade(setup)
    assert rc == 0, (out, err, r.log()[-3000:])
    st = status(setup)
    assert st["pid"] == r.pid and st["version"] == "9.9.9" and st["last_upgrade"]["state"] == "ok"
    assert st["draining"] and st["phase"] == "draining"
    assert st["drain"]["refuse_usec"] == before["drain"]["refuse_usec"]     # not restarted
    assert http_get(setup.url + "/healthz")[0] == 503


def test_an_old_worker_killed_after_a_failed_upgrade_restores_its_flows_from_the_carried_journal(relay):
    # the execve carries each running worker's crash journal: the old workers that keep serving
    # after a failed upgrade still have one, so a SIGKILLed one's successor restores its calls
    setup, r, code, tx = relay(workers=2)
    clients = clients_for(setup, 6)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=connected(clients))
        old_workers = r.worker_pids()
        code.install(broken_worker("        ctl.send(control.READY)", "        raise SystemExit(3)"))
        rc, out, err = upgrade(setup, traffic)
        assert rc == 1 and status(setup)["last_upgrade"]["state"] == "failed", (out, err)
        assert r.worker_pids() == old_workers
        victim = 0 if any(tx.worker_of[tuple(c.address)] == setup.ports["internal_port"] for c in clients) else 1
        os.kill(old_workers[victim], signal.SIGKILL)
        assert traffic.run(20, until=lambda: r.worker_pids().get(victim) not in (None, old_workers[victim])
                           and status(setup)["workers_up"] == 2)
        assert traffic.run(20, until=lambda: re.search(
            rf"worker {victim}: [1-9]\d* flows restored from the crash journal", r.log()) is not None), r.log()
    finally:
        traffic.close()
    assert carries_calls(setup, tx)
