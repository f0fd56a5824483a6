"""RESP2 (the Redis protocol): a sans-IO codec and a small non-blocking client.

Theory of operation
  Codec (no I/O):
    * `encode_command(*args)` -> bytes: an array of bulk strings, the only form
      a client sends (https://redis.io/docs/reference/protocol-spec/).
      Arguments are bytes, str (UTF-8) or int.
    * `Parser.feed(data)` -> list of complete replies, in order. Input may be
      split anywhere; incomplete input is kept until the rest arrives. Reply
      values: simple string -> str, error -> a `ReplyError` instance
      (returned, not raised), integer -> int, bulk string -> bytes, null bulk
      or null array -> None, array -> list.
    * Malformed input raises `ProtocolError`, and the parser stays broken
      (every later feed raises again): the byte stream can no longer be
      trusted, so the connection must be dropped. Nesting depth, bulk length,
      array length and line length are bounded. `RespError` is the only
      family this module raises on network input; anything else is a bug
      (tests/test_resp.py fuzzes exactly that).

  Client (`Client`): one non-blocking stream socket (TCP or a Unix socket)
  for a selectors loop, never blocking and never reading a clock:
    * `call(args, callback, now)` queues a command (pipelined: many in flight)
      and returns False without queuing when the bounded queue is full or the
      client is backing off after a failure. The callback gets the reply value,
      or a `RespError` instance: `Timeout`, `Disconnected`, or a `ReplyError`.
    * Register `fileno()` for `events()`; call `on_readable(now)` /
      `on_writable(now)` when ready and `handle_timer(now)` at
      `next_deadline()`; `events()` changes after each of them (re-register
      when it does, or use `modify`). Connection state changes are rare.
    * A request not answered within `timeout` gets `Timeout` at once; its
      reply, when it comes, is discarded (RESP has no request ids, so order is
      what matches replies to requests). If the oldest request goes
      unanswered for `dead_after`, the connection is considered dead:
      everything queued fails with `Disconnected` and the client reconnects
      with exponential backoff (`backoff_min` doubling to `backoff_max`).
    * Connecting uses connect_ex; connection errors only ever reach callbacks
      (possibly from inside `call`, when the write fails at once).

  A blocking call-and-wait client for the demo lives in
  edge_relay/demo/blocking_resp.py, on this codec; the relay has none.
"""

import collections
import errno
import selectors
import socket

MAX_DEPTH = 8
MAX_BULK = 16 * 1024 * 1024
MAX_ARRAY = 1024 * 1024
MAX_LINE = 64 * 1024


class RespError(Exception):
    """The only exception family this module raises for protocol or connection trouble."""


class ProtocolError(RespError):
    """The server sent bytes that are not RESP2 (or exceed this parser's bounds)."""


class ReplyError(RespError):
    """An error reply ("-ERR ..."); returned as a value, raised only by the demo's BlockingClient."""


class Timeout(RespError):
    """No reply within the request timeout."""


class Disconnected(RespError):
    """The connection failed or was dropped before the reply arrived."""


def _arg(a):
    if isinstance(a, bytes):
        return a
    if isinstance(a, (bytearray, memoryview)):
        return bytes(a)
    if isinstance(a, str):
        return a.encode("utf-8")
    if isinstance(a, int) and not isinstance(a, bool):
        return str(a).encode("ascii")
    raise TypeError(f"RESP argument must be bytes, str or int, not {type(a).__name__}")


def encode_command(*args):
    """The RESP2 encoding of one command: an array of bulk strings."""
    if not args:
        raise ValueError("empty command")
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(b"\r\n")
    return b"".join(parts)


_INCOMPLETE = object()


class Parser:
    """Incremental RESP2 reply parser (see the module docstring)."""

    def __init__(self):
        self._buf = bytearray()
        self._broken = None

    def feed(self, data):
        """Add bytes; return the list of replies now complete (possibly empty)."""
        if self._broken is not None:
            raise ProtocolError(self._broken)
        self._buf += data
        out = []
        pos = 0
        try:
            while pos < len(self._buf):
                value, end = self._parse(pos, 0)
                if value is _INCOMPLETE:
                    break
                out.append(value)
                pos = end
        except ProtocolError as e:
            self._broken = str(e)
            raise
        del self._buf[:pos]
        if len(self._buf) > MAX_BULK + MAX_LINE:
            self._broken = "reply too large"
            raise ProtocolError(self._broken)
        return out

    def _line(self, pos):
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            if len(self._buf) - pos > MAX_LINE:
                raise ProtocolError("line too long")
            return None, pos
        if end - pos > MAX_LINE:
            raise ProtocolError("line too long")
        return bytes(self._buf[pos:end]), end + 2

    def _int(self, text):
        # RESP integers: optional '-', then ASCII digits only.
        digits = text[1:] if text[:1] == b"-" else text
        if not digits or not digits.isdigit() or len(digits) > 20:
            raise ProtocolError(f"bad integer {text[:32]!r}")
        return int(text)

    def _parse(self, pos, depth):
        if depth > MAX_DEPTH:
            raise ProtocolError("nesting too deep")
        if pos >= len(self._buf):
            return _INCOMPLETE, pos
        kind = self._buf[pos]
        line, after = self._line(pos + 1)
        if line is None:
            return _INCOMPLETE, pos
        if kind == 0x2B:        # '+' simple string
            try:
                return line.decode("utf-8"), after
            except UnicodeDecodeError:
                raise ProtocolError("simple string not UTF-8") from None
        if kind == 0x2D:        # '-' error
            return ReplyError(line.decode("utf-8", "replace")), after
        if kind == 0x3A:        # ':' integer
            return self._int(line), after
        if kind == 0x24:        # '$' bulk string
            n = self._int(line)
            if n == -1:
                return None, after
            if n < 0 or n > MAX_BULK:
                raise ProtocolError(f"bad bulk length {n}")
            if len(self._buf) < after + n + 2:
                return _INCOMPLETE, pos
            if self._buf[after + n:after + n + 2] != b"\r\n":
                raise ProtocolError("bulk string not terminated by CRLF")
            return bytes(self._buf[after:after + n]), after + n + 2
        if kind == 0x2A:        # '*' array
            n = self._int(line)
            if n == -1:
                return None, after
            if n < 0 or n > MAX_ARRAY:
                raise ProtocolError(f"bad array length {n}")
            items = []
            p = after
            for _ in range(n):
                value, p = self._parse(p, depth + 1)
                if value is _INCOMPLETE:
                    return _INCOMPLETE, pos
                items.append(value)
            return items, p
        raise ProtocolError(f"unknown reply type byte {kind:#04x}")


# -- non-blocking client --------------------------------------------------------

DISCONNECTED, CONNECTING, CONNECTED = "disconnected", "connecting", "connected"


class Client:
    """Pipelined RESP client over a non-blocking socket (see the module docstring).

    Parameters
      address      (host, port) for TCP, or a str path for a Unix socket
      max_pending  bound on queued + in-flight requests
      timeout      seconds before a request's callback gets Timeout
      dead_after   seconds the oldest request may wait before the connection is dropped
      backoff_min, backoff_max  reconnect delays
    """

    def __init__(self, address, *, max_pending=1024, timeout=0.25, dead_after=2.0,
                 backoff_min=0.05, backoff_max=5.0, now=0.0):
        self.address = address
        self.max_pending = max_pending
        self.timeout = timeout
        self.dead_after = max(dead_after, timeout)
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.sock = None
        self.state = DISCONNECTED
        self._backoff = backoff_min
        self._retry_at = now          # connect at the first chance
        self._out = bytearray()       # encoded, not yet written
        self._waiting = collections.deque()   # [deadline, sent_at, callback] in send order
        self._parser = Parser()
        self.stats = collections.Counter()
        self.last_error = None

    # -- selector glue --------------------------------------------------------

    def fileno(self):
        return self.sock.fileno() if self.sock is not None else -1

    def events(self):
        """Selector events wanted now (0 when there is no socket)."""
        if self.sock is None:
            return 0
        if self.state == CONNECTING or self._out:
            return selectors.EVENT_READ | selectors.EVENT_WRITE
        return selectors.EVENT_READ

    def next_deadline(self):
        """When `handle_timer` has work: a reconnect or the oldest request's timeout."""
        if self.sock is None:
            return self._retry_at
        if not self._waiting:
            return None
        best = self._waiting[0][1] + self.dead_after
        for entry in self._waiting:       # deadlines grow with send order
            if entry[2] is not None:
                return min(best, entry[0])
        return best

    # -- requests -------------------------------------------------------------

    def call(self, args, callback, now):
        """Queue one command (a sequence of arguments). False if refused (full or backing off)."""
        if self.sock is None:
            if now < self._retry_at:
                self.stats["refused_down"] += 1
                return False
            self._connect(now)
            if self.sock is None:
                self.stats["refused_down"] += 1
                return False
        if len(self._waiting) >= self.max_pending:
            self.stats["refused_full"] += 1
            return False
        self._out += encode_command(*args)
        self._waiting.append([now + self.timeout, now, callback])
        self.stats["calls"] += 1
        if self.state == CONNECTED:
            self._flush(now)
        return True

    def _connect(self, now):
        try:
            family = socket.AF_UNIX if isinstance(self.address, str) else \
                socket.getaddrinfo(self.address[0], self.address[1], type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            self._down(now, f"socket: {e}")
            return
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.address)
        self.stats["connects"] += 1
        if err in (0, errno.EISCONN):
            self.sock, self.state = sock, CONNECTED
            self._backoff = self.backoff_min
        elif err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY):
            self.sock, self.state = sock, CONNECTING
        else:
            sock.close()
            self._down(now, f"connect: {errno.errorcode.get(err, err)}")

    def _down(self, now, reason):
        """Drop the connection, fail everything queued, schedule a reconnect."""
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.state = DISCONNECTED
        self.stats["failures"] += 1
        self.last_error = reason
        self._retry_at = now + self._backoff
        self._backoff = min(self.backoff_max, self._backoff * 2)
        self._out.clear()
        self._parser = Parser()
        waiting, self._waiting = self._waiting, collections.deque()
        for entry in waiting:
            if entry[2] is not None:
                entry[2](Disconnected(reason))

    def close(self):
        """Close the socket without callbacks (at exit)."""
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.state = DISCONNECTED
        self._waiting.clear()
        self._out.clear()

    # -- events ---------------------------------------------------------------

    def on_writable(self, now):
        if self.sock is None:
            return
        if self.state == CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._down(now, f"connect: {errno.errorcode.get(err, err)}")
                return
            self.state = CONNECTED
            self._backoff = self.backoff_min
        self._flush(now)

    def _flush(self, now):
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._down(now, f"send: {e.strerror or e}")
                return
            del self._out[:n]

    def on_readable(self, now):
        if self.sock is None:
            return
        if self.state == CONNECTING:
            self.on_writable(now)
            if self.sock is None:
                return
        for _ in range(16):       # bounded work per wake-up
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._down(now, f"recv: {e.strerror or e}")
                return
            if not data:
                self._down(now, "connection closed by server")
                return
            try:
                replies = self._parser.feed(data)
            except ProtocolError as e:
                self._down(now, f"protocol: {e}")
                return
            for value in replies:
                if not self._waiting:
                    self._down(now, "reply without a request")
                    return
                entry = self._waiting.popleft()
                if entry[2] is None:
                    self.stats["late_replies"] += 1
                else:
                    entry[2](value)

    def handle_timer(self, now):
        """Reconnect when due, time out requests, drop a dead connection."""
        if self.sock is None:
            return
        if self._waiting and now - self._waiting[0][1] >= self.dead_after:
            self._down(now, "no reply")
            return
        for entry in self._waiting:
            if entry[2] is not None and now >= entry[0]:
                cb, entry[2] = entry[2], None
                self.stats["timeouts"] += 1
                cb(Timeout("no reply in time"))
