"""The management HTTP server's connection handling on real loopback sockets (ephemeral ports).

The test drives the server's selector itself, in bounded loops: no threads,
no sleeps, no timing thresholds (deadlines run on a clock the test holds).
"""

import selectors
import socket

import pytest

from edge_relay import httpd

SOURCES = [f"127.0.0.{i}" for i in range(2, 2 + httpd.MAX_CONNECTIONS // httpd.MAX_PER_SOURCE)]


@pytest.fixture
def server():
    sel = selectors.DefaultSelector()
    clock = [100.0]
    srv = httpd.Server(httpd.listen("127.0.0.1", 0), sel,
                       {"/healthz": lambda: (200, "text/plain", b"ok\n")}, clock=lambda: clock[0])
    srv.test_clock = clock
    opened = []
    srv.test_opened = opened
    yield srv
    for s in opened:
        s.close()
    srv.close()
    sel.close()


def pump(srv, rounds=50):
    """Run the server's ready callbacks until nothing is ready (bounded)."""
    for _ in range(rounds):
        ready = srv.sel.select(0.01)
        if not ready:
            return
        for key, _ in ready:
            key.data()


def connect(srv, source="127.0.0.1", send=b""):
    c = socket.create_connection(srv.sock.getsockname()[:2], timeout=5, source_address=(source, 0))
    srv.test_opened.append(c)
    if send:
        c.sendall(send)
    return c


def answer(srv, c, rounds=100):
    """What the server sent on `c` until it closed it (b"" if closed without a word), bounded."""
    c.setblocking(False)
    got = b""
    for _ in range(rounds):
        pump(srv, 5)
        try:
            data = c.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return got
        if not data:
            return got
        got += data
    raise AssertionError(f"no answer or close within {rounds} rounds (got {got!r})")


def slowloris(srv, n):
    """`n` connections that send part of a request head and then nothing, each from the
    source in SOURCES with the fewest connections (so the per-source cap never stops them)."""
    out = []
    for _ in range(n):
        source = min(SOURCES, key=lambda a: getattr(srv, "per_source", {}).get(a, 0))
        out.append(connect(srv, source, b"GET /healthz HTTP/1.0\r\nX-Slow: "))
        pump(srv)
    return out


def test_healthz_answers_while_slow_connections_fill_the_server(server):
    """issue 14 item 7: 64 slow connections, reopened as they are closed, never lock /healthz out."""
    slow = slowloris(server, httpd.MAX_CONNECTIONS)
    pump(server)
    assert len(server.conns) == httpd.MAX_CONNECTIONS
    answered = 0
    for i in range(12):
        probe = connect(server, send=b"GET /healthz HTTP/1.0\r\n\r\n")
        got = answer(server, probe)
        answered += got.startswith(b"HTTP/1.0 200 OK") and got.endswith(b"ok\n")
        # the attacker reopens what was closed: the server stays full of slow connections
        slow += slowloris(server, httpd.MAX_CONNECTIONS - len(server.conns))
        pump(server)
    assert answered == 12
    assert server.evicted >= 12 and len(server.conns) <= httpd.MAX_CONNECTIONS


def test_connections_per_source_are_capped(server):
    mine = [connect(server, "127.0.0.2", b"GET / HTTP/1.0\r\n") for _ in range(httpd.MAX_PER_SOURCE)]
    pump(server)
    extra = connect(server, "127.0.0.2", b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer(server, extra) == b""                      # closed at accept
    assert server.refused == 1 and server.per_source == {"127.0.0.2": httpd.MAX_PER_SOURCE}
    other = connect(server, "127.0.0.3", b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer(server, other).startswith(b"HTTP/1.0 200 OK")
    assert len(mine) == httpd.MAX_PER_SOURCE


def test_request_head_has_a_short_deadline(server):
    slow = connect(server, send=b"GET /healthz HTTP/1.0\r\n")
    pump(server)
    assert server.expire() == pytest.approx(server.test_clock[0] + httpd.HEAD_TIMEOUT)
    server.test_clock[0] += httpd.HEAD_TIMEOUT
    assert server.expire() is None
    assert answer(server, slow) == b"" and server.conns == {} and server.per_source == {}


def test_connections_being_answered_are_not_evicted(server):
    """Only connections still sending their head make room; when none is, the newcomer waits its turn."""
    busy = slowloris(server, httpd.MAX_CONNECTIONS)
    pump(server)
    for c in server.conns.values():
        c.out = memoryview(b"x")            # as if each were being answered to a client that reads nothing
    late = connect(server, "127.0.0.1", b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer(server, late) == b"" and server.refused == 1 and server.evicted == 0
    assert len(busy) == httpd.MAX_CONNECTIONS
