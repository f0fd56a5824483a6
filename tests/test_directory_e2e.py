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
The same again with two relay *hosts* in network namespaces: the PoP's
anycast address is on both, and the client's namespace routes it to A, then
(mid-call, `ip route replace`) to B; the transceiver and redis-server live
in a fourth namespace.
"""

import json
import os
import random
import selectors
import shutil
import socket
import subprocess
import sys
import time

import pytest

import tomlconf
from edge_relay import demo, directory, header, keys as keys_mod, metrics as metrics_mod, resp, sockaddr
from edge_relay.drops import Drop
from edge_relay.flows import CONFIRMED, FlowTable
from edge_relay.keys import KeyRing
from edge_relay.router import FLOWS_FROM_DIRECTORY, TO_TX_PACKETS, Policy, Router
from redisserver import redis_server
from relayproc import ROOT, CountingClient, Relay, Setup, Traffic, Transceiver, http_get, parse_prometheus
from waiting import wait_for

# -- the router's side, sans-IO ---------------------------------------------------

RING = KeyRing({1: bytes(range(32))})
TX_SA = sockaddr.from_tuple(("127.0.0.9", 5000))
RTP = b"\x80\x6f" + bytes(158)
DTLS = b"\x16\xfe\xfd" + bytes(60)


def router_with_directory(**kw):
    return Router(FlowTable(n_listeners=1, max_flows=64), RING, {1: TX_SA}, [socket.AF_INET], Policy(),
                  directory=directory.Directory(**kw))


def test_unknown_media_is_held_then_forwarded_on_a_hit():
    r = router_with_directory()
    sa = sockaddr.from_tuple(("198.51.100.7", 4000))
    r.from_clients(0, [memoryview(DTLS), memoryview(RTP)], [sa, sa], 2, 1.0, 1000)
    assert not r.to_transceivers and sum(r.drops) == 0       # held, not lost
    lookup, = r.dir_lookups
    assert lookup.command == ("GET", directory.flow_key(0, sa))
    r.dir_resolved(lookup, b"1", 1.01, 1010)
    assert [bytes(d) for _, _, d in r.to_transceivers] == [DTLS, RTP]      # in arrival order
    assert r.stats[TO_TX_PACKETS] == 2 and r.stats[FLOWS_FROM_DIRECTORY] == 1
    flow = r.flows.get(0, sa)
    assert flow.state == CONFIRMED and flow.transceiver == 1
    hdr = header.decode(r.to_transceivers[0][1] + DTLS, RING, 1010, 2000, accept=header.TRANSCEIVER_ACCEPTS)
    assert hdr.family == 4 and hdr.port == 4000


def test_misses_timeouts_errors_and_caps_are_counted():
    r = router_with_directory(max_held_per_flow=2, timeout=0.1)
    a, b, c = (sockaddr.from_tuple((f"198.51.100.{i}", 4000)) for i in (1, 2, 3))
    r.from_clients(0, [memoryview(RTP)] * 3, [a, a, a], 3, 1.0, 1000)
    assert r.drops[Drop.DIRECTORY_FULL] == 1                  # third packet over the per-flow cap
    r.dir_resolved(r.dir_lookups.pop(), None, 1.01, 1010)     # miss
    assert r.drops[Drop.DIRECTORY_MISS] == 2
    r.from_clients(0, [memoryview(RTP)], [a], 1, 1.02, 1020)  # negative cache: not asked again
    assert r.drops[Drop.UNKNOWN_FLOW] == 1 and not r.dir_lookups
    r.from_clients(0, [memoryview(RTP)], [b], 1, 1.0, 1000)
    r.timer(1.2, 1200)                                        # timeout
    assert r.drops[Drop.DIRECTORY_MISS] == 3
    r.dir_lookups.clear()
    r.from_clients(0, [memoryview(RTP)], [c], 1, 2.0, 2000)
    r.dir_resolved(r.dir_lookups.pop(), resp.Disconnected("down"), 2.0, 2000)
    assert r.drops[Drop.DIRECTORY_MISS] == 4
    r.from_clients(0, [memoryview(RTP)], [c], 1, 2.1, 2100)   # an error is not cached: asked again
    assert len(r.dir_lookups) == 1
    assert not r.to_transceivers and not len(r.flows)


def test_every_datagram_is_forwarded_or_counted_with_the_directory():
    rng = random.Random(5)
    r = router_with_directory(max_held_total=16, max_lookups=4)
    addrs = [sockaddr.from_tuple((f"198.51.100.{i}", 4000)) for i in range(8)]
    received = 0
    for case in range(2000):
        n = rng.randrange(1, 9)
        views = [memoryview(rng.choice([RTP, DTLS, b"\x00", b""])) for _ in range(n)]
        r.from_clients(0, views, [rng.choice(addrs) for _ in range(n)], n, case * 0.01, 1000 + case * 10)
        received += n
        for lookup in r.dir_lookups:
            reply = rng.choice([b"1", None, b"junk", b"9", resp.Timeout("t")])
            if rng.random() < 0.8:
                r.dir_resolved(lookup, reply, case * 0.01, 1000 + case * 10)
        r.dir_lookups.clear()
        r.timer(case * 0.01, 1000 + case * 10)
        r.clear_output()
    r.timer(10**6, 10**9)
    held = r.directory.held_total
    assert held == 0
    assert received == sum(r.drops) + r.stats[TO_TX_PACKETS]


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

    @property
    def address(self):
        return self.seen_as or super().address


def two_relays(tmp_path, sections):
    a = Setup(tmp_path / "a", workers=1, sections=sections)
    b = Setup(tmp_path / "b", workers=1, sections=sections)
    b.tx_sock.close()
    b.key_dir, b.keyring = a.key_dir, a.keyring
    b.ports["transceiver_port"] = a.ports["transceiver_port"]
    b.write()
    return a, b


def call_moved_mid_way(tmp_path, sections, label):
    for d in ("a", "b"):
        os.makedirs(tmp_path / d, exist_ok=True)
    a, b = two_relays(tmp_path, sections)
    tx = Transceiver(a.keyring, a.tx_sock)
    relays = [Relay(a), Relay(b)]
    bal = Balancer([a.public, b.public])
    try:
        for setup, relay in zip((a, b), relays):
            relay.wait_serving()
        ufrag, password = demo.mint_session(a.keyring, 1, time.time())
        vc = NattedClient(bal.address, ufrag, password)
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


@pytest.mark.slow
def test_a_moved_call_resumes_at_once_with_the_directory_and_at_consent_without(tmp_path):
    with redis_server(tmp_path) as redis:
        sections = {"probes": {"enabled": False}, "directory": {"address": redis.address}}
        gap_with, events, fams = call_moved_mid_way(tmp_path / "with", sections, "with the directory")
        assert events[(("event", "from_directory"),)] == 1
        results = fams["edge_relay_directory_lookup_results_total"]["samples"]
        assert results[(("result", "hit"),)] == 1
    gap_without, events, _ = call_moved_mid_way(tmp_path / "without", {"probes": {"enabled": False}},
                                                "without the directory")
    assert events[(("event", "from_directory"),)] == 0
    print(f"\ndirectory gaps: {gap_with * 1000:.0f} ms with, {gap_without * 1000:.0f} ms without "
          f"(the next consent check)")


# -- two relay hosts in network namespaces ---------------------------------------------

VIP = "198.19.255.1"          # the PoP's anycast address: on lo of both relay hosts
CLIENT_IP = "198.19.254.1"    # the caller's address: on lo of the client host

NETNS_CLIENT = r"""
import json, socket, sys, time
from edge_relay import demo
from relayproc import CountingClient           # tests/ is on PYTHONPATH
vip, port, ufrag, password, client_ip, seconds = sys.argv[1:7]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((client_ip, 0))
s.connect((vip, int(port)))
vc = CountingClient((vip, int(port)), ufrag, password, sock=s)
arrivals = vc.arrivals
said = {}
def on_second(elapsed):
    if vc.connected and arrivals and not said:
        said["at"] = time.monotonic()
        print("connected", flush=True)
demo.run_clients([vc], float(seconds), on_second)
gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
print(json.dumps({"connected": vc.connected, "received": vc.received, "sent": vc.sent,
                  "max_gap": max(gaps) if gaps else None}), flush=True)
"""

NETNS_TRANSCEIVER = r"""
import socket, sys
from edge_relay import demo, keys
keyring = keys.load_dir(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.setblocking(False)
print("ready", flush=True)
demo.DemoTransceiver(keyring, 1, s, io_mode="plain").serve()
"""

NETNS_METRICS = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""


def netns_relay_config(internal, key_dir, tx, directory=None):
    """One of the two relay hosts: the VIP on its public side, the transceiver behind."""
    data = {
        "relay": {"workers": 1, "drain_seconds": 0.2},
        "listeners": [{"address": VIP, "port": 3478}],
        "internal": {"address": internal, "port": 4478},
        "keys": {"dir": key_dir},
        "transceivers": [{"id": 1, "address": tx, "port": 5000}],
        "management": {"address": "127.0.0.1", "port": 9477},
        "probes": {"enabled": False},
    }
    if directory is not None:
        data["directory"] = {"address": directory}
    return tomlconf.dumps(data)


NETNS_PING_REDIS = r"""
import socket, sys
with socket.create_connection((sys.argv[1], 6379), timeout=1) as s:
    s.sendall(b"PING\r\n")
    print(s.recv(16).decode().strip())
"""


def netns_moved_call(netns_factory, tmp_path, use_directory):
    """One call moved from relay host A to B by a route change; (client result, B's from_directory)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (scripts/bootstrap --apt redis-server)")
    c, a, b, t = (netns_factory() for _ in range(4))
    ca, cb = netns_factory.veth(c, a), netns_factory.veth(c, b)
    at, bt = netns_factory.veth(a, t), netns_factory.veth(b, t)
    c.ip("addr", "add", f"{CLIENT_IP}/32", "dev", "lo")
    for relay_ns, link in ((a, ca), (b, cb)):
        relay_ns.ip("addr", "add", f"{VIP}/32", "dev", "lo")
        relay_ns.ip("route", "add", f"{CLIENT_IP}/32", "via", link.ipv4_a)
    c.ip("route", "add", f"{VIP}/32", "via", ca.ipv4_b)          # the hash: relay A
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o700)
    keys_mod.write_key_file(key_dir, 1)
    keyring = keys_mod.load_dir(key_dir)
    tx = t.python(NETNS_TRANSCEIVER, str(key_dir), "5000")
    assert tx.readline(10) == "ready"
    if use_directory:
        redis = t.popen("redis-server", "--save", "", "--appendonly", "no", "--port", "6379",
                        "--bind", "0.0.0.0", "--protected-mode", "no", "--daemonize", "no",
                        "--dir", str(tmp_path))
        for link in (at, bt):
            wait_for(lambda link=link: redis.poll() is None and "PONG" in link.ns_a.python(
                NETNS_PING_REDIS, link.ipv4_b, stderr=subprocess.DEVNULL).communicate(timeout=5)[0].decode(),
                10, what="redis-server in the transceiver namespace")
    relays = {}
    for name, relay_ns, link in (("a", a, at), ("b", b, bt)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "edge-relay.toml").write_text(netns_relay_config(
            link.ipv4_a, key_dir, link.ipv4_b, f"{link.ipv4_b}:6379" if use_directory else None))
        relays[name] = relay_ns.popen(sys.executable, "-m", "edge_relay", "run", "--config",
                                      str(folder / "edge-relay.toml"), stdout=subprocess.DEVNULL,
                                      env=dict(os.environ, PYTHONPATH=ROOT))
    for name, relay_ns in (("a", a), ("b", b)):
        wait_for(lambda ns=relay_ns: "edge_relay_ready 1" in ns.python(
            NETNS_METRICS, "http://127.0.0.1:9477/metrics").communicate(timeout=10)[0].decode(),
            15, what=f"relay {name} to be ready")
    ufrag, password = demo.mint_session(keyring, 1, time.time())
    client = c.python(NETNS_CLIENT, VIP, "3478", ufrag, password, CLIENT_IP, "9",
                      env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__))))
    assert client.readline(10) == "connected"

    def a_holds_the_call():
        out = a.python(NETNS_METRICS, "http://127.0.0.1:9477/metrics").communicate(timeout=10)[0].decode()
        samples = metrics_mod.parse(out)
        return (samples.get(("edge_relay_flows", (("state", "confirmed"),)), 0) >= 1
                and (not use_directory or samples.get(("edge_relay_directory_publications_total", ()), 0) >= 1))
    # the move must find the flow confirmed on A and, with the directory, published by A
    wait_for(a_holds_the_call, 10, interval=0.2, what="relay A to hold (and publish) the call")
    c.ip("route", "replace", f"{VIP}/32", "via", cb.ipv4_b)      # the hash moves the call to B
    result = json.loads(client.readline(20))
    out = b.python(NETNS_METRICS, "http://127.0.0.1:9477/metrics").communicate(timeout=10)[0].decode()
    from_directory = [line for line in out.splitlines()
                      if line.startswith('edge_relay_flow_events_total{event="from_directory"}')]
    return result, float(from_directory[0].split()[-1])


@pytest.mark.netns
@pytest.mark.slow
def test_two_relay_hosts_in_namespaces_with_and_without_the_directory(netns_factory, tmp_path):
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    with_dir, learned = netns_moved_call(netns_factory, tmp_path / "with", True)
    assert with_dir["connected"] and learned == 1
    without, learned_without = netns_moved_call(netns_factory, tmp_path / "without", False)
    assert without["connected"] and learned_without == 0
    print(f"\nnetns directory gaps (longest silence of the call moved from host A to host B): "
          f"{with_dir['max_gap'] * 1000:.0f} ms with the directory, "
          f"{without['max_gap'] * 1000:.0f} ms without (next consent check)")
