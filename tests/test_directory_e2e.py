"""PoP-wide flow directory end to end: two relays behind a 'hash' that moves a call mid-way.

Two `edge-relay run` processes (A and B) share keys and a transceiver. A tiny
UDP balancer in the test plays the PoP's ECMP/L4 hash: one front socket for
clients and, per client, one back socket that keeps its address whichever
relay it sends to (as a DNAT would keep the client's). Mid-call the hash
moves the client from A to B.
  * with the directory ([directory] address = a throwaway redis-server), A
    published the confirmed flow; B asks Redis about the unknown SRTP and
    forwards it at once;
  * without it, B drops the media until the client's next consent check
    (RFC 7675, every 5 s here) reopens the flow through its routing token.
Both gaps are printed; the asserts only say that the call resumes (and that
with the directory B learned the flow from Redis, not from a consent check).
Loopback only (no network namespaces): see the closing note of issue 8.
"""

import os
import selectors
import socket
import time

from edge_relay import demo
from relayproc import (CountingClient, Relay, Setup, Traffic, Transceiver, http_get, parse_prometheus,
                       wait_for)
from redisserver import redis_server


class Balancer:
    """front <- clients; per client a back socket that sends to relays[target]."""

    def __init__(self, relays):
        self.relays = relays
        self.target = 0
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.setblocking(False)
        self.backs = {}            # client addr -> back socket
        self.client_of = {}        # back socket -> client addr

    @property
    def address(self):
        return self.front.getsockname()

    def back_for(self, client):
        s = self.backs.get(client)
        if s is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            self.backs[client] = s
            self.client_of[s] = client
            self.sel.register(s, selectors.EVENT_READ, lambda s=s: self.from_relay(s))
        return s

    def from_client(self):
        while True:
            try:
                data, addr = self.front.recvfrom(4096)
            except BlockingIOError:
                return
            self.back_for(addr).sendto(data, self.relays[self.target])

    def from_relay(self, s):
        while True:
            try:
                data, _ = s.recvfrom(4096)
            except (BlockingIOError, ConnectionRefusedError):
                return
            self.front.sendto(data, self.client_of[s])

    def close(self):
        for s in [self.front, *self.backs.values()]:
            s.close()


class NattedClient(CountingClient):
    """A voice client whose address, as the relays see it, is its balancer back socket."""

    seen_as = None
    arrivals = None

    @property
    def address(self):
        return self.seen_as or super().address

    def receive(self, data, now):
        before = self.received
        super().receive(data, now)
        if self.received > before:
            self.arrivals.append(now)


def two_relays(tmp_path, extra):
    a = Setup(tmp_path / "a", workers=1, extra=extra)
    b = Setup(tmp_path / "b", workers=1, extra=extra)
    b.tx_sock.close()
    b.key_dir, b.keyring = a.key_dir, a.keyring
    b.ports["transceiver_port"] = a.ports["transceiver_port"]
    b.write()
    return a, b


def call_moved_mid_way(tmp_path, extra, label):
    for d in ("a", "b"):
        os.makedirs(tmp_path / d, exist_ok=True)
    a, b = two_relays(tmp_path, extra)
    tx = Transceiver(a.keyring, a.tx_sock)
    relays = [Relay(a), Relay(b)]
    bal = Balancer([a.public, b.public])
    try:
        for setup, relay in zip((a, b), relays):
            wait_for(lambda: http_get(setup.url + "/healthz")[0] == 200 or relay.proc.poll() is not None, 20)
            assert relay.proc.poll() is None, relay.log()
        ufrag, password = demo.mint_session(a.keyring, 1, time.time())
        vc = NattedClient(bal.address, ufrag, password)
        vc.arrivals = []
        traffic = Traffic([vc], tx, extra={bal.front: bal.from_client})
        bal.sel = traffic.sel
        # the first check creates the back socket: then the client knows how the relays see it
        traffic.run(0.2, until=lambda: bal.backs)
        vc.seen_as = next(iter(bal.backs.values())).getsockname()
        assert traffic.run(10, until=lambda: vc.connected), "no call through relay A"
        traffic.run(2.0)
        moved_at = time.monotonic()
        bal.target = 1                    # the hash moves the client to relay B
        traffic.run(8.0)
        before = [t for t in vc.arrivals if t <= moved_at]
        after = [t for t in vc.arrivals if t > moved_at]
        assert before and after, f"{label}: the call did not resume on relay B"
        gap = after[0] - before[-1]
        fams = parse_prometheus(http_get(b.url + "/metrics")[1])
        events = fams["edge_relay_flow_events_total"]["samples"]
        print(f"\ndirectory gap {label}: {gap * 1000:.0f} ms between the last echo through relay A "
              f"and the first through relay B")
        return gap, events, fams
    finally:
        for r in relays:
            r.kill()
        bal.close()
        tx.sock.close()


def test_a_moved_call_resumes_at_once_with_the_directory_and_at_consent_without(tmp_path):
    with redis_server(tmp_path) as redis:
        extra = f'\n[probes]\nenabled = false\n\n[directory]\naddress = "{redis.address}"\n'
        gap_with, events, fams = call_moved_mid_way(tmp_path / "with", extra, "with the directory")
        assert events[(("event", "from_directory"),)] == 1
        dir_events = fams["edge_relay_directory_events_total"]["samples"]
        assert dir_events[(("event", "hit"),)] == 1
    gap_without, events, _ = call_moved_mid_way(tmp_path / "without", "\n[probes]\nenabled = false\n",
                                                "without the directory")
    assert events[(("event", "from_directory"),)] == 0
    print(f"\ndirectory gaps: {gap_with * 1000:.0f} ms with, {gap_without * 1000:.0f} ms without "
          f"(the next consent check)")
