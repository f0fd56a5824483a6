"""The batch contract: what the event loop, the router and every batch I/O object agree on.

Theory of operation
  Datagrams move in batches: a worker's socket is read a batch at a time
  (batchio: recvmmsg, one system call), the router decides for the whole
  batch, and what it forwards leaves a batch at a time (sendmmsg, or one
  UDP_SEGMENT send per run). This module states that contract once; batchio
  implements it over sockets, memio in memory (for tests: the router and the
  loop run without a socket).

Receiving (BatchIO.recv)
  `n = io.recv()` takes what is queued, at most `io.batch_size`
  datagrams, never waiting. For i < n, `io.views[i]` is datagram i's
  payload (a memoryview of exactly its length) and `io.addrs[i]` its
  source as raw sockaddr bytes (sockaddr.py). The views are valid until the
  next recv() on the same object: a caller copies what it keeps. `views`
  and `addrs` are the same two lists for the object's life (a loop may bind
  them once).

Sending (Outbox, BatchIO.send)
  An Outbox holds the datagrams to send from one socket as parallel lists,
  so that queueing one costs four list stores and no object: for k < n,
  datagram k is `head[k] + body[k]` (head None: body alone) to raw sockaddr
  `dest[k]`. head and body leave as one datagram from two buffers, so a
  forwarding header is never concatenated with its payload.
  `origin[k]` says where body[k] came from: i >= 0 when body[k] is datagram
  i of the batch just received on the object passed as `src` to send(), or
  a tail of it (views[i][j:]); -1 for any other buffer. It lets an I/O
  object send from its own receive buffer without asking where the body
  lies (batchio: ~200 ns a datagram through ctypes); it says nothing about
  I/O to the code that fills it (the router knows only batch indexes).
  `io.send(box, src)` sends datagrams 0..box.n-1 and returns how many the
  kernel accepted; per-datagram errors are counted in `io.send_failed`
  (last errno in `io.send_errno`), never raised. The caller clears the box
  (`box.n = 0`) before the next recv() on `src`, since its bodies may be
  views into that object's receive buffers.

Counters every BatchIO keeps
  truncated    datagrams longer than the receive buffer: never returned
  send_failed  datagrams the kernel refused after the retries send() allows

Invariants: an Outbox only grows (its lists are extended in place, so a
reference to them stays valid); `n` never exceeds their length; a BatchIO
and its Outboxes are used by one thread.
"""

from typing import Protocol

# Datagrams per receive or send system call when the config says nothing: enough
# to amortise a wake-up at saturation, small enough to keep a batch's latency
# (32 x ~2 us) far below one voice frame; the default of [relay] batch_size.
IDEAL_BATCH = 32


class Outbox:
    """Datagrams to send from one socket: parallel lists, queued without a per-datagram object.

    Hot paths write the lists directly (after `reserve`); everything else
    calls `append`. Iterating, indexing and len() give (dest, head, body)
    tuples, for tests and slow paths.
    """

    __slots__ = ("n", "dest", "head", "body", "origin")

    def __init__(self, capacity=IDEAL_BATCH):
        capacity = max(1, capacity)
        self.n = 0
        self.dest = [b""] * capacity
        self.head = [None] * capacity
        self.body = [b""] * capacity
        self.origin = [-1] * capacity

    @classmethod
    def of(cls, datagrams):
        """An Outbox of (dest, data) pairs: whole datagrams, no header, no origin (tests, tools)."""
        datagrams = list(datagrams)
        box = cls(len(datagrams))
        for dest, data in datagrams:
            box.append(dest, None, data)
        return box

    def reserve(self, extra):
        """Make room for `extra` more datagrams (the lists grow in place: references stay valid)."""
        need = self.n + extra - len(self.dest)
        if need > 0:
            need = max(need, len(self.dest))
            self.dest += [b""] * need
            self.head += [None] * need
            self.body += [b""] * need
            self.origin += [-1] * need

    def append(self, dest, head, body, origin=-1):
        k = self.n
        if k == len(self.dest):
            self.reserve(1)
        self.dest[k] = dest
        self.head[k] = head
        self.body[k] = body
        self.origin[k] = origin
        self.n = k + 1

    def clear(self):
        """Forget every datagram (after a send; references are overwritten by the next ones)."""
        self.n = 0

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        if not -self.n <= k < self.n:
            raise IndexError(k)
        k %= self.n
        return self.dest[k], self.head[k], self.body[k]

    def __iter__(self):
        for k in range(self.n):
            yield self.dest[k], self.head[k], self.body[k]


class BatchIO(Protocol):
    """What the worker needs from an I/O object (batchio.MmsgIO, batchio.PlainIO, memio.MemIO)."""

    name: str
    batch_size: int
    views: list
    addrs: list
    truncated: int
    send_failed: int
    send_errno: int

    def recv(self) -> int:
        """Receive up to batch_size queued datagrams into views/addrs; how many (0: none queued)."""

    def send(self, box: Outbox, src: "BatchIO | None" = None) -> int:
        """Send box's datagrams 0..box.n-1 (origins refer to src's last batch); how many left."""
