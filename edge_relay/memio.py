"""batch.py's contract in memory: BatchIO objects joined by a Network, for tests without sockets.

Theory of operation
  A Network maps raw sockaddr bytes to MemIO endpoints. `MemIO.send` hands
  each datagram (head + body, copied) to the endpoint bound at its
  destination, stamped with the sender's address, or counts it in
  `send_failed` (errno ECONNREFUSED) when nothing is bound there, as the
  kernel would report for loopback. `inject` queues a datagram from any
  source address (a client, a spoofer). `recv` fills views/addrs exactly as
  batchio does: views are cut from one receive buffer reused by the next
  recv(), and a datagram longer than bufsize is counted in `truncated`.

  It holds the sender to the contract more strictly than the kernel can:
  a body whose origin names datagram i of `src`'s last batch must be that
  view or a tail of it (ContractError otherwise), since MmsgIO would send
  whatever octets lie at that address. `sent` keeps every datagram sent
  (dest, bytes) for assertions.
"""

import collections
import errno

from .batch import IDEAL_BATCH


class ContractError(AssertionError):
    """A caller broke batch.py's contract (a bug in the caller, raised only by this test double)."""


class Network:
    """Endpoints by raw sockaddr; datagrams between them are delivered at once, in order."""

    def __init__(self):
        self.endpoints = {}

    def bind(self, sa, batch_size=IDEAL_BATCH, bufsize=2048):
        if sa in self.endpoints:
            raise ValueError("address in use")
        io = self.endpoints[sa] = MemIO(self, sa, batch_size, bufsize)
        return io


class MemIO:
    """One endpoint: batch.BatchIO in memory (see the module docstring)."""

    name = "memory"

    def __init__(self, network, sa, batch_size=IDEAL_BATCH, bufsize=2048):
        self.network = network
        self.sa = sa
        self.batch_size = batch_size
        self.bufsize = bufsize
        self.truncated = 0
        self.send_failed = 0
        self.send_errno = 0
        self.queue = collections.deque()
        self.sent = []
        self._buf = bytearray(batch_size * bufsize)
        self._whole = memoryview(self._buf)
        self.views = [memoryview(b"")] * batch_size
        self.addrs = [b""] * batch_size
        self._batch = 0                 # how many views the last recv() cut (origins must be below)

    def inject(self, data, source):
        """Queue `data` as if it had arrived from raw sockaddr `source`."""
        self.queue.append((bytes(data), bytes(source)))

    def recv(self):
        kept = 0
        bufsize = self.bufsize
        queue = self.queue
        while kept < self.batch_size and queue:
            data, source = queue.popleft()
            if len(data) > bufsize:
                self.truncated += 1
                continue
            start = kept * bufsize
            self._buf[start:start + len(data)] = data
            self.views[kept] = self._whole[start:start + len(data)]
            self.addrs[kept] = source
            kept += 1
        self._batch = kept
        return kept

    def send(self, box, src=None):
        sent = 0
        for k in range(box.n):
            dest, head, body, origin = box.dest[k], box.head[k], box.body[k], box.origin[k]
            if origin >= 0:
                _check_origin(src, origin, body)
            data = (bytes(head) if head is not None else b"") + bytes(body)
            peer = self.network.endpoints.get(bytes(dest))
            if peer is None:
                self.send_failed += 1
                self.send_errno = errno.ECONNREFUSED
                continue
            self.sent.append((bytes(dest), data))
            peer.queue.append((data, self.sa))
            sent += 1
        return sent

    def received(self):
        """Every queued datagram as (bytes, source), emptying the queue (for assertions)."""
        out = list(self.queue)
        self.queue.clear()
        return out


def _check_origin(src, origin, body):
    if src is None or origin >= getattr(src, "_batch", len(src.views)):
        raise ContractError(f"origin {origin} names no datagram of the source's last batch")
    view = src.views[origin]
    size = len(body)
    if not isinstance(body, memoryview) or body.obj is not view.obj or size > len(view) \
            or bytes(body) != bytes(view[len(view) - size:]):
        raise ContractError(f"body with origin {origin} is not received datagram {origin} or a tail of it")
