"""httpd.py's contract on real loopback sockets (ephemeral ports): requests, answers, connection limits.

The test drives the server's selector itself, in bounded loops: no threads,
no sleeps, no timing thresholds (deadlines run on a clock the test holds).
The first part is the request side (methods, paths, queries, malformed and
oversized heads, HEAD, the answer's deadline); the second the connection
handling (caps, eviction, head deadline).
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
    routes = {"/healthz": lambda: (200, "text/plain", b"ok\n"),
              "/query": httpd.with_query(lambda q: (200, "application/json", repr(sorted(q.items())).encode())),
              "/busy": lambda: (503, "text/plain", b"draining\n"),
              "/big": lambda: (200, "application/octet-stream", bytes(32 << 20))}
    srv = httpd.Server(httpd.listen("127.0.0.1", 0), sel, routes, clock=lambda: clock[0])
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


def request(srv, head):
    """(status line, headers dict, body) of the answer to `head`, on a fresh connection."""
    got = answer(srv, connect(srv, send=head))
    top, sep, body = got.partition(b"\r\n\r\n")
    assert sep, got
    status, *lines = top.decode("ascii").split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


# --- requests and answers ------------------------------------------------------

def test_get_answers_with_length_type_and_close(server):
    status, headers, body = request(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == "HTTP/1.0 200 OK" and body == b"ok\n"
    assert headers == {"Content-Type": "text/plain", "Content-Length": "3", "Connection": "close",
                       "Cache-Control": "no-store"}
    assert server.conns == {} and server.per_source == {}         # one request per connection


def test_head_gets_the_head_of_the_get_answer_and_no_body(server):
    status, headers, body = request(server, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.0 200 OK" and headers["Content-Length"] == "3" and body == b""
    status, headers, body = request(server, b"HEAD /nowhere HTTP/1.0\r\n\r\n")
    assert status == "HTTP/1.0 404 Not Found" and body == b""


def test_a_handler_status_is_passed_through(server):
    status, _, body = request(server, b"GET /busy HTTP/1.0\r\n\r\n")
    assert status == "HTTP/1.0 503 Service Unavailable" and body == b"draining\n"


@pytest.mark.parametrize("head, status", [
    (b"GET /nowhere HTTP/1.0\r\n\r\n", "HTTP/1.0 404 Not Found"),
    (b"GET /healthz/ HTTP/1.0\r\n\r\n", "HTTP/1.0 404 Not Found"),   # paths match exactly
    (b"POST /healthz HTTP/1.0\r\n\r\n", "HTTP/1.0 405 Method Not Allowed"),
    (b"DELETE /healthz HTTP/1.0\r\n\r\n", "HTTP/1.0 405 Method Not Allowed"),
    (b"GET /healthz\r\n\r\n", "HTTP/1.0 400 Bad Request"),            # no version
    (b"GET /healthz SPDY/3\r\n\r\n", "HTTP/1.0 400 Bad Request"),
    (b"GET  /healthz HTTP/1.0\r\n\r\n", "HTTP/1.0 400 Bad Request"),   # not three fields
    (b"GET /h\xe9 HTTP/1.0\r\n\r\n", "HTTP/1.0 400 Bad Request"),     # not ASCII
    (b"GET /healthz HTTP/1.0\n\n", "HTTP/1.0 200 OK"),                 # bare LF line ends
])
def test_each_request_line_gets_its_status(server, head, status):
    assert request(server, head)[0] == status


def test_the_query_string_is_ignored_except_by_with_query_handlers(server):
    assert request(server, b"GET /healthz?x=1 HTTP/1.0\r\n\r\n")[2] == b"ok\n"
    status, headers, body = request(server, b"GET /query?state=pending&limit=5&limit=6 HTTP/1.0\r\n\r\n")
    assert status == "HTTP/1.0 200 OK" and headers["Content-Type"] == "application/json"
    assert body == repr([("limit", ["5", "6"]), ("state", ["pending"])]).encode()
    many = "&".join(f"k{i}=v" for i in range(17)).encode()
    status, _, body = request(server, b"GET /query?" + many + b" HTTP/1.0\r\n\r\n")
    assert status == "HTTP/1.0 400 Bad Request" and body == b"too many query fields\n"


def test_a_request_head_over_max_request_is_refused(server):
    c = connect(server, send=b"GET /healthz HTTP/1.0\r\nX-Fill: " + b"a" * httpd.MAX_REQUEST)
    got = answer(server, c)
    assert got.startswith(b"HTTP/1.0 400 Bad Request") and got.endswith(b"request too large\n")
    assert server.conns == {}


def test_an_answer_not_taken_is_closed_at_its_deadline(server):
    """32 MiB is more than the loopback socket buffers hold, so a client that reads nothing leaves it pending."""
    c = connect(server, send=b"GET /big HTTP/1.0\r\n\r\n")
    pump(server)
    (conn,) = server.conns.values()
    assert conn.out is not None and len(conn.out)              # answered, not all of it taken
    assert server.expire() == pytest.approx(server.test_clock[0] + httpd.TIMEOUT)
    server.test_clock[0] += httpd.TIMEOUT
    assert server.expire() is None and server.conns == {} and server.per_source == {}
    c.close()


def test_a_peer_that_closes_before_its_head_is_forgotten(server):
    c = connect(server, send=b"GET /heal")
    pump(server)
    assert len(server.conns) == 1
    c.close()
    pump(server)
    assert server.conns == {} and server.per_source == {}


def test_close_closes_every_connection_and_the_listener(server):
    c = connect(server, send=b"GET /heal")
    pump(server)
    server.close()
    assert server.conns == {} and server.sock.fileno() == -1
    assert answer_after_close(c) == b""
    server.close = lambda: None                         # the fixture's teardown: already closed


def answer_after_close(c):
    c.settimeout(5)
    try:
        return c.recv(65536)
    except ConnectionResetError:
        return b""


# --- connections -----------------------------------------------------------------

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
