"""edge-relay: an edge UDP relay for real-time voice AI over WebRTC.

The relay forwards a client's UDP to the transceiver named by the routing
token in the client's first STUN Binding Request, and forwards the
transceiver's authenticated answers back. It holds no session secrets.
Runtime code is the Python standard library only.
"""

__version__ = "0.1.0"
