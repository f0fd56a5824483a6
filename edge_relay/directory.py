"""The PoP-wide flow directory: confirmed flows shared between relays through Redis (sans-IO).

Theory of operation
  Optional and off by default (configured by the Redis address). When a load
  balancer rehashes a client to another relay host, that host sees DTLS/SRTP
  from an address it has no flow for. Without the directory it drops them
  (Drop.UNKNOWN_FLOW) until the client's next consent check (a STUN Binding
  Request carrying the routing token, up to ~5 s away, RFC 7675). With it, the
  relay asks Redis who owns the address, holds the packets meanwhile, and
  forwards them as soon as the answer comes.

  Keys and values (one string key per confirmed flow):
      key    <prefix><listener>:<hex>      prefix "edge-relay:flow:" by default
             <listener> the public listener index (relays of a PoP share the
             listener layout); <hex> = lowercase hex of family (1 octet, 4 or
             6), port (2 octets, big-endian) and address (4 or 16 octets) as
             sockaddr.client_fields gives them. Example, 192.0.2.1:5000 on
             listener 0: "edge-relay:flow:0:041388c0000201".
      value  the transceiver id in decimal ASCII ("17")
      ttl    SET ... EX ttl; refreshed while the flow lives (see `refresh`)

  This module never touches a socket: it builds RESP commands (argument
  tuples for resp.Client.call) and consumes replies; the worker moves them.

  Publishing: `publish(listener, sa, tid)` when a flow is confirmed or
  changes owner (failover), and `refresh(snapshot, now)` every loop turn,
  which re-publishes all confirmed flows once per ttl/3, at most `budget`
  commands per call so a large table never stalls the loop.

  Lookups: `hold(listener, sa, packet, now)` for a DTLS/SRTP packet of an
  unknown flow. It returns one of
      (Hold.LOOKUP, lookup) first packet for this address: send
                            lookup.command and hand the reply to
                            `resolved(lookup, reply, now)`
      (Hold.HELD, None)     queued behind a lookup already in flight
      (Hold.DROP_*, None)   not held; the caller counts the drop:
          DROP_NEGATIVE     the directory said "unknown" less than
                            negative_ttl ago
          DROP_FLOW_FULL    max_held_per_flow packets already held
          DROP_TOTAL_FULL   max_held_total packets held in all
          DROP_LOOKUPS_FULL max_lookups lookups in flight
  The packet is copied (the caller's receive buffer is reused).
  `resolved` returns a `Resolution` (transceiver id or None, the held packets
  in arrival order, and why) or None for an answer nobody waits for any more.
  `expire(now)` returns the Resolutions of lookups older than `timeout`; their
  packets are dropped, and a late reply is ignored. If resp.Client.call
  refuses the command, call `resolved(lookup, resp.Disconnected(...), now)`.

  Trust: the directory is PoP-internal and trusted like the relay's own
  table: a hit makes the relay create a CONFIRMED flow for that address. The
  lookups themselves are triggered by unauthenticated packets, so they are
  bounded (in-flight cap, held-packet caps, negative cache) and never block.

  All counters are in `stats` (a Counter): "published", "lookups", "held",
  "late_replies", one per resolution reason (`Result`) and one per drop
  reason (`Hold.DROP_*`). Hold and Result are StrEnums: their values are the
  keys, so the stats serialize as plain strings (metrics.ExtraShared).
"""

import collections
import enum
from typing import NamedTuple

from . import defaults
from .sockaddr import client_fields

KEY_PREFIX = b"edge-relay:flow:"


class Hold(enum.StrEnum):
    """What `hold` did with a packet. The DROP_* values are also `stats` keys."""
    LOOKUP = "lookup"                           # a new lookup: send its command
    HELD = "held"                               # queued behind a lookup in flight
    DROP_NEGATIVE = "directory_negative"        # the directory said "unknown" recently
    DROP_FLOW_FULL = "directory_flow_full"      # max_held_per_flow reached
    DROP_TOTAL_FULL = "directory_total_full"    # max_held_total reached
    DROP_LOOKUPS_FULL = "directory_lookups_full"  # max_lookups in flight


class Result(enum.StrEnum):
    """How a lookup ended (`Resolution.reason`); each value is also a `stats` key."""
    HIT = "hit"             # the directory named a transceiver
    MISS = "miss"           # no entry
    ERROR = "error"         # Redis error or connection trouble
    INVALID = "invalid"     # an entry that is not a transceiver id
    TIMEOUT = "timeout"     # no answer within `timeout`


def flow_key(listener, sa, prefix=KEY_PREFIX):
    """The Redis key (bytes) of the flow of raw sockaddr `sa` on `listener`."""
    family, port, addr16 = client_fields(sa)
    addr = addr16[:4] if family == 4 else addr16
    return b"%s%d:%s" % (prefix, listener, (bytes((family,)) + port + addr).hex().encode("ascii"))


def decode_value(value):
    """A transceiver id from a GET reply, or None if it is not one (0..65535 in decimal)."""
    if not isinstance(value, bytes) or not 1 <= len(value) <= 5 or not value.isdigit():
        return None
    tid = int(value)
    return tid if tid <= 65535 else None


class Lookup:
    """One GET in flight for one client address."""

    __slots__ = ("key", "listener", "sa", "command", "deadline", "packets", "done")

    def __init__(self, key, listener, sa, deadline):
        self.key = key
        self.listener = listener
        self.sa = sa
        self.command = ("GET", key)
        self.deadline = deadline
        self.packets = []
        self.done = False


class Resolution(NamedTuple):
    listener: int
    sa: bytes
    transceiver: int | None   # None: not found, error or timeout: drop the packets
    packets: list             # held packets (bytes), oldest first
    reason: Result


class Directory:
    """Flow-directory logic of one worker (see the module docstring).

    Parameters
      ttl                seconds a published entry lives without refresh
      timeout            seconds a lookup may take before its packets are dropped
      max_held_per_flow  packets held per address while its lookup is in flight
      max_held_total     packets held in all
      max_lookups        lookups in flight at once
      negative_ttl       seconds an address the directory did not know is not asked again
      max_negative       bound on remembered unknown addresses
      prefix             key prefix (bytes)
    """

    def __init__(self, *, ttl=defaults.DIRECTORY_TTL, timeout=defaults.DIRECTORY_TIMEOUT,
                 max_held_per_flow=defaults.DIRECTORY_MAX_HELD_PER_FLOW,
                 max_held_total=defaults.DIRECTORY_MAX_HELD_TOTAL, max_lookups=defaults.DIRECTORY_MAX_LOOKUPS,
                 negative_ttl=defaults.DIRECTORY_NEGATIVE_TTL, max_negative=4096, prefix=KEY_PREFIX):
        if ttl < 1 or timeout <= 0 or max_held_per_flow < 1 or max_lookups < 1:
            raise ValueError("bad directory parameters")
        self.ttl = int(ttl)
        self.timeout = timeout
        self.max_held_per_flow = max_held_per_flow
        self.max_held_total = max_held_total
        self.max_lookups = max_lookups
        self.negative_ttl = negative_ttl
        self.max_negative = max_negative
        self.prefix = prefix
        self.lookups = {}                  # key -> Lookup
        self.negative = {}                 # key -> expiry, insertion ordered
        self.held_total = 0
        self.stats = collections.Counter()
        self._sweep = None
        self._next_sweep = None

    # -- publishing -----------------------------------------------------------

    def publish(self, listener, sa, tid):
        """The SET command announcing that `sa` on `listener` belongs to transceiver `tid`."""
        self.stats["published"] += 1
        key = flow_key(listener, sa, self.prefix)
        self.negative.pop(key, None)
        return ("SET", key, b"%d" % tid, "EX", self.ttl)

    def unpublish(self, listener, sa):
        """The DEL command for a flow this relay ended on purpose (optional: the TTL does it too)."""
        return ("DEL", flow_key(listener, sa, self.prefix))

    def refresh(self, snapshot, now, budget=256):
        """SET commands re-publishing confirmed flows, paced (see the module docstring).

        `snapshot()` returns an iterable of (listener, sa, tid) for the
        confirmed flows; it is called once per sweep (every ttl/3) and must
        not be invalidated by later table changes (return a list).
        """
        if self._sweep is None:
            if self._next_sweep is not None and now < self._next_sweep:
                return []
            self._sweep = iter(snapshot())
            self._next_sweep = now + self.ttl / 3
        out = []
        for listener, sa, tid in self._sweep:
            out.append(self.publish(listener, sa, tid))
            if len(out) >= budget:
                return out
        self._sweep = None
        return out

    # -- lookups ----------------------------------------------------------------

    def hold(self, listener, sa, packet, now):
        """Hold `packet` from unknown `sa` until the directory answers; see the module docstring."""
        key = flow_key(listener, sa, self.prefix)
        lookup = self.lookups.get(key)
        if lookup is None:
            expiry = self.negative.get(key)
            if expiry is not None:
                if now < expiry:
                    return self._drop(Hold.DROP_NEGATIVE)
                del self.negative[key]
            if len(self.lookups) >= self.max_lookups:
                return self._drop(Hold.DROP_LOOKUPS_FULL)
        elif len(lookup.packets) >= self.max_held_per_flow:
            return self._drop(Hold.DROP_FLOW_FULL)
        if self.held_total >= self.max_held_total:
            return self._drop(Hold.DROP_TOTAL_FULL)
        self.held_total += 1
        self.stats["held"] += 1
        if lookup is not None:
            lookup.packets.append(bytes(packet))
            return Hold.HELD, None
        lookup = Lookup(key, listener, bytes(sa), now + self.timeout)
        lookup.packets.append(bytes(packet))
        self.lookups[key] = lookup
        self.stats["lookups"] += 1
        return Hold.LOOKUP, lookup

    def _drop(self, reason):
        self.stats[reason] += 1
        return reason, None

    def _finish(self, lookup, tid, reason):
        lookup.done = True
        del self.lookups[lookup.key]
        self.held_total -= len(lookup.packets)
        self.stats[reason] += 1
        if tid is None and reason != Result.TIMEOUT:
            self._remember_unknown(lookup.key, reason)
        return Resolution(lookup.listener, lookup.sa, tid, lookup.packets, reason)

    def _remember_unknown(self, key, reason):
        if reason != Result.MISS and reason != Result.INVALID:
            return
        if len(self.negative) >= self.max_negative:
            self.negative.pop(next(iter(self.negative)))
        self.negative[key] = self._now + self.negative_ttl

    def resolved(self, lookup, reply, now):
        """Consume the GET reply (a value or a resp error) for `lookup`. Resolution or None."""
        if lookup.done or self.lookups.get(lookup.key) is not lookup:
            self.stats["late_replies"] += 1
            return None
        self._now = now
        if reply is None:
            return self._finish(lookup, None, Result.MISS)
        if isinstance(reply, Exception):
            return self._finish(lookup, None, Result.ERROR)
        tid = decode_value(reply)
        if tid is None:
            return self._finish(lookup, None, Result.INVALID)
        return self._finish(lookup, tid, Result.HIT)

    def expire(self, now):
        """Resolutions (transceiver None) of lookups past their timeout; forgets stale negatives."""
        self._now = now
        out = [self._finish(lk, None, Result.TIMEOUT)
               for lk in [lk for lk in self.lookups.values() if now >= lk.deadline]]
        while self.negative:
            key = next(iter(self.negative))
            if self.negative[key] > now:
                break
            del self.negative[key]
        return out

    def next_deadline(self):
        """The earliest lookup timeout, or None (negative entries need no timer)."""
        return min((lk.deadline for lk in self.lookups.values()), default=None)

    _now = 0.0
