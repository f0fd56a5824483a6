"""Journal-friendly logging to stderr: one line per message, rate-limited per kind.

Contract:
  - Each message is one line "<N>name: text\\n" on stderr (or the given
    stream). The "<N>" prefix is the sd-daemon(3) priority the journal
    reads from a service's stderr: 3 err, 4 warning, 5 notice, 6 info,
    7 debug. Messages less severe than the level are dropped first, before
    they are formatted or counted.
  - Rendered text never spans lines: newlines, other control characters and
    Unicode line separators are escaped (\\n, \\r, \\xNN, \\uNNNN), so text
    that comes from a packet can neither forge a log line nor reach a
    terminal as an escape sequence. Lines are capped (MAX_TEXT) so a line
    goes out in one write and lines from several workers never interleave.
  - Every `kind` (a short fixed string naming what happened, e.g.
    "flow.table-full") gets a window of `interval` seconds that opens at
    its first message and lets `burst` lines through; the rest are counted.
    The first message after the window closes (or flush()) writes one line
    "<kind>: N similar messages suppressed" before anything else. So a
    flood costs at most burst+1 lines per kind per interval. Kinds are
    independent of each other; the table of kinds is bounded (MAX_KINDS).
  - `verdict()` is the exception to the rate limit: the outcome of one
    operator action (a reload accepted or refused, with its reason) is
    always written, since each such line answers one thing a person did
    and a retry a second later must show its own reason, not "suppressed".
  - Logging never raises: a bad format is logged as such, and a stderr that
    is closed or broken (OSError, ValueError) loses the line, not the relay.

One Log per process, used from one thread (no lock: a signal handler that
logs must not be able to deadlock).
"""

import sys
import time

LEVELS = {"err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}
MAX_TEXT = 3800        # chars; with prefix and escapes a line stays near PIPE_BUF
MAX_KINDS = 1024       # a caller that puts variable data in `kind` cannot grow us without bound
OVERFLOW_KIND = "log.too-many-kinds"


def _escape_table():
    table = {c: f"\\x{c:02x}" for c in range(0x20)}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r"})
    del table[ord("\t")]
    table[0x7F] = "\\x7f"
    for c in range(0x80, 0xA0):     # C1 controls, NEL among them
        table[c] = f"\\x{c:02x}"
    for c in (0x2028, 0x2029):       # line and paragraph separators
        table[c] = f"\\u{c:04x}"
    return table


_ESCAPES = _escape_table()


def _level(level):
    if isinstance(level, str) and level in LEVELS:
        return LEVELS[level]
    if isinstance(level, int) and not isinstance(level, bool) and level in LEVELS.values():
        return level
    raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")


def _render(fmt, args):
    # Without args the text is taken as is, so a literal '%' needs no escaping.
    if not args:
        text = fmt if isinstance(fmt, str) else str(fmt)
    else:
        try:
            text = fmt % args
        except Exception as exc:  # noqa: BLE001 - any __str__ may raise; logging must not
            text = f"(bad log call: {type(exc).__name__}) {fmt!r} with {len(args)} args"
    text = text.translate(_ESCAPES)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "...[truncated]"
    return text


class _Window:
    __slots__ = ("start", "count", "suppressed", "priority")

    def __init__(self, start):
        self.reset(start)

    def reset(self, start):
        self.start = start
        self.count = 0
        self.suppressed = 0
        self.priority = 7   # most severe priority among the suppressed


class Log:
    def __init__(self, level="info", stream=None, clock=time.monotonic, burst=5,
                 interval=10.0, name="edge-relay"):
        if not isinstance(burst, int) or burst < 1:
            raise ValueError(f"log burst must be a positive integer, not {burst!r}")
        if not interval > 0:
            raise ValueError(f"log interval must be positive, not {interval!r}")
        self.level = _level(level)
        self.name = name
        self._stream = stream
        self._clock = clock
        self._burst = burst
        self._interval = interval
        self._prefix = f"{name}: " if name else ""
        self._windows = {}
        self._last_prune = None

    def set_level(self, level):
        self.level = _level(level)

    def err(self, kind, fmt, *args):
        self._log(3, kind, fmt, args)

    def warning(self, kind, fmt, *args):
        self._log(4, kind, fmt, args)

    def notice(self, kind, fmt, *args):
        self._log(5, kind, fmt, args)

    def info(self, kind, fmt, *args):
        self._log(6, kind, fmt, args)

    def debug(self, kind, fmt, *args):
        self._log(7, kind, fmt, args)

    def verdict(self, level, fmt, *args):
        """The outcome of one operator action: filtered by level, never rate-limited."""
        priority = _level(level)
        if priority <= self.level:
            self._write(priority, _render(fmt, args))

    def flush(self):
        """Write the summary of every kind whose window has closed, and forget those kinds.

        The relay calls this from its housekeeping tick so that the count of
        a flood that stopped still reaches the journal.
        """
        self._prune(self._clock(), force=True)

    def _log(self, priority, kind, fmt, args):
        if priority > self.level:
            return
        now = self._clock()
        window = self._windows.get(kind)
        if window is None:
            if len(self._windows) >= MAX_KINDS:
                self._prune(now)
                if len(self._windows) >= MAX_KINDS:
                    kind = OVERFLOW_KIND
                    window = self._windows.get(kind)
            if window is None:
                window = self._windows[kind] = _Window(now)
        elif now - window.start >= self._interval:
            self._summarize(kind, window)
            window.reset(now)
        if window.count >= self._burst:
            window.suppressed += 1
            window.priority = min(window.priority, priority)
            return
        window.count += 1
        self._write(priority, _render(fmt, args))

    def _prune(self, now, force=False):
        # Under a flood of distinct kinds this scan would run per message;
        # once per interval is enough to find the windows that closed.
        if not force and self._last_prune is not None and now - self._last_prune < self._interval:
            return
        self._last_prune = now
        for kind, window in list(self._windows.items()):
            if now - window.start >= self._interval:
                self._summarize(kind, window)
                del self._windows[kind]

    def _summarize(self, kind, window):
        if window.suppressed and window.priority <= self.level:
            self._write(window.priority, _render(
                "%s: %d similar messages suppressed", (kind, window.suppressed)))

    def _write(self, priority, text):
        stream = self._stream if self._stream is not None else sys.stderr
        if stream is None:      # e.g. started with stderr closed
            return
        try:
            stream.write(f"<{priority}>{self._prefix}{text}\n")
            stream.flush()
        except (OSError, ValueError):
            pass
