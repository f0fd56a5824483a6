"""Synthetic voice clients for the e2e test, sent from the host over the veth.

Same as `edge-relay demo-client` (mint a ufrag with the shared key, STUN
check, 50 pps of RTP-shaped datagrams echoed by the demo transceiver), except
that each client socket is bound to the host's address on the route to the
relay: demo.VoiceClient binds 127.0.0.1 by default, from where the kernel
refuses (EINVAL) to reach the container, and the client checks that the
XOR-MAPPED-ADDRESS it gets back equals its own bound address.

Usage: python3 tests/e2e/voice.py RELAY_HOST:PORT KEY_DIR SECONDS [CLIENTS]
Prints demo.client_report() as JSON; exit 0 when every client connected.
"""

import json
import os
import selectors
import socket
import sys
import time

from edge_relay import demo, keys

TAIL = 3.0   # seconds to wait for echoes still in flight after the last send


def main(argv):
    relay, key_dir, duration = argv[0], argv[1], float(argv[2])
    n = int(argv[3]) if len(argv) > 3 else 1
    host, _, port = relay.rpartition(":")
    addr = (host.strip("[]"), int(port))
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    probe.connect(addr)                 # no packet sent: only picks the route
    local = probe.getsockname()[0]
    probe.close()
    # the e2e gives callers their own address: the transceiver's is not a client's (SOURCE_INTERNAL)
    local = os.environ.get("VOICE_BIND") or local
    keyring = keys.load_dir(key_dir)
    clients = []
    for _ in range(n):
        ufrag, password = demo.mint_session(keyring, 1, time.time())
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((local, 0))
        clients.append(demo.VoiceClient(addr, ufrag, password, sock=sock))
    demo.run_clients(clients, duration)
    # run_clients waits 0.3 s for the last echoes; on a loaded CI machine a
    # round trip can take longer, and a late echo is not a lost packet.
    # Collect for up to TAIL more seconds, until every echo is back.
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ, c)
    deadline = time.monotonic() + TAIL
    while time.monotonic() < deadline and any(c.received < c.sent for c in clients):
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            key.data.pump(time.monotonic())
    sel.close()
    report = demo.client_report(clients)
    print(json.dumps(report), flush=True)
    return 0 if report["connected"] == n else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
