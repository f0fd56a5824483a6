"""A tiny non-blocking HTTP/1.0 server for /metrics, /healthz and /flows, driven by the supervisor's loop.

Contract
  - One request per connection (HTTP/1.0 style, `Connection: close`); the
    request head must arrive whole within MAX_REQUEST bytes and HEAD_TIMEOUT
    seconds, or the connection is answered 400 (or just closed); the answer
    must be taken within TIMEOUT seconds.
  - GET (and HEAD) only: other methods get 405. Paths are looked up in
    `routes` {path: callable() -> (status, content_type, body bytes)}; the
    query string is ignored, except by a handler wrapped in `with_query`,
    which is called with it parsed ({name: [values]}); anything else is 404.
  - At most MAX_CONNECTIONS at once and MAX_PER_SOURCE from one source
    address. A new connection over the total evicts the oldest connection
    whose request head is not complete yet (slowloris: slow clients cannot
    lock /healthz out); only if every connection is being answered is the
    newcomer closed. One over its source's cap is closed at accept.
    `evicted` and `refused` count both. Nothing here blocks and nothing
    raises into the caller's loop.
"""

import selectors
import socket
import time
import urllib.parse

MAX_REQUEST = 8192
MAX_CONNECTIONS = 64
MAX_PER_SOURCE = 8
HEAD_TIMEOUT = 2.0              # seconds for the whole request head
TIMEOUT = 5.0                   # seconds for the client to take the answer
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 503: "Service Unavailable"}


def listen(address, port):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def with_query(handler):
    """Mark `handler` as taking the request's parsed query string: handler(query) -> (status, type, body)."""
    def route(query):
        return handler(query)
    route.takes_query = True
    return route


def response(status, content_type, body, head_only=False):
    head = (f"HTTP/1.0 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\nCache-Control: no-store\r\n\r\n").encode("ascii")
    return head if head_only else head + body


class _Conn:
    __slots__ = ("sock", "buf", "out", "deadline", "source")

    def __init__(self, sock, deadline, source):
        self.sock = sock
        self.buf = b""
        self.out = None             # the answer once the head is complete (None: still reading)
        self.deadline = deadline
        self.source = source


class Server:
    def __init__(self, sock, sel, routes, clock=time.monotonic):
        self.sock = sock
        self.sel = sel
        self.routes = routes
        self.clock = clock
        self.conns = {}             # socket -> _Conn, oldest first (insertion order)
        self.per_source = {}        # source address -> open connections from it (never 0)
        self.evicted = 0            # connections closed to make room for a newer one
        self.refused = 0            # connections closed at accept (source cap, or all busy)
        sel.register(sock, selectors.EVENT_READ, self._accept)

    def _accept(self):
        for _ in range(16):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            source = peer[0] if isinstance(peer, tuple) else peer
            if self.per_source.get(source, 0) >= MAX_PER_SOURCE or (
                    len(self.conns) >= MAX_CONNECTIONS and not self._evict_oldest_reading()):
                self.refused += 1
                conn.close()
                continue
            conn.setblocking(False)
            c = _Conn(conn, self.clock() + HEAD_TIMEOUT, source)
            self.conns[conn] = c
            self.per_source[source] = self.per_source.get(source, 0) + 1
            self.sel.register(conn, selectors.EVENT_READ, lambda c=c: self._readable(c))

    def _evict_oldest_reading(self):
        """Close the oldest connection still sending its request head; False if there is none."""
        for c in self.conns.values():
            if c.out is None:
                self._close(c)
                self.evicted += 1
                return True
        return False

    def _readable(self, c):
        try:
            data = c.sock.recv(MAX_REQUEST + 1 - len(c.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._close(c)
        if not data:
            return self._close(c)
        c.buf += data
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            end = c.buf.find(b"\n\n")
        if end < 0:
            if len(c.buf) > MAX_REQUEST:
                self._answer(c, response(400, "text/plain", b"request too large\n"))
            return
        self._answer(c, self._handle(c.buf[:end]))

    def _handle(self, head):
        try:
            line = head.split(b"\n", 1)[0].decode("ascii").strip()
            method, target, version = line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return response(400, "text/plain", b"bad request\n")
        if not version.startswith("HTTP/1."):
            return response(400, "text/plain", b"bad request\n")
        if method not in ("GET", "HEAD"):
            return response(405, "text/plain", b"method not allowed\n")
        path, _, query = target.partition("?")
        handler = self.routes.get(path)
        if handler is None:
            return response(404, "text/plain", b"not found\n", method == "HEAD")
        if getattr(handler, "takes_query", False):
            try:
                fields = urllib.parse.parse_qs(query, max_num_fields=16)
            except ValueError:
                return response(400, "text/plain", b"too many query fields\n", method == "HEAD")
            status, ctype, body = handler(fields)
        else:
            status, ctype, body = handler()
        return response(status, ctype, body, method == "HEAD")

    def _answer(self, c, data):
        c.out = memoryview(data)
        c.deadline = self.clock() + TIMEOUT
        self.sel.modify(c.sock, selectors.EVENT_WRITE, lambda c=c: self._writable(c))
        self._writable(c)

    def _writable(self, c):
        try:
            sent = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._close(c)
        c.out = c.out[sent:]
        if not c.out:
            self._close(c)

    def _close(self, c):
        if self.conns.pop(c.sock, None) is not None:
            n = self.per_source[c.source] - 1
            if n:
                self.per_source[c.source] = n
            else:
                del self.per_source[c.source]
            self.sel.unregister(c.sock)
            c.sock.close()

    def expire(self):
        """Close connections past their deadline; returns the next deadline or None."""
        now = self.clock()
        nearest = None
        for c in list(self.conns.values()):
            if now >= c.deadline:
                self._close(c)
            elif nearest is None or c.deadline < nearest:
                nearest = c.deadline
        return nearest

    def close(self):
        for c in list(self.conns.values()):
            self._close(c)
        self.sel.unregister(self.sock)
        self.sock.close()
