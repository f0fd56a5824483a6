"""The forwarding header on the relay <-> transceiver leg (docs/PROTOCOL.md section 4).

Every datagram on that leg is a 48-octet header followed by the payload:

    0  magic      2  0xEE 0x52
    2  version    1  HEADER_VERSION (1)
    3  type       1  TO_TRANSCEIVER 1, TO_CLIENT 2, PROBE 3, PROBE_ACK 4
    4  key id     1  the key whose header subkey made the tag
    5  flags      1  bit 0 FAILOVER; other bits reserved: sent 0, ignored on receipt
    6  route      1  opaque to the transceiver: which relay address the client
                     used; the transceiver echoes the last value it received
    7  family     1  4 or 6 for data; 0 for probes
    8  port       2  client port, big-endian
   10  address   16  client IPv6 address, or IPv4 address then 12 zero octets
   26  timestamp  6  sender's clock, milliseconds since the Unix epoch, big-endian
   32  tag       16  HMAC-SHA256(header subkey, octets 0..31 || payload), first 16 octets
   48  payload

Octets 6..25 (route, family, port, address) form the "client block": the same
bytes that identify a client in both directions.

`decode` applies the receiver rules in the documented order and returns a
`Header` or the `Drop` reason for the first rule that failed; it never raises
for any input and never copies the payload (it is a memoryview slice). The
relay's hot path (`seal`, which Router.from_clients inlines) seals with a
per-flow prefix (octets 0..25, built once per flow) and a per-batch
timestamp, so a packet costs two hash state copies
(the key's pre-keyed inner and outer SHA-256 states, keys.split_hmac), three
updates and two digests: HMAC-SHA256 exactly, ~20 % cheaper than copying an
HMAC object.

The relay's own transceiver -> client loop (router.Router.from_transceivers)
applies the same rules inline, in the same order, with RELAY_FIELDS: no
Python call per datagram (inlined, the loop costs about a tenth less).
tests/test_header.py (test_the_relay_check_*) holds its verdict equal to
`decode(..., accept=RELAY_ACCEPTS)` on every vector and on fuzzed input.
"""

import hmac
import struct
from typing import NamedTuple

from .drops import Drop

MAGIC = b"\xee\x52"
HEADER_VERSION = 1
HEADER_LEN = 48
MAC_INPUT_LEN = 32
TAG_LEN = 16

TO_TRANSCEIVER = 1   # relay -> transceiver: a client's datagram
TO_CLIENT = 2        # transceiver -> relay: send the payload to this client
PROBE = 3            # relay -> transceiver: health probe (payload echoed)
PROBE_ACK = 4        # transceiver -> relay: answer to a probe
TYPES = (TO_TRANSCEIVER, TO_CLIENT, PROBE, PROBE_ACK)
RELAY_ACCEPTS = frozenset((TO_CLIENT, PROBE_ACK))
TRANSCEIVER_ACCEPTS = frozenset((TO_TRANSCEIVER, PROBE))

FLAG_FAILOVER = 0x01
FAMILY_NONE, FAMILY_V4, FAMILY_V6 = 0, 4, 6
ZERO_ADDRESS = bytes(16)

_FIXED = struct.Struct(">2sBBBBBBH16s")        # octets 0..25
_ALL = struct.Struct(">2sBBBBBBH16sHI16s")     # octets 0..47 (timestamp as 16 + 32 bits)
# octets 0..47 as Router.from_transceivers reads them (decode's rules inlined
# there): magic as one 16-bit word, flags skipped, the port as its two octets
# (what sockaddr.pack_v4/pack_v6 take)
RELAY_FIELDS = struct.Struct(">HBBBxBB2s16sHI16s")
MAGIC_WORD = int.from_bytes(MAGIC, "big")


class Header(NamedTuple):
    type: int
    key_id: int
    flags: int
    route: int
    family: int
    port: int
    address: bytes        # 16 octets, as on the wire
    timestamp_ms: int
    payload: memoryview   # a view into the datagram: no copy

    @property
    def client_block(self):
        """Octets 6..25 as bytes: route, family, port, address."""
        return bytes((self.route, self.family)) + self.port.to_bytes(2, "big") + self.address


def timestamp_bytes(ms):
    """The 6-octet timestamp field for `ms` milliseconds since the epoch."""
    return (ms & 0xFFFFFFFFFFFF).to_bytes(6, "big")


def prefix(key_id, msg_type, flags, route, family, port, address):
    """Octets 0..25: everything before the timestamp (fixed per flow and key)."""
    return _FIXED.pack(MAGIC, HEADER_VERSION, msg_type, key_id, flags, route, family, port, address)


def seal(mac_state, head26, ts6, payload):
    """The 48-octet header for `payload`: `head26` + `ts6` + tag.

    `mac_state` is the key's pre-keyed HMAC: keys.Key.header_split (the
    (inner, outer) SHA-256 pair, fastest), header_openssl_mac or header_mac;
    it is copied, never updated in place. Octets 0..31 are joined once: that bytes
    object is both the first MAC input and the start of the header.
    """
    head32 = head26 + ts6
    if mac_state.__class__ is tuple:
        inner, outer = mac_state
        mac = inner.copy()
        mac.update(head32)
        mac.update(payload)
        tag = outer.copy()
        tag.update(mac.digest())
        return head32 + tag.digest()[:TAG_LEN]
    mac = mac_state.copy()
    mac.update(head32)
    mac.update(payload)
    return head32 + mac.digest()[:TAG_LEN]


def encode(key, msg_type, payload, *, route=0, family=0, port=0, address=ZERO_ADDRESS,
           timestamp_ms, flags=0):
    """The 48-octet header (bytes) for `payload`, sealed with keys.Key `key`.

    The payload is not included: send header and payload as two buffers, or
    concatenate them. `address` is 16 octets (IPv4: 4 octets + 12 zeros).
    """
    if msg_type not in TYPES:
        raise ValueError(f"unknown header type {msg_type}")
    if len(address) == 4:
        address = bytes(address) + bytes(12)
    elif len(address) != 16:
        raise ValueError(f"address must be 4 or 16 octets, got {len(address)}")
    head = prefix(key.key_id, msg_type, flags, route, family, port, bytes(address))
    return seal(key.header_split, head, timestamp_bytes(timestamp_ms), payload)


def decode(datagram, keyring, now_ms, window_ms, accept=RELAY_ACCEPTS):
    """A Header for a valid datagram (bytes or memoryview), or the Drop reason.

    Rules, in order: length >= 48 (HEADER_SHORT); magic (HEADER_MAGIC);
    version (HEADER_VERSION); type known and in `accept` (HEADER_TYPE); key id
    in the ring (HEADER_KEY_ID); family 4/6 for data, 0 for probes
    (HEADER_FAMILY); tag (HEADER_MAC); |now_ms - timestamp| <= window_ms
    (HEADER_STALE). Nothing about the datagram is trusted before the tag.
    """
    if len(datagram) < HEADER_LEN:
        return Drop.HEADER_SHORT
    (magic, version, msg_type, key_id, flags, route, family, port, address,
     ts_hi, ts_lo, tag) = _ALL.unpack_from(datagram)
    if magic != MAGIC:
        return Drop.HEADER_MAGIC
    if version != HEADER_VERSION:
        return Drop.HEADER_VERSION
    if msg_type not in accept:
        return Drop.HEADER_TYPE
    key = keyring.by_id[key_id]
    if key is None:
        return Drop.HEADER_KEY_ID
    if msg_type == PROBE or msg_type == PROBE_ACK:
        if family != FAMILY_NONE:
            return Drop.HEADER_FAMILY
    elif family != FAMILY_V4 and family != FAMILY_V6:
        return Drop.HEADER_FAMILY
    view = datagram if isinstance(datagram, memoryview) else memoryview(datagram)
    inner, outer = key.header_split
    mac = inner.copy()
    mac.update(view[:MAC_INPUT_LEN])
    payload = view[HEADER_LEN:]
    mac.update(payload)
    check = outer.copy()
    check.update(mac.digest())
    if not hmac.compare_digest(check.digest()[:TAG_LEN], tag):
        return Drop.HEADER_MAC
    ts = (ts_hi << 32) | ts_lo
    if ts > now_ms + window_ms or ts < now_ms - window_ms:
        return Drop.HEADER_STALE
    return Header(msg_type, key_id, flags, route, family, port, address, ts, payload)
