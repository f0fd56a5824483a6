"""Transceiver health: authenticated probes, RTT, up/down with hysteresis (sans-IO).

Theory of operation
  One `Prober` per worker. It never reads a clock and never touches a socket:
  the worker calls `due(now)` when `next_deadline()` has passed, sends each
  returned payload to that transceiver as a PROBE (header.PROBE, sealed like
  any header), and hands every PROBE_ACK payload that passed header.decode
  to `ack(tid, payload, now)`.

  Payload (PAYLOAD_LEN = 24 octets, opaque to the transceiver, which echoes it):
      0  magic    4  b"ERp1"
      4  seq      4  per-transceiver sequence number, big-endian, wraps
      8  sent_us  8  the worker's monotonic clock at sending, microseconds
     16  nonce    8  random (os.urandom) per probe
  The header MAC already keeps a forger without the key out; the nonce and the
  outstanding-probe check make a replayed or guessed ack useless: an ack
  counts only if its 24 octets equal a probe still outstanding, compared with
  hmac.compare_digest, and each probe is answered at most once. The RTT comes
  from the stored send time, not from the echoed one.

  Loss and timeouts
    A probe not acknowledged within the retransmission timeout counts as one
    miss. With `timeout=None` (the default) the timeout adapts as in RFC 6298
    section 2: srtt + max(granularity, 4 * rttvar), clamped to
    [min_timeout, max_timeout]; before the first sample it is max_timeout. A
    fixed `timeout` overrides that. An ack that arrives after its probe was
    counted as missed (but within max_timeout) still feeds the RTT estimate,
    so the timeout follows a path that slowed down, but it does not count as a
    success. Outstanding probes are forgotten after max_timeout, so memory per
    transceiver is bounded by ceil(max_timeout / interval) + 1 probes.

  Hysteresis
    A transceiver goes DOWN after `down_after` consecutive misses and UP again
    after `up_after` consecutive successes; a success resets the miss count and
    a miss resets the success count. Every transition is appended to a list of
    `Event`s (its `state` a `State`) that the worker takes with
    `take_events()` and logs. `Health.up` holds the same state as a bool, which
    the per-packet `is_up` reads.

  Initial state: UP. A worker that starts (or restarts after a crash) routes
  immediately instead of blackholing every call until the first probes come
  back; a transceiver that is really dead is marked down after `down_after`
  probes, the same delay as for a transceiver that dies later. Transceiver ids
  the prober does not know are treated as up by `is_up` and `route_for`.

  Failure detection time, worst case: down_after * interval + timeout after
  the last answered probe (defaults: 3 * 0.25 s + about one RTT-based timeout,
  i.e. under 1 s on a LAN).

  Failover (`route_for`)
    A down transceiver's traffic goes to its configured backup when that is up
    (following a chain of backups, cycles stopped), and the flag says so
    (header.FLAG_FAILOVER). When nothing in the chain is up, the primary is
    returned unflagged: nothing better is known. Returning traffic after
    recovery is the router's policy: flows moved to the backup stay there
    (FlowTable.move), only new tokens route to the primary again.

  RTT metrics per transceiver: srtt/rttvar (alpha 1/8, beta 1/4, RFC 6298),
  the last sample, and a fixed-bucket histogram.Histogram (RTT_BUCKETS).
"""

import enum
import hmac
import math
import os
import struct
from typing import NamedTuple

from . import defaults
from .histogram import Histogram, header

PAYLOAD_LEN = 24
PAYLOAD_MAGIC = b"ERp1"
_PAYLOAD = struct.Struct(">4sIQ8s")
_SEQ_MOD = 1 << 32

# RFC 6298 section 2 constants.
ALPHA = 1 / 8
BETA = 1 / 4
K = 4
CLOCK_GRANULARITY = 0.001

RTT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class State(enum.StrEnum):
    """A transceiver's probe state, as `Event.state` reports it (and the log prints it)."""
    UP = "up"
    DOWN = "down"


class Event(NamedTuple):
    """A state change of one transceiver, for the worker's log and counters."""
    transceiver: int
    state: State        # the new state
    at: float           # `now` when it happened
    reason: str         # e.g. "3 probes missed", "2 probes answered"
    srtt: float | None  # smoothed RTT in seconds at the time, None if no sample yet


class Health:
    """Probe state of one transceiver (read-only for callers)."""

    __slots__ = ("tid", "up", "misses", "successes", "seq", "outstanding",
                 "srtt", "rttvar", "last_rtt", "histogram", "sent", "acked",
                 "lost", "late", "bad_acks", "transitions", "next_send", "changed_at")

    def __init__(self, tid, now):
        self.tid = tid
        self.up = True
        self.misses = 0           # consecutive
        self.successes = 0        # consecutive
        self.seq = int.from_bytes(os.urandom(4), "big")
        self.outstanding = {}     # seq -> [payload, sent, counted_as_missed]
        self.srtt = None
        self.rttvar = None
        self.last_rtt = None
        self.histogram = Histogram(RTT_BUCKETS)
        self.sent = 0             # counters, for metrics
        self.acked = 0
        self.lost = 0
        self.late = 0
        self.bad_acks = 0
        self.transitions = 0
        self.next_send = now
        self.changed_at = now


class Prober:
    """Probe scheduling and health state for a set of transceiver ids.

    Parameters
      transceiver_ids  ids to probe (ints)
      interval         seconds between probes to one transceiver
      timeout          seconds before an unanswered probe is a miss; None = adaptive
      down_after       consecutive misses that mark a transceiver down
      up_after         consecutive answers that mark it up again
      min_timeout, max_timeout  bounds of the adaptive timeout; max_timeout is
                       also how long a probe is remembered for a late answer
      now              the clock at creation (first probes are due at once)
      random           callable n -> n random bytes (tests may pass their own)
    """

    def __init__(self, transceiver_ids, interval=defaults.PROBE_INTERVAL, timeout=None,
                 down_after=defaults.PROBE_DOWN_AFTER, up_after=defaults.PROBE_UP_AFTER,
                 min_timeout=0.05, max_timeout=1.0, now=0.0, random=os.urandom):
        if not (interval > 0 and down_after >= 1 and up_after >= 1
                and 0 < min_timeout <= max_timeout):
            raise ValueError("bad prober parameters")
        if timeout is not None and not 0 < timeout <= max_timeout:
            raise ValueError("timeout must be in (0, max_timeout]")
        self.interval = interval
        self.timeout = timeout
        self.down_after = down_after
        self.up_after = up_after
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self._random = random
        self._events = []
        self.health = {}
        self.set_transceivers(transceiver_ids, now)

    # -- configuration --------------------------------------------------------

    def set_transceivers(self, transceiver_ids, now):
        """Start probing new ids and forget removed ones (on reload); kept ids keep their state."""
        ids = list(transceiver_ids)
        self.health = {tid: self.health.get(tid) or Health(tid, now) for tid in ids}

    # -- timers ---------------------------------------------------------------

    def rto(self, h):
        """The current timeout for transceiver health `h` (see the module docstring)."""
        if self.timeout is not None:
            return self.timeout
        if h.srtt is None:
            return self.max_timeout
        rto = h.srtt + max(CLOCK_GRANULARITY, K * h.rttvar)
        return min(self.max_timeout, max(self.min_timeout, rto))

    def next_deadline(self):
        """The earliest time `due` has work (a probe to send or one to time out), or None."""
        best = math.inf
        for h in self.health.values():
            best = min(best, h.next_send)
            if h.outstanding:
                rto = self.rto(h)
                for entry in h.outstanding.values():
                    deadline = entry[1] + (self.max_timeout if entry[2] else rto)
                    if deadline < best:
                        best = deadline
        return None if best == math.inf else best

    def due(self, now):
        """Time out old probes, then return [(tid, payload)] of probes to send now."""
        out = []
        for h in self.health.values():
            self._expire(h, now)
            if now >= h.next_send:
                h.seq = (h.seq + 1) % _SEQ_MOD
                payload = _PAYLOAD.pack(PAYLOAD_MAGIC, h.seq, int(now * 1e6) & (2**64 - 1),
                                        self._random(8))
                h.outstanding[h.seq] = [payload, now, False]
                h.sent += 1
                # Keep the schedule without drift, but never try to catch up a backlog.
                h.next_send = max(h.next_send + self.interval, now + self.interval / 2)
                out.append((h.tid, payload))
        return out

    def _expire(self, h, now):
        if not h.outstanding:
            return
        rto = self.rto(h)
        for seq in list(h.outstanding):
            entry = h.outstanding[seq]
            age = now - entry[1]
            if age >= self.max_timeout:
                del h.outstanding[seq]
                if not entry[2]:
                    self._miss(h, now)
            elif not entry[2] and age >= rto:
                entry[2] = True
                self._miss(h, now)

    def _miss(self, h, now):
        h.lost += 1
        h.successes = 0
        h.misses += 1
        if h.up and h.misses >= self.down_after:
            self._transition(h, False, now, f"{h.misses} probes missed")

    # -- answers --------------------------------------------------------------

    def ack(self, tid, payload, now):
        """Account a PROBE_ACK payload from transceiver `tid`. True if it matched a probe.

        Unknown ids, wrong lengths, unknown or already answered sequence
        numbers and mismatched nonces return False and count as `bad_acks`.
        """
        h = self.health.get(tid)
        if h is None:
            return False
        if len(payload) != PAYLOAD_LEN:
            h.bad_acks += 1
            return False
        payload = bytes(payload)
        seq = int.from_bytes(payload[4:8], "big")
        entry = h.outstanding.get(seq)
        if entry is None or not hmac.compare_digest(entry[0], payload):
            h.bad_acks += 1
            return False
        del h.outstanding[seq]
        self._sample(h, max(0.0, now - entry[1]))
        if entry[2]:
            h.late += 1
            return True
        h.acked += 1
        h.misses = 0
        h.successes += 1
        if not h.up and h.successes >= self.up_after:
            self._transition(h, True, now, f"{h.successes} probes answered")
        return True

    def _sample(self, h, rtt):
        # RFC 6298 section 2.2 / 2.3
        if h.srtt is None:
            h.srtt = rtt
            h.rttvar = rtt / 2
        else:
            h.rttvar = (1 - BETA) * h.rttvar + BETA * abs(h.srtt - rtt)
            h.srtt = (1 - ALPHA) * h.srtt + ALPHA * rtt
        h.last_rtt = rtt
        h.histogram.observe(rtt)

    def _transition(self, h, up, now, reason):
        h.up = up
        h.changed_at = now
        h.transitions += 1
        if up:
            h.misses = 0
        else:
            h.successes = 0
        self._events.append(Event(h.tid, State.UP if up else State.DOWN, now, reason, h.srtt))

    # -- queries ----------------------------------------------------------------

    def take_events(self):
        """The transitions since the last call, oldest first (and forget them)."""
        events, self._events = self._events, []
        return events

    def is_up(self, tid):
        h = self.health.get(tid)
        return True if h is None else h.up

    def route_for(self, tid, backups):
        """(effective transceiver id, failover flag) for traffic meant for `tid`.

        `backups` maps a transceiver id to its backup id (or None). See the
        module docstring for the policy.
        """
        if self.is_up(tid):
            return tid, False
        seen = {tid}
        nxt = backups.get(tid)
        while nxt is not None and nxt not in seen:
            if self.is_up(nxt):
                return nxt, True
            seen.add(nxt)
            nxt = backups.get(nxt)
        return tid, False

    def render(self, names=None):
        """Prometheus text lines for every transceiver (see docs/OPERATIONS.md).

        `names` maps id -> label value (config `name`, default "tx<id>").
        """
        names = names or {}
        rows = [(names.get(t) or f"tx{t}", h) for t, h in sorted(self.health.items())]
        lines = header("edge_relay_transceiver_up", "1 if probes say the transceiver is up", "gauge")
        lines += [f'edge_relay_transceiver_up{{transceiver="{n}"}} {int(h.up)}' for n, h in rows]
        for metric, attr, text in (
                ("edge_relay_transceiver_probes_sent_total", "sent", "probes sent"),
                ("edge_relay_transceiver_probes_lost_total", "lost", "probes not answered in time"),
                ("edge_relay_transceiver_probes_bad_total", "bad_acks",
                 "probe answers matching no outstanding probe"),
                ("edge_relay_transceiver_transitions_total", "transitions", "up/down changes")):
            lines += header(metric, text, "counter")
            lines += [f'{metric}{{transceiver="{n}"}} {getattr(h, attr)}' for n, h in rows]
        lines += header("edge_relay_transceiver_srtt_seconds", "smoothed probe RTT (RFC 6298)", "gauge")
        lines += [f'edge_relay_transceiver_srtt_seconds{{transceiver="{n}"}} {h.srtt}'
                  for n, h in rows if h.srtt is not None]
        lines += header("edge_relay_transceiver_rtt_seconds", "probe round-trip time")
        for n, h in rows:
            lines += h.histogram.render("edge_relay_transceiver_rtt_seconds", f'transceiver="{n}"')
        return lines
