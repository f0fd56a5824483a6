"""batchio over real loopback sockets: every test runs on MmsgIO and PlainIO, IPv4 and IPv6.

The last part holds memio.MemIO, the in-memory implementation of the same
contract (batch.py), to what these tests prove of the socket ones.

Determinism: nothing sleeps and nothing is timed. Waits are poll() with a
bounded timeout (a failure, not a retry, when it expires) and every loop is
bounded. To know that a burst is fully queued before recv(), the sender
runs pinned to one CPU: loopback delivery goes through that CPU's backlog
queue in order, so when a marker sent last has reached the sender's own
socket, every datagram sent before it has reached its socket too.
"""

import contextlib
import ctypes
import errno
import os
import select
import socket

import pytest

from edge_relay import batchio, memio, sockaddr
from edge_relay.batch import Outbox
from edge_relay.errors import StartupError

WAIT_MS = 5000
MARKER = b"--marker--"
IP_RECVERR = 11        # <linux/in.h>; not exported by the socket module
IPV6_RECVERR = 25      # <linux/in6.h>


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(params=["mmsg", "plain"])
def mode(request):
    if request.param == "mmsg" and not batchio.mmsg_available():
        pytest.skip("recvmmsg/sendmmsg not available")
    return request.param


@pytest.fixture(params=["ipv4", "ipv6"])
def family(request):
    if request.param == "ipv6":
        if not _ipv6_loopback():
            pytest.skip("no IPv6 loopback")
        return socket.AF_INET6, "::1"
    return socket.AF_INET, "127.0.0.1"


@pytest.fixture
def sockets(family):
    """A factory of bound UDP sockets on the loopback of `family`, closed after the test."""
    af, host = family
    made = []

    def make():
        s = socket.socket(af, socket.SOCK_DGRAM)
        made.append(s)
        s.bind((host, 0))
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def make_io(mode, sockets):
    def make(batch_size=8, bufsize=256):
        sock = sockets()
        return batchio.open_io(sock, batch_size=batch_size, bufsize=bufsize, mode=mode), sock
    return make


def sa(sock):
    return sockaddr.from_tuple(sock.getsockname())


def wait_for(sock, events=select.POLLIN):
    poller = select.poll()
    poller.register(sock, events)
    ready = poller.poll(WAIT_MS)
    assert ready and ready[0][1] & events, f"socket not ready within {WAIT_MS} ms"


@contextlib.contextmanager
def one_cpu():
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def queue(dest, sends):
    """Send (sender, payload) pairs to `dest` and return once all of them are queued there."""
    with one_cpu():
        for sender, payload in sends:
            sender.sendto(payload, dest.getsockname())
        last = sends[-1][0]
        last.sendto(MARKER, last.getsockname())
        wait_for(last)
        assert last.recv(64) == MARKER


def box(msgs):
    """An Outbox of (dest, data) and (dest, head, body) tuples, no origins."""
    out = Outbox(1)
    for m in msgs:
        out.append(m[0], None, m[1]) if len(m) == 2 else out.append(*m)
    return out


def received(io, n):
    return [(bytes(io.views[i]), io.addrs[i]) for i in range(n)]


def recv_datagrams(sock, count):
    """The next `count` datagrams queued on a plain socket (each waited for, bounded)."""
    out = []
    for _ in range(count):
        wait_for(sock)
        out.append(sock.recv(65536))
    return out


def assert_nothing_more(sock):
    """Nothing queued: checked with a marker, as in queue()."""
    with one_cpu():
        sock.sendto(MARKER, sock.getsockname())
        wait_for(sock)
    assert sock.recv(65536) == MARKER


# --- receiving ---------------------------------------------------------------

def test_recv_full_batches_exact_payloads_and_sources(make_io, sockets):
    io, sock = make_io(batch_size=8, bufsize=256)
    a, b = sockets(), sockets()
    sends = [((a, b)[i % 2], bytes([i]) * (1 + i * 13)) for i in range(19)]
    sends.append((b, b"\xff" * 256))          # exactly bufsize: not truncated
    queue(sock, sends)
    expected = [(payload, sa(sender)) for sender, payload in sends]
    got = []
    for want in (8, 8, 4, 0):
        n = io.recv()
        assert n == want
        got += received(io, n)
    assert got == expected
    assert io.truncated == 0
    assert len(expected[0][1]) == (16 if sock.family == socket.AF_INET else 28)


def test_recv_empty_socket_returns_zero(make_io):
    io, sock = make_io()
    assert sock.getblocking() is False
    assert io.recv() == 0
    assert io.recv() == 0


def test_recv_takes_fewer_than_batch_size_when_fewer_are_queued(make_io, sockets):
    io, sock = make_io(batch_size=8)
    peer = sockets()
    queue(sock, [(peer, b"one"), (peer, b"two"), (peer, b"three")])
    assert io.recv() == 3
    assert received(io, 3) == [(b"one", sa(peer)), (b"two", sa(peer)), (b"three", sa(peer))]
    assert io.recv() == 0


def test_views_are_slices_of_the_receive_buffer_until_next_recv(make_io, sockets):
    io, sock = make_io(batch_size=4, bufsize=64)
    peer = sockets()
    queue(sock, [(peer, b"first")])
    assert io.recv() == 1
    view = io.views[0]
    assert isinstance(view, memoryview) and bytes(view) == b"first"
    queue(sock, [(peer, b"again")])
    assert io.recv() == 1
    assert bytes(view) == b"again"            # same slot reused: the caller copies what it keeps


def test_oversize_datagram_is_dropped_and_counted(make_io, sockets):
    io, sock = make_io(batch_size=8, bufsize=64)
    peer = sockets()
    queue(sock, [(peer, b"a" * 65), (peer, b"b" * 64), (peer, b"c" * 1000), (peer, b"ok")])
    assert io.recv() == 2
    assert received(io, 2) == [(b"b" * 64, sa(peer)), (b"ok", sa(peer))]
    assert io.truncated == 2
    assert io.recv() == 0


def test_a_batch_of_only_oversize_datagrams_does_not_hide_the_next_one(make_io, sockets):
    io, sock = make_io(batch_size=2, bufsize=64)
    peer = sockets()
    queue(sock, [(peer, b"x" * 100)] * 3 + [(peer, b"ok")])
    assert io.recv() == 1
    assert received(io, 1) == [(b"ok", sa(peer))]
    assert io.truncated == 3


# --- sending -----------------------------------------------------------------

def test_send_one_and_two_buffers_as_one_datagram_each(make_io, sockets):
    io, sock = make_io(batch_size=8, bufsize=256)
    peer = sockets()
    backing = bytearray(b"..writable..")
    msgs = [
        (sa(peer), b"single"),
        (sa(peer), b"head:", b"body"),
        (sa(peer), bytearray(b"head:"), memoryview(backing)[2:10]),
        (sa(peer), memoryview(b"read-only view")[5:], b""),
        (sa(peer), b"", b""),
    ]
    assert io.send(box(msgs)) == 5
    assert recv_datagrams(peer, 5) == [b"single", b"head:body", b"head:writable", b"only view", b""]
    assert io.send_failed == 0
    assert_nothing_more(peer)


def test_forwarding_received_views_with_a_header(make_io, sockets):
    io, sock = make_io(batch_size=4, bufsize=256)
    client, target = sockets(), sockets()
    queue(sock, [(client, b"payload-%d" % i) for i in range(3)])
    n = io.recv()
    assert n == 3
    msgs = [(sa(target), b"HDR%d|" % i, io.views[i][7:]) for i in range(n)]
    assert io.send(box(msgs)) == 3
    assert recv_datagrams(target, 3) == [b"HDR0|-0", b"HDR1|-1", b"HDR2|-2"]


def test_bodies_sent_by_origin_are_the_same_datagrams(make_io, sockets):
    """A body named by its origin (the received view or a tail of it) leaves exactly as a copy would,
    whether `src` is the receiving object or not given (then the origin is not used)."""
    io, sock = make_io(batch_size=8, bufsize=256)
    client, target = sockets(), sockets()
    sizes = [0, 1, 17, 256, 300, 40]                   # 300: truncated, not returned
    queue(sock, [(client, bytes([i + 1]) * size) for i, size in enumerate(sizes)])
    n = io.recv()
    assert n == 5 and io.truncated == 1
    dest = sa(target)
    out = Outbox(2)
    for i in range(n):
        out.append(dest, b"H%d|" % i, io.views[i], i)
        out.append(dest, None, io.views[i][min(3, len(io.views[i])):], i)
    out.append(dest, bytearray(b"b|"), io.views[2][5:], 2)
    out.append(dest, None, b"not received", -1)
    want = [d for i in range(n) for d in (b"H%d|" % i + bytes(io.views[i]), bytes(io.views[i][3:]))]
    want += [b"b|" + bytes(io.views[2][5:]), b"not received"]
    assert io.send(out, io) == len(want)
    assert recv_datagrams(target, len(want)) == want
    other, _ = make_io()
    assert other.send(out, io) == len(want) and other.send(out) == len(want)
    assert recv_datagrams(target, 2 * len(want)) == want * 2
    assert_nothing_more(target)


def test_recv_fuzz_sizes_sources_and_truncation(make_io, sockets):
    """Random batches: every datagram not over bufsize comes back, in order, from its source."""
    import random
    rng = random.Random(5)
    io, sock = make_io(batch_size=8, bufsize=64)
    senders = [sockets() for _ in range(3)]
    for _ in range(25):
        sends = [(rng.choice(senders), rng.randbytes(rng.choice((0, 1, 5, 63, 64, 65, 200))))
                 for _ in range(rng.randrange(1, 12))]
        queue(sock, sends)
        want = [(p, sa(s)) for s, p in sends if len(p) <= 64]
        got = []
        truncated = io.truncated
        for _ in range(10):
            n = io.recv()
            if n == 0:
                break
            got += received(io, n)
            if io.name == "mmsg":           # what send() points at for origin i: the view's octets
                assert all(ctypes.string_at(io._ends[i] - len(io.views[i]), len(io.views[i]))
                           == bytes(io.views[i]) for i in range(n))
        assert got == want
        assert io.truncated - truncated == len(sends) - len(want)


def test_send_more_than_batch_size_in_one_call(make_io, sockets):
    io, sock = make_io(batch_size=4)
    peer = sockets()
    msgs = [(sa(peer), b"m%02d" % i) if i % 3 else (sa(peer), b"h%02d/" % i, b"body")
            for i in range(23)]
    assert io.send(box(msgs)) == 23
    assert recv_datagrams(peer, 23) == [b"".join(m[1:]) for m in msgs]
    assert io.send_failed == 0
    assert_nothing_more(peer)


def test_refused_datagrams_are_counted_and_the_rest_still_go(make_io, sockets):
    io, sock = make_io(batch_size=4)
    peer = sockets()
    host, _ = sockaddr.to_tuple(sa(peer))
    bad = [
        sockaddr.from_tuple((host, 0)),      # port 0: EINVAL
        b"\x00\x00\x00",                      # not a sockaddr: EINVAL
    ]
    if sock.family == socket.AF_INET:
        bad.append(sockaddr.from_tuple(("::1", 9)))   # IPv6 from an IPv4 socket: EAFNOSUPPORT
    good = [(sa(peer), b"good-%02d" % i) for i in range(9)]
    # With batch_size 4 the refusals fall at the start, end and middle of
    # a chunk, two in a row, and last.
    msgs = ([(bad[0], b"first")] + good[0:2] + [(bad[1], b"end", b"of chunk")] + good[2:4]
            + [(bad[-1], b"middle")] + good[4:7] + [(bad[0], b"two"), (bad[1], b"in a row")]
            + good[7:9] + [(bad[-1], b"last")])
    assert io.send(box(msgs)) == len(good)
    assert io.send_failed == len(msgs) - len(good)
    assert recv_datagrams(peer, len(good)) == [payload for _, payload in good]
    assert_nothing_more(peer)


@pytest.fixture
def refusing_io(make_io, sockets):
    """An io whose socket holds a pending ECONNREFUSED, and a live peer.

    Unconnected UDP sockets only keep ICMP errors with IP_RECVERR set; the
    error then fails the next call on the socket, whatever it is about.
    """
    io, sock = make_io()
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    gone = sockets()
    closed = sa(gone)
    gone.close()
    peer = sockets()
    assert io.send(box([(closed, b"to nobody")])) == 1
    wait_for(sock, select.POLLERR)
    return io, sock, peer


def test_pending_econnrefused_does_not_lose_a_send(refusing_io):
    io, sock, peer = refusing_io
    assert io.send(box([(sa(peer), b"after", b" refusal"), (sa(peer), b"next")])) == 2
    assert io.send_failed == 0
    assert recv_datagrams(peer, 2) == [b"after refusal", b"next"]
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_pending_econnrefused_does_not_lose_a_recv(refusing_io):
    io, sock, peer = refusing_io
    queue(sock, [(peer, b"hello")])
    assert io.recv() == 1
    assert received(io, 1) == [(b"hello", sa(peer))]
    assert io.recv() == 0
    assert io.send(box([(sa(peer), b"reply")])) == 1
    assert recv_datagrams(peer, 1) == [b"reply"]


def test_pending_econnrefused_on_an_empty_socket_reads_as_nothing(refusing_io):
    io, sock, peer = refusing_io
    assert io.recv() == 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


# --- choosing an implementation ---------------------------------------------

def test_open_io_modes(sockets):
    if batchio.mmsg_available():
        assert batchio.open_io(sockets(), mode="mmsg").name == "mmsg"
        assert batchio.open_io(sockets()).name == "mmsg"
    assert batchio.open_io(sockets(), mode="plain").name == "plain"
    with pytest.raises(ValueError):
        batchio.open_io(sockets(), mode="fast")


def test_mmsg_mode_without_libc_support_is_a_startup_error(sockets, monkeypatch):
    monkeypatch.setattr(batchio, "_load_libc", lambda: None)
    assert not batchio.mmsg_available()
    with pytest.raises(StartupError):
        batchio.open_io(sockets(), mode="mmsg")
    assert batchio.open_io(sockets(), mode="auto").name == "plain"


def test_unexpected_recv_error_raises(make_io):
    io, sock = make_io()
    sock.close()                              # the io now holds a dead descriptor: EBADF
    with pytest.raises(OSError) as info:
        io.recv()
    assert info.value.errno == errno.EBADF


# --- UDP_SEGMENT (GSO) runs ------------------------------------------------------

def test_same_size_runs_arrive_as_the_same_datagrams_in_order(make_io, sockets, mode):
    io, sock = make_io(batch_size=8)
    peer, other = sockets(), sockets()
    msgs = []
    for i in range(40):                     # runs longer than batch_size, broken by size and by destination
        if i in (7, 23):
            msgs.append((sa(peer), b"odd-size-%02d" % i))
        elif i in (12, 13):
            msgs.append((sa(other), b"H%03d" % i, b"-other-"))
        else:
            msgs.append((sa(peer), b"H%03d" % i, memoryview(bytearray(b"body-%02d" % i))))
    assert io.send(box(msgs)) == 40
    assert io.send_failed == 0
    to_peer = [b"".join(bytes(x) for x in m[1:]) for m in msgs if m[0] == sa(peer)]
    assert recv_datagrams(peer, len(to_peer)) == to_peer
    assert recv_datagrams(other, 2) == [b"H012-other-", b"H013-other-"]
    assert_nothing_more(peer)
    assert_nothing_more(other)
    if mode == "mmsg":
        assert io.gso                       # the kernel took the runs as GSO sends


def test_a_socket_that_cannot_segment_falls_back_to_sendmmsg(sockets):
    if not batchio.mmsg_available():
        pytest.skip("recvmmsg/sendmmsg not available")
    sock, peer = sockets(), sockets()
    io = batchio.open_io(sock, batch_size=8, mode="mmsg")
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EIO, "no segmentation here")
    io._sendmsg = refuse
    msgs = [(sa(peer), b"same-%02d" % i) for i in range(12)]
    assert io.send(box(msgs)) == 12 and io.send_failed == 0
    assert recv_datagrams(peer, 12) == [m[1] for m in msgs]
    assert len(calls) == 1 and not io.gso   # turned off for good after one refusal
    assert io.send(box(msgs)) == 12 and len(calls) == 1
    assert recv_datagrams(peer, 12) == [m[1] for m in msgs]


def test_a_refused_run_is_counted_per_datagram_and_gso_stays_on(make_io, sockets, mode):
    io, sock = make_io(batch_size=8)
    peer = sockets()
    host, _ = sockaddr.to_tuple(sa(peer))
    port0 = sockaddr.from_tuple((host, 0))          # EINVAL for every datagram
    msgs = [(port0, b"x%02d" % i) for i in range(5)] + [(sa(peer), b"y%02d" % i) for i in range(5)]
    assert io.send(box(msgs)) == 5
    assert io.send_failed == 5
    assert recv_datagrams(peer, 5) == [m[1] for m in msgs[5:]]
    assert_nothing_more(peer)
    if mode == "mmsg":
        assert io.gso


def test_a_one_destination_batch_with_headers_leaves_as_one_gso_send_or_falls_back(sockets):
    """The client -> transceiver shape (one peer, a header on each datagram, one size): one sendmsg;
    refused as unsupported, the same datagrams through sendmmsg; refused otherwise, counted per datagram."""
    if not batchio.mmsg_available():
        pytest.skip("recvmmsg/sendmmsg not available")
    sock, peer = sockets(), sockets()
    io = batchio.open_io(sock, batch_size=8, mode="mmsg")
    msgs = [(sa(peer), b"H%03d" % i, memoryview(bytearray(b"body-%02d" % i))) for i in range(20)]
    want = [b"H%03dbody-%02d" % (i, i) for i in range(20)]
    calls = []
    real = io._sendmsg

    def counting(*args):
        calls.append(args)
        return real(*args)
    io._sendmsg = counting
    assert io.send(box(msgs)) == 20 and io.send_failed == 0
    assert len(calls) == 1 and recv_datagrams(peer, 20) == want

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EIO, "no segmentation here")
    io._sendmsg = refuse
    assert io.send(box(msgs)) == 20 and io.send_failed == 0
    assert recv_datagrams(peer, 20) == want and not io.gso
    assert_nothing_more(peer)

    io = batchio.open_io(sock, batch_size=8, mode="mmsg")
    host, _ = sockaddr.to_tuple(sa(peer))
    port0 = sockaddr.from_tuple((host, 0))          # EINVAL for the GSO send and for every datagram
    assert io.send(box([(port0,) + m[1:] for m in msgs])) == 0
    assert io.send_failed == 20 and io.gso
    assert_nothing_more(peer)


# --- memio: the same contract in memory ----------------------------------------

A_SA = sockaddr.from_tuple(("192.0.2.1", 1000))
B_SA = sockaddr.from_tuple(("192.0.2.2", 2000))


def test_memio_recv_cuts_views_like_batchio_and_counts_truncation():
    net = memio.Network()
    io = net.bind(A_SA, batch_size=3, bufsize=8)
    for data in (b"one", b"", b"too long: 9+", b"two", b"three", b"four"):
        io.inject(data, B_SA)
    assert io.recv() == 3 and io.truncated == 1
    assert received(io, 3) == [(b"one", B_SA), (b"", B_SA), (b"two", B_SA)]
    view = io.views[0]
    assert io.recv() == 2 and received(io, 2) == [(b"three", B_SA), (b"four", B_SA)]
    assert bytes(view) == b"thr"            # a view is valid until the next recv(), as in batchio
    assert io.recv() == 0


def test_memio_send_delivers_head_and_body_and_counts_unbound_destinations():
    net = memio.Network()
    a, b = net.bind(A_SA), net.bind(B_SA)
    nobody = sockaddr.from_tuple(("192.0.2.3", 3000))
    a.inject(b"xxpayload", B_SA)
    assert a.recv() == 1
    out = Outbox(1)
    out.append(B_SA, b"H|", a.views[0], 0)
    out.append(B_SA, None, a.views[0][2:], 0)
    out.append(nobody, None, b"lost")
    out.append(B_SA, bytearray(b"h|"), memoryview(b"copied"))
    assert a.send(out, a) == 3
    assert a.send_failed == 1 and a.send_errno == errno.ECONNREFUSED
    assert b.received() == [(b"H|xxpayload", A_SA), (b"payload", A_SA), (b"h|copied", A_SA)]
    assert list(out) == [(B_SA, b"H|", a.views[0]), (B_SA, None, a.views[0][2:]),
                         (nobody, None, b"lost"), (B_SA, bytearray(b"h|"), memoryview(b"copied"))]


@pytest.mark.parametrize("body, origin", [
    (b"xxpayload", 0),                       # the right octets, but not the received view
    ("tail", 1),                             # origin past the last batch
    ("other", 0),                            # a view of another datagram
])
def test_memio_refuses_an_origin_that_is_not_the_body(body, origin):
    """What MmsgIO would get wrong silently (it sends the octets at the origin's address) is an error here."""
    net = memio.Network()
    a, _ = net.bind(A_SA), net.bind(B_SA)
    a.inject(b"xxpayload", B_SA)
    a.inject(b"second", B_SA)
    assert a.recv() == 2
    a.inject(b"third", B_SA)
    if body == "tail":
        body = a.views[0][2:]
        a.recv()                             # now a one-datagram batch: origin 1 names nothing
    elif body == "other":
        body = a.views[1]
    out = Outbox(1)
    out.append(B_SA, None, body, origin)
    with pytest.raises(memio.ContractError):
        a.send(out, a)


def test_outbox_grows_in_place_and_reads_back_as_tuples():
    out = Outbox(2)
    dest = out.dest
    for i in range(5):
        out.append(b"sa%d" % i, None, b"d%d" % i)
    assert out.dest is dest and len(out) == 5 and out[-1] == (b"sa4", None, b"d4")
    out.reserve(100)
    assert out.dest is dest and len(dest) >= 105 and out.n == 5
    with pytest.raises(IndexError):
        out[5]
    out.clear()
    assert not out and list(out) == []
