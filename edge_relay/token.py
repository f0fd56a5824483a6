"""The routing token: the transceiver's ICE ufrag, which tells any relay where a session lives.

Wire form (docs/PROTOCOL.md section 3): 24 octets, base64 without padding,
so 32 characters of ice-char (RFC 8839: ALPHA / DIGIT / "+" / "/").

    0  version        1   TOKEN_VERSION (1)
    1  key id         1
    2  transceiver id 2   big-endian
    4  expiry         4   Unix seconds, big-endian
    8  nonce          8   random per session
   16  tag            8   HMAC-SHA256(token subkey, octets 0..15), first 8 octets

`verify` applies the receiver rules in the documented order and returns
either a `Token` or the `Drop` reason for the first rule that failed. It never
raises for any input bytes. The relay calls it only for packets that would
open or move a flow, so it is off the per-packet hot path.
"""

import binascii
import hmac
import os
import struct
from typing import NamedTuple

from .drops import Drop

TOKEN_VERSION = 1
TOKEN_OCTETS = 24
TOKEN_CHARS = 32
TAG_LEN = 8
MIN_UFRAG, MAX_UFRAG = 4, 256     # RFC 8839 section 5.4 ice-ufrag length
_BODY = struct.Struct(">BBHI8s")


class Token(NamedTuple):
    version: int
    key_id: int
    transceiver: int
    expiry: int        # Unix seconds; no new flow may open with this token after it
    nonce: bytes


def mint(key, transceiver, expiry, nonce=None):
    """The ufrag (str) for a new session on `transceiver`, signed with `key` (a keys.Key)."""
    if not 0 <= transceiver <= 0xFFFF:
        raise ValueError(f"transceiver id {transceiver} outside 0..65535")
    nonce = os.urandom(8) if nonce is None else nonce
    if len(nonce) != 8:
        raise ValueError(f"nonce must be 8 octets, got {len(nonce)}")
    body = _BODY.pack(TOKEN_VERSION, key.key_id, transceiver, int(expiry), nonce)
    mac = key.token_mac.copy()
    mac.update(body)
    return binascii.b2a_base64(body + mac.digest()[:TAG_LEN], newline=False).decode("ascii")


def verify(ufrag, keyring, wall, max_lifetime, skew):
    """A Token for a valid `ufrag` (bytes or str), or the Drop reason it fails.

    Rules, in order: length 4..256 and ice-char only (TOKEN_MALFORMED); version
    (TOKEN_VERSION); exact length for the version (TOKEN_MALFORMED); key id in
    the ring (TOKEN_KEY_ID); MAC (TOKEN_MAC); expiry + skew >= wall
    (TOKEN_EXPIRED); expiry <= wall + max_lifetime + skew (TOKEN_FUTURE).
    `wall` is Unix time in seconds.
    """
    if isinstance(ufrag, str):
        try:
            ufrag = ufrag.encode("ascii")
        except UnicodeEncodeError:
            return Drop.TOKEN_MALFORMED
    n = len(ufrag)
    if n < MIN_UFRAG or n > MAX_UFRAG or b"=" in ufrag or b"\n" in ufrag:
        return Drop.TOKEN_MALFORMED
    try:
        raw = binascii.a2b_base64(ufrag, strict_mode=True)
    except (binascii.Error, ValueError):
        return Drop.TOKEN_MALFORMED
    if not raw or raw[0] != TOKEN_VERSION:
        return Drop.TOKEN_VERSION if raw else Drop.TOKEN_MALFORMED
    if len(raw) != TOKEN_OCTETS:
        return Drop.TOKEN_MALFORMED
    version, key_id, transceiver, expiry, nonce = _BODY.unpack_from(raw)
    key = keyring.by_id[key_id]
    if key is None:
        return Drop.TOKEN_KEY_ID
    mac = key.token_mac.copy()
    mac.update(raw[:16])
    if not hmac.compare_digest(mac.digest()[:TAG_LEN], raw[16:]):
        return Drop.TOKEN_MAC
    if expiry + skew < wall:
        return Drop.TOKEN_EXPIRED
    if expiry > wall + max_lifetime + skew:
        return Drop.TOKEN_FUTURE
    return Token(version, key_id, transceiver, expiry, nonce)


def peek_transceiver(ufrag):
    """The transceiver id a well-formed v1 token names, without checking its MAC, or None.

    For a flow that already exists: a consent check naming the flow's own
    transceiver needs no verification; only a different id (an ICE restart)
    is verified in full before anything changes.
    """
    if len(ufrag) != TOKEN_CHARS:
        return None
    try:
        raw = binascii.a2b_base64(ufrag, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != TOKEN_OCTETS or raw[0] != TOKEN_VERSION:
        return None
    return (raw[2] << 8) | raw[3]
