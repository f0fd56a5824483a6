"""sd_notify, sd_listen_fds and memfd helpers, checked against a fake service manager.

The tests play systemd: they bind the AF_UNIX datagram socket that
$NOTIFY_SOCKET names and read what the Notifier sends, byte for byte.
"""

import array
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from edge_relay import sdnotify
from edge_relay.sdnotify import Notifier, listen_fds, memfd_read, memfd_write, watchdog_interval

REPO = Path(__file__).resolve().parent.parent
SUN_PATH_MAX = 107


class FakeManager:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, sock, notify_socket):
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": notify_socket}

    def recv(self):
        """(payload, [fds]) of the next datagram; fails rather than hangs if none comes."""
        msg, ancdata, flags, _ = self.sock.recvmsg(
            8192, socket.CMSG_SPACE(4 * sdnotify.SCM_MAX_FD))
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        fds = array.array("i")
        for level, kind, data in ancdata:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        return msg, list(fds)

    def assert_empty(self):
        assert select.select([self.sock], [], [], 0)[0] == []


@pytest.fixture
def short_dir(tmp_path):
    # sun_path holds 107 bytes; fall back to /tmp if pytest's tmp_path is deep.
    if len(str(tmp_path / "notify.sock")) <= SUN_PATH_MAX:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="er-") as d:
        yield Path(d)


@pytest.fixture
def path_manager(short_dir):
    path = str(short_dir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield FakeManager(sock, path)


@pytest.fixture
def abstract_manager():
    name = f"edge-relay-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield FakeManager(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def manager(request):
    return request.getfixturevalue(f"{request.param}_manager")


def same_file(a, b):
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# --- Notifier -----------------------------------------------------------------

def test_ready(manager):
    n = Notifier(manager.env)
    assert n.enabled
    assert n.ready() is True
    assert manager.recv() == (b"READY=1", [])


def test_ready_with_status(manager):
    assert Notifier(manager.env).ready(status="serving 8 workers")
    assert manager.recv() == (b"READY=1\nSTATUS=serving 8 workers", [])


def test_reloading_carries_monotonic_usec(manager):
    n = Notifier(manager.env)
    before = time.monotonic_ns() // 1000
    assert n.reloading()
    after = time.monotonic_ns() // 1000
    msg, fds = manager.recv()
    assert fds == []
    first, second = msg.split(b"\n")
    assert first == b"RELOADING=1"
    var, _, value = second.partition(b"=")
    assert var == b"MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_reloading_with_status(manager):
    assert Notifier(manager.env).reloading(status="reloading keys")
    lines = manager.recv()[0].split(b"\n")
    assert lines[0] == b"RELOADING=1"
    assert lines[1].startswith(b"MONOTONIC_USEC=")
    assert lines[2:] == [b"STATUS=reloading keys"]


@pytest.mark.parametrize("call, expected", [
    (lambda n: n.stopping(), b"STOPPING=1"),
    (lambda n: n.stopping(status="draining"), b"STOPPING=1\nSTATUS=draining"),
    (lambda n: n.status("3 flows"), b"STATUS=3 flows"),
    (lambda n: n.watchdog(), b"WATCHDOG=1"),
    (lambda n: n.watchdog_trigger(), b"WATCHDOG=trigger"),
    (lambda n: n.mainpid(4242), b"MAINPID=4242"),
    (lambda n: n.fdstore_remove("flows"), b"FDSTOREREMOVE=1\nFDNAME=flows"),
    (lambda n: n.send("A=1", "B=two words"), b"A=1\nB=two words"),
])
def test_exact_datagrams(manager, call, expected):
    assert call(Notifier(manager.env)) is True
    assert manager.recv() == (expected, [])


def test_status_is_one_line_and_fits_a_datagram(path_manager):
    n = Notifier(path_manager.env)
    assert n.status("line one\nline two\r\nthree\0four")
    assert path_manager.recv()[0] == b"STATUS=line one line two three four"
    # Cut on a UTF-8 boundary to fit beside the other lines, never rejected.
    for call, first in [(n.status, "STATUS=éé"), (n.ready, "READY=1\nSTATUS=éé"),
                        (n.reloading, "RELOADING=1\nMONOTONIC_USEC="),
                        (n.stopping, "STOPPING=1\nSTATUS=éé")]:
        assert call("é" * 5000)
        msg = path_manager.recv()[0]
        assert sdnotify.NOTIFY_MAX - 1 <= len(msg) <= sdnotify.NOTIFY_MAX
        assert msg.decode("utf-8").startswith(first)
        assert msg.decode("utf-8").endswith("é")


def test_fdstore_passes_the_same_open_files(manager, tmp_path):
    with open(tmp_path / "a", "wb") as a, open(tmp_path / "b", "wb") as b:
        assert Notifier(manager.env).fdstore("public", [a.fileno(), b.fileno()])
        msg, fds = manager.recv()
        try:
            assert msg == b"FDSTORE=1\nFDNAME=public"
            assert len(fds) == 2
            assert same_file(fds[0], a.fileno())
            assert same_file(fds[1], b.fileno())
            assert not same_file(fds[0], b.fileno())
        finally:
            for fd in fds:
                os.close(fd)


def test_fdstore_without_poll(path_manager):
    r, w = os.pipe()
    try:
        assert Notifier(path_manager.env).fdstore("ctl", [r], poll=False)
        msg, fds = path_manager.recv()
        assert msg == b"FDSTORE=1\nFDNAME=ctl\nFDPOLL=0"
        assert same_file(fds[0], r)
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_fdstore_memfd_state_round_trip(path_manager):
    fd = memfd_write("flows", b"flow table v1")
    try:
        assert Notifier(path_manager.env).fdstore("flows", [fd])
        _, fds = path_manager.recv()
        assert memfd_read(fds[0]) == b"flow table v1"
        os.close(fds[0])
    finally:
        os.close(fd)


def test_barrier_waits_for_the_manager(path_manager):
    def manager_side():
        msg, fds = path_manager.recv()
        received.append(msg)
        for fd in fds:
            os.close(fd)          # what PID 1 does once it reaches the message

    received = []
    thread = threading.Thread(target=manager_side)
    thread.start()
    try:
        assert Notifier(path_manager.env).barrier(timeout=10) is True
    finally:
        thread.join(10)
    assert received == [b"BARRIER=1"]


def test_barrier_times_out_while_the_manager_holds_the_fd(path_manager):
    assert Notifier(path_manager.env).barrier(timeout=0) is False
    msg, fds = path_manager.recv()
    assert msg == b"BARRIER=1" and len(fds) == 1
    os.close(fds[0])


def test_barrier_without_manager():
    assert Notifier({}).barrier() is False
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/sock"}).barrier() is False


@pytest.mark.parametrize("name", [
    "", "a:b", "new\nline", "tab\tname", "del\x7f", "caf\u00e9", "x" * 256,
])
def test_fdstore_rejects_bad_names(name):
    # Raised with or without a manager: a bad name is a bug to catch in tests.
    for n in (Notifier({}), Notifier({"NOTIFY_SOCKET": "/nonexistent/sock"})):
        with pytest.raises(ValueError):
            n.fdstore(name, [0])
        with pytest.raises(ValueError):
            n.fdstore_remove(name)


def test_fdstore_accepts_longest_name(path_manager):
    name = "n" * 255
    assert Notifier(path_manager.env).fdstore_remove(name)
    assert path_manager.recv()[0] == b"FDSTOREREMOVE=1\nFDNAME=" + name.encode()


def test_fdstore_needs_fds():
    with pytest.raises(ValueError):
        Notifier({}).fdstore("empty", [])


@pytest.mark.parametrize("lines", [
    (), ("A=1\nREADY=1",), ("A=1\r",), ("A=\0",), ("X=" + "y" * sdnotify.NOTIFY_MAX,),
])
def test_send_rejects_malformed_messages(lines):
    with pytest.raises(ValueError):
        Notifier({"NOTIFY_SOCKET": "/nonexistent/sock"}).send(*lines)


@pytest.mark.parametrize("env", [
    {}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/notify.sock"},
    {"NOTIFY_SOCKET": "@"}, {"NOTIFY_SOCKET": "vsock:2:1234"},
])
def test_without_a_usable_socket_everything_is_a_noop(env):
    n = Notifier(env)
    assert not n.enabled
    results = [
        n.send("X=1"), n.ready(), n.ready("s"), n.reloading(), n.stopping(),
        n.status("s"), n.watchdog(), n.watchdog_trigger(), n.fdstore("x", [0]),
        n.fdstore_remove("x"), n.mainpid(1),
    ]
    assert results == [False] * len(results)


def test_vanished_socket_returns_false(short_dir):
    path = str(short_dir / "gone.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready() is False          # bound file left behind, no reader: ECONNREFUSED
    os.unlink(path)
    assert n.ready() is False          # path gone: ENOENT
    assert n.watchdog() is False


def test_vanished_abstract_socket_returns_false():
    assert Notifier({"NOTIFY_SOCKET": f"@edge-relay-none-{time.monotonic_ns()}"}).ready() is False


def test_closed_fd_returns_false(path_manager):
    # High, so the Notifier's own socket cannot reuse the number.
    stale = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 900)
    os.close(stale)
    assert Notifier(path_manager.env).fdstore("stale", [stale]) is False
    path_manager.assert_empty()


def test_env_defaults_to_os_environ(path_manager, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", path_manager.env["NOTIFY_SOCKET"])
    assert Notifier().watchdog()
    assert path_manager.recv()[0] == b"WATCHDOG=1"


# --- watchdog_interval --------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "3000000"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "500"}, 0.00025),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": str(2**64 - 1)}, None),
    ({"WATCHDOG_PID": str(os.getpid())}, None),
])
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env) == expected


@pytest.mark.parametrize("env", [
    {"WATCHDOG_USEC": "3s"}, {"WATCHDOG_USEC": "-1"}, {"WATCHDOG_USEC": ""},
    {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"},
    {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "0"},
])
def test_watchdog_interval_rejects_malformed(env):
    with pytest.raises(ValueError):
        watchdog_interval(env)


# --- listen_fds ---------------------------------------------------------------

# Runs in the child: moves the passed fds to 3, 4, 5 (via fds >= 100, so no
# move clobbers a source), then lets sh put its own pid in LISTEN_PID and
# exec the probe, exactly as systemd arranges it.
ARRANGE = r"""
import fcntl, json, os, sys
src = json.loads(sys.argv[1])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in src]
targets = range(3, 3 + len(high))
for target, fd in zip(targets, high):
    os.dup2(fd, target)
for fd in set(src) | set(high):
    if fd not in targets:
        os.close(fd)
os.execv("/bin/sh", ["sh", "-c", 'export LISTEN_PID=$$; exec "$0" -c "$1"',
                     sys.executable, sys.argv[2]])
"""

PROBE = r"""
import fcntl, json, os
def cloexec(fd):
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
before = {fd: cloexec(fd) for fd in (3, 4, 5)}
pid_seen = os.environ.get("LISTEN_PID")
from edge_relay.sdnotify import listen_fds
got = listen_fds()
fds = [fd for group in got.values() for fd in group]
print(json.dumps({
    "pid": os.getpid(), "pid_seen": pid_seen, "got": got,
    "before": before, "after": {fd: cloexec(fd) for fd in fds},
    "stat": {fd: [os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in fds},
    "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
}))
"""


def run_with_listen_fds(fds, extra_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env.update(extra_env)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", ARRANGE, json.dumps(fds), PROBE],
        pass_fds=fds, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def three_files(tmp_path):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r, w = os.pipe()
    state = open(tmp_path / "state", "wb")
    fds = [udp.fileno(), state.fileno(), r]
    yield fds, [[os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in fds]
    udp.close()
    state.close()
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("names, expected", [
    ("public:state:state", {"public": [3], "state": [4, 5]}),
    (None, {"unknown": [3, 4, 5]}),
])
def test_listen_fds_in_a_child(three_files, names, expected):
    fds, stats = three_files
    extra = {"LISTEN_FDS": "3"}
    if names is not None:
        extra["LISTEN_FDNAMES"] = names
    out = run_with_listen_fds(fds, extra)
    assert out["pid_seen"] == str(out["pid"])
    assert out["got"] == expected
    assert out["stat"] == {str(3 + i): s for i, s in enumerate(stats)}
    assert out["before"] == {"3": False, "4": False, "5": False}
    assert out["after"] == {"3": True, "4": True, "5": True}
    assert out["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def listen_env(pid, fds="2", names="a:b"):
    return {"LISTEN_PID": str(pid), "LISTEN_FDS": fds, "LISTEN_FDNAMES": names, "OTHER": "x"}


def test_listen_fds_for_another_pid_is_empty_and_unset():
    env = listen_env(os.getpid() + 1)
    assert listen_fds(env) == {}
    assert env == {"OTHER": "x"}


def test_listen_fds_can_leave_the_environment_alone():
    env = listen_env(os.getpid() + 1)
    assert listen_fds(env, unset=False) == {}
    assert env == listen_env(os.getpid() + 1)


@pytest.mark.parametrize("env", [
    {}, {"LISTEN_FDS": "2"}, {"LISTEN_PID": str(os.getpid())},
    {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"},
])
def test_listen_fds_nothing_passed(env):
    assert listen_fds(dict(env)) == {}


@pytest.mark.parametrize("env", [
    listen_env("x"), listen_env("0"),
    listen_env(os.getpid(), fds="two"), listen_env(os.getpid(), fds="-1"),
    listen_env(os.getpid(), fds="2", names="only-one"),
    listen_env(os.getpid(), fds="2", names="a:b:c"),
])
def test_listen_fds_malformed_raises_and_still_unsets(env):
    # Every rejection happens before any fd of this process is touched.
    with pytest.raises(ValueError):
        listen_fds(env)
    assert env == {"OTHER": "x"}


# --- memfd --------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 1000])
def test_memfd_round_trip(data):
    fd = memfd_write("state", data)
    try:
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert not os.get_inheritable(fd)
        assert memfd_read(fd) == data
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0     # pread leaves the offset alone
        assert memfd_read(fd) == data
        assert os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)


def test_memfd_is_sealed():
    fd = memfd_write("state", bytearray(b"frozen"))
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_SEAL):
            assert seals & seal
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"thawed", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def test_memfd_read_limit():
    fd = memfd_write("state", b"x" * 100)
    try:
        assert memfd_read(fd, limit=100) == b"x" * 100
        with pytest.raises(ValueError):
            memfd_read(fd, limit=99)
    finally:
        os.close(fd)


def test_memfd_read_limit_holds_for_a_file_that_grows(tmp_path, monkeypatch):
    # st_size is only a hint for an unsealed file: the limit holds on the bytes read.
    with open(tmp_path / "grow", "w+b") as f:
        f.write(b"y" * 11)
        f.flush()
        real_fstat = os.fstat
        monkeypatch.setattr(sdnotify.os, "fstat",
                            lambda fd: os.stat_result(real_fstat(fd)[:6] + (0,) + real_fstat(fd)[7:]))
        assert os.fstat(f.fileno()).st_size == 0
        assert memfd_read(f.fileno(), limit=11) == b"y" * 11
        with pytest.raises(ValueError):
            memfd_read(f.fileno(), limit=10)
