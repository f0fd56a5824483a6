"""Just enough STUN (RFC 8489) for a relay and an ICE-lite transceiver, plus RFC 7983 demux.

Contract
  * `classify(first_byte)` sorts a datagram by its first octet (RFC 7983
    section 7): STUN 0..3, DTLS 20..63, RTP/RTCP 128..191; everything else
    (ZRTP, TURN channels, unassigned) is OTHER. It costs one table lookup.
  * `decode(buf)` returns a `Message` or Drop.STUN_MALFORMED; it checks the
    whole framing before trusting any of it: top two bits zero, the magic
    cookie, length = datagram length - 20 and a multiple of 4, every attribute
    inside the message with its padding, FINGERPRINT (if present) last, 4
    octets and correct. Attributes after MESSAGE-INTEGRITY other than
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, and after
    MESSAGE-INTEGRITY-SHA256 other than FINGERPRINT, are ignored (RFC 8489
    sections 14.5 and 14.6). For a repeated attribute the first one counts. It never raises
    for any input bytes.
  * MESSAGE-INTEGRITY is checked with `check_integrity` by whoever holds the
    password (the transceiver); the relay holds none and never checks it.
  * `encode` builds messages with MESSAGE-INTEGRITY and FINGERPRINT computed
    over the length field patched as RFC 8489 sections 14.5 and 14.7 say.
"""

import hashlib
import hmac
import socket
import struct
import zlib
from typing import NamedTuple

from .drops import Drop

# RFC 7983 section 7 first-octet ranges
OTHER, STUN, DTLS, RTP = 0, 1, 2, 3
_CLASS = bytes(
    STUN if b <= 3 else DTLS if 20 <= b <= 63 else RTP if 128 <= b <= 191 else OTHER
    for b in range(256)
)


def classify(first_byte):
    """OTHER, STUN, DTLS or RTP (RTP and RTCP) for a datagram's first octet."""
    return _CLASS[first_byte]


MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E        # RFC 8489 section 14.7
MAX_USERNAME = 513                  # RFC 5389 section 15.3 bound; RFC 8489 narrowed it to 509, we stay liberal

# message types (RFC 8489 section 5: method and class bits interleaved)
BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# attribute types (RFC 8489 section 18.3, RFC 8445 section 16.1)
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
XOR_MAPPED_ADDRESS = 0x0020
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
MESSAGE_INTEGRITY_SHA256 = 0x001C
SOFTWARE = 0x8022
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A

_HEAD = struct.Struct(">HHI12s")
_ATTR = struct.Struct(">HH")
_U32 = struct.Struct(">I")
_COOKIE_BYTES = _U32.pack(MAGIC_COOKIE)


class Message(NamedTuple):
    msg_type: int
    transaction_id: bytes
    attributes: dict          # type -> memoryview of the value (first occurrence)
    integrity_offset: int     # offset of the MESSAGE-INTEGRITY attribute, or -1

    def get(self, attr_type):
        return self.attributes.get(attr_type)


def decode(buf):
    """A Message, or Drop.STUN_MALFORMED. See the module contract for the rules."""
    n = len(buf)
    if n < HEADER_LEN or n > 0xFFFF + HEADER_LEN:
        return Drop.STUN_MALFORMED
    msg_type, length, cookie, txid = _HEAD.unpack_from(buf)
    if msg_type & 0xC000 or cookie != MAGIC_COOKIE or length & 3 or length != n - HEADER_LEN:
        return Drop.STUN_MALFORMED
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    attrs = {}
    integrity = -1          # offset of MESSAGE-INTEGRITY, for check_integrity
    sealed = False          # past MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256
    off = HEADER_LEN
    while off < n:
        if n - off < 4:
            return Drop.STUN_MALFORMED
        atype, alen = _ATTR.unpack_from(buf, off)
        start = off + 4
        nxt = start + ((alen + 3) & ~3)
        if nxt > n:
            return Drop.STUN_MALFORMED
        if atype == FINGERPRINT:
            # FINGERPRINT is last (RFC 8489 section 14.7); its CRC covers all before it
            if alen != 4 or nxt != n:
                return Drop.STUN_MALFORMED
            if (zlib.crc32(view[:off]) ^ FINGERPRINT_XOR) != _U32.unpack_from(buf, start)[0]:
                return Drop.STUN_MALFORMED
            attrs.setdefault(atype, view[start:start + 4])
        elif sealed and not (atype == MESSAGE_INTEGRITY_SHA256 and integrity >= 0):
            pass    # ignored after the integrity attributes (RFC 8489 sections 14.5, 14.6)
        else:
            if atype == MESSAGE_INTEGRITY:
                if alen != 20:
                    return Drop.STUN_MALFORMED
                integrity = off
                sealed = True
            elif atype == MESSAGE_INTEGRITY_SHA256:
                sealed = True
            elif atype == USERNAME and alen > MAX_USERNAME:
                return Drop.STUN_MALFORMED
            if atype not in attrs:
                attrs[atype] = view[start:start + alen]
        off = nxt
    return Message(msg_type, bytes(txid), attrs, integrity)


def binding_username(buf):
    """USERNAME (bytes) of a well-formed Binding Request, or the Drop reason.

    The relay's question for a packet that might open a flow.
    """
    msg = decode(buf)
    if msg.__class__ is Drop:
        return msg
    if msg.msg_type != BINDING_REQUEST:
        return Drop.STUN_NOT_BINDING_REQUEST
    username = msg.attributes.get(USERNAME)
    if username is None:
        return Drop.STUN_NO_USERNAME
    return bytes(username)


def split_username(username):
    """`(server ufrag, client ufrag)` from a USERNAME "<server>:<client>" (RFC 8445 section 7.2.2), or None."""
    server, sep, client = bytes(username).partition(b":")
    if not sep or not server or not client:
        return None
    return server, client


def _integrity(buf, offset, key):
    """HMAC-SHA1 over the message up to `offset`, with the length patched to end after MI."""
    patched = bytes(buf[0:2]) + struct.pack(">H", offset - HEADER_LEN + 24) + bytes(buf[4:offset])
    return hmac.new(key, patched, hashlib.sha1).digest()


def check_integrity(buf, msg, key):
    """True when `msg` (decoded from `buf`) carries a MESSAGE-INTEGRITY valid for `key`."""
    off = msg.integrity_offset
    if off < 0:
        return False
    expected = _integrity(buf, off, key)
    return hmac.compare_digest(expected, bytes(buf[off + 4:off + 24]))


def encode(msg_type, transaction_id, attributes=(), integrity_key=None, fingerprint=True):
    """A STUN message: attributes as (type, value bytes) pairs, padded with zeros.

    With `integrity_key` a MESSAGE-INTEGRITY follows them; with `fingerprint`
    a FINGERPRINT ends the message.
    """
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 octets")
    body = bytearray()
    for atype, value in attributes:
        value = bytes(value)
        body += _ATTR.pack(atype, len(value)) + value + bytes(-len(value) & 3)
    msg = bytearray(_HEAD.pack(msg_type, len(body), MAGIC_COOKIE, bytes(transaction_id))) + body
    if integrity_key is not None:
        mac = _integrity(msg, len(msg), integrity_key)
        msg += _ATTR.pack(MESSAGE_INTEGRITY, 20) + mac
    if fingerprint:
        struct.pack_into(">H", msg, 2, len(msg) - HEADER_LEN + 8)
        crc = zlib.crc32(msg) ^ FINGERPRINT_XOR
        msg += _ATTR.pack(FINGERPRINT, 4) + _U32.pack(crc)
    struct.pack_into(">H", msg, 2, len(msg) - HEADER_LEN)
    return bytes(msg)


def encode_xor_address(host, port, transaction_id):
    """XOR-MAPPED-ADDRESS value for (host, port) (RFC 8489 section 14.2)."""
    xport = port ^ (MAGIC_COOKIE >> 16)
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host)
        mask = _COOKIE_BYTES + bytes(transaction_id)
        return struct.pack(">BBH", 0, 2, xport) + bytes(a ^ b for a, b in zip(raw, mask))
    raw = socket.inet_pton(socket.AF_INET, host)
    return struct.pack(">BBH", 0, 1, xport) + bytes(a ^ b for a, b in zip(raw, _COOKIE_BYTES))


def decode_xor_address(value, transaction_id):
    """(host, port) from an XOR-MAPPED-ADDRESS value, or None if malformed."""
    value = bytes(value)
    if len(value) < 4:
        return None
    family, xport = value[1], struct.unpack_from(">H", value, 2)[0]
    port = xport ^ (MAGIC_COOKIE >> 16)
    if family == 1 and len(value) == 8:
        raw = bytes(a ^ b for a, b in zip(value[4:], _COOKIE_BYTES))
        return socket.inet_ntop(socket.AF_INET, raw), port
    if family == 2 and len(value) == 20:
        mask = _COOKIE_BYTES + bytes(transaction_id)
        raw = bytes(a ^ b for a, b in zip(value[4:], mask))
        return socket.inet_ntop(socket.AF_INET6, raw), port
    return None
