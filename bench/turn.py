"""coturn for the side-by-side bench: Debian's turnserver run directly, and a TURN client.

Theory of operation
  `start_coturn` runs /usr/bin/turnserver (never its systemd unit, which
  `ensure_unit_off` keeps disabled and stopped) on loopback only: one relay
  thread, no authentication, no CLI, no TLS/DTLS, no config file, an
  ephemeral listening port, pid/log/db files in a temp directory. The caller
  pins it to the forwarder CPU.

  `allocate_all` is the bench's own TURN client (RFC 8656), one allocation
  per client socket: Allocate (REQUESTED-TRANSPORT UDP), CreatePermission
  and ChannelBind (channel 0x4000) for the one peer address, the bench's
  sink socket. Afterwards a client sends ChannelData (channel, length,
  payload) and coturn relays the payload from the allocation's relayed
  address to the peer; the peer sends to a relayed address and coturn
  relays it back to the client as ChannelData. ChannelData carries no
  authentication, so --no-auth changes nothing on that path.
"""

import os
import select
import shutil
import struct
import subprocess
import time

from edge_relay import stun

TURNSERVER = "/usr/bin/turnserver"
ALLOCATE, CREATE_PERMISSION, CHANNEL_BIND = 0x0003, 0x0008, 0x0009
SUCCESS = 0x0100                        # class bits of a success response
REQUESTED_TRANSPORT, LIFETIME, XOR_PEER_ADDRESS = 0x0019, 0x000D, 0x0012
XOR_RELAYED_ADDRESS, CHANNEL_NUMBER = 0x0016, 0x000C
CHANNEL = 0x4000
CHANNEL_HEAD = struct.Struct(">HH")


def available():
    return os.path.exists(TURNSERVER)


def ensure_unit_off():
    """Disable (and stop, if systemd runs) the package's coturn unit; returns its state."""
    if shutil.which("systemctl") is None:
        return "no systemctl"
    subprocess.run(["systemctl", "disable", "--now", "coturn"], capture_output=True)
    enabled = subprocess.run(["systemctl", "is-enabled", "coturn"], capture_output=True, text=True).stdout.strip()
    active = subprocess.run(["systemctl", "is-active", "coturn"], capture_output=True, text=True).stdout.strip()
    return f"enabled={enabled or '?'} active={active or '?'}"


def start_coturn(tmp, port, cpu):
    """turnserver on 127.0.0.1:`port`, pinned to `cpu`; returns the Popen once it answers."""
    args = [TURNSERVER, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
            f"--listening-port={port}", "--relay-threads=1", "--no-auth", "--no-cli", "--no-tls",
            "--no-dtls", "--no-tcp-relay", "--allow-loopback-peers", "--no-rfc5780",
            "--no-software-attribute", "--no-stdout-log", "--simple-log",
            f"--log-file={tmp}/turn.log", f"--pidfile={tmp}/turn.pid", f"--db={tmp}/turndb",
            "--max-allocate-lifetime=3600"]
    proc = subprocess.Popen(["taskset", "-c", str(cpu), *args], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, "turn.stderr"), "w"))
    return proc


def _request(sock, server, msg_type, attrs, timeout=2.0):
    """One STUN transaction on `sock` (non-blocking), retransmitted; returns the decoded answer or None."""
    txid = os.urandom(12)
    msg = stun.encode(msg_type, txid, attrs)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.sendto(msg, server)
        end = min(deadline, time.monotonic() + 0.2)
        while time.monotonic() < end:
            r, _, _ = select.select([sock], [], [], max(0.0, end - time.monotonic()))
            if not r:
                continue
            try:
                data, _ = sock.recvfrom(2048)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            m = stun.decode(data)
            if m.__class__ is not stun.Message or m.transaction_id != txid:
                continue
            return m
    return None


def allocate(sock, server, peer):
    """Allocate + CreatePermission + ChannelBind(CHANNEL -> peer) for one client; returns the relayed address."""
    m = _request(sock, server, ALLOCATE, [(REQUESTED_TRANSPORT, bytes((17, 0, 0, 0))),
                                          (LIFETIME, struct.pack(">I", 3600))])
    if m is None or m.msg_type != ALLOCATE | SUCCESS or XOR_RELAYED_ADDRESS not in m.attributes:
        raise RuntimeError(f"coturn: Allocate failed: {m}")
    relayed = stun.decode_xor_address(m.attributes[XOR_RELAYED_ADDRESS], m.transaction_id)
    txid = os.urandom(12)      # XOR-PEER-ADDRESS for IPv4 does not depend on the transaction id
    peer_attr = (XOR_PEER_ADDRESS, stun.encode_xor_address(peer[0], peer[1], txid))
    m = _request(sock, server, CREATE_PERMISSION, [peer_attr])
    if m is None or m.msg_type != CREATE_PERMISSION | SUCCESS:
        raise RuntimeError(f"coturn: CreatePermission failed: {m}")
    m = _request(sock, server, CHANNEL_BIND, [(CHANNEL_NUMBER, struct.pack(">HH", CHANNEL, 0)), peer_attr])
    if m is None or m.msg_type != CHANNEL_BIND | SUCCESS:
        raise RuntimeError(f"coturn: ChannelBind failed: {m}")
    return relayed


def wait_listening(sock, server, timeout=10.0):
    """True once coturn answers a Binding request on `server`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _request(sock, server, stun.BINDING_REQUEST, [], timeout=0.5) is not None:
            return True
    return False


def allocate_all(socks, server, peer):
    """One allocation per client socket; returns the relayed addresses in socket order."""
    return [allocate(s, server, peer) for s in socks]


def channel_data(payload):
    return CHANNEL_HEAD.pack(CHANNEL, len(payload)) + payload
