"""The transceiver's side of the wire protocol, for transceiver authors.

A transceiver terminates ICE, DTLS and SRTP; the relay only forwards. This
module gives it everything the relay expects of it, sans-IO:

  * `Endpoint.new_session(wall)` mints the ICE ufrag (a routing token naming
    this transceiver) and an ICE password for a new session.
  * `Endpoint.receive(datagram, now_ms)` checks a datagram from a relay and
    returns an `Inbound` (who the client really is, and the payload) or the
    Drop reason.
  * `Endpoint.to_client(inbound, payload, now_ms)` seals a payload for that
    client; send it back to the relay address the inbound came from, so it
    reaches the relay worker that holds the flow.
  * `answer_binding(...)` is an ICE-lite answer to a connectivity check:
    Binding success with XOR-MAPPED-ADDRESS = the client's real address (from
    the header, not the relay's), MESSAGE-INTEGRITY with the local ICE
    password (RFC 8489 section 14.5) and FINGERPRINT.
  * `Endpoint.answer_probe(inbound, now_ms)` answers a relay health probe.

docs/PROTOCOL.md section 7 shows the whole integration in a dozen lines.
"""

import binascii
import os
import socket
from typing import NamedTuple

from . import header, stun, token
from .drops import Drop

DEFAULT_SESSION_LIFETIME = 4 * 3600     # seconds a ufrag may open flows on any relay
ICE_PWD_OCTETS = 18                     # 24 ice-chars; RFC 8839 wants >= 22 chars, 128 bits


class Credentials(NamedTuple):
    ufrag: str          # the server ufrag: a routing token
    password: str       # the ICE password; only the transceiver and the client know it


class Inbound(NamedTuple):
    client: tuple       # (host, port) of the client as the relay saw it
    route: int          # echo it in every datagram to this client
    family: int
    port: int
    address: bytes      # 16 octets, as in the header
    failover: bool      # the relay sent this client here as a backup
    payload: memoryview
    header: header.Header


def ice_password():
    """A fresh ICE password: 24 ice-chars (RFC 8839 section 5.4)."""
    return binascii.b2a_base64(os.urandom(ICE_PWD_OCTETS), newline=False).decode("ascii")


class Endpoint:
    """One transceiver id and the key ring it shares with the relays."""

    def __init__(self, keyring, transceiver_id, window_ms=2000):
        self.keyring = keyring
        self.transceiver_id = transceiver_id
        self.window_ms = window_ms

    def new_session(self, wall, lifetime=DEFAULT_SESSION_LIFETIME):
        ufrag = token.mint(self.keyring.signing, self.transceiver_id, int(wall + lifetime))
        return Credentials(ufrag, ice_password())

    def receive(self, datagram, now_ms):
        hdr = header.decode(datagram, self.keyring, now_ms, self.window_ms,
                            accept=header.TRANSCEIVER_ACCEPTS)
        if hdr.__class__ is Drop:
            return hdr
        if hdr.family == header.FAMILY_V4:
            host = socket.inet_ntop(socket.AF_INET, hdr.address[:4])
        elif hdr.family == header.FAMILY_V6:
            host = socket.inet_ntop(socket.AF_INET6, hdr.address)
        else:
            host = ""
        return Inbound((host, hdr.port), hdr.route, hdr.family, hdr.port, hdr.address,
                       bool(hdr.flags & header.FLAG_FAILOVER), hdr.payload, hdr)

    def to_client(self, inbound, payload, now_ms):
        """A TO_CLIENT datagram (bytes) carrying `payload` to `inbound`'s client."""
        head = header.encode(self.keyring.signing, header.TO_CLIENT, payload, route=inbound.route,
                             family=inbound.family, port=inbound.port, address=inbound.address,
                             timestamp_ms=now_ms)
        return head + bytes(payload)

    def answer_probe(self, inbound, now_ms):
        """A PROBE_ACK echoing the probe's payload (the relay measures RTT from it)."""
        payload = bytes(inbound.payload)
        return header.encode(self.keyring.signing, header.PROBE_ACK, payload,
                             timestamp_ms=now_ms) + payload


def check_request(buf, local_ufrag, password):
    """The decoded Binding Request if it is for `local_ufrag` and its integrity holds, else a Drop.

    USERNAME must be "<local ufrag>:<remote ufrag>" and MESSAGE-INTEGRITY keyed
    with the local password (RFC 8445 section 7.2.2).
    """
    msg = stun.decode(buf)
    if msg.__class__ is Drop:
        return msg
    if msg.msg_type != stun.BINDING_REQUEST:
        return Drop.STUN_NOT_BINDING_REQUEST
    username = msg.get(stun.USERNAME)
    parts = stun.split_username(username) if username is not None else None
    if parts is None or parts[0] != local_ufrag.encode("ascii"):
        return Drop.STUN_NO_USERNAME
    if not stun.check_integrity(buf, msg, password.encode("utf-8")):
        return Drop.STUN_INTEGRITY
    return msg


def answer_binding(request, client, password, software=b"edge-relay demo"):
    """Binding success for a decoded `request` from `client` (host, port), as bytes."""
    attrs = [(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(client[0], client[1], request.transaction_id))]
    if software:
        attrs.insert(0, (stun.SOFTWARE, software))
    return stun.encode(stun.BINDING_SUCCESS, request.transaction_id, attrs,
                       integrity_key=password.encode("utf-8"), fingerprint=True)
