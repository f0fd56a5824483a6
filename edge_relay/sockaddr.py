"""Socket addresses as the kernel writes them: raw `sockaddr_in`/`sockaddr_in6` bytes.

The batched I/O path (recvmmsg) hands us addresses as raw sockaddr bytes, and
sendmmsg wants them back in the same form. Keeping them raw end to end means
no per-packet conversion to `(host, port)` tuples: flow tables are keyed by
these bytes, and the forwarding header's address block is cut from them.

Layouts (Linux, <netinet/in.h>):
  sockaddr_in   16 bytes: family u16 (host order), port u16 (network order),
                          addr 4 bytes, 8 zero bytes
  sockaddr_in6  28 bytes: family u16 (host order), port u16 (network order),
                          flowinfo u32, addr 16 bytes, scope_id u32

An IPv4 client reaching a dual-stack IPv6 socket appears as an IPv4-mapped
IPv6 address (::ffff:a.b.c.d); `client_fields` unmaps it so the transceiver
sees the IPv4 address it will put in XOR-MAPPED-ADDRESS, and `from_fields`
maps it back for a socket of family AF_INET6.
"""

import functools
import socket
import struct

SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28
_FAMILY = struct.Struct("=H")          # host byte order, as the kernel stores it
_IN = struct.Struct("=H2s4s8x")        # family, port (already big-endian bytes), addr
_IN6 = struct.Struct("=H2s4s16sI")     # family, port, flowinfo, addr, scope_id
_AF_INET = _FAMILY.pack(socket.AF_INET)
_AF_INET6 = _FAMILY.pack(socket.AF_INET6)
V4_MAPPED = bytes(10) + b"\xff\xff"   # ::ffff:0:0/96
_ZERO12 = bytes(12)
_ZERO4 = bytes(4)


def from_tuple(addr):
    """Raw sockaddr bytes for a Python socket address `(host, port[, flow, scope])`.

    The host must be a numeric address; its family follows from its syntax.
    Raises ValueError (from `inet_pton`) on a malformed host.
    """
    host, port = addr[0], addr[1]
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        flowinfo = addr[2] if len(addr) > 2 else 0
        scope = addr[3] if len(addr) > 3 else 0
        return _IN6.pack(socket.AF_INET6, port.to_bytes(2, "big"),
                         flowinfo.to_bytes(4, "big"), packed, scope)
    return _IN.pack(socket.AF_INET, port.to_bytes(2, "big"), socket.inet_pton(socket.AF_INET, host))


def to_tuple(sa):
    """`(host, port)` for raw sockaddr bytes (for logs, tests and the fallback I/O)."""
    sa = bytes(sa)
    if sa[:2] == _AF_INET6:
        _, port, _, addr, _ = _IN6.unpack(sa[:SOCKADDR_IN6_LEN])
        return socket.inet_ntop(socket.AF_INET6, addr), int.from_bytes(port, "big")
    _, port, addr = _IN.unpack(sa[:SOCKADDR_IN_LEN])
    return socket.inet_ntop(socket.AF_INET, addr), int.from_bytes(port, "big")


def client_fields(sa):
    """The header's view of a client: `(family, port_bytes, addr16)`.

    family is 4 or 6 (the header's own code, not AF_*); addr16 is the IPv6
    address, or the IPv4 address followed by 12 zero bytes. IPv4-mapped IPv6
    addresses come out as family 4.
    """
    if sa[:2] == _AF_INET6:
        addr = bytes(sa[8:24])
        if addr[:12] == V4_MAPPED:
            return 4, bytes(sa[2:4]), addr[12:] + _ZERO12
        return 6, bytes(sa[2:4]), addr
    return 4, bytes(sa[2:4]), bytes(sa[4:8]) + _ZERO12


# (port as 2 octets, 16-octet address) -> sockaddr bytes, as C callables: the
# router's transceiver -> client loop calls these directly (a Python call per
# datagram costs more than the packing), with from_fields' branches inlined.
# pack_v4 keeps the first 4 octets of the address ("4s" truncates).
pack_v4 = functools.partial(struct.Struct("=2s2s4s8x").pack, _AF_INET)
pack_v6 = functools.partial(struct.Struct("=2s2s4x16s4x").pack, _AF_INET6)


def from_fields(family, port, addr16, sock_family):
    """Raw sockaddr bytes to send to `(family, port, addr16)` from a socket of `sock_family`.

    The inverse of `client_fields`. Returns None when the address cannot be
    reached from that socket (an IPv6 client on an IPv4 socket). An IPv4
    client on an IPv6 socket gets its v4-mapped address.
    """
    if family == 4:
        if sock_family == socket.AF_INET6:
            return pack_v6(port, V4_MAPPED + addr16[:4])
        return pack_v4(port, addr16)
    if sock_family != socket.AF_INET6:
        return None
    return pack_v6(port, addr16)


def source_ip(sa):
    """The source IP of raw sockaddr bytes, as bytes: the per-source limit key."""
    if sa[:2] == _AF_INET6:
        addr = bytes(sa[8:24])
        return addr[12:] if addr[:12] == V4_MAPPED else addr
    return bytes(sa[4:8])


def family_of_sa(sa):
    """socket.AF_INET or socket.AF_INET6 for raw sockaddr bytes."""
    return socket.AF_INET6 if sa[:2] == _AF_INET6 else socket.AF_INET
