"""The flow table: which transceiver owns each client address (sans-IO, clock passed in).

Theory of operation
-------------------
A flow is one client (raw sockaddr bytes, see sockaddr.py) on one listener
(public socket index) bound to one transceiver id. It is PENDING from the first
valid STUN Binding Request until that transceiver answers through the relay,
then CONFIRMED. The table never reads a clock: every method that needs time
takes `now`, finite float seconds on a monotonic clock.

Lifetimes
  * PENDING flows die `pending_ttl` after creation. Client packets never extend
    them, so a spoofer cannot keep pending state alive. The hot path must not
    write `last_seen` on a pending flow (`if flow.state == CONFIRMED:
    flow.last_seen = now`); even if it does, `expire` ignores `last_seen` for
    pending flows (the bucket a pending flow sits in is its creation deadline;
    only `snapshot` and a bucket rebuild read it).
  * CONFIRMED flows die `idle_timeout` after the last client packet (RFC 7675
    consent: 30 s). The hot path refreshes a flow by assigning
    `flow.last_seen = now`; the table costs nothing per packet.
  * A flow is never removed before its deadline and may outlive it by up to
    one `granularity` (plus however late the caller runs `expire`). Until then
    the hot path can still find it; callers that care compare deadlines.

Timer wheel
  Every flow sits in the bucket of its deadline: bucket k holds deadlines in
  [(k-1)*g, k*g) and is due once k*g <= now. A heap of bucket numbers gives the
  earliest due bucket, so `expire` pops only due buckets and `next_deadline` is
  O(1). Entries are checked lazily when their bucket pops: a removed flow is
  skipped, a confirmed flow whose `last_seen` moved on is re-bucketed at its new
  deadline. Each live confirmed flow is therefore touched about once per
  `idle_timeout`, never per packet. A removed flow's object lingers in its
  bucket until that bucket is due; if stale entries pile up (many `remove`
  calls) the buckets are rebuilt, amortised O(1) per removal.

Memory (tests/test_flows.py measures it with tracemalloc): about 246 bytes
per confirmed IPv4 flow at 100k flows: Flow object 112 (ten slots + GC
header), key bytes 49, last_seen float 24 (when not shared with other flows
of the same batch), dict entry and index ~52, bucket entry ~9; with a crash
journal attached about 278 (the record index `jslot`, an int above 256; the
64-byte record itself is in the journal's shared region). Transceiver ids
are interned so they cost nothing per flow. Per session (routing token), not
per flow: one [count, key] record shared by the session's flows; per
transceiver one dict entry. The pending FIFO holds pending flows only (a
confirmed flow leaves it once the flows opened before it have gone too).
Whatever the router caches in `route` comes on top.

Invariants (the tests check them against a reference model)
  * `by_listener[i]` maps key -> Flow for exactly the live flows of listener i;
    a flow's `state` is REMOVED once it has left the table, and removed flows
    never come back (open makes a new Flow object).
  * `pending` / `confirmed` count the live flows in each state; the per-source
    pending counts (keyed by `sockaddr.source_ip`) sum to `pending` and hold no
    zero entries.
  * Caps refuse new flows (a Drop is returned): `max_flows_per_session` per
    routing token (its nonce, the `session` key of `open`),
    `max_flows_per_transceiver` per owner, `max_pending_per_source` per source
    IP. A table at `max_flows` evicts its oldest pending flow to make room
    (counted in `evicted`; unless `evict_pending` is False) and refuses only
    when no flow is pending: confirmed flows are never evicted.
  * `set_limits` applies new caps and lifetimes to the live table (reload).
  * `restore` raises ValueError and nothing else for any malformed input, and
    leaves the table unchanged when it raises.

Crash journal (journal.py)
  With a journal.Journal in `journal`, every transition that changes what a
  successor must know about a confirmed flow writes its record: PENDING ->
  CONFIRMED, a change of owner (move, reassign), and leaving the table
  (remove, expire, eviction). Nothing is written per packet, nor for pending
  flows. Flags are journaled with the transition that follows them, so the
  router sets FAILED_OVER before it moves or confirms the flow.
"""

import binascii
import collections
import heapq
import math
import socket
import struct
import sys

from .drops import Drop
from .sockaddr import SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN, source_ip

PENDING = 0
CONFIRMED = 1
REMOVED = 2          # internal: the flow has left the table (its object may linger in a bucket)

# Flow.flags bits: state about a flow that is not its owner or lifetime, kept by
# snapshot/restore and the crash journal (journal.py). Only FAILED_OVER exists.
FAILED_OVER = 1      # moved to a backup by failover: its datagrams carry header.FLAG_FAILOVER
FLAG_BITS = FAILED_OVER

# Transceiver ids are interned so 100k flows share a handful of int objects
# (struct.unpack makes a fresh int above 256 for every token); the map is
# reset past this size, which only costs sharing, never correctness.
_MAX_INTERNED = 65536


class Flow:
    """One client address on one listener, owned by one transceiver.

    Attributes (plain slots; the hot path reads and writes them directly):
      key          raw sockaddr bytes of the client (the by_listener dict key)
      listener     public socket index
      transceiver  owning transceiver id
      state        PENDING, CONFIRMED, or REMOVED once out of the table
      last_seen    pending: creation time; confirmed: last client packet
      restart_to   transceiver id of an ICE restart in progress, or None
      flags        FLAG_BITS (FAILED_OVER); set them before the transition that
                   makes them true (open, confirm, move), which journals them
      route        opaque router cache (e.g. a header prefix); the table never
                   reads it, and resets it to None when `move` changes owner
      session      the table's [count, key] record of the routing token that
                   opened the flow, shared by its flows, or None (table-owned)
      jslot        the flow's record index in the table's crash journal, or None
                   (table-owned: journal.py)
    """

    # Ten pointers and nothing else: no __dict__, no __weakref__ (memory target).
    __slots__ = ("key", "listener", "transceiver", "state", "last_seen", "restart_to", "flags", "route",
                 "session", "jslot")

    def __init__(self, key, listener, transceiver, state, last_seen, flags=0):
        self.key = key
        self.listener = listener
        self.transceiver = transceiver
        self.state = state
        self.last_seen = last_seen
        self.restart_to = None
        self.flags = flags
        self.route = None
        self.session = None
        self.jslot = None

    def __repr__(self):
        state = ("PENDING", "CONFIRMED", "REMOVED")[self.state]
        return (f"<Flow {self.key.hex()} l{self.listener} t{self.transceiver} {state}"
                f" last_seen={self.last_seen} restart_to={self.restart_to} flags={self.flags}>")


# Snapshot wire format, version 1 (all little-endian; only ever read by the
# same build family on the same host, but versioned so a newer relay can
# refuse an older layout cleanly):
#   header  magic "ERFT" | version u8 | reserved u8 (0) | reserved u16 (0)
#           | count u32 | crc32 u32 of every record byte
#   record  age f64 (now - last_seen, >= 0) | transceiver u32 | restart_to u32
#           | listener u16 | state u8 | flags u8 (bit 0: restart_to present;
#           bit 1: Flow.flags FAILED_OVER) | key length u8 (16 or 28) | key
# `route` is not saved: it is a cache the router rebuilds. A relay older than
# bit 1 refuses a snapshot that sets it (a downgrade loses those flows).
SNAPSHOT_MAGIC = b"ERFT"
SNAPSHOT_VERSION = 1
_SNAP_HEAD = struct.Struct("<4sBBHII")
_SNAP_REC = struct.Struct("<dIIHBBB")
_F_RESTART = 1
_F_FAILED_OVER = 2
_U32 = 0xFFFFFFFF
_AF_INET = socket.AF_INET.to_bytes(2, sys.byteorder)
_AF_INET6 = socket.AF_INET6.to_bytes(2, sys.byteorder)
_ZERO8 = bytes(8)


class FlowTable:
    """Flows of one worker, indexed by listener then client sockaddr bytes.

    Parameters
      n_listeners             number of public sockets (listener indexes 0..n-1)
      max_flows               cap on all live flows (pending + confirmed)
      max_pending_per_source  cap on pending flows per source IP
      pending_ttl             seconds a pending flow lives after creation
      idle_timeout            seconds a confirmed flow lives after its last client packet
      granularity             timer-wheel bucket width in seconds: expiry runs at
                              most this late, and larger buckets mean fewer wake-ups
      max_flows_per_session   cap on live flows opened by one routing token (0 = none)
      max_flows_per_transceiver  cap on live flows owned by one transceiver (0 = none)
      evict_pending           a full table evicts its oldest pending flow (default)

    `by_listener[i].get(sa)` is the hot-path lookup; `pending`, `confirmed` and
    `scanned` (bucket entries examined by `expire`, cumulative: a work meter)
    and `evicted` (pending flows evicted to make room, cumulative) are plain
    int attributes, read-only for callers.
    """

    # Rebuild the buckets when they hold this many entries beyond two per live flow.
    _compact_slack = 4096

    def __init__(self, *, n_listeners=1, max_flows=200_000, max_pending_per_source=16,
                 pending_ttl=5.0, idle_timeout=30.0, granularity=0.25, max_flows_per_session=16,
                 max_flows_per_transceiver=0, evict_pending=True):
        if not (isinstance(granularity, (int, float)) and math.isfinite(granularity) and granularity > 0):
            raise ValueError(f"granularity must be a positive finite number, not {granularity!r}")
        if n_listeners < 1 or n_listeners > 0xFFFF:
            raise ValueError(f"n_listeners must be 1..65535, not {n_listeners!r}")
        self.n_listeners = n_listeners
        self.granularity = float(granularity)
        self.evict_pending = evict_pending
        self.by_listener = [{} for _ in range(n_listeners)]
        self.pending = 0
        self.confirmed = 0
        self.scanned = 0
        self.evicted = 0
        self._per_source = {}        # source_ip -> live pending flows from it (never 0)
        self._sessions = {}          # session key -> [live flows, key] (never 0), shared by its flows
        self._per_tx = {}            # transceiver id -> live flows it owns (never 0)
        self._fifo = collections.deque()   # pending flows in opening order (plus stale entries)
        self._buckets = {}           # bucket number -> [Flow, ...]
        self._heap = []              # bucket numbers present in _buckets, min-heap
        self._entries = 0            # total entries across buckets, live or stale
        self._ids = {}               # interned transceiver ids
        self.journal = None          # journal.Journal recording confirmed flows, or None (attach())
        self.pending_ttl = self.idle_timeout = None
        self.set_limits(max_flows=max_flows, max_pending_per_source=max_pending_per_source,
                        pending_ttl=pending_ttl, idle_timeout=idle_timeout,
                        max_flows_per_session=max_flows_per_session,
                        max_flows_per_transceiver=max_flows_per_transceiver)

    def set_limits(self, *, max_flows, max_pending_per_source, pending_ttl, idle_timeout,
                   max_flows_per_session=16, max_flows_per_transceiver=0):
        """Apply caps and lifetimes to the live table (construction and reload); ValueError if bad.

        Caps apply to the next `open`: flows already over a lowered cap stay
        (pending ones die within `pending_ttl`). New lifetimes apply to every
        live flow at once: the buckets are rebuilt at their new deadlines.
        """
        for name, value in (("pending_ttl", pending_ttl), ("idle_timeout", idle_timeout)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, not {value!r}")
        if min(max_flows, max_pending_per_source, max_flows_per_session, max_flows_per_transceiver) < 0:
            raise ValueError("flow caps must be >= 0")
        self.max_flows = max_flows
        self.max_pending_per_source = max_pending_per_source
        self.max_flows_per_session = max_flows_per_session
        self.max_flows_per_transceiver = max_flows_per_transceiver
        changed = (self.pending_ttl, self.idle_timeout) != (float(pending_ttl), float(idle_timeout))
        self.pending_ttl = float(pending_ttl)
        self.idle_timeout = float(idle_timeout)
        if changed and self._entries:
            self._compact()

    def per_transceiver(self, transceiver):
        """Live flows `transceiver` owns."""
        return self._per_tx.get(transceiver, 0)

    def per_session(self, session):
        """Live flows opened by routing token `session` (as given to `open`)."""
        rec = self._sessions.get(session)
        return rec[0] if rec is not None else 0

    # -- lookup ------------------------------------------------------------

    def get(self, listener, sa):
        """The live Flow for `sa` (bytes) on `listener`, or None."""
        return self.by_listener[listener].get(sa)

    def __len__(self):
        return self.pending + self.confirmed

    def __iter__(self):
        """Live flows. Do not open/remove/expire while iterating: iterate a list(table)."""
        for flows in self.by_listener:
            yield from flows.values()

    def next_deadline(self):
        """The earliest `now` at which `expire` may have work, or None if it never will.

        The due bucket may hold only refreshed or removed flows, so a wake-up
        at this time can find nothing to do; it is never too late.
        """
        return self._heap[0] * self.granularity if self._heap else None

    # -- transitions ---------------------------------------------------------

    def open(self, listener, sa, transceiver, now, session=None):
        """A new PENDING flow for `sa` on `listener` owned by `transceiver`, created at `now`.

        Returns the existing flow unchanged if `sa` already has one on that
        listener (whatever its transceiver: ICE restarts go through
        `restart_to` and `move`). `session` (hashable, e.g. the routing
        token's nonce; None = not counted) names the session the flow
        belongs to. Returns Drop.SESSION_FLOWS, Drop.TRANSCEIVER_FLOWS or
        Drop.PENDING_PER_SOURCE when that cap is reached. A table holding
        `max_flows` evicts its oldest pending flow first, and returns
        Drop.FLOW_TABLE_FULL only when none is pending (or eviction is off).
        """
        if type(sa) is not bytes:
            sa = bytes(sa)          # never keep (or hash) a view of a receive buffer
        flows = self.by_listener[listener]
        flow = flows.get(sa)
        if flow is not None:
            return flow
        rec = None
        if session is not None:
            rec = self._sessions.get(session)
            if rec is not None and self.max_flows_per_session and rec[0] >= self.max_flows_per_session:
                return Drop.SESSION_FLOWS
        transceiver = self._intern(transceiver)
        cap = self.max_flows_per_transceiver
        if cap and self._per_tx.get(transceiver, 0) >= cap:
            return Drop.TRANSCEIVER_FLOWS
        full = self.pending + self.confirmed >= self.max_flows
        if full and not self.evict_pending:
            return Drop.FLOW_TABLE_FULL
        src = source_ip(sa)
        n = self._per_source.get(src, 0)
        if n >= self.max_pending_per_source:
            return Drop.PENDING_PER_SOURCE
        if full:
            if not self._evict_oldest_pending():
                return Drop.FLOW_TABLE_FULL
            n = self._per_source.get(src, 0)        # the evicted flow may have been this source's
        self._per_source[src] = n + 1
        self.pending += 1
        flow = Flow(sa, listener, transceiver, PENDING, now)
        flows[sa] = flow
        self._per_tx[transceiver] = self._per_tx.get(transceiver, 0) + 1
        if session is not None:
            if rec is None:
                self._sessions[session] = rec = [0, session]
            rec[0] += 1
            flow.session = rec
        self._fifo.append(flow)
        self._schedule(flow, now + self.pending_ttl)
        return flow

    def confirm(self, flow, now):
        """The owning transceiver answered: PENDING -> CONFIRMED, last_seen = now.

        Idempotent on a confirmed flow (it only refreshes last_seen). Returns
        False, changing nothing, if the flow has left the table.
        """
        state = flow.state
        if state == CONFIRMED:
            flow.last_seen = now
            return True
        if state != PENDING:
            return False
        flow.last_seen = now
        self._promote(flow, now)
        return True

    def move(self, flow, transceiver, now):
        """ICE restart completed: `transceiver` owns the flow, which is confirmed at `now`.

        Clears `restart_to` and `route` (the router's cache was built for the
        old owner). Returns False, changing nothing, if the flow has left the table.
        The per-transceiver cap is not applied: a move never adds a flow.
        """
        state = flow.state
        if state == REMOVED:
            return False
        self._reassign(flow, transceiver)
        flow.restart_to = None
        flow.route = None
        flow.last_seen = now
        if state == PENDING:
            self._promote(flow, now)
        elif self.journal is not None:
            self.journal.put(flow)
        return True

    def reassign(self, flow, transceiver):
        """Change a live flow's owner, keeping its state and deadline (failover of a pending flow)."""
        if flow.state == REMOVED:
            return
        if self._reassign(flow, transceiver) and flow.state == CONFIRMED and self.journal is not None:
            self.journal.put(flow)

    def _reassign(self, flow, transceiver):
        """Change a live flow's owner; True if it changed."""
        old = flow.transceiver
        transceiver = self._intern(transceiver)
        if old == transceiver:
            return False
        self._tx_leave(old)
        self._per_tx[transceiver] = self._per_tx.get(transceiver, 0) + 1
        flow.transceiver = transceiver
        return True

    def remove(self, flow):
        """Take a flow out of the table now (idempotent)."""
        if flow.state == REMOVED:
            return
        self._drop(flow)
        self._trim_fifo()
        # Removals are the one way stale bucket entries accumulate faster than
        # buckets fall due; rebuild once they dwarf the live entries.
        if self._entries > 2 * (self.pending + self.confirmed) + self._compact_slack:
            self._compact()

    def expire(self, now):
        """Remove every flow whose deadline is <= `now`, visiting only due buckets.

        Returns the number of flows removed. A flow may survive its deadline
        by up to one granularity: it goes when its bucket falls due.
        """
        heap = self._heap
        if not heap:
            return 0
        g = self.granularity
        buckets = self._buckets
        idle = self.idle_timeout
        removed = 0
        while heap and heap[0] * g <= now:
            k = heapq.heappop(heap)
            bucket = buckets.pop(k)
            self._entries -= len(bucket)
            self.scanned += len(bucket)
            for flow in bucket:
                state = flow.state
                if state == CONFIRMED:
                    deadline = flow.last_seen + idle
                    if now < deadline:
                        # Strictly later than k, so a bucket never refills itself.
                        self._schedule(flow, deadline, k + 1)
                        continue
                elif state != PENDING:
                    continue        # removed (or a duplicate of a flow already expired)
                # A pending flow's only entry is its creation deadline: due now.
                self._drop(flow)
                removed += 1
        if removed:
            self._trim_fifo()
        return removed

    # -- snapshot ------------------------------------------------------------

    def snapshot(self, now):
        """The live, unexpired flows as versioned binary (see the format above).

        Ages (now - last_seen) are saved, not times, so the receiving process
        may use any monotonic clock. `route` is not saved; `flags` are.
        Left out: flows whose ids do not fit 32 bits (the v1 token carries
        16) and keys that are not a Linux sockaddr_in / sockaddr_in6.
        """
        rec = _SNAP_REC.pack
        parts = []
        for flow in self:
            limit = self.pending_ttl if flow.state == PENDING else self.idle_timeout
            if now >= flow.last_seen + limit:
                continue
            rto = flow.restart_to
            tid = flow.transceiver
            # Anything restore would reject must stay out, or one odd flow
            # would make the whole snapshot unusable.
            if not (0 <= tid <= _U32 and (rto is None or 0 <= rto <= _U32)
                    and _key_ok(flow.key)):
                continue
            age = now - flow.last_seen
            flags = 0 if rto is None else _F_RESTART
            if flow.flags & FAILED_OVER:
                flags |= _F_FAILED_OVER
            parts.append(rec(age if age > 0.0 else 0.0, tid, 0 if rto is None else rto,
                             flow.listener, flow.state, flags, len(flow.key)))
            parts.append(flow.key)
        body = b"".join(parts)
        head = _SNAP_HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, 0, 0, len(parts) // 2,
                               binascii.crc32(body))
        return head + body

    def restore(self, data, now):
        """Add the flows of a `snapshot` to this table; returns how many were added.

        Each flow keeps its age relative to `now` (the time between snapshot
        and restore does not count) and its flags. Skipped without error: flows already
        expired, flows on a listener this table does not have, clients that
        already have a flow here, and flows that the caps refuse. Raises
        ValueError (and nothing else) for malformed data, leaving the table
        unchanged: the whole snapshot is validated before any flow is added.
        """
        records = _parse_snapshot(data)
        added = 0
        per_source = self._per_source
        journal = self.journal
        for age, tid, rto, listener, state, key, flags in records:
            if listener >= self.n_listeners:
                continue
            last_seen = now - age
            ttl = self.pending_ttl if state == PENDING else self.idle_timeout
            deadline = last_seen + ttl
            if now >= deadline:
                continue
            flows = self.by_listener[listener]
            if key in flows or self.pending + self.confirmed >= self.max_flows:
                continue
            if state == PENDING:
                src = source_ip(key)
                n = per_source.get(src, 0)
                if n >= self.max_pending_per_source:
                    continue
                per_source[src] = n + 1
                self.pending += 1
            else:
                self.confirmed += 1
            flow = self._insert(key, listener, tid, state, last_seen, flags, deadline)
            if rto is not None:
                flow.restart_to = self._intern(rto)
            if state == PENDING:
                self._fifo.append(flow)
            elif journal is not None:
                journal.put(flow)
            added += 1
        return added

    def adopt(self, entries, now):
        """Add CONFIRMED flows seen last at `now` (the crash journal's restore, journal.py).

        `entries` yields (listener, key, transceiver, flags, jslot, ...)
        tuples; each flow gets that `jslot` (its journal record, which is not
        written). Returns the jslots of the entries refused, adding nothing
        for them: a listener this table does not have, a key that already
        has a flow there, or a full table. One loop, one bucket: restore
        time is what a crashed worker's callers wait.
        """
        refused = []
        deadline = now + self.idle_timeout
        k = int(deadline // self.granularity) + 1
        bucket = self._buckets.get(k)
        if bucket is None:
            self._buckets[k] = bucket = []
            heapq.heappush(self._heap, k)
        room = self.max_flows - self.pending - self.confirmed
        by_listener, n_listeners, per_tx, intern = self.by_listener, self.n_listeners, self._per_tx, self._intern
        ids = self._ids
        added = 0
        for entry in entries:
            listener, key, tid, flags, jslot = entry[:5]
            if room <= added or not 0 <= listener < n_listeners or key in by_listener[listener]:
                refused.append(jslot)
                continue
            shared = ids.get(tid)
            tid = intern(tid) if shared is None else shared
            flow = Flow(key, listener, tid, CONFIRMED, now, flags)
            flow.jslot = jslot
            by_listener[listener][key] = flow
            per_tx[tid] = per_tx.get(tid, 0) + 1
            bucket.append(flow)
            added += 1
        self.confirmed += added
        self._entries += added
        if not bucket:
            del self._buckets[k]
            self._heap.remove(k)
            heapq.heapify(self._heap)
        return refused

    # -- internals -----------------------------------------------------------

    def _insert(self, key, listener, tid, state, last_seen, flags, deadline):
        """A new Flow in the dict, the owner count and its bucket (the state counts are the caller's)."""
        flow = Flow(key, listener, self._intern(tid), state, last_seen, flags)
        self.by_listener[listener][key] = flow
        self._per_tx[flow.transceiver] = self._per_tx.get(flow.transceiver, 0) + 1
        self._schedule(flow, deadline)
        return flow

    def _intern(self, tid):
        ids = self._ids
        shared = ids.get(tid)
        if shared is None:
            if len(ids) >= _MAX_INTERNED:
                ids.clear()
            ids[tid] = shared = tid
        return shared

    def _schedule(self, flow, deadline, earliest=None):
        # Bucket k is due once k*g <= now; k = floor(d/g) + 1 makes k*g > d
        # (float rounding can at worst make it equal), so nothing goes early.
        k = int(deadline // self.granularity) + 1
        if earliest is not None and k < earliest:
            k = earliest
        bucket = self._buckets.get(k)
        if bucket is None:
            self._buckets[k] = [flow]
            heapq.heappush(self._heap, k)
        else:
            bucket.append(flow)
        self._entries += 1

    def _promote(self, flow, now):
        self._leave_pending(flow)
        self.confirmed += 1
        flow.state = CONFIRMED
        if self.journal is not None:
            self.journal.put(flow)
        # The pending entry stays where it is and re-buckets the flow when it
        # falls due; only a confirmed deadline earlier than that needs its own
        # entry (idle_timeout < pending_ttl), at the cost of one duplicate.
        if self.idle_timeout < self.pending_ttl:
            self._schedule(flow, now + self.idle_timeout)
        self._trim_fifo()

    def _trim_fifo(self):
        """Forget FIFO entries at the front that are no longer pending (amortised O(1))."""
        fifo = self._fifo
        while fifo and fifo[0].state != PENDING:
            fifo.popleft()

    def _evict_oldest_pending(self):
        """Remove the longest-waiting pending flow; False when no flow is pending."""
        self._trim_fifo()
        if not self._fifo:
            return False
        self._drop(self._fifo.popleft())
        self.evicted += 1
        return True

    def _tx_leave(self, tid):
        n = self._per_tx[tid] - 1
        if n:
            self._per_tx[tid] = n
        else:
            del self._per_tx[tid]

    def _leave_pending(self, flow):
        self.pending -= 1
        src = source_ip(flow.key)
        n = self._per_source[src] - 1
        if n:
            self._per_source[src] = n
        else:
            del self._per_source[src]

    def _drop(self, flow):
        if flow.jslot is not None and self.journal is not None:
            self.journal.drop(flow)
        del self.by_listener[flow.listener][flow.key]
        if flow.state == PENDING:
            self._leave_pending(flow)
        else:
            self.confirmed -= 1
        self._tx_leave(flow.transceiver)
        rec = flow.session
        if rec is not None:
            rec[0] -= 1
            if not rec[0]:
                del self._sessions[rec[1]]
        flow.state = REMOVED

    def _compact(self):
        self._buckets = {}
        self._heap = []
        self._entries = 0
        for flow in self:
            ttl = self.pending_ttl if flow.state == PENDING else self.idle_timeout
            self._schedule(flow, flow.last_seen + ttl)
        self._trim_fifo()


def _key_ok(key):
    """Is `key` a sockaddr the kernel could have written (the only keys a snapshot carries)?"""
    if len(key) == SOCKADDR_IN_LEN:
        return key[:2] == _AF_INET and key[8:] == _ZERO8
    return len(key) == SOCKADDR_IN6_LEN and key[:2] == _AF_INET6


def _parse_snapshot(data):
    """[(age, tid, restart_to|None, listener, state, key, Flow.flags)] or ValueError; never mutates."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise ValueError("flow snapshot: not a bytes-like object") from None
    size = len(view)
    if size < _SNAP_HEAD.size:
        raise ValueError("flow snapshot: shorter than its header")
    magic, version, res8, res16, count, crc = _SNAP_HEAD.unpack_from(view, 0)
    if magic != SNAPSHOT_MAGIC:
        raise ValueError("flow snapshot: bad magic")
    if version != SNAPSHOT_VERSION:
        raise ValueError(f"flow snapshot: unsupported version {version}")
    if res8 or res16:
        raise ValueError("flow snapshot: reserved header bits set")
    body = view[_SNAP_HEAD.size:]
    if binascii.crc32(body) != crc:
        raise ValueError("flow snapshot: checksum mismatch")
    if count * (_SNAP_REC.size + SOCKADDR_IN_LEN) > len(body):
        raise ValueError("flow snapshot: count larger than the data")
    records = []
    seen = set()
    off = 0
    end = len(body)
    unpack = _SNAP_REC.unpack_from
    for _ in range(count):
        if off + _SNAP_REC.size > end:
            raise ValueError("flow snapshot: truncated record")
        age, tid, rto, listener, state, flags, klen = unpack(body, off)
        off += _SNAP_REC.size
        if klen != SOCKADDR_IN_LEN and klen != SOCKADDR_IN6_LEN:
            raise ValueError(f"flow snapshot: bad address length {klen}")
        if off + klen > end:
            raise ValueError("flow snapshot: truncated address")
        key = bytes(body[off:off + klen])
        off += klen
        if not _key_ok(key):
            raise ValueError("flow snapshot: malformed address")
        if not (math.isfinite(age) and age >= 0.0):
            raise ValueError("flow snapshot: bad age")
        if state not in (PENDING, CONFIRMED):
            raise ValueError(f"flow snapshot: bad state {state}")
        if flags & ~(_F_RESTART | _F_FAILED_OVER) or (not flags & _F_RESTART and rto):
            raise ValueError("flow snapshot: bad flags")
        if (listener, key) in seen:
            raise ValueError("flow snapshot: duplicate flow")
        seen.add((listener, key))
        records.append((age, tid, rto if flags & _F_RESTART else None, listener, state, key,
                        FAILED_OVER if flags & _F_FAILED_OVER else 0))
    if off != end:
        raise ValueError("flow snapshot: trailing bytes")
    return records
