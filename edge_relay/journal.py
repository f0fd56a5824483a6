"""The crash journal: a worker's confirmed flows in memory that outlives the worker (sans-IO).

Theory of operation
  The supervisor creates one shared memory region per worker slot, once, and
  holds it (worker.JournalMemory: a memfd mapped MAP_SHARED). The forked
  worker wraps it in a `Journal` and attaches it to its flows.FlowTable,
  which writes one record per confirmed flow at each transition a successor
  must know (flows.py "Crash journal"): confirm, change of owner (move,
  reassign: failover, ICE restart), flags, and leaving the table (remove,
  expire, evict). Nothing is written per packet. When the worker dies
  unasked (SIGKILL, a crash), the region still holds what it wrote; the
  successor of that slot calls `attach`, which restores every valid record
  into its new table before the first datagram is read, and carries on
  writing in place.

  This module only reads and writes a buffer it is given (an mmap or, in
  the tests, a bytearray): no clock, no syscall.

Layout (little-endian; read only by the same build on the same host, but
versioned so another layout is refused and overwritten, never misread)
  header  64 bytes at offset 0, written when the region is formatted:
          magic "ERFJ" | version u8 (2) | reserved u8 | record size u16 (64)
          | capacity u32 | mark A | mark B | 36 zero bytes
          mark    high u32 | high ^ 0xFFFFFFFF u32
          `high`: records [0, high) have been used; it grows before a record
          beyond it is first written, and restore reads nothing above it. A
          memfd allocates a page when it is first read as well as written,
          so this keeps the memory of a slot at its peak of journaled flows,
          not at capacity. It is written twice, mark A whole and then mark
          B, because a store is not atomic here (struct writes byte by
          byte): a writer killed inside one mark leaves that mark failing
          its complement check and the other one whole, old or new, and
          restore takes the higher valid mark. (Version 1 had one unchecked
          `high`: a kill inside its store could leave 0 and hide every
          record, e.g. between the two byte stores of 255 -> 256.)
  record  `capacity` records of 64 bytes from offset 64; record i at 64 + 64 i:
     0  kind u8          0 free, 1 a confirmed flow
     1  key length u8    16 (sockaddr_in) or 28 (sockaddr_in6)
     2  flags u8         flows.Flow.flags (flows.FLAG_BITS)
     3  reserved u8      0
     4  listener u16     public socket index
     6  reserved u16     0
     8  seq u64          the journal's write counter at this write (newest wins)
    16  transceiver u32  owner
    20  key 28 bytes     the client's raw sockaddr, zero-padded
    48  reserved 12      0
    60  crc32 u32        of bytes 0..59
  A write is one record (`record_stores`): bytes 1..63 (the body after the
  kind byte, and the crc), then the kind byte. Removal clears the kind byte
  first (one store: the record is free from then on) and then zeroes the
  rest. So a record taken from the free list stays free until it is whole,
  even over the remains of a removal torn between its two stores (kind 0,
  the old flow still in the rest: with the kind byte written first, a
  successor killed just after it would have revived the removed flow); a
  record rewritten in place is caught by its crc.
  Only one process writes a region at a time (a slot's worker is restarted
  after it has been reaped), and nobody reads it meanwhile: the stores need
  no ordering, only the pages, which the memfd keeps when the writer dies.

Guarantees (tests/test_journal.py checks them by fuzzing and by tearing writes)
  * `attach` (the restore) never raises for any buffer content: every non-free record
    that fails a check (kind, crc, key, reserved bits, flags) is counted in
    `bad` and freed. A writer killed mid-record leaves that one record with a
    crc that does not match (counted bad: that one flow is lost, and is
    picked up again at its client's next consent check), or it leaves the
    old record or the new one whole. A record that passes carries exactly
    what some `put` wrote, except with probability 2^-32 per torn record (a
    crc32 collision). The header is checked whole (a `high` above capacity
    makes it unusable: counted `reformatted`), and so are both marks (no
    valid one, or one above capacity: counted `reformatted`); a corrupted
    but plausible mark hides the records above it, which are then neither
    restored nor counted.
  * A restored flow is CONFIRMED with `last_seen` = the restore's `now`: a
    fresh idle deadline (idle_timeout). It may therefore outlive its
    client by up to one idle_timeout; that is safe because it was confirmed
    by its transceiver, and the relay still sends to the client only in
    answer to that transceiver's authenticated packets.
  * Not journaled, so lost with the worker: pending flows (the client's
    Binding Request retransmission opens them again), an ICE restart in
    progress (`restart_to`; the client's next request with the new token
    starts it again), the router's cached prefix (rebuilt), quality samples,
    and the flow's session (a restored flow counts toward neither its
    routing token's max_flows_per_session nor any other token's: as after a
    snapshot restore).
  * Two valid records for one (listener, client): the higher seq is kept,
    the other freed and counted `duplicate`. Records the table refuses
    (listener it does not have, table full) are freed, counted `skipped`.
  * Capacity is fixed when the region is made (the config's max_flows
    then). A confirmed flow that finds no free record is not journaled,
    counted in `full`, and served as usual.

Costs (python -m bench.journal; the shared 2-core machine under load): one
record write per transition, about 1 us (Journal.put alone; a confirm costs
about 1.4 us more with the journal than without); restore about 3-4 us per
flow (10,000 flows ~30 ms), like a snapshot restore. Memory: 64 bytes of
shared memory per journaled flow at the slot's peak (the region is
64 + 64 * capacity bytes of address space; only the pages below `high` are
ever touched), plus in the worker one int per journaled flow (Flow.jslot,
~32 bytes: tests/test_flows.py measures 278 bytes per flow with the
journal, 246 without) and the free-record list.
"""

import binascii
import collections
import re
import socket
import struct
import sys

from .flows import CONFIRMED, FLAG_BITS
from .sockaddr import SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN

MAGIC = b"ERFJ"
VERSION = 2
HEADER_SIZE = 64
RECORD_SIZE = 64
FLOW = 1                    # record kind; 0 is free

_HEAD = struct.Struct("<4sBBHI")
_MARK = struct.Struct("<II")                    # high, high ^ 0xFFFFFFFF
_MARKS_AT = (12, 20)                            # mark A, then mark B
_HEAD_END = 28                                  # zero from here to HEADER_SIZE
_BODY = struct.Struct("<BBBBHHQI28s12x")       # bytes 0..59 of a record
_CRC = struct.Struct("<I")
_RECORD = struct.Struct("<BBBBHHQI28s12sI")     # a whole record, as restore reads it
_ZERO12 = bytes(12)
_PADS = {16: bytes(12), 28: b""}                 # key length -> the zero padding after the key
# what flows._key_ok checks, inlined for restore speed: the family of each key length
_FAMILIES = {SOCKADDR_IN_LEN: socket.AF_INET.to_bytes(2, sys.byteorder),
             SOCKADDR_IN6_LEN: socket.AF_INET6.to_bytes(2, sys.byteorder)}
_ZERO8 = bytes(8)
_CRC_AT = _BODY.size
_KEY_AT = 20
_U32 = 0xFFFFFFFF
_ZERO_RECORD = bytes(RECORD_SIZE)
_WRITTEN = re.compile(b"[^\x00]")
assert _BODY.size + _CRC.size == _RECORD.size == RECORD_SIZE and _HEAD.size == _MARKS_AT[0]
assert _MARKS_AT[1] + _MARK.size == _HEAD_END <= HEADER_SIZE

Restored = collections.namedtuple("Restored", "restored bad duplicate skipped reformatted")
Restored.__doc__ = """What `Journal.attach` found: flows added to the table; records that failed a
check; duplicates dropped; valid records the table refused; and whether the header was
unusable (another layout or garbage), so that the whole region was formatted afresh."""


def header(capacity, high):
    """The 64 header bytes of a region of `capacity` records whose records [0, high) are used."""
    mark = _MARK.pack(high, high ^ _U32)
    return _HEAD.pack(MAGIC, VERSION, 0, RECORD_SIZE, capacity) + mark + mark + bytes(HEADER_SIZE - _HEAD_END)


def high_mark(buf):
    """The high mark restore uses in `buf` (a region), or None if its header is not ours.

    The capacity field is not compared with the region's size here (Journal does that).
    """
    if len(buf) < HEADER_SIZE:
        return None
    magic, version, res, rsize, cap = _HEAD.unpack_from(buf, 0)
    if (magic, version, res, rsize) != (MAGIC, VERSION, 0, RECORD_SIZE) or any(buf[_HEAD_END:HEADER_SIZE]):
        return None
    valid = [high for high, check in (_MARK.unpack_from(buf, at) for at in _MARKS_AT)
             if check == high ^ _U32 and high <= cap]
    return max(valid) if valid else None


def record_stores(off, body):
    """The stores, in order, that write the record at `off` whose bytes 0..59 are `body`:
    ((off + 1, bytes 1..63), (off, the kind byte)). See Layout for why the kind byte goes last."""
    return (off + 1, body[1:] + _CRC.pack(binascii.crc32(body))), (off, body[:1])


def region_size(capacity):
    """Bytes a journal of `capacity` records needs."""
    return HEADER_SIZE + RECORD_SIZE * capacity


class Journal:
    """The journal of one worker slot over `buf`, a writable buffer of region_size(capacity) bytes.

    Attributes (read-only for callers): `capacity` records, `full` (puts
    that found no free record), `unjournaled` (flows whose owner id does not
    fit 32 bits), `seq` (the last write's number), `restored` (the Restored
    of the last `attach`, or None). `restore_seconds` is set by whoever
    times the attach (worker.start_flows); `in_use` counts the records held.
    The worker publishes them all (metrics.publish, edge_relay_journal_*).
    """

    def __init__(self, buf):
        self._buf = memoryview(buf).cast("B")
        self.capacity = max(0, (len(self._buf) - HEADER_SIZE) // RECORD_SIZE)
        self._free = []             # free record indexes below _next (a stack)
        self._next = 0              # records at or above this index have never been used
        self.seq = 0
        self.full = 0
        self.unjournaled = 0
        self.restored = None
        self.restore_seconds = 0.0

    @property
    def in_use(self):
        """Records that hold a flow now (journaled flows)."""
        return self._next - len(self._free)

    # -- the worker's writes (flows.FlowTable calls them) -----------------------

    def put(self, flow):
        """Write `flow`'s record (a confirmed flow; allocates one on its first write)."""
        slot = flow.jslot
        if slot is None:
            tid = flow.transceiver
            if not 0 <= tid <= _U32:
                self.unjournaled += 1
                return
            if self._free:
                slot = self._free.pop()
            elif self._next < self.capacity:
                slot = self._next
                self._next += 1
                self._mark(self._next)          # before the record it covers
            else:
                self.full += 1
                return
            flow.jslot = slot
        self.seq += 1
        key = flow.key
        buf = self._buf
        off = HEADER_SIZE + slot * RECORD_SIZE
        for at, data in record_stores(off, _BODY.pack(FLOW, len(key), flow.flags, 0, flow.listener, 0,
                                                      self.seq, flow.transceiver, key)):
            buf[at:at + len(data)] = data

    def drop(self, flow):
        """Free `flow`'s record (it left the table)."""
        slot = flow.jslot
        if slot is None:
            return
        flow.jslot = None
        off = HEADER_SIZE + slot * RECORD_SIZE
        buf = self._buf
        buf[off] = 0                # free from this store on, whatever follows
        buf[off:off + RECORD_SIZE] = _ZERO_RECORD
        self._free.append(slot)

    # -- the successor's start --------------------------------------------------

    def attach(self, table, now, fresh=False):
        """Make this the journal of `table` (a flows.FlowTable); returns Restored.

        fresh=False (a successor after a crash): every valid record becomes a
        CONFIRMED flow of `table` seen at `now`, and keeps its record.
        fresh=True (`table` already holds the truth, e.g. a handed-over
        snapshot): the records are discarded and the table's confirmed
        flows written instead.
        """
        reformatted = self._check_header()
        found = {}                  # (listener, key) -> FlowTable.adopt entry (listener, key, tid, flags, slot, seq)
        bad = duplicate = skipped = 0
        used = bytearray(self._next)        # 1 where a record stays
        if not reformatted and not fresh:
            bad, duplicate = self._scan(found, used)
        elif not reformatted:
            for match in _WRITTEN.finditer(self._kinds()):
                self._clear(match.start())      # only the written ones: untouched pages stay unallocated
        for slot in table.adopt(found.values(), now):
            skipped += 1
            self._clear(slot)
            used[slot] = 0
        self.seq = max((rec[5] for rec in found.values()), default=0)
        self._free = [i for i in range(self._next - 1, -1, -1) if not used[i]]
        table.journal = self
        if fresh:
            for flow in list(table):
                flow.jslot = None           # an index into some other region means nothing here
                if flow.state == CONFIRMED:
                    self.put(flow)
        self.restored = Restored(len(found) - skipped, bad, duplicate, skipped, reformatted)
        return self.restored

    def _check_header(self):
        """Format the region unless its header is ours; True if it was not (counted by attach)."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return True
        high = high_mark(buf)
        if high is not None and high <= self.capacity and \
                _HEAD.unpack_from(buf, 0)[4] == self.capacity:
            self._next = high
            return False
        fresh = not any(buf[:HEADER_SIZE])          # a new region is all zero: nothing to count
        if not fresh:
            self._wipe()
        buf[:HEADER_SIZE] = header(self.capacity, 0)
        self._next = 0
        return not fresh

    def _mark(self, high):
        """Raise the high mark: mark A whole, then mark B (see Layout)."""
        buf = self._buf
        for at in _MARKS_AT:
            _MARK.pack_into(buf, at, high, high ^ _U32)

    def _wipe(self):
        # (allocates the whole region: only for a header that is not ours, never in normal operation)
        end = region_size(self.capacity)
        self._buf[HEADER_SIZE:end] = bytes(end - HEADER_SIZE)

    def _scan(self, found, used):
        """Validate every non-free record into `found`; free the rest. Returns (bad, duplicate)."""
        buf = self._buf
        kinds = self._kinds()
        bad = duplicate = 0
        unpack = _RECORD.unpack_from
        crc32 = binascii.crc32
        pads = _PADS
        unknown = ~FLAG_BITS
        families = _FAMILIES
        # the free records are skipped at C speed: only written ones cost a Python step
        for match in _WRITTEN.finditer(kinds):
            slot = match.start()
            off = HEADER_SIZE + slot * RECORD_SIZE
            kind, klen, flags, res8, listener, res16, seq, tid, key28, res12, crc = unpack(buf, off)
            pad = pads.get(klen)
            key = key28[:klen]
            if (kind != FLOW or pad is None or res8 or res16 or flags & unknown or res12 != _ZERO12
                    or not key28.endswith(pad) or crc != crc32(buf[off:off + _CRC_AT])
                    or key[:2] != families[klen] or (klen == 16 and key[8:] != _ZERO8)):
                bad += 1
                self._clear(slot)
                continue
            pair = (listener, key)
            have = found.get(pair)
            if have is not None:
                duplicate += 1
                if have[5] >= seq:
                    self._clear(slot)
                    continue
                self._clear(have[4])
                used[have[4]] = 0
            found[pair] = (listener, key, tid, flags, slot, seq)
            used[slot] = 1
        return bad, duplicate

    def _kinds(self):
        """The kind byte of every record ever used, as bytes (one strided copy)."""
        return bytes(self._buf[HEADER_SIZE:region_size(self._next):RECORD_SIZE])

    def _clear(self, slot):
        off = HEADER_SIZE + slot * RECORD_SIZE
        self._buf[off:off + RECORD_SIZE] = _ZERO_RECORD
