"""Fixtures and marker handling shared by the whole edge-relay test suite.

Waits: there is no per-test timeout (the suite runs on pytest alone, no
pytest-timeout), so every test bounds its own waits: select()/poll() or
socket.settimeout() with a timeout, Popen.wait/communicate(timeout=...),
netns.Process.readline(timeout), waiting.wait_for(...). No unbounded loops on
the network, no sleep-and-hope. (pytest.ini's faulthandler_timeout dumps
the stacks of a test stuck for 5 minutes, then ends the run: a backstop, not a
budget.)

Markers (registered in pytest.ini, strict):
  root   needs root and a kernel feature; skipped with the reason when this
         machine is not root or `ip netns` does not work (probed once per run).
  netns  builds a test network with tests/netns.py; implies root.
  slow   takes seconds; left out of the short second run on PATH's python3.

Test networks: use the netns_factory fixture, and see tests/netns.py.
A worker stepped on loopback: make_harness (tests/relayharness.py). A relay
process: start_relay (tests/relayproc.py). HACKING.md lists the helpers.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import pytest

import netns
from netns import requires_root


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Before -m selects: a netns test is a root test.
    for item in items:
        if item.get_closest_marker("netns") and not item.get_closest_marker("root"):
            item.add_marker(pytest.mark.root)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root"):
        requires_root()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Namespaces that escaped their fixture (a NetNS never closed): remove them
    # now, and say so. An atexit hook in netns.py does the same if this is skipped.
    removed = netns.sweep_if_used()
    if removed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"netns: removed leftover namespaces: {' '.join(removed)}"
        if reporter is not None:
            reporter.write_line(message, yellow=True)
        else:
            print(message, file=sys.stderr)


@pytest.fixture
def netns_factory() -> Iterator[netns.Factory]:
    """A netns.Factory: netns_factory() is a new namespace, netns_factory.veth(a, b)
    joins two. Afterwards, pass or fail, every namespace it made is deleted and
    every process inside them killed. Skips the test when namespaces do not work."""
    requires_root()
    factory = netns.Factory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def make_harness(tmp_path):
    """make_harness(**kw) -> a relayharness.Harness (a worker stepped on loopback), each in
    its own folder under tmp_path; every one made is closed after the test."""
    from relayharness import Harness
    made = []

    def make(**kw):
        folder = tmp_path / f"h{len(made)}"
        folder.mkdir()
        made.append(Harness(folder, **kw))
        return made[-1]
    yield make
    for h in made:
        h.close()


@pytest.fixture
def start_relay(tmp_path):
    """start_relay(workers=2, drain=0.5, sections=None, env=None) -> (setup, relay): a
    relayproc.Relay (`edge-relay run`, a real process) answering /healthz, its
    relayproc.Setup in its own folder under tmp_path. Afterwards every relay is killed."""
    from relayproc import Relay, Setup
    made = []

    def start(workers=2, drain=0.5, sections=None, env=None):
        setup = Setup(tmp_path / f"r{len(made)}", workers=workers, drain=drain, sections=sections)
        relay = Relay(setup, env=env)
        made.append((setup, relay))
        return setup, relay.wait_serving()
    yield start
    for setup, relay in made:
        relay.kill()
        setup.tx_sock.close()


@pytest.fixture
def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (bound to port 0, then
    closed). Someone else may take it before the test binds it: rarely matters."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def python_exe() -> str:
    """The interpreter running the tests, for subprocesses."""
    return sys.executable
