"""Why a datagram was dropped: one vocabulary for every decoder and the relay.

Decoders return these values instead of raising; the relay turns each into a
counter (`edge_relay_drops_total{reason="..."}`). The numeric values index the
counter arrays, so append new reasons at the end and never renumber.
`OK` (0) means "not dropped".
"""

import enum


class Drop(enum.IntEnum):
    OK = 0
    # RFC 7983 demultiplexing and I/O
    NOT_WEBRTC = 1            # first byte is not STUN, DTLS or RTP/RTCP
    TRUNCATED = 2             # datagram larger than the receive buffer
    # STUN (RFC 8489)
    STUN_MALFORMED = 3        # header, length, attribute walk or FINGERPRINT bad
    STUN_NOT_BINDING_REQUEST = 4  # a new flow may only start with a Binding Request
    STUN_NO_USERNAME = 5      # Binding Request without USERNAME "<server>:<client>"
    # routing token (docs/PROTOCOL.md section 3)
    TOKEN_MALFORMED = 6       # bad length or characters outside ice-char
    TOKEN_VERSION = 7
    TOKEN_KEY_ID = 8
    TOKEN_MAC = 9
    TOKEN_EXPIRED = 10
    TOKEN_FUTURE = 11         # expiry further ahead than the allowed lifetime
    UNKNOWN_TRANSCEIVER = 12  # token valid, transceiver id not configured
    # flows
    UNKNOWN_FLOW = 13         # DTLS/RTP/STUN-response from an address with no flow
    FLOW_TABLE_FULL = 14
    PENDING_PER_SOURCE = 15   # too many pending flows from one source IP
    DRAINING = 16             # new flow refused while the relay drains
    # forwarding header (docs/PROTOCOL.md section 4)
    HEADER_SHORT = 17
    HEADER_MAGIC = 18
    HEADER_VERSION = 19
    HEADER_TYPE = 20          # unknown type, or a type not valid in this direction
    HEADER_KEY_ID = 21
    HEADER_FAMILY = 22
    HEADER_MAC = 23
    HEADER_STALE = 24         # timestamp outside the acceptance window
    # transceiver leg policy
    NOT_TRANSCEIVER = 25      # internal socket: source is not a configured transceiver
    NO_FLOW = 26              # header names a client that is not a live flow
    FLOW_OF_OTHER = 27        # header names a flow owned by another transceiver
    # app-level rate limits (edge hardening)
    RATE_SOURCE_NEW_FLOWS = 28
    RATE_GLOBAL_NEW_FLOWS = 29
    RATE_FLOW_PACKETS = 30
    # sending
    SEND_FAILED = 31          # the kernel refused a datagram (ENOBUFS, EAGAIN, ...)
    # PoP-wide flow directory (directory.py; only when [directory] is configured)
    DIRECTORY_FULL = 32       # unknown flow's packet not held: hold or lookup caps reached
    DIRECTORY_MISS = 33       # held packet dropped: directory did not know the flow, failed or timed out
    # transceiver side (transceiver.check_request; the relay holds no ICE password)
    STUN_INTEGRITY = 34       # Binding Request whose MESSAGE-INTEGRITY is missing or not the session password's
    # ingress source checks (router._source_drop; before any token work)
    SOURCE_INTERNAL = 35      # public port: source is a transceiver address or inside internal.allow
    SOURCE_PORT_ZERO = 36     # public port: UDP source port 0 (no reply could ever reach it)
    SOURCE_NOT_UNICAST = 37   # public port: multicast, broadcast or unspecified source address
    SOURCE_SELF = 38          # public port: source is one of the relay's own configured addresses
    # flow-table fairness (flows.py)
    SESSION_FLOWS = 39        # routing token already holds limits.max_flows_per_session flows
    TRANSCEIVER_FLOWS = 40    # transceiver already holds limits.max_flows_per_transceiver flows
    # ICE restart (router._pass_or_restart; docs/SECURITY.md "ICE restart")
    RESTART_HELD = 41         # new owner's answer while the old owner may still serve the flow
    RESTART_RATE = 42         # restart request on a flow whose last restart was refused recently
    # transceiver adapter (adapter.py, docs/ADAPTER.md)
    STUN_ERROR_RESPONSE = 43  # a Binding error response: never sent on toward the relay
    STUN_UNMATCHED = 44       # a Binding success whose transaction id matches no check the adapter forwarded

    @property
    def label(self):
        """The Prometheus label value: the lower-case name."""
        return self.name.lower()


N_DROPS = len(Drop)
