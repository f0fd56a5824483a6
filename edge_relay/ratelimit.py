"""App-level rate limits, sans-IO: token buckets that take `now` and never read a clock.

Theory of operation
  The relay's first line against floods is the kernel (the nftables meters
  rendered by nft.py). These buckets are the second line, and the only one on
  hosts without nftables. They cap what is expensive for the relay:

    * new flows per source IP (a token verification plus a flow-table entry
      each): `SourceBuckets`, one bucket per source IP, in a bounded table;
    * new flows overall: one `Bucket`;
    * packets per flow: `FlowMeter`, a per-second window counter packed into
      one small int per flow (no per-flow object, see "Memory").

  Every method takes `now`, finite float seconds on a monotonic clock that
  never goes backwards (a clock that does is treated as "no time passed").
  A refusal is a plain False; the router turns it into a Drop reason.

Memory (bounded whatever an attacker sends)
  * SourceBuckets holds at most `max_sources` buckets (one float each, the
    time the bucket is full again: about 76 bytes with the dict entry and
    the key, where a [tokens, stamp] list took 150). When the table is
    full, buckets that have refilled completely are forgotten first (a full
    bucket is exactly what a newcomer gets, so forgetting it changes nothing);
    if none has, a newcomer is let through untracked and counted in
    `untracked` (fail open to the global bucket: a spoofer cycling through
    source addresses cannot grow the table, cannot evict a real client's
    bucket, and cannot lock every new source out either; what caps it is the
    global new-flow bucket, which the router always applies as well).
    Callers choose the key: the router uses the IPv4 address or the IPv6 /64,
    since one IPv6 host commonly holds a whole /64.
  * FlowMeter is a fixed-size count-min sketch plus an exact entry only for
    flows that send more than half their allowance in one window; see its
    docstring. Nothing is stored per flow for flows below that (the ordinary
    case), so the flow table's per-flow memory budget is untouched.
"""

import array
import math

from . import defaults, sockaddr


class Bucket:
    """A classic token bucket: `rate` tokens per second, at most `burst` stored.

    Starts full. `take(now)` spends one token and returns True, or returns
    False (spending nothing) when less than one token is left.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate, burst, now=0.0):
        if not (rate > 0 and math.isfinite(rate)) or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate!r}, {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now):
        elapsed = now - self.stamp
        if elapsed > 0.0:
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SourceBuckets:
    """One token bucket per key (a source IP), in a table of at most `max_sources`.

    `take(key, now)` is True when `key` may open one more flow now.

    A bucket is stored as one float, `full_at`: the time it holds `burst`
    tokens again (the "theoretical arrival time" of GCRA, ITU-T I.371). At
    `now` it holds burst - (full_at - now) * rate tokens, all of them when
    full_at <= now. Spending a token moves full_at 1/rate later; one is
    there to spend while full_at - now <= (burst - 1) / rate. That is the
    token bucket of `Bucket`, kept in a third of the memory. A clock that
    steps back adds no tokens (it can only make fewer appear).
    """

    __slots__ = ("rate", "burst", "max_sources", "buckets", "untracked", "_refill_time",
                 "_next_sweep", "_pass", "_pos", "_interval", "_tolerance")

    def __init__(self, rate, burst, max_sources=65536):
        if not (rate > 0 and math.isfinite(rate)) or burst < 1 or max_sources < 1:
            raise ValueError("need rate > 0, burst >= 1, max_sources >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_sources = max_sources
        self.buckets = {}           # key -> full_at: when its bucket holds `burst` tokens again
        self.untracked = 0          # newcomers let through untracked: table full of busy sources
        self._refill_time = self.burst / self.rate   # seconds for an empty bucket to fill
        self._next_sweep = -math.inf
        self._interval = 1.0 / self.rate             # what one token moves full_at
        # full_at - now at which one token is left; the 1e-9 token of slack
        # keeps float rounding in `full_at += interval` from refusing the
        # burst-th token of a burst taken at one instant
        self._tolerance = (self.burst - 1.0 + 1e-9) / self.rate
        self._pass = None           # expire(): the keys of the pass in progress, or None
        self._pos = 0               # expire(): how far into them

    def take(self, key, now):
        full_at = self.buckets.get(key)
        if full_at is None:
            if len(self.buckets) >= self.max_sources and not self._sweep(now):
                self.untracked += 1
                return True
            self.buckets[key] = now + self._interval      # a full bucket, less one token
            return True
        if full_at < now:
            full_at = now
        if full_at - now > self._tolerance:
            return False
        self.buckets[key] = full_at + self._interval
        return True

    def _sweep(self, now):
        """Forget every bucket that is full again at `now`; True if any room was made.

        O(table), and it runs only when the table is full: at most once per
        `_refill_time` / 4 after a sweep that freed nothing (newcomers in
        between are refused without a scan), so a flood of new sources costs
        one bounded scan now and then, not one per packet.
        """
        if now < self._next_sweep:
            return False
        stale = [k for k, full_at in self.buckets.items() if full_at <= now]
        for k in stale:
            del self.buckets[k]
        if not stale:
            self._next_sweep = now + self._refill_time / 4
        return bool(stale)

    def expire(self, now, budget=4096):
        """Forget buckets that have refilled completely by `now`; return how many.

        Looks at no more than `budget` buckets per call, carrying on where the
        previous call stopped: a pass over the table takes len / budget calls,
        and a bucket idle for `burst / rate` seconds is gone within one pass.
        A pass works from a list of the keys taken when it starts (one C-speed
        copy, 8 bytes a key, freed when the pass ends); keys added since wait
        for the next pass, keys already gone are skipped. Forgetting a full
        bucket changes nothing (a newcomer gets a full one), so this only
        gives memory back: called from the router's periodic expire, it
        keeps the table to the sources active in the last `burst / rate` s
        instead of letting it fill to `max_sources`, and a pass that leaves
        under a quarter of the keys it started with rebuilds the dict, which
        deleting keys never shrinks.
        """
        keys = self._pass
        if keys is None:
            if not self.buckets:
                return 0
            keys = self._pass = list(self.buckets)
            self._pos = 0
        start = self._pos
        end = min(start + max(1, budget), len(keys))
        buckets = self.buckets
        get = buckets.get
        forgotten = 0
        for i in range(start, end):
            k = keys[i]
            full_at = get(k)
            if full_at is not None and full_at <= now:
                del buckets[k]
                forgotten += 1
        if end >= len(keys):
            self._pass = None
            if len(buckets) * 4 < len(keys):
                # A dict never shrinks when keys leave it: after a burst of sources (a
                # flood, or 100k clients arriving at once) the empty table would keep
                # its peak allocation (~2.6 MB at 65536 sources) for good. A copy has
                # the size of what is left; at most once per pass, O(what is left).
                self.buckets = dict(buckets)
        else:
            self._pos = end
        return forgotten

    def __len__(self):
        return len(self.buckets)


class FlowMeter:
    """Per-flow packet-rate cap: at most `burst` packets per window of `burst / rate` s.

    Memory is the constraint (flows.py: under 300 bytes a flow at 100k flows,
    and the Flow object has no spare slot), so nothing is stored per flow in
    the ordinary case. Packets are counted in a count-min sketch of fixed
    size (two rows of `cells` 32-bit counters, 512 KiB at the default 65536,
    whatever the number of flows). The sketch never under-counts, so a flow
    whose estimate is below `burst / 2` is certainly below it and passes on
    the cheap path (two array increments). A flow whose estimate reaches
    `burst / 2` (a heavy flow, or a light one sharing both cells with heavy
    ones) gets an exact entry in `heavy`, keyed by its key and started at
    `burst / 2`; it is refused once that entry reaches `burst`.

    Guarantees, per window:
      * no flow forwards more than `burst` packets (the estimate was at least
        its true count when the exact entry started);
      * every flow may forward at least `burst / 2` (= rate/2 per second on
        average), even one that collides with floods in both rows; ordinary
        flows far below the rate, e.g. 50 packets/s of voice, never notice.
    Both the sketch and `heavy` are reset when the window advances, so
    `heavy` holds at most the flows that were heavy in the current window
    (bounded by the flow table). Keys must be hashable; the router passes
    the flow's key bytes, whose hash CPython caches (and randomises per
    process, so a client cannot aim collisions).
    """

    __slots__ = ("window", "burst", "threshold", "mask", "row0", "row1", "_zero",
                 "heavy", "current")

    def __init__(self, rate, burst, cells=65536):
        if not (rate > 0 and math.isfinite(rate)) or burst < 1:
            raise ValueError("need rate > 0 and burst >= 1")
        if cells < 1 or cells & (cells - 1):
            raise ValueError("cells must be a power of two")
        self.window = float(burst) / float(rate)
        self.burst = int(burst)
        self.threshold = max(1, self.burst // 2)
        self.mask = cells - 1
        self._zero = array.array("I", bytes(4 * cells))
        self.row0 = array.array("I", self._zero)
        self.row1 = array.array("I", self._zero)
        self.heavy = {}
        self.current = -1

    def advance(self, now):
        """Start a new window if `now` is past the current one (resetting the counts)."""
        w = int(now // self.window)
        if w > self.current:          # a clock that steps back stays in the current window
            self.current = w
            self.row0[:] = self._zero
            self.row1[:] = self._zero
            self.heavy.clear()

    def allow_heavy(self, key):
        """The slow path of `allow` (window already current): exact count of a flow whose estimate
        reached the threshold.

        For callers that inline the sketch fast path (Router.from_clients does,
        with advance(now) once per batch) and need its other branch.
        """
        heavy = self.heavy
        n = heavy.get(key, self.threshold)
        if n >= self.burst:
            return False
        heavy[key] = n + 1
        return True

    def allow(self, key, now):
        """True if flow `key` may forward one more packet at `now` (and count it)."""
        self.advance(now)
        h = hash(key)
        mask = self.mask
        row0, row1 = self.row0, self.row1
        i = h & mask
        j = (h >> 24) & mask
        a = row0[i]
        b = row1[j]
        est = a if a < b else b
        if est < self.threshold:
            if a < 0xFFFFFFFF:
                row0[i] = a + 1
            if b < 0xFFFFFFFF:
                row1[j] = b + 1
            return True
        heavy = self.heavy
        n = heavy.get(key, self.threshold)
        if n >= self.burst:
            return False
        heavy[key] = n + 1
        return True


def source_key(sa):
    """The per-source bucket key of raw sockaddr bytes: IPv4 address, or IPv6 /64."""
    ip = sockaddr.source_ip(sa)
    return ip if len(ip) == 4 else ip[:8]


# config.Limits keys that are RateLimiters keyword arguments.
CONFIG_KEYS = ("new_flows_per_source_rate", "new_flows_per_source_burst",
               "new_flows_rate", "new_flows_burst", "flow_packets_rate", "flow_packets_burst")


class RateLimiters:
    """The router's app-level rate limiters, built from config.Limits values (defaults: defaults.py).

    Attributes
      per_source   SourceBuckets: new flows per source IP
      total        Bucket: new flows on this worker
      per_flow     FlowMeter: packets per flow
    """

    __slots__ = ("per_source", "total", "per_flow")

    def __init__(self, *, new_flows_per_source_rate=defaults.NEW_FLOWS_PER_SOURCE_RATE,
                 new_flows_per_source_burst=defaults.NEW_FLOWS_PER_SOURCE_BURST,
                 new_flows_rate=defaults.NEW_FLOWS_RATE, new_flows_burst=defaults.NEW_FLOWS_BURST,
                 flow_packets_rate=defaults.FLOW_PACKETS_RATE, flow_packets_burst=defaults.FLOW_PACKETS_BURST,
                 max_sources=65536, now=0.0):
        self.per_source = SourceBuckets(new_flows_per_source_rate, new_flows_per_source_burst,
                                        max_sources)
        self.total = Bucket(new_flows_rate, new_flows_burst, now)
        self.per_flow = FlowMeter(flow_packets_rate, flow_packets_burst)
