"""Creating the relay's UDP sockets: public listeners and per-worker internal sockets.

Listeners use SO_REUSEPORT so that each worker holds its own socket on the
same public address and the kernel spreads clients across them by 4-tuple
hash. IPv6 listeners are IPV6_V6ONLY so that "0.0.0.0" and "::" can be listed
side by side and each listener has exactly one family. Internal sockets are
IPV6_V6ONLY too, except on "::" (internal_dual_stack): that one socket reaches
IPv4 transceivers as well, at their IPv4-mapped addresses (::ffff:a.b.c.d),
which is how their replies arrive and how worker.transceiver_addrs names them.
"""

import socket

from .errors import StartupError


def family_of_ip_text(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def internal_dual_stack(address):
    """True when internal sockets on `address` take both families: the IPv6 wildcard "::"."""
    return address == "::"


def udp_socket(address, port, *, reuseport=False, rcvbuf=None, sndbuf=None, what="socket",
               dual_stack=False):
    """A bound non-blocking UDP socket; StartupError (one line naming it) on failure.

    An IPv6 socket is IPV6_V6ONLY unless `dual_stack`.
    """
    family = family_of_ip_text(address)
    shown = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:      # EMFILE, ENOBUFS: still one line naming the socket, not a traceback
        raise StartupError(f"{what} {shown}: cannot create a socket: {exc.strerror or exc}") from None
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for opt, size in ((socket.SO_RCVBUF, rcvbuf), (socket.SO_SNDBUF, sndbuf)):
            if size:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"{what} {shown}: cannot bind: {exc.strerror or exc}") from None
    return sock


# (socket option, config key, sysctl that caps it) for the two buffer sizes
_BUFFERS = ((socket.SO_RCVBUF, "relay.recv_buffer_bytes", "net.core.rmem_max"),
            (socket.SO_SNDBUF, "relay.send_buffer_bytes", "net.core.wmem_max"))


def buffer_shortfalls(sock, rcvbuf, sndbuf):
    """[(config key, asked, granted, sysctl)] for each buffer the kernel gave less of than asked.

    setsockopt(SO_RCVBUF/SO_SNDBUF) silently caps the size at rmem_max /
    wmem_max, and Linux reports back twice what it granted (socket(7): the
    doubling leaves room for bookkeeping), so granted = getsockopt() / 2.
    """
    out = []
    for (opt, key, sysctl), asked in zip(_BUFFERS, (rcvbuf, sndbuf)):
        if not asked:
            continue
        try:
            granted = sock.getsockopt(socket.SOL_SOCKET, opt) // 2
        except OSError:
            continue
        if granted < asked:
            out.append((key, asked, granted, sysctl))
    return out
