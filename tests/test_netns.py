"""The test-network helpers (tests/netns.py, netns_factory) do what they promise:
namespaces joined by veth carry UDP over IPv4 and IPv6, and everything they
create is gone afterwards, also when the test fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import netns
from waiting import wait_for

HERE = Path(__file__).resolve().parent

# Inside a namespace: bind to an address, say on which port, print the first
# datagram and who sent it; give up after a while.
RECEIVER = """
import select, socket, sys
host, wait = sys.argv[1], float(sys.argv[2])
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((host, 0))
print("ready", sock.getsockname()[1])
if not select.select([sock], [], [], wait)[0]:
    print("timeout")
    sys.exit(1)
data, peer = sock.recvfrom(2048)
print("got", data.decode(), peer[0])
"""

SENDER = """
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.sendto(payload.encode(), (host, port))
"""

SLEEPER = "import time; time.sleep(60)"


def alive(pid: int) -> bool:
    return netns._pid_alive(pid)


def send_one_datagram(a: netns.NetNS, b: netns.NetNS, src: str, dst: str, payload: str) -> None:
    """Send a datagram from a to dst in b; check that it arrives, from src."""
    receiver = b.python(RECEIVER, dst, "5")
    word, port = receiver.readline(timeout=10).split()
    assert word == "ready"
    a.exec(sys.executable, "-c", SENDER, dst, port, payload)
    assert receiver.readline(timeout=10).split() == ["got", payload, src]
    assert receiver.wait(timeout=5) == 0


@pytest.mark.netns
@pytest.mark.parametrize("version", [4, 6])
def test_udp_datagram_crosses_veth(netns_factory, version):
    if version == 6 and not netns.ipv6_available():
        pytest.skip("this kernel has no IPv6")
    a, b = netns_factory(), netns_factory()
    link = netns_factory.veth(a, b)
    src, dst = (link.ipv4_a, link.ipv4_b) if version == 4 else (link.ipv6_a, link.ipv6_b)
    send_one_datagram(a, b, src, dst, f"hello-v{version}")
    # The test network's addresses exist only inside the namespaces.
    assert dst not in netns.run("ip", "-o", "addr", "show").stdout


@pytest.mark.netns
def test_explicit_addresses(netns_factory):
    a, b = netns_factory(), netns_factory()
    link = netns_factory.veth(a, b, "198.19.255.1/30", ["198.19.255.2/30", "fd00:ee::2/64"])
    assert (link.ipv4_a, link.ipv4_b, link.ipv6_a, link.ipv6_b) == (
        "198.19.255.1", "198.19.255.2", None, "fd00:ee::2",
    )
    send_one_datagram(a, b, "198.19.255.1", "198.19.255.2", "explicit")


@pytest.mark.netns
def test_close_removes_namespaces_and_kills_processes():
    factory = netns.Factory()
    try:
        a, b = factory(), factory()
        factory.veth(a, b)
        started = a.python(SLEEPER)
        # A process the helpers did not start: found through the namespace.
        stray = subprocess.Popen(["ip", "netns", "exec", b.name, sys.executable, "-c", SLEEPER])
        wait_for(lambda: stray.pid in b.pids(), what="stray process to enter its namespace")
        names = {a.name, b.name}
        assert names <= set(netns.list_namespaces())
    finally:
        factory.close()
    assert not names & set(netns.list_namespaces())
    assert started.returncode == -signal.SIGTERM
    assert stray.wait(timeout=5) == -signal.SIGKILL
    assert factory.namespaces == [] and a.closed and b.closed


@pytest.mark.netns
def test_cleanup_when_body_raises():
    # What the fixture does: create, run the body, close in `finally`.
    made: list[netns.NetNS] = []
    with pytest.raises(RuntimeError, match="boom"):
        factory = netns.Factory()
        try:
            made += [factory(), factory()]
            factory.veth(*made)
            pid = made[0].python(SLEEPER).pid
            raise RuntimeError("boom")
        finally:
            factory.close()
    assert not {ns.name for ns in made} & set(netns.list_namespaces())
    assert not alive(pid)


def copy_helpers(pytester: pytest.Pytester) -> None:
    for name in ("conftest.py", "netns.py", "waiting.py"):
        shutil.copy(HERE / name, pytester.path / name)


@pytest.mark.netns
def test_fixture_cleans_up_after_failing_test_and_sweeps_leaks(pytester, tmp_path):
    # A real pytest run, in its own process (so its own name prefix), with one
    # test that builds a network and fails, and one that leaks a namespace.
    copy_helpers(pytester)
    record = tmp_path / "record"
    pytester.makepyfile(
        test_inner=textwrap.dedent(
            f"""
            import pathlib, netns

            RECORD = pathlib.Path({str(record)!r})

            def test_fails(netns_factory):
                a, b = netns_factory(), netns_factory()
                netns_factory.veth(a, b)
                sleeper = a.python("import time; time.sleep(60)")
                RECORD.write_text(f"{{a.name}} {{b.name}} {{sleeper.pid}}\\n")
                raise RuntimeError("boom")

            def test_leaks():
                leaked = netns.NetNS()
                with RECORD.open("a") as f:
                    f.write(leaked.name)
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["netns: removed leftover namespaces: er-*", "*RuntimeError: boom*"])

    first, leaked = record.read_text().splitlines()
    a, b, pid = first.split()
    prefix = a.rpartition("-")[0] + "-"
    assert prefix != netns.PREFIX and leaked.startswith(prefix)
    assert not [name for name in netns.list_namespaces() if name.startswith(prefix)]
    assert not alive(int(pid))


@pytest.mark.netns
def test_sweep_stale_removes_namespaces_of_dead_runs():
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=5)
    name = f"er-{dead.pid}-1"
    netns.run("ip", "netns", "add", name)
    try:
        assert name in netns.sweep_stale()
        assert name not in netns.list_namespaces()
    finally:
        netns.run("ip", "netns", "delete", name, check=False)


def test_not_root_skips_with_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        netns.requires_root()
