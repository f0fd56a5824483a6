"""Batched datagram I/O over sockets: many datagrams per system call, payloads not copied in Python.

Theory of operation
-------------------
batch.py states the contract (recv() into views/addrs, send() of an
Outbox); this module implements it over a socket. `open_io(sock)` wraps a
bound UDP socket (set non-blocking) in one of two objects with the same
interface:

  MmsgIO   recvmmsg(2)/sendmmsg(2) through ctypes: one system call per batch
           each way. Used when libc has both (Linux, 64-bit).
  PlainIO  socket.recvmsg_into / socket.sendmsg: one system call per
           datagram. The fallback, and the reference the tests hold MmsgIO to.

Receiving. `recv()` takes whatever is queued, at most `batch_size` datagrams,
and never blocks or waits for a batch to fill. It returns n; for i < n,
`views[i]` is the payload (a memoryview of exactly its length, cut from a
receive buffer allocated once) and `addrs[i]` the source as raw sockaddr bytes
(see sockaddr.py). The views are valid until the next `recv()` on the same
object: the caller copies what it keeps. A datagram longer than `bufsize` is
not returned, only counted in `truncated` (a truncated datagram is never
forwarded). `recv()` returns 0 when nothing is queued; it retries (a bounded
number of times) a pending ICMP error, which the kernel reports once on the
next call and which says nothing about the queued datagrams. (An unconnected
UDP socket only keeps such errors with IP_RECVERR/IPV6_RECVERR set.)

Sending. `send(box, src)` sends a batch.Outbox: head and body leave as one
datagram from two iovecs. A body whose origin names a datagram of `src`'s
last batch (src a MmsgIO) is pointed at from `src`'s receive buffer by
arithmetic (the end of that datagram minus the body's length); any other
buffer costs ctypes (c_char.from_buffer, ~200 ns) or, for bytes, nothing
(its id). The box holds every buffer until send() returns, which keeps the
memory each iovec points at alive. It returns how many datagrams the
kernel accepted. A datagram the kernel refuses is retried only when a retry
can help (EINTR; EAGAIN/ENOBUFS a few times; ECONNREFUSED, a pending error
left by an earlier datagram, once), then counted in `send_failed` and
skipped: the rest of the batch still goes. Per-datagram errors never raise
and no loop is unbounded.

GSO. MmsgIO sends each run of two or more consecutive messages with the same
sockaddr and the same datagram size (voice toward one transceiver) as one
sendmsg with UDP_SEGMENT (Linux 4.18): the header and body of every message
are joined into one buffer (one copy) and the kernel cuts it into the same
datagrams, in order, for about a third of sendmmsg's CPU per datagram
(measured on loopback: 0.45 vs 1.7 us). The rest goes through sendmmsg, in
order. A refused GSO send is retried through sendmmsg, which applies the
per-datagram policy below; a refusal saying the socket cannot segment
(EIO, ENOPROTOOPT, EOPNOTSUPP) turns GSO off for that object. open_io(...,
gso=False) skips the look for runs (a socket sending to many destinations).

Errors: recv() raises OSError only for an error that is not about a datagram
(EBADF: a bug). send() never raises OSError; a dead socket shows up as every
datagram counted in `send_failed`.

Invariants: buffers, iovecs and headers are allocated in the constructor and
reused; MmsgIO makes one foreign call, the system call, per batch of up to
`batch_size` datagrams (or one sendmsg per GSO run, which joins that run's
buffers); an object is used by one thread (a worker owns its sockets).
"""

import array
import ctypes
import errno
import os
import socket
import struct
import sys
from operator import add as _add

from . import sockaddr
from .errors import StartupError

# <bits/socket.h> flags; MSG_WAITFORONE is not exported by the socket module.
MSG_TRUNC = 0x20
MSG_DONTWAIT = 0x40
MSG_WAITFORONE = 0x10000

_NAME_CAP = 128          # sizeof(struct sockaddr_storage): any family fits
_RECV_ATTEMPTS = 4       # system calls per recv() spent on EINTR / ICMP errors / all-truncated batches
_SEND_BUSY_RETRIES = 3   # EAGAIN/ENOBUFS retries of one datagram before it is counted as failed
_SEND_INTR_RETRIES = 8   # EINTR retries of one datagram

# Errors the kernel stores on a socket when an ICMP error arrives (udp_err:
# icmp_err_convert in net/ipv4/icmp.c, icmpv6_err_convert in net/ipv6/icmp.c)
# and reports once on the next call. On recv they are about some datagram we
# sent earlier, never about the queued ones.
_ICMP_ERRORS = frozenset((
    errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
    errno.ENONET, errno.EPROTO, errno.ENOPROTOOPT, errno.EMSGSIZE, errno.EACCES,
))
_SEND_BUSY = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS))

MODES = ("auto", "mmsg", "plain")

# UDP generic segmentation offload (<linux/udp.h>): one sendmsg carries many
# datagrams of one size to one destination; the kernel cuts them (late, in
# one pass), which costs far less per datagram than sendmmsg's one by one.
_SOL_UDP = 17
_UDP_SEGMENT = 103
_GSO_SIZE = struct.Struct("=H")
_GSO_MAX_SEGMENTS = 64                  # UDP_MAX_SEGMENTS
_GSO_MAX_BYTES = 65000                  # under the 64 KiB IP datagram limit with headers
_GSO_UNSUPPORTED = frozenset((errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP))


def _sendmsg_retrying(sendmsg, bufs, cmsg, dest):
    """One socket.sendmsg under the send policy; None when sent, else the errno that stopped it.

    Retries (each with its own budget, so the loop is bounded) EAGAIN/ENOBUFS
    a few times and ECONNREFUSED (a pending error left by an earlier
    datagram) once; EINTR is retried inside sendmsg (PEP 475).
    """
    busy = 0
    refused = False
    while True:
        try:
            sendmsg(bufs, cmsg, MSG_DONTWAIT, dest)
            return None
        except OSError as exc:
            if exc.errno in _SEND_BUSY and busy < _SEND_BUSY_RETRIES:
                busy += 1
                continue
            if exc.errno == errno.ECONNREFUSED and not refused:
                refused = True
                continue
            return exc.errno


def open_io(sock, batch_size=32, bufsize=2048, mode="auto", gso=True):
    """Wrap a bound datagram socket for batched I/O and set it non-blocking.

    Parameters: `batch_size` datagrams per recv() and per system call;
    `bufsize` the largest datagram accepted; `mode` "auto" (MmsgIO when
    available, else PlainIO), "mmsg" or "plain"; `gso` False keeps MmsgIO
    from looking for same-destination runs (a socket that sends to many
    destinations, one datagram each, saves the look).
    Returns: a MmsgIO or PlainIO; its `name` says which.
    Raises: StartupError for mode "mmsg" without recvmmsg/sendmmsg;
    ValueError for an unknown mode or a size below 1.
    """
    if mode not in MODES:
        raise ValueError(f"io mode must be one of {', '.join(MODES)}, not {mode!r}")
    if batch_size < 1 or bufsize < 1:
        raise ValueError("batch_size and bufsize must be at least 1")
    sock.setblocking(False)
    if mode == "plain" or (mode == "auto" and not mmsg_available()):
        return PlainIO(sock, batch_size, bufsize)
    if not mmsg_available():
        raise StartupError("io mode 'mmsg': recvmmsg/sendmmsg are not available "
                           "(they need libc on 64-bit Linux); use io mode 'auto' or 'plain'")
    return MmsgIO(sock, batch_size, bufsize, gso=gso)


# ---------------------------------------------------------------------------
# libc and the kernel structures (<sys/socket.h>, <bits/uio.h>)

class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),      # socklen_t, then 4 bytes of padding
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _msghdr), ("msg_len", ctypes.c_uint)]


# The hot paths read and write the header arrays through memoryviews cast to
# 32- and 64-bit words: an index costs ~30 ns where a ctypes field costs
# ~120 ns. These are the word indexes of each field inside one mmsghdr,
# taken from the ctypes layout above rather than written by hand.
_HDR_SIZE = ctypes.sizeof(_mmsghdr)                 # 64 on LP64
_HDR_U32 = _HDR_SIZE // 4
_HDR_U64 = _HDR_SIZE // 8
_NAME = _msghdr.msg_name.offset // 8                # u64 words
_IOVLEN = _msghdr.msg_iovlen.offset // 8
_NAMELEN = _msghdr.msg_namelen.offset // 4          # u32 words
_FLAGS = _msghdr.msg_flags.offset // 4
_LEN = _mmsghdr.msg_len.offset // 4
_IOV_SIZE = ctypes.sizeof(_iovec)
# one mmsghdr as _collect reads it: msg_namelen, msg_flags, msg_len, the rest skipped
_HDR_FIELDS = (f"{_msghdr.msg_namelen.offset}xI"
               f"{_msghdr.msg_flags.offset - _msghdr.msg_namelen.offset - 4}xi"
               f"{_mmsghdr.msg_len.offset - _msghdr.msg_flags.offset - 4}xI"
               f"{_HDR_SIZE - _mmsghdr.msg_len.offset - 4}x")

_libc = None


def _load_libc():
    """libc with recvmmsg and sendmmsg, or None."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux") and ctypes.sizeof(ctypes.c_void_p) == 8:
            try:
                # the process's own symbols, libc's among them: ctypes.util.find_library
                # would cost a restart ~10 ms (its imports, and an ldconfig run per worker)
                lib = ctypes.CDLL(None, use_errno=True)
                if hasattr(lib, "recvmmsg") and hasattr(lib, "sendmmsg"):
                    _libc = lib
            except OSError:
                pass
    return _libc or None


def mmsg_available():
    """True when libc has recvmmsg and sendmmsg with the layouts above (64-bit Linux)."""
    return _BYTES_DATA is not None and _load_libc() is not None


def _bytes_data_offset():
    """Where a bytes object's data starts, relative to id(): ob_sval in PyBytesObject.

    Measured once through c_char_p (which points at exactly that data) on two
    objects rather than assumed, so a different build still gets it right.
    """
    offsets = {ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value - id(probe)
               for probe in (b"edge-relay", bytes(100))}
    return offsets.pop() if len(offsets) == 1 else None      # None: MmsgIO unavailable


# An iovec may point straight at a bytes object's data: id(b) + this offset
# costs ~25 ns, where ctypes.cast(c_char_p(b), c_void_p) costs ~400 ns. It is
# safe while the bytes object is alive, which send() guarantees by holding a
# reference to every message until sendmmsg has returned.
_BYTES_DATA = _bytes_data_offset()


def _address(buf, keep):
    """(address, nbytes) of any buffer for an iovec; what must stay alive goes in `keep`.

    Writable contiguous buffers (bytearray, the views recv() hands out) are
    pointed at in place through c_char.from_buffer, which also pins them.
    Read-only views of bytes and non-contiguous views are copied once.
    """
    if type(buf) is bytes:
        return id(buf) + _BYTES_DATA, len(buf)
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    nbytes = view.nbytes
    if nbytes == 0:
        return 0, 0
    try:
        anchor = ctypes.c_char.from_buffer(view)
    except (TypeError, BufferError):
        copy = view.tobytes()
        keep.append(copy)
        return id(copy) + _BYTES_DATA, nbytes
    keep.append(anchor)
    return ctypes.addressof(anchor), nbytes


def _raw(nbytes, pins):
    """A zeroed bytearray and its address: memory that ctypes, the kernel and memoryviews share.

    The ctypes anchor goes in `pins`: while it lives the bytearray cannot be
    resized, so the address handed to the kernel stays valid.
    """
    mem = bytearray(nbytes)
    anchor = ctypes.c_char.from_buffer(mem)
    pins.append(anchor)
    return mem, ctypes.addressof(anchor)


class MmsgIO:
    """recvmmsg/sendmmsg through ctypes: one system call per batch each way."""

    name = "mmsg"

    def __init__(self, sock, batch_size=32, bufsize=2048, gso=True):
        libc = _load_libc()
        if libc is None:
            raise StartupError("recvmmsg/sendmmsg are not available in libc")
        # No argtypes/restype: declaring them adds ~250 ns per call. Without
        # them ints go as C int (the fd, counts and flags fit) and every
        # pointer is passed as a ctypes object, never as a Python int, which
        # would be truncated to 32 bits. The default restype (int) is right.
        self._recvmmsg = libc.recvmmsg
        self._sendmmsg = libc.sendmmsg
        self._sock = sock                  # keeps the fd open while we use it
        self._sendmsg = sock.sendmsg       # the GSO path (one call per run)
        self._family = sock.family
        # UDP_SEGMENT (Linux 4.18): runs of same-destination, same-size datagrams leave
        # as one GSO send. Off for other socket types, and turned off at the first refusal.
        self.gso = gso and sock.type == socket.SOCK_DGRAM and sock.family in (socket.AF_INET, socket.AF_INET6)
        self._fd = sock.fileno()
        self.batch_size = batch_size
        self.bufsize = bufsize
        self.truncated = 0
        self.send_failed = 0
        self.send_errno = 0                # errno of the last failed send, for the worker's log

        self._pins = pins = []

        # Receive side: payload slots, sockaddr slots, one iovec and one
        # mmsghdr per datagram. The kernel fills them in place.
        self._rbuf, rbuf_addr = _raw(batch_size * bufsize, pins)
        self._rnames, rnames_addr = _raw(batch_size * _NAME_CAP, pins)
        self._riov_mem, riov_addr = _raw(batch_size * _IOV_SIZE, pins)
        self._rhdr_mem, rhdr_addr = _raw(batch_size * _HDR_SIZE, pins)
        riov = (_iovec * batch_size).from_buffer(self._riov_mem)
        rhdr = (_mmsghdr * batch_size).from_buffer(self._rhdr_mem)
        for i in range(batch_size):
            riov[i].iov_base = rbuf_addr + i * bufsize
            riov[i].iov_len = bufsize
            hdr = rhdr[i].msg_hdr
            hdr.msg_name = rnames_addr + i * _NAME_CAP
            hdr.msg_namelen = _NAME_CAP
            hdr.msg_iov = riov_addr + i * _IOV_SIZE
            hdr.msg_iovlen = 1
        self._rhdr_ptr = ctypes.c_void_p(rhdr_addr)
        self._rhdr_u32 = memoryview(self._rhdr_mem).cast("I")
        self._rbuf_view = memoryview(self._rbuf)
        self._rnames_view = memoryview(self._rnames)
        self.views = [memoryview(b"")] * batch_size
        self.addrs = [b""] * batch_size
        # ends[i]: the address just past views[i], for bodies sent from this
        # receive buffer (a tail views[i][j:] starts at ends[i] - its length)
        self._ends = [0] * batch_size
        # _collect's batch reading: the kernel's sockaddr length for this
        # socket's family (every address it writes has it), one struct per
        # batch length made on first use, and constant per-slot tables.
        self._namelen = {socket.AF_INET: sockaddr.SOCKADDR_IN_LEN,
                         socket.AF_INET6: sockaddr.SOCKADDR_IN6_LEN}.get(sock.family, -1)
        self._fields_structs = [None] * (batch_size + 1)
        self._name1 = struct.Struct(f"{max(0, self._namelen)}s").unpack_from    # slot 0's address
        self._names_structs = [None] * (batch_size + 1)
        self._name_caps = memoryview(array.array("I", [_NAME_CAP] * batch_size))
        self._slot_addrs = [rbuf_addr + i * bufsize for i in range(batch_size)]
        self._slot_starts = range(0, batch_size * bufsize, bufsize)

        # Send side: two iovecs per message (head and body); each send()
        # writes names, iovecs and lengths, and sendmmsg starts at any slot.
        self._siov_mem, siov_addr = _raw(batch_size * 2 * _IOV_SIZE, pins)
        self._shdr_mem, shdr_addr = _raw(batch_size * _HDR_SIZE, pins)
        shdr = (_mmsghdr * batch_size).from_buffer(self._shdr_mem)
        for i in range(batch_size):
            shdr[i].msg_hdr.msg_iov = siov_addr + 2 * i * _IOV_SIZE
        del shdr
        self._shdr_u64 = memoryview(self._shdr_mem).cast("Q")
        self._shdr_u32 = memoryview(self._shdr_mem).cast("I")
        self._siov_u64 = memoryview(self._siov_mem).cast("Q")
        # sendmmsg resumes after a partial send at slot k: one pointer object per slot, made once.
        self._shdr_ptrs = [ctypes.c_void_p(shdr_addr + i * _HDR_SIZE) for i in range(batch_size)]

    def recv(self):
        """Receive what is queued, up to batch_size datagrams; return how many (see module doc)."""
        for _ in range(_RECV_ATTEMPTS):
            n = self._recvmmsg(self._fd, self._rhdr_ptr, self.batch_size,
                               MSG_DONTWAIT | MSG_WAITFORONE, None)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EAGAIN:
                    return 0
                if err == errno.EINTR or err in _ICMP_ERRORS:
                    continue
                raise OSError(err, f"recvmmsg: {os.strerror(err)}")
            kept = self._collect(n)
            if kept:
                return kept
            # The whole batch was truncated: more may be queued behind it.
        return 0

    def _collect(self, n):
        """Cut views and addresses for the n datagrams just received; drop the truncated ones.

        Reading n mmsghdrs field by field costs ~250 ns a datagram in Python.
        Instead one precompiled struct reads every (namelen, flags, length)
        of the batch at once, one strided slice assignment gives the kernel
        back every msg_namelen (it overwrote them with the address length),
        and when no flag is set and every address has the family's length
        (always, for a UDP socket, unless a datagram was truncated) a second
        struct cuts all the addresses at once: only the views are cut per
        datagram. Otherwise the general loop below does it one by one.
        A batch of one (what a wake-up at low rates brings) reads its three
        words by index instead: ~1 us less than the struct path's setup.
        """
        if n == 1:
            u32 = self._rhdr_u32
            namelen = u32[_NAMELEN]
            if not u32[_FLAGS] and namelen == self._namelen:
                u32[_NAMELEN] = _NAME_CAP
                length = u32[_LEN]
                self.addrs[0] = self._name1(self._rnames)[0]
                self.views[0] = self._rbuf_view[:length]
                self._ends[0] = self._slot_addrs[0] + length
                return 1
        fields = self._fields_structs[n]
        if fields is None:
            fields = self._fields_structs[n] = struct.Struct("=" + _HDR_FIELDS * n)
        fields = fields.unpack_from(self._rhdr_mem)
        self._rhdr_u32[_NAMELEN:n * _HDR_U32:_HDR_U32] = self._name_caps[:n]
        lens = fields[2::3]
        rbuf = self._rbuf_view
        if fields[1::3].count(0) == n and fields[0::3].count(self._namelen) == n:
            names = self._names_structs[n]
            if names is None:
                names = self._names_structs[n] = struct.Struct(
                    "=" + f"{self._namelen}s{_NAME_CAP - self._namelen}x" * n)
            self.addrs[:n] = names.unpack_from(self._rnames)
            self.views[:n] = [rbuf[start:start + length] for start, length in zip(self._slot_starts, lens)]
            self._ends[:n] = map(_add, self._slot_addrs, lens)
            return n
        names = self._rnames_view
        views = self.views
        addrs = self.addrs
        ends = self._ends
        bufsize = self.bufsize
        kept = 0
        for i in range(n):
            if fields[3 * i + 1] & MSG_TRUNC:
                self.truncated += 1
                continue
            start = i * bufsize
            views[kept] = rbuf[start:start + lens[i]]
            ends[kept] = self._slot_addrs[i] + lens[i]
            start = i * _NAME_CAP
            addrs[kept] = names[start:start + fields[3 * i]].tobytes()
            kept += 1
        return kept

    def send(self, box, src=None):
        """Send datagrams 0..box.n-1 of a batch.Outbox; return how many the kernel accepted."""
        n = box.n
        if not n:
            return 0
        ends = src._ends if src.__class__ is MmsgIO else None
        if self.gso and n > 1:
            return self._send_runs(box, n, ends)
        return self._send_mmsg(box, 0, n, ends)

    def _send_runs(self, box, total, ends):
        """send() with UDP_SEGMENT: each run of >= 2 consecutive datagrams to one sockaddr with
        one size leaves as one GSO sendmsg; the rest through sendmmsg, in order."""
        dests, heads, bodies = box.dest, box.head, box.body
        if total <= _GSO_MAX_SEGMENTS:
            # The client -> transceiver batch: one destination, a header on every datagram,
            # one size. Checked and joined with C-level list operations, not per datagram.
            sa = dests[0]
            hs = heads[:total]
            if dests[:total].count(sa) == total and hs.count(None) == 0:
                bs = bodies[:total]
                hl = list(map(len, hs))
                bl = list(map(len, bs))
                size = hl[0] + bl[0]
                if (hl.count(hl[0]) == total and bl.count(bl[0]) == total and size
                        and size * total <= _GSO_MAX_BYTES):
                    parts = [None] * (2 * total)
                    parts[0::2] = hs
                    parts[1::2] = bs
                    n = self._send_joined(parts, sa, size, total)
                    if n is not None:
                        return n
                    return self._send_mmsg(box, 0, total, ends)     # refused as one: datagram by datagram
        sent = 0
        start = 0
        i = 0
        while i < total:
            sa = dests[i]
            j = i + 1
            if j == total or dests[j] != sa:         # the common case to many destinations: no run
                i = j
                continue
            head = heads[i]
            size = len(bodies[i]) + (len(head) if head is not None else 0)
            limit = min(total, i + _GSO_MAX_SEGMENTS, i + _GSO_MAX_BYTES // max(1, size))
            while j < limit and dests[j] == sa:
                head = heads[j]
                if len(bodies[j]) + (len(head) if head is not None else 0) != size:
                    break
                j += 1
            if j - i < 2 or size == 0:
                i = j
                continue
            if start < i:
                sent += self._send_mmsg(box, start, i, ends)
            n = self._send_gso(box, i, j, sa, size)
            if n is None:                   # refused as one: sendmmsg counts it datagram by datagram
                n = self._send_mmsg(box, i, j, ends)
                if not self.gso:
                    return sent + n + self._send_mmsg(box, j, total, ends)
            sent += n
            i = start = j
        if start < total:
            sent += self._send_mmsg(box, start, total, ends)
        return sent

    def _send_gso(self, box, i, j, sa, size):
        """Datagrams i..j-1 of `box` (same sockaddr, `size` octets each) in one sendmsg with UDP_SEGMENT.

        Returns how many were sent, or None when the kernel refused the send
        (the caller then sends the run through sendmmsg, which applies the
        per-datagram error policy). When the refusal says the socket or
        device cannot segment (EIO, as wireguard-go treats it, ENOPROTOOPT,
        EOPNOTSUPP), `gso` is turned off for good.
        """
        parts = []
        heads, bodies = box.head, box.body
        for k in range(i, j):
            head = heads[k]
            if head is not None:
                parts.append(head)
            parts.append(bodies[k])
        return self._send_joined(parts, sa, size, j - i)

    def _send_joined(self, parts, sa, size, count):
        """`count` datagrams of `size` octets, the concatenation of `parts`, to `sa` in one
        UDP_SEGMENT sendmsg: `count`, or None when refused (see _send_gso)."""
        try:
            dest = _destination(sa, self._family)
        except (ValueError, struct.error):
            return None
        data = b"".join(parts)
        cmsg = [(_SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(size))]
        err = _sendmsg_retrying(self._sendmsg, (data,), cmsg, dest)
        if err is None:
            return count
        if err in _GSO_UNSUPPORTED:
            self.gso = False
        return None

    def _send_mmsg(self, box, start, end, ends):
        """Datagrams start..end-1 of `box` through sendmmsg, batch_size per call."""
        sent = 0
        batch = self.batch_size
        while start < end:
            count = min(batch, end - start)
            # Every address staged points into a buffer the box holds until
            # send() returns, or into `keep` (pins and copies made by _address).
            keep = []
            self._stage(box, start, count, ends, keep)
            sent += self._send_staged(count)
            del keep
            start += count
        return sent

    def _stage(self, box, start, count, ends, keep):
        """Write names and iovecs for datagrams start..start+count-1 of `box` into send slots 0..count-1."""
        u64 = self._shdr_u64
        u32 = self._shdr_u32
        iov = self._siov_u64
        dests, heads, bodies, origins = box.dest, box.head, box.body, box.origin
        for slot in range(count):
            k = start + slot
            sa = dests[k]
            if type(sa) is bytes:
                u64[slot * _HDR_U64 + _NAME] = id(sa) + _BYTES_DATA
                u32[slot * _HDR_U32 + _NAMELEN] = len(sa)
            else:
                u64[slot * _HDR_U64 + _NAME], u32[slot * _HDR_U32 + _NAMELEN] = _address(sa, keep)
            body = bodies[k]
            o = origins[k]
            v = slot * 4                  # two iovecs of two words each
            head = heads[k]
            if head is not None:
                if type(head) is bytes:
                    iov[v] = id(head) + _BYTES_DATA
                    iov[v + 1] = len(head)
                else:
                    iov[v], iov[v + 1] = _address(head, keep)
                u64[slot * _HDR_U64 + _IOVLEN] = 2
                v += 2
            else:
                u64[slot * _HDR_U64 + _IOVLEN] = 1
            if o >= 0 and ends is not None:
                size = len(body)
                iov[v] = ends[o] - size       # body is views[o] or a tail of it (batch.py)
                iov[v + 1] = size
            elif type(body) is bytes:
                iov[v] = id(body) + _BYTES_DATA
                iov[v + 1] = len(body)
            else:
                iov[v], iov[v + 1] = _address(body, keep)

    def _send_staged(self, count):
        """sendmmsg slots 0..count-1 under the error policy; return how many were sent.

        sendmmsg stops at the first datagram the kernel refuses: it returns
        the number sent before it, or -1 and its errno when it is the first.
        So the loop always resumes at the refused datagram, retries it or
        skips it, and each pass either advances or spends a bounded retry.
        """
        pos = sent = busy = intr = 0
        refused = False
        while pos < count:
            n = self._sendmmsg(self._fd, self._shdr_ptrs[pos], count - pos, MSG_DONTWAIT)
            if n > 0:
                pos += n
                sent += n
                busy = intr = 0
                refused = False
                continue
            err = ctypes.get_errno() if n < 0 else 0
            if err == errno.EINTR and intr < _SEND_INTR_RETRIES:
                intr += 1
            elif err in _SEND_BUSY and busy < _SEND_BUSY_RETRIES:
                busy += 1
            elif err == errno.ECONNREFUSED and not refused:
                refused = True            # the error was an earlier datagram's; this one was not tried
            else:
                self.send_failed += 1
                self.send_errno = err
                pos += 1
                busy = intr = 0
                refused = False
        return sent


class PlainIO:
    """socket.recvmsg_into / socket.sendmsg, one system call per datagram: the fallback."""

    name = "plain"

    def __init__(self, sock, batch_size=32, bufsize=2048):
        self._sock = sock
        self._family = sock.family
        self.batch_size = batch_size
        self.bufsize = bufsize
        self.truncated = 0
        self.send_failed = 0
        self.send_errno = 0                # errno of the last failed send, for the worker's log
        self._buf = bytearray(batch_size * bufsize)
        whole = memoryview(self._buf)
        self._slots = [[whole[i * bufsize:(i + 1) * bufsize]] for i in range(batch_size)]
        self.views = [memoryview(b"")] * batch_size
        self.addrs = [b""] * batch_size

    def recv(self):
        """Receive what is queued, up to batch_size datagrams; return how many (see module doc)."""
        recvmsg_into = self._sock.recvmsg_into
        slots = self._slots
        kept = 0
        spare = _RECV_ATTEMPTS            # calls that may return no datagram before we give up
        while kept < self.batch_size:
            slot = slots[kept]
            try:
                nbytes, _, flags, addr = recvmsg_into(slot, 0, MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:             # EINTR is retried inside recvmsg_into (PEP 475)
                if exc.errno not in _ICMP_ERRORS:
                    raise
                if spare == 0:
                    break
                spare -= 1
                continue
            if flags & MSG_TRUNC:
                self.truncated += 1
                if spare == 0:
                    break
                spare -= 1
                continue
            self.views[kept] = slot[0][:nbytes]
            self.addrs[kept] = sockaddr.from_tuple(addr)
            kept += 1
        return kept

    def send(self, box, src=None):
        """Send datagrams 0..box.n-1 of a batch.Outbox; return how many the kernel accepted."""
        sendmsg = self._sock.sendmsg
        dests, heads, bodies = box.dest, box.head, box.body
        sent = 0
        for k in range(box.n):
            try:
                dest = self._destination(dests[k])
            except (ValueError, struct.error):     # not a sockaddr this socket can send to
                self.send_failed += 1
                self.send_errno = errno.EAFNOSUPPORT
                continue
            head = heads[k]
            bufs = (bodies[k],) if head is None else (head, bodies[k])
            err = _sendmsg_retrying(sendmsg, bufs, (), dest)
            if err is None:
                sent += 1
            else:
                self.send_failed += 1
                self.send_errno = err or 0
        return sent

    def _destination(self, sa):
        return _destination(sa, self._family)


def _destination(sa, family):
    """The socket-module address for raw sockaddr bytes, as the kernel would read them.

    Keeps the IPv6 flow info and scope id (a link-local peer needs the
    latter) and maps an IPv4 sockaddr for an IPv6 socket, as the kernel
    does for MmsgIO.
    """
    host, port = sockaddr.to_tuple(sa)
    if sockaddr.family_of_sa(sa) == socket.AF_INET6:
        if family != socket.AF_INET6:
            raise ValueError("IPv6 destination for an IPv4 socket")   # the kernel says EAFNOSUPPORT
        sa = bytes(sa)
        return (host, port, int.from_bytes(sa[4:8], "big"), int.from_bytes(sa[24:28], sys.byteorder))
    if family == socket.AF_INET6:
        return ("::ffff:" + host, port, 0, 0)
    return (host, port)
