"""Synthetic voice clients for the e2e test, sent from the host over the veth.

Same as `edge-relay demo-client` (mint a ufrag with the shared key, STUN
check, 50 pps of RTP-shaped datagrams echoed by the demo transceiver), except
that each client socket is bound to the host's address on the route to the
relay: demo.VoiceClient binds 127.0.0.1 by default, from where the kernel
refuses (EINVAL) to reach the container, and the client checks that the
XOR-MAPPED-ADDRESS it gets back equals its own bound address.

Each client keeps one record per echo (packet index, round trip), so that
voice_figures.py can say what a caller heard: packets never echoed, late
echoes, the longest gap.

Usage: python3 tests/e2e/voice.py RELAY_HOST:PORT KEY_DIR SECONDS [CLIENTS]
           [--ready FILE] [--hold AFTER] [--new-calls N]
  --ready FILE  once every client is connected, write their addresses to FILE
  --hold AFTER  send for at least SECONDS and until AFTER seconds after SIGUSR2
                (the action is over), HOLD_MAX seconds at most
  --new-calls N SIGUSR1 places N more calls at once (the calls placed during
                the action), each timed from its first Binding Request to its
                first Binding success answer; each gives up after
                NEW_CALL_TIMEOUT seconds. Reported as "new_calls", and as
                "new_call": the one that did not connect, else the slowest
Prints demo.client_report() of the CLIENTS as JSON, plus "calls" (each call's
address and figures) and "new_call"; exit 0 when every client connected.
"""

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time

from edge_relay import demo, keys

import voice_figures

TAIL = 3.0              # seconds to wait for echoes still in flight after the last send
HOLD_MAX = 300.0        # --hold: never send longer than this
NEW_CALL_TIMEOUT = 5.0  # --new-calls: a call not connected by then failed to connect
TICK = 0.02             # the loop wakes at least this often, so a signal's flag is seen soon


class Caller(demo.VoiceClient):
    """A VoiceClient with the time of its first check, of its connection, and one record per echo."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.echoes = []            # (packet index, round trip in seconds) per echo, in arrival order
        self.placed_at = None       # monotonic time of the first Binding Request
        self.connected_at = None    # monotonic time the first Binding success was accepted

    def send_check(self, now):
        if self.placed_at is None:
            self.placed_at = now
        super().send_check(now)

    def receive(self, data, now):
        received = self.received
        super().receive(data, now)
        if self.received != received:       # a first echo of one media packet: its index and RTT
            index, _ = demo._PROBE_STAMP.unpack_from(data, demo._RTP.size)
            self.echoes.append((index, self.rtts[-1]))
        if self.connected and self.connected_at is None:
            self.connected_at = now

    def figures(self):
        host, port = self.address
        fig = voice_figures.call_figures(self.sent, self.echoes)
        fig.update(address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                   received=self.received, connected=self.connected)
        return fig


class Signals:
    """SIGUSR1 (place the new calls) and SIGUSR2 (the action is over), as monotonic times."""

    def __init__(self):
        self.usr1 = self.usr2 = None
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "usr1", self.usr1 or time.monotonic()))
        signal.signal(signal.SIGUSR2, lambda *_: setattr(self, "usr2", self.usr2 or time.monotonic()))


def make_caller(keyring, addr, family, local):
    ufrag, password = demo.mint_session(keyring, 1, time.time())
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((local, 0))
    return Caller(addr, ufrag, password, sock=sock)


def write_ready(path, clients):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"calls": [c.figures()["address"] for c in clients], "wall": time.time()}, f)
    os.replace(tmp, path)


def drive(clients, seconds, sig, hold_after, new_calls, new_caller, ready):
    """Run the clients (and the new calls, once asked for); returns the new calls."""
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ, c)
    live = list(clients)
    new = []
    start = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            end = start + seconds
            if hold_after is not None:
                end = min(start + HOLD_MAX, max(end, sig.usr2 + hold_after if sig.usr2 else float("inf")))
            for c in new:
                if c.gave_up or c.connected_at is not None or c.placed_at is None:
                    continue
                if now - c.placed_at >= NEW_CALL_TIMEOUT:     # it failed to connect: stop its checks
                    sel.unregister(c.sock)
                    live.remove(c)
                    c.gave_up = True
                else:
                    end = max(end, c.placed_at + NEW_CALL_TIMEOUT)
            if now >= end:
                break
            if sig.usr1 is not None and not new and new_calls:
                for _ in range(new_calls):
                    c = new_caller()
                    c.asked_at = sig.usr1
                    c.gave_up = False
                    sel.register(c.sock, selectors.EVENT_READ, c)
                    new.append(c)
                live += new
            due = min(c.tick(now) for c in live)
            timeout = max(0.0, min(due, end, time.monotonic() + TICK) - time.monotonic())
            for key, _ in sel.select(timeout):
                key.data.pump(time.monotonic())
            if ready is not None and all(c.connected for c in clients):
                write_ready(ready, clients)
                ready = None
        # collect the echoes still in flight: a late echo is not a lost packet
        deadline = time.monotonic() + TAIL
        while time.monotonic() < deadline and any(c.received < c.sent for c in live):
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                key.data.pump(time.monotonic())
    finally:
        sel.close()
    return new


def new_call_report(new, t0_mono, t0_wall):
    wall = lambda t: None if t is None else round(t0_wall + (t - t0_mono), 3)  # noqa: E731
    ms = None if new.connected_at is None else (new.connected_at - new.placed_at) * 1000
    return {"asked_wall": wall(new.asked_at), "placed_wall": wall(new.placed_at), "connected": ms is not None,
            "ms": None if ms is None else round(ms, 1), "gave_up": new.gave_up,
            "timeout_s": NEW_CALL_TIMEOUT, "address": new.figures()["address"],
            "sent": new.sent, "received": new.received}


def main(argv):
    p = argparse.ArgumentParser(prog="voice.py")
    p.add_argument("relay")
    p.add_argument("key_dir")
    p.add_argument("seconds", type=float)
    p.add_argument("clients", type=int, nargs="?", default=1)
    p.add_argument("--ready")
    p.add_argument("--hold", type=float, default=None)
    p.add_argument("--new-calls", type=int, default=0)
    args = p.parse_args(argv)
    sig = Signals()
    host, _, port = args.relay.rpartition(":")
    addr = (host.strip("[]"), int(port))
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    probe.connect(addr)                 # no packet sent: only picks the route
    local = probe.getsockname()[0]
    probe.close()
    # the e2e gives callers their own address: the transceiver's is not a client's (SOURCE_INTERNAL)
    local = os.environ.get("VOICE_BIND") or local
    keyring = keys.load_dir(args.key_dir)
    clients = [make_caller(keyring, addr, family, local) for _ in range(args.clients)]
    t0_mono, t0_wall = time.monotonic(), time.time()
    new = drive(clients, args.seconds, sig, args.hold, args.new_calls,
                lambda: make_caller(keyring, addr, family, local), args.ready)
    report = demo.client_report(clients)
    report["calls"] = [c.figures() for c in clients]
    report["new_calls"] = [new_call_report(c, t0_mono, t0_wall) for c in new]
    # the call that did not connect, else the slowest: the one a caller would complain about
    report["new_call"] = max(report["new_calls"], key=lambda r: (not r["connected"], r["ms"] or 0), default=None)
    if args.new_calls and not new:      # never asked (no SIGUSR1): a call that did not connect
        report["new_call"] = {"connected": False, "ms": None, "placed_wall": None, "asked_wall": None}
    report["started_wall"] = round(t0_wall, 3)
    for c in clients + new:
        c.sock.close()
    print(json.dumps(report), flush=True)
    return 0 if report["connected"] == args.clients else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
