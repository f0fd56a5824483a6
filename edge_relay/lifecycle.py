"""The supervisor's lifecycle as data: its phases, the allowed transitions, and worker restart timing.

Theory of operation
  The supervisor is in exactly one Phase. Every change goes through
  Lifecycle.set(), which refuses a transition the TRANSITIONS table does not
  list (that is a bug, not an operator error) and logs "old -> new: why"
  once. Nothing here reads a clock: every method that depends on time takes
  `now` (time.monotonic() seconds, read once by the supervisor's loop).

    STARTING       workers forked, not all serving yet; no READY=1 sent
    SERVING        every worker serves the current generation
    RELOADING      a new generation was sent to the workers; its verdict is
                   pending until they all run it or RELOAD_ACK_TIMEOUT passes
    RESTRUCTURING  the new config needs other sockets or another number of
                   workers: the old workers hand their flows over and exit;
                   then new workers start (-> RELOADING)
    UPGRADING      SIGUSR2 (upgrade.py): the new code on disk is being checked
                   (-> SERVING when refused; else this image is replaced by
                   execve); in the new image, from the takeover until every
                   old worker has handed its flows to a new one (-> SERVING)
    DRAINING       SERVING, but an operator asked to take the host out of the
                   pool (edge-relay drain): /healthz and /readyz are 503, new
                   flows are refused once Drain.refuse_at has passed
    STOPPING       SIGTERM: every worker exits at once; its flows and the
                   sockets go to the fd store for the next process
    STOPPED        every worker is gone; the loop ends

  The drain is the operator's intent, kept apart from the phase (a Drain, or
  None): a reload while draining passes through RELOADING and comes back to
  DRAINING, and a new worker started meanwhile starts draining. steady()
  is where a finished start or reload lands.

  Restarts (one per worker slot) decides when a dead worker starts again:
  an exponential backoff from BACKOFF_MIN, doubling with each death within
  CRASH_WINDOW seconds, capped at BACKOFF_MAX; CRASH_LIMIT deaths within the
  window is a crash loop, which ends once the worker has lived CRASH_WINDOW.
"""

import collections
import enum
import json

CRASH_WINDOW = 30.0         # deaths counted over this many seconds ...
CRASH_LIMIT = 5             # ... this many of them is a crash loop
BACKOFF_MIN = 0.1           # delay after a second death in the window; doubles with each further one
BACKOFF_MAX = 30.0


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RELOADING = "reloading"
    RESTRUCTURING = "restructuring"
    UPGRADING = "upgrading"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


P = Phase
TRANSITIONS = {
    # a new image that took over running workers starts by replacing them
    P.STARTING: {P.SERVING, P.DRAINING, P.UPGRADING, P.STOPPING},
    P.SERVING: {P.RELOADING, P.RESTRUCTURING, P.UPGRADING, P.DRAINING, P.STOPPING},
    # a second SIGHUP before the verdict supersedes the pending reload
    P.RELOADING: {P.SERVING, P.DRAINING, P.RELOADING, P.RESTRUCTURING, P.STOPPING},
    P.RESTRUCTURING: {P.RELOADING, P.STOPPING},
    P.UPGRADING: {P.SERVING, P.DRAINING, P.STOPPING},
    P.DRAINING: {P.SERVING, P.RELOADING, P.RESTRUCTURING, P.UPGRADING, P.STOPPING},
    P.STOPPING: {P.STOPPED},
    P.STOPPED: set(),
}
del P


class Lifecycle:
    """The current phase and since when; `on_change(old, new, why)` is told of every transition."""

    def __init__(self, on_change=None, now=0.0):
        self.phase = Phase.STARTING
        self.since = now
        self.on_change = on_change
        self.history = collections.deque(maxlen=16)    # (now, old, new, why): the last few, for tests and logs

    def set(self, new, now, why=""):
        old = self.phase
        if new not in TRANSITIONS[old]:
            raise ValueError(f"phase {old.value} -> {new.value} is not a transition ({why})")
        self.phase = new
        self.since = now
        self.history.append((now, old, new, why))
        if self.on_change is not None:
            self.on_change(old, new, why)

    @property
    def started(self):
        """True once the first READY=1 went out (the supervisor left STARTING)."""
        return self.phase is not Phase.STARTING

    @property
    def stopping(self):
        return self.phase in (Phase.STOPPING, Phase.STOPPED)


class Drain:
    """The operator's drain: since when, and from when new flows are refused (time.monotonic() seconds).

    `requested` is the time of the last drain request the supervisor took
    (what `edge-relay drain` waits for). Encoded for the fd store so that a
    restart keeps the host drained (CLOCK_MONOTONIC is shared by the old and
    the new process).
    """

    def __init__(self, since, refuse_at, requested=None):
        self.since = since
        self.refuse_at = refuse_at
        self.requested = since if requested is None else requested

    def refusing(self, now):
        return now >= self.refuse_at

    def encode(self):
        return json.dumps({"since": self.since, "refuse_at": self.refuse_at}).encode()

    @classmethod
    def decode(cls, data):
        """A Drain from encode()'s bytes; ValueError when they are not that."""
        try:
            doc = json.loads(data)
            since, refuse_at = float(doc["since"]), float(doc["refuse_at"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError("not a drain record") from None
        return cls(since, refuse_at)


def steady(drain):
    """Where a start or a reload lands: DRAINING while the operator's drain lasts, else SERVING."""
    return Phase.SERVING if drain is None else Phase.DRAINING


class Restarts:
    """One worker slot's deaths and the next restart time."""

    def __init__(self):
        self.deaths = collections.deque()
        self.restart_at = None
        self.crash_loop = False

    def died(self, now):
        """Note a death at `now`: (delay until the restart, crash loop now, crash loop just began)."""
        while self.deaths and now - self.deaths[0] > CRASH_WINDOW:
            self.deaths.popleft()
        self.deaths.append(now)
        # a first death restarts at once: its callers wait in the socket buffer for the successor
        # (which restores their flows from the crash journal); only a repeat backs off
        k = len(self.deaths)
        delay = 0.0 if k == 1 else min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (k - 2))
        began = False
        if len(self.deaths) >= CRASH_LIMIT:
            began = not self.crash_loop
            self.crash_loop = True
        self.restart_at = now + delay
        return delay, self.crash_loop, began

    def due(self, now):
        """True (once) when a restart is scheduled and its time has come."""
        if self.restart_at is not None and now >= self.restart_at:
            self.restart_at = None
            return True
        return False

    def cancel(self):
        self.restart_at = None

    def stable(self, started, now):
        """True (once) when a crash-looping worker started at `started` has lived CRASH_WINDOW."""
        if self.crash_loop and now - started > CRASH_WINDOW:
            self.crash_loop = False
            self.deaths.clear()
            return True
        return False
