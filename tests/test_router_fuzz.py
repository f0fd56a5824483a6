"""The router under hostile input, sans-IO: it never raises, and every datagram is forwarded or counted.

The invariant checked for every batch: datagrams in == datagrams queued for
sending + datagrams counted in a drop reason (+ probe acks consumed). Inputs
are seeded random bytes, mutations and truncations of valid STUN, DTLS, RTP
and headers, including empty datagrams, from known and unknown addresses.
"""

import os
import random
import time

from edge_relay import header, sockaddr, stun, token
from edge_relay.flows import FlowTable
from edge_relay.keys import KeyRing
from edge_relay.router import TO_CLIENT_PACKETS, TO_TX_PACKETS, TX_IN_PACKETS, Policy, Router

RING = KeyRing({1: bytes(range(32))})
TX_SA = sockaddr.from_tuple(("127.0.0.9", 5000))
CASES = 4000


def make_router():
    return Router(FlowTable(n_listeners=2, max_flows=64, max_pending_per_source=64), RING, {1: TX_SA, 2: TX_SA},
                  [2, 2], Policy())


def seeds(wall):
    ufrag = token.mint(RING.signing, 1, int(wall) + 600)
    req = stun.encode(stun.BINDING_REQUEST, os.urandom(12), [(stun.USERNAME, f"{ufrag}:abcd".encode())])
    return [req, b"\x16\xfe\xfd" + bytes(60), b"\x80\x6f" + bytes(158), b"\x81\xc8" + bytes(20), b""]


def mutate(rng, data):
    data = bytearray(data)
    op = rng.randrange(5)
    if op == 0 and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == 1:
        del data[rng.randrange(len(data) + 1):]
    elif op == 2:
        data += os.urandom(rng.randrange(8))
    elif op == 3:
        data = bytearray(os.urandom(rng.randrange(64)))
    elif op == 4 and data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def test_client_side_never_raises_and_accounts_for_every_datagram():
    rng = random.Random(7)
    router = make_router()
    wall = time.time()
    wall_ms = int(wall * 1000)
    base = seeds(wall)
    addrs = [sockaddr.from_tuple((f"198.51.100.{i}", 1000 + i)) for i in range(8)]
    for case in range(CASES):
        n = rng.randrange(1, 9)
        views = [memoryview(mutate(rng, rng.choice(base)) if rng.random() < 0.7 else rng.choice(base))
                 for _ in range(n)]
        batch_addrs = [rng.choice(addrs) for _ in range(n)]
        drops_before, sent_before = sum(router.drops), router.stats[TO_TX_PACKETS]
        router.from_clients(rng.randrange(2), views, batch_addrs, n, case * 0.01, wall_ms)
        handled = (sum(router.drops) - drops_before) + (router.stats[TO_TX_PACKETS] - sent_before)
        # an ICE restart may queue a request for the new owner in place of the old: still one datagram each
        assert handled == n, (case, [bytes(v) for v in views])
        assert len(router.to_transceivers) == router.stats[TO_TX_PACKETS] - sent_before
        router.clear_output()


def test_transceiver_side_never_raises_and_accounts_for_every_datagram():
    rng = random.Random(11)
    router = make_router()
    wall_ms = int(time.time() * 1000)
    clients = [sockaddr.from_tuple((f"198.51.100.{i}", 1000 + i)) for i in range(4)]
    for i, sa in enumerate(clients):
        router.flows.open(i % 2, sa, 1, 0.0)
    valid = []
    for i, sa in enumerate(clients):
        family, port, addr = sockaddr.client_fields(sa)
        payload = b"\x80" + bytes(20)
        valid.append(header.encode(RING.signing, header.TO_CLIENT, payload, route=i % 2, family=family,
                                   port=int.from_bytes(port, "big"), address=addr, timestamp_ms=wall_ms) + payload)
    valid.append(header.encode(RING.signing, header.PROBE_ACK, b"p", timestamp_ms=wall_ms) + b"p")
    sources = [TX_SA, sockaddr.from_tuple(("127.0.0.10", 5000))]
    for case in range(CASES):
        n = rng.randrange(1, 9)
        views = [memoryview(mutate(rng, rng.choice(valid)) if rng.random() < 0.7 else rng.choice(valid))
                 for _ in range(n)]
        src = [rng.choice(sources) for _ in range(n)]
        drops_before = sum(router.drops)
        sent_before = router.stats[TO_CLIENT_PACKETS]
        acks = sum(1 for v, s in zip(views, src) if s == TX_SA and bytes(v) == valid[-1])
        router.from_transceivers(views, src, n, 1.0, wall_ms)
        handled = (sum(router.drops) - drops_before) + (router.stats[TO_CLIENT_PACKETS] - sent_before)
        assert n - acks <= handled <= n, case
        queued = sum(len(out) for out in router.to_clients)
        assert queued == router.stats[TO_CLIENT_PACKETS] - sent_before
        # nothing is ever queued for an address that is not a live flow
        for listener, out in enumerate(router.to_clients):
            for sa, *_ in out:
                assert router.flows.get(listener, sa) is not None
        router.clear_output()
    assert router.stats[TX_IN_PACKETS] > 0
