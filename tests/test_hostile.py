"""The hostile bench: the real relay, the real rulesets, and an attacker on the wire.

    client ns ──veth── relay ns ──veth── transceiver ns
    (attacker, caller,   (edge-relay run,   (demo transceiver 1,
     flooder, sniffer)    table inet          table inet
                          edge_relay,         edge_relay_transceiver,
                          forwarding on)      forger posing as transceiver 2)

The relay namespace routes between the other two, so a packet from the client
namespace straight to the transceiver crosses it like the Internet would.

For every attack class the test sends from the client side (scapy on an L3
socket inside the namespace, spoofed sources included) or from the
transceiver side, then waits (bounded) until the expected counter rises: a
relay drop counter (its /metrics, published every 0.5 s) or an nft counter.
Throughout, a sniffer in the client namespace records every packet the relay
sends that way, and relay memory (VmRSS of supervisor and workers) is
sampled. At the end: nothing went to an address that is not a live flow, no
ICMP came back, the relay never restarted a worker, memory stayed bounded,
and the legit call kept < 1 % loss while another source flooded at 10x its
per-source meter. The table of classes and counters is printed (-s to see it).

`test_every_hostile_payload_has_its_drop_reason` runs the same payloads
through a worker on loopback, without root, so a payload that stopped
meaning what it should is caught everywhere.

Budget: well under two minutes; every wait is bounded.
"""

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

import tomlconf
from edge_relay import header, keys, nft, sockaddr, stun, token
from edge_relay.config import load as load_config
from edge_relay.drops import Drop
from edge_relay.flows import FlowTable
from edge_relay.router import STAT_NAMES, Policy, Router
from relayharness import Harness, drain
from waiting import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC_PORT, INTERNAL_PORT, TX_PORT, MGMT_PORT = 3478, 4478, 5000, 9477
MARK_PORT = 3479                 # the sniffer's end-of-capture marker comes from the public address on this port
METER_PPS = 300                  # nftables.source_pps (and burst)
METER_BYTES = 100_000            # nftables.source_bytes_per_second (and burst)


# -- hostile payloads ------------------------------------------------------------

def _stun_raw(msg_type, txid, attrs_bytes, length=None, cookie=stun.MAGIC_COOKIE):
    length = len(attrs_bytes) if length is None else length
    return struct.pack(">HHI12s", msg_type, length, cookie, txid) + attrs_bytes


def _attr(kind, value, declared=None):
    pad = bytes(-len(value) % 4)
    return struct.pack(">HH", kind, len(value) if declared is None else declared) + value + pad


def _fingerprint_attr(msg_without_fp):
    """FINGERPRINT for a message whose header length already counts it."""
    crc = (zlib.crc32(msg_without_fp) ^ stun.FINGERPRINT_XOR) & 0xFFFFFFFF
    return _attr(stun.FINGERPRINT, struct.pack(">I", crc))


def malformed_stun(ufrag):
    """Binding Requests that break RFC 8489 framing in every way we know of."""
    txid = os.urandom(12)
    user = _attr(stun.USERNAME, f"{ufrag}:clnt".encode())
    good = stun.encode(stun.BINDING_REQUEST, txid, [(stun.USERNAME, f"{ufrag}:clnt".encode())])
    out = {
        "bad cookie": _stun_raw(1, txid, user, cookie=0xDEADBEEF),
        "length not a multiple of 4": _stun_raw(1, txid, user + b"\x00\x00", length=len(user) + 2),
        "length beyond datagram": _stun_raw(1, txid, user, length=len(user) + 64),
        "length short of datagram": _stun_raw(1, txid, user + bytes(8), length=len(user)),
        "truncated attribute": _stun_raw(1, txid, user + struct.pack(">HH", 0x8022, 200) + bytes(4)),
        "oversized username": _stun_raw(1, txid, _attr(stun.USERNAME, b"a" * 600)),
        "attribute header cut": _stun_raw(1, txid, user + b"\x80\x22"),
    }
    # Attributes after FINGERPRINT (RFC 8489 section 14.7: it must be last).
    head_len = len(user) + 8 + 8
    pre = _stun_raw(1, txid, user, length=head_len - 8)
    fp = _fingerprint_attr(pre)
    out["attribute after fingerprint"] = _stun_raw(1, txid, user + fp + _attr(0x8022, b"evil"),
                                                   length=head_len)
    bad_fp = bytearray(good)
    bad_fp[-1] ^= 0xFF
    out["bad fingerprint"] = bytes(bad_fp)
    return out


def binding_request(ufrag):
    return stun.encode(stun.BINDING_REQUEST, os.urandom(12), [(stun.USERNAME, f"{ufrag}:clnt".encode())])


def token_attacks(keyring, foreign_key, wall):
    """{class: (Binding Request, expected drop)} for tokens that must not open a flow."""
    sign = keyring.signing
    good = token.mint(sign, 1, int(wall + 600))
    forged = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    return {
        "forged token (MAC)": (binding_request(forged), "TOKEN_MAC"),
        "expired token": (binding_request(token.mint(sign, 1, int(wall - 60))), "TOKEN_EXPIRED"),
        "future token": (binding_request(token.mint(sign, 1, int(wall + 10 * 86400))), "TOKEN_FUTURE"),
        "unknown key id": (binding_request(token.mint(foreign_key, 1, int(wall + 600))), "TOKEN_KEY_ID"),
        "unknown transceiver": (binding_request(token.mint(sign, 99, int(wall + 600))),
                                "UNKNOWN_TRANSCEIVER"),
        "garbage token": (binding_request("x!y"), "TOKEN_MALFORMED"),
    }


def junk(n, seed):
    """Random datagrams whose first byte RFC 7983 gives to nobody we serve."""
    rng = random.Random(seed)
    return [bytes([rng.choice(list(range(64, 128)) + list(range(192, 256)))])
            + rng.randbytes(rng.randrange(0, 300)) for _ in range(n)]


def unknown_flow_media(n):
    dtls = [bytes([22, 0xFE, 0xFD]) + os.urandom(60) for _ in range(n)]
    rtp = [bytes([0x80, 111]) + os.urandom(170) for _ in range(n)]
    return dtls + rtp


# -- without root: each payload means what it should --------------------------------

@pytest.fixture
def harness(make_harness):
    return make_harness(transceivers={1: "sink"})


def test_every_hostile_payload_has_its_drop_reason(harness, tmp_path):
    h = harness
    foreign = keys.Key(9, os.urandom(32))
    cases = {name: ([p], "STUN_MALFORMED") for name, p in malformed_stun(h.session()[0]).items()}
    cases.update({name: ([p], reason) for name, (p, reason)
                  in token_attacks(h.keyring, foreign, time.time()).items()})
    cases["junk"] = (junk(20, 1), "NOT_WEBRTC")
    cases["unknown flow media"] = (unknown_flow_media(5), "UNKNOWN_FLOW")
    for name, (payloads, reason) in cases.items():
        client = h.client()
        before = dict(h.drops())
        for p in payloads:
            client.sendto(p, h.public)
        h.settle()
        after = h.drops()
        assert after.get(reason, 0) - before.get(reason, 0) == len(payloads), (name, after)
        assert drain(h.sinks[1]) == [] and drain(client) == [], name
    assert len(h.router.flows) == 0


# -- the bench ---------------------------------------------------------------------------

ATTACKER = r"""
import json, socket, sys, time
from scapy.all import IP, UDP, Raw, conf
l3 = conf.L3socket()
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    sent = 0
    for i, hexed in enumerate(cmd["payloads"]):
        src = cmd["srcs"][i % len(cmd["srcs"])]
        sport = cmd.get("sport")
        pkt = IP(src=src, dst=cmd["dst"]) / UDP(sport=20000 + i % 40000 if sport is None else sport,
                                                  dport=cmd["dport"]) / Raw(bytes.fromhex(hexed))
        l3.send(pkt)
        sent += 1
    print(json.dumps({"sent": sent}), flush=True)
"""

FLOODER = r"""
import socket, sys, time
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
rate, duration, size = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
payload = b"\x80\x6f" + bytes(size - 2)
start = time.monotonic(); sent = 0
while True:
    now = time.monotonic()
    if now - start >= duration:
        break
    due = int((now - start) * rate) + 1
    while sent < due:
        try:
            s.sendto(payload, (dst, port))
        except OSError:
            pass
        sent += 1
    time.sleep(0.001)
print(sent, flush=True)
"""

CALLER = r"""
import json, socket, sys, time
from edge_relay import demo, keys
src, relay, port, key_dir, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
keyring = keys.load_dir(key_dir)
ufrag, password = demo.mint_session(keyring, 1, time.time())
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((src, 0))
c = demo.VoiceClient((relay, port), ufrag, password, sock=sock)
demo.run_clients([c], duration)
report = demo.client_report([c])
report["address"] = list(c.address)
print(json.dumps(report), flush=True)
"""

SNIFFER = r"""
import json, select, socket, struct, sys, time
watch = sys.argv[1]                      # the relay's address on this link
marker = int(sys.argv[3])                # a datagram from watch:marker ends the capture
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
udp, icmp = {}, {}
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    r, _, _ = select.select([s], [], [], 0.5)
    if s not in r:
        continue
    data, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING or len(data) < 28:
        continue
    ihl = (data[0] & 15) * 4
    src, dst = socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20])
    if src != watch:
        continue
    if data[9] == 17:
        sport, dport = struct.unpack_from(">HH", data, ihl)
        if sport == marker:
            break
        k = f"{src}:{sport}>{dst}:{dport}"
        udp[k] = udp.get(k, 0) + 1
    elif data[9] == 1:
        k = f"{src}>{dst} type {data[ihl]} code {data[ihl + 1]}"
        icmp[k] = icmp.get(k, 0) + 1
print(json.dumps({"udp": udp, "icmp": icmp}), flush=True)
"""

# Sent from the relay's namespace after everything else: once the sniffer has
# seen it, it has seen whatever the relay sent before it over the same link.
MARKER = r"""
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.sendto(b"end of capture", (sys.argv[3], 9))
"""

FORGER = r"""
import json, socket, sys
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, sport))
n = 0
for line in sys.stdin:
    s.sendto(bytes.fromhex(line.strip()), (dst, dport)); n += 1
print(n, flush=True)
"""

METRICS = r"""
import json, sys, urllib.request
from edge_relay import metrics
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    samples = metrics.parse(r.read().decode())
out = {}
for (name, labels), v in samples.items():
    lab = dict(labels)
    if name == "edge_relay_drops_total":
        out[lab["reason"].upper()] = int(v)
    elif not labels:
        out[name] = v
print(json.dumps(out))
"""


def relay_config(bench):
    """The relay of the bench: two transceiver addresses, meters low enough to trip."""
    return tomlconf.dumps({
        "relay": {"workers": 1},
        "listeners": [{"address": bench.public, "port": PUBLIC_PORT}],
        "internal": {"address": bench.internal, "port": INTERNAL_PORT},
        "keys": {"dir": bench.key_dir},
        "transceivers": [{"id": 1, "address": bench.tx1, "port": TX_PORT},
                         {"id": 2, "address": bench.tx2, "port": TX_PORT}],
        "limits": {"pending_ttl": 20.0},
        "nftables": {"source_pps": METER_PPS, "source_pps_burst": METER_PPS,
                     "source_bytes_per_second": METER_BYTES, "source_bytes_burst": METER_BYTES,
                     "total_pps": 50000},
        "management": {"address": "127.0.0.1", "port": MGMT_PORT},
    })


def _done(proc, timeout):
    """A one-shot process's stdout (it must exit in time)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


class Bench:
    def __init__(self, factory, tmp):
        self.tmp = tmp
        self.c, self.r, self.t = factory(), factory(), factory()
        self.cr = factory.veth(self.c, self.r, "198.18.201.2/24", "198.18.201.1/24")
        self.rt = factory.veth(self.r, self.t, "198.18.202.1/24", "198.18.202.2/24")
        self.public, self.client_ip = "198.18.201.1", "198.18.201.2"
        self.flood_ip, self.attack_ips = "198.18.201.3", [f"198.18.201.{i}" for i in range(10, 40)]
        self.internal, self.tx1, self.tx2 = "198.18.202.1", "198.18.202.2", "198.18.202.3"
        self.spoofed = "203.0.113."            # routed to the client ns: a reply would be seen there
        for ip in [self.flood_ip, *self.attack_ips]:
            self.c.ip("addr", "add", f"{ip}/32", "dev", self.cr.dev_a)
        self.t.ip("addr", "add", f"{self.tx2}/32", "dev", self.rt.dev_b)
        self.c.ip("route", "add", "default", "via", self.public)
        self.t.ip("route", "add", "default", "via", self.internal)
        self.r.ip("route", "add", "203.0.113.0/24", "via", self.client_ip)
        self.r.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.c.exec("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        self.key_dir = tmp / "keys"
        self.key_dir.mkdir(mode=0o700)
        keys.write_key_file(self.key_dir, 1)
        self.keyring = keys.load_dir(self.key_dir)
        self.foreign_key = keys.Key(9, os.urandom(32))
        self.config = tmp / "edge-relay.toml"
        self.config.write_text(relay_config(self))
        cfg = load_config(self.config)
        (tmp / "relay.nft").write_text(nft.render_relay(cfg))
        (tmp / "tx.nft").write_text(nft.render_transceiver(cfg))
        self.r.exec("nft", "-f", str(tmp / "relay.nft"))
        self.t.exec("nft", "-f", str(tmp / "tx.nft"))
        self.rss_peak = self.rss_start = 0
        self.rss_samples = []
        self._stop = threading.Event()

    def start(self):
        self.demo = self.t.popen(sys.executable, "-m", "edge_relay", "demo-transceiver",
                                 "--listen", f"{self.tx1}:{TX_PORT}", "--id", "1",
                                 "--keys", str(self.key_dir), cwd=REPO)
        self.relay = self.r.popen(sys.executable, "-m", "edge_relay", "run", "--config",
                                  str(self.config), cwd=REPO, stdout=None, stderr=open(self.tmp / "relay.log", "w"))
        wait_for(lambda: self._metrics_or_none() is not None, 15, 0.2, "relay /metrics")
        self.sniffer = self.c.python(SNIFFER, self.public, "110", str(MARK_PORT))
        assert self.sniffer.readline(10) == "ready"
        self.attacker = self.c.python(ATTACKER, stdin=subprocess.PIPE)
        assert self.attacker.readline(30) == "ready"
        self.rss_start = self.rss()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    # -- observation
    def relay_pids(self):
        pids = []
        for pid in self.r.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"edge_relay\x00run" in f.read():
                        pids.append(pid)
            except OSError:
                pass
        return pids

    def rss(self):
        total = 0
        for pid in self.relay_pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def _sample(self):
        while not self._stop.wait(0.2):
            v = self.rss()
            self.rss_samples.append(v)
            self.rss_peak = max(self.rss_peak, v)

    def _metrics_or_none(self):
        p = self.r.python(METRICS, f"http://127.0.0.1:{MGMT_PORT}/metrics")
        out, _ = p.communicate(timeout=10)
        return json.loads(out) if p.returncode == 0 else None

    def metrics(self):
        m = self._metrics_or_none()
        assert m is not None, "relay /metrics unreachable"
        return m

    def nft_counters(self, ns=None, table="edge_relay"):
        r = (ns or self.r).exec("nft", "-j", "list", "counters", "table", "inet", table)
        return {o["counter"]["name"]: o["counter"]["packets"]
                for o in json.loads(r.stdout)["nftables"] if "counter" in o}

    def wait_rise(self, before, expect, timeout=5.0, source=None):
        """Wait until every counter in `expect` rose by at least its amount; the deltas."""
        source = source or self.metrics
        last = {}

        def risen():
            nonlocal last
            now = source()
            last = {k: now.get(k, 0) - before.get(k, 0) for k in expect}
            return all(last[k] >= v for k, v in expect.items())
        try:
            wait_for(risen, timeout, 0.25, f"counters {expect}")
        except Exception:
            pytest.fail(f"expected rise {expect}, got {last}")
        return last

    # -- acting
    def send(self, payloads, srcs, dport=PUBLIC_PORT, dst=None, sport=None):
        line = json.dumps({"payloads": [p.hex() for p in payloads], "srcs": srcs,
                           "dst": dst or self.public, "dport": dport, "sport": sport})
        self.attacker.stdin.write(line.encode() + b"\n")
        self.attacker.stdin.flush()
        assert json.loads(self.attacker.readline(30))["sent"] == len(payloads)

    def forge(self, payloads, src, sport):
        p = self.t.python(FORGER, src, str(sport), self.internal, str(INTERNAL_PORT),
                          stdin=subprocess.PIPE)
        out, err = p.communicate("".join(x.hex() + "\n" for x in payloads).encode(), timeout=10)
        assert p.returncode == 0, err

    def finish(self):
        """What the sniffer saw, up to a marker datagram sent from the relay's address after all else."""
        self._stop.set()
        _done(self.r.python(MARKER, self.public, str(MARK_PORT), self.client_ip), 10)
        return json.loads(self.sniffer.readline(10))


@pytest.mark.netns
@pytest.mark.slow
def test_hostile_bench(netns_factory, tmp_path):
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (scripts/bootstrap installs nftables when root)")
    pytest.importorskip("scapy", reason="scapy is not installed (requirements-test.txt)")
    started = time.monotonic()
    b = Bench(netns_factory, tmp_path)
    b.start()
    table = []            # (class, what rose)
    ips = iter(b.attack_ips)

    # 1. Legit under attack: a voice call while another source floods at 10x its meter.
    before_nft = b.nft_counters()
    caller = b.c.python(CALLER, b.client_ip, b.public, str(PUBLIC_PORT), str(b.key_dir), "5")
    flooder = b.c.python(FLOODER, b.flood_ip, b.public, str(PUBLIC_PORT), str(10 * METER_PPS), "5.5", "120")
    report = json.loads(_done(caller, 30))
    flood_sent = int(_done(flooder, 30))
    nft_after = b.nft_counters()
    over = nft_after["l0_over_pps"] - before_nft["l0_over_pps"]
    print(f"\nlegit call under a {10 * METER_PPS} pps flood ({flood_sent} sent): "
          f"loss {report['loss'] * 100:.2f} %, {report['sent']} sent, {report['received']} echoed, "
          f"rtt p99 {report['rtt_p99_ms']} ms; l0_over_pps +{over}")
    assert report["connected"] == 1
    assert report["loss"] < 0.01, report
    assert over >= flood_sent * 0.8, (over, flood_sent)
    table.append(("flood 10x source_pps (nft)", f"l0_over_pps +{over}"))
    flow_addresses = {tuple(report["address"])}
    legit = report["address"]

    # 2. Byte flood under the packet meter: big datagrams at 2/3 of source_pps.
    before_nft = b.nft_counters()
    flooder = b.c.python(FLOODER, next(ips), b.public, str(PUBLIC_PORT), str(METER_PPS * 2 // 3), "1.5", "1200")
    _done(flooder, 15)
    d = b.wait_rise(before_nft, {"l0_over_bytes": 1}, source=b.nft_counters)
    table.append(("byte flood (nft)", f"l0_over_bytes +{d['l0_over_bytes']}"))

    def client_class(name, payloads, expect, srcs=None):
        before = b.metrics()
        b.send(payloads, srcs or [next(ips)])
        d = b.wait_rise(before, expect)
        table.append((name, ", ".join(f"{k} +{v}" for k, v in d.items())))

    # 3. Client side, one source address per class (per-source buckets stay apart).
    client_class("random bytes", junk(50, 7), {"NOT_WEBRTC": 50})
    for name, p in malformed_stun(token.mint(b.keyring.signing, 1, int(time.time() + 600))).items():
        client_class(f"malformed STUN: {name}", [p], {"STUN_MALFORMED": 1})
    for name, (p, reason) in token_attacks(b.keyring, b.foreign_key, time.time()).items():
        client_class(name, [p], {reason: 1})
    client_class("DTLS/RTP from unknown flows", unknown_flow_media(10), {"UNKNOWN_FLOW": 20})
    spoofed = [f"{b.spoofed}{i}" for i in range(1, 51)]
    client_class("spoofed sources (forged tokens, junk, media)",
                 [token_attacks(b.keyring, b.foreign_key, time.time())["forged token (MAC)"][0]] * 50
                 + junk(50, 8) + unknown_flow_media(25),
                 {"TOKEN_MAC": 50, "NOT_WEBRTC": 50, "UNKNOWN_FLOW": 50}, srcs=spoofed)
    forged = token_attacks(b.keyring, b.foreign_key, time.time())["forged token (MAC)"][0]
    client_class("new-flow flood from one source (app level)", [forged] * 100,
                 {"RATE_SOURCE_NEW_FLOWS": 50})

    # 3b. A "client" claiming a transceiver's address (issue 14 item 1): nft drops it first.
    before_nft = b.nft_counters()
    b.send([binding_request(token.mint(b.keyring.signing, 1, int(time.time() + 600)))] * 5, [b.tx1])
    d = b.wait_rise(before_nft, {"l0_from_internal": 5}, source=b.nft_counters)
    table.append(("client spoofing a transceiver address (nft)", f"l0_from_internal +{d['l0_from_internal']}"))
    before_nft = b.nft_counters()
    b.send([binding_request(token.mint(b.keyring.signing, 1, int(time.time() + 600)))] * 3, [next(ips)], sport=0)
    b.send([binding_request(token.mint(b.keyring.signing, 1, int(time.time() + 600)))] * 3,
           ["224.0.0.9", b.public])                      # multicast, and the relay's own address
    d = b.wait_rise(before_nft, {"l0_bad_source": 6}, source=b.nft_counters)
    table.append(("source port 0, multicast, the relay's own address (nft)",
                  f"l0_bad_source +{d['l0_bad_source']}"))

    # 4. The internal port from the client side, and the transceiver directly.
    before_nft = b.nft_counters()
    b.send([b"\xee\x52" + os.urandom(100)] * 10, [next(ips)], dport=INTERNAL_PORT, dst=b.internal)
    d = b.wait_rise(before_nft, {"internal_refused": 10}, source=b.nft_counters)
    table.append(("client to the internal port (nft)", f"internal_refused +{d['internal_refused']}"))
    before_tx = b.nft_counters(b.t, "edge_relay_transceiver")
    demo_before = b.demo.poll()
    b.send([binding_request("direct")] * 10, [next(ips)], dport=TX_PORT, dst=b.tx1)
    d = b.wait_rise(before_tx, {"t0_refused": 10},
                    source=lambda: b.nft_counters(b.t, "edge_relay_transceiver"))
    table.append(("client straight to the transceiver (nft, transceiver side)",
                  f"t0_refused +{d['t0_refused']}"))
    assert demo_before is None and b.demo.poll() is None

    # 5. Transceiver side: the forger holds transceiver 2's address.
    ep2 = keys.load_dir(b.key_dir).signing

    def to_client(addr, port, ts, key=ep2, payload=b"\x80evil" + bytes(60)):
        head = header.encode(key, header.TO_CLIENT, payload, route=0, family=header.FAMILY_V4,
                             port=port, address=socket.inet_aton(addr), timestamp_ms=ts)
        return head + payload

    def tx_class(name, payloads, expect, src=b.tx2, sport=TX_PORT):
        before = b.metrics()
        b.forge(payloads, src, sport)
        d = b.wait_rise(before, expect)
        table.append((name, ", ".join(f"{k} +{v}" for k, v in d.items())))

    def now_ms():
        return int(time.time() * 1000)
    forged_mac = bytearray(to_client(legit[0], legit[1], now_ms()))
    forged_mac[40] ^= 0x55
    tx_class("forged header (bad MAC)", [bytes(forged_mac)] * 5, {"HEADER_MAC": 5})
    tx_class("replayed header (10 s old)", [to_client(legit[0], legit[1], now_ms() - 10_000)] * 5,
             {"HEADER_STALE": 5})
    tx_class("header for a flow of another transceiver", [to_client(legit[0], legit[1], now_ms())] * 5,
             {"FLOW_OF_OTHER": 5})
    tx_class("header for an address that is not a flow",
             [to_client(f"{b.spoofed}7", 4444, now_ms()), to_client(b.attack_ips[0], 20000, now_ms())] * 3,
             {"NO_FLOW": 6})
    tx_class("header from an allowed host, wrong port", [to_client(legit[0], legit[1], now_ms())] * 3,
             {"NOT_TRANSCEIVER": 3}, src=b.tx1, sport=TX_PORT + 1)
    tx_class("garbage on the internal port", [b"\xee\x52\x07" + bytes(60), b"x" * 10],
             {"HEADER_VERSION": 1, "HEADER_SHORT": 1})

    # 6. Afterwards: nothing went anywhere but live flows, nothing crashed, memory bounded.
    seen = b.finish()
    final = b.metrics()
    bad = {k: n for k, n in seen["udp"].items()
           if tuple([k.split(">")[1].split(":")[0], int(k.split(":")[-1])]) not in flow_addresses}
    print("\nattack class".ljust(62) + "counter(s) that rose")
    for name, what in table:
        print(f"  {name:<60}{what}")
    print(f"packets from the relay toward the client side: {seen['udp']}; icmp: {seen['icmp']}")
    print(f"relay RSS: start {b.rss_start} KiB, peak {b.rss_peak} KiB, end {b.rss()} KiB "
          f"({len(b.rss_samples)} samples); worker restarts "
          f"{final.get('edge_relay_worker_restarts_total')}; took {time.monotonic() - started:.1f} s")
    assert bad == {}, f"the relay sent to addresses that are not flows: {bad}"
    assert seen["icmp"] == {}
    assert b.relay.poll() is None and b.demo.poll() is None
    assert final.get("edge_relay_worker_restarts_total", 0) == 0
    assert b.rss_peak < b.rss_start + 30 * 1024, (b.rss_start, b.rss_peak)


# -- round two (issue 14): sans-IO and on loopback, without root ------------------------
#
# Each test below failed on the relay before issue 14 (the test names are listed in
# docs/SECURITY.md next to the defence they prove).

R14_RING = keys.KeyRing({1: bytes(range(32))})
R14_TX = {1: ("10.9.0.5", 5000), 2: ("10.9.0.6", 5000)}


def _sa(host, port):
    return sockaddr.from_tuple((host, port))


def _router(internal_nets=(), own_addresses=(), families=(socket.AF_INET,), **table):
    table.setdefault("max_pending_per_source", 1000)
    flows = FlowTable(n_listeners=len(families), **table)
    rates = {"new_flows_per_source_rate": 1e6, "new_flows_per_source_burst": 10**6}
    sources = {k: v for k, v in (("internal_nets", internal_nets), ("own_addresses", own_addresses)) if v}
    return Router(flows, R14_RING, {t: _sa(*a) for t, a in R14_TX.items()}, families, Policy(**rates),
                  **sources)


def _feed(router, datagrams, listener=0, now=1.0):
    """Hand [(payload, sockaddr)] to the router as one batch; returns what it queued for transceivers."""
    views = [memoryview(d) for d, _ in datagrams]
    router.from_clients(listener, views, [a for _, a in datagrams], len(datagrams), now,
                        int(time.time() * 1000))
    out = list(router.to_transceivers)
    router.clear_output()
    return out


def _check(tx_id=1, lifetime=600, ring=R14_RING):
    return binding_request(token.mint(ring.signing, tx_id, int(time.time() + lifetime)))


def _r14_drops(router):
    return {Drop(i).name: n for i, n in enumerate(router.drops) if n}


def test_client_claiming_a_transceiver_address_is_dropped_before_token_work():
    """Item 1: public-port datagrams from transceiver or internal.allow sources open nothing."""
    forged = binding_request("A" * 32)
    payloads = (_check(1), _check(2), forged, b"\x80\x6f" + bytes(20))
    r = _router(families=(socket.AF_INET, socket.AF_INET6))
    for listener, sa in [(0, _sa("10.9.0.5", 5000)),            # the transceiver's exact address
                         (0, _sa("10.9.0.6", 40000)),           # a transceiver's IP, any port
                         (1, _sa("::ffff:10.9.0.5", 5000))]:    # IPv4-mapped on a dual-stack socket
        for payload in payloads:
            assert _feed(r, [(payload, sa)], listener) == []
    assert _r14_drops(r) == {"SOURCE_INTERNAL": 12}       # not TOKEN_MAC: no token work at all
    assert len(r.flows) == 0 and not r.limits.per_source.buckets
    r = _router(internal_nets=("10.9.1.0/24", "fd00:9::/64"), families=(socket.AF_INET, socket.AF_INET6))
    for listener, sa in [(0, _sa("10.9.1.77", 1234)),           # inside internal.allow
                         (1, _sa("fd00:9::1234", 1234))]:       # inside an IPv6 internal.allow network
        for payload in payloads:
            assert _feed(r, [(payload, sa)], listener) == []
    assert _r14_drops(r) == {"SOURCE_INTERNAL": 8}
    assert len(r.flows) == 0 and not r.limits.per_source.buckets
    # a real client next door still gets in
    assert len(_feed(r, [(_check(1), _sa("10.9.2.1", 1234))])) == 1


def test_a_reload_that_makes_a_source_internal_removes_its_flows():
    r = _router()
    _feed(r, [(_check(1), _sa("10.9.2.1", 1234)), (_check(1), _sa("10.9.3.1", 1234))])
    assert len(r.flows) == 2
    r.configure(r.keyring, r.transceivers, r.policy, internal_nets=("10.9.2.0/24",))
    assert [f.key for f in r.flows] == [_sa("10.9.3.1", 1234)]


@pytest.mark.parametrize("host,port,reason", [
    ("198.51.100.7", 0, "SOURCE_PORT_ZERO"),
    ("2001:db8::7", 0, "SOURCE_PORT_ZERO"),
    ("224.0.0.1", 5000, "SOURCE_NOT_UNICAST"),
    ("239.255.255.250", 1900, "SOURCE_NOT_UNICAST"),
    ("255.255.255.255", 5000, "SOURCE_NOT_UNICAST"),
    ("0.0.0.0", 5000, "SOURCE_NOT_UNICAST"),
    ("ff02::1", 5000, "SOURCE_NOT_UNICAST"),
    ("::", 5000, "SOURCE_NOT_UNICAST"),
    ("::ffff:224.0.0.9", 5000, "SOURCE_NOT_UNICAST"),
    ("198.51.100.1", 5000, "SOURCE_SELF"),         # the relay's own listener address
    ("2001:db8:1::1", 5000, "SOURCE_SELF"),
    ("10.9.9.1", 5000, "SOURCE_SELF"),             # its internal address
])
def test_unusable_client_sources_are_dropped_at_ingress(host, port, reason):
    """Item 4: no flow for a source no reply could reach (or one that is the relay itself)."""
    own = ("198.51.100.1", "2001:db8:1::1", "10.9.9.1", "0.0.0.0") if reason == "SOURCE_SELF" else ()
    r = _router(own_addresses=own, families=(socket.AF_INET6,))
    assert _feed(r, [(_check(1), _sa(host, port)), (b"\x16\xfe\xfd" + bytes(20), _sa(host, port))]) == []
    assert _r14_drops(r) == {reason: 2} and len(r.flows) == 0


def test_loopback_sources_stay_clients():
    """The kernel never takes 127/8 or ::1 from a wire: a local client next to a local transceiver works."""
    flows = FlowTable(n_listeners=2)
    tx = {1: _sa("127.0.0.1", 5000)}
    r = Router(flows, R14_RING, tx, [socket.AF_INET, socket.AF_INET6], Policy(),
               internal_nets=("127.0.0.0/8",), own_addresses=("127.0.0.1", "::1"))
    assert len(_feed(r, [(_check(1), _sa("127.0.0.1", 4000))])) == 1
    assert len(_feed(r, [(_check(1), _sa("::1", 4000))], listener=1)) == 1
    assert len(r.flows) == 2 and _r14_drops(r) == {}


def _now_ms():
    return int(time.time() * 1000)


def _sink_open(h, client, tx_id, ufrag=None, answer=True):
    """Open (and, if `answer`, confirm) a flow from `client` to sink `tx_id`: (Inbound, Endpoint)."""
    from edge_relay import transceiver
    ufrag = ufrag or h.session(tx_id)[0]
    client.sendto(binding_request(ufrag), h.public)
    h.settle()
    (got, _), = drain(h.sinks[tx_id])
    ep = transceiver.Endpoint(h.keyring, tx_id)
    inb = ep.receive(got, _now_ms())
    if answer:
        h.sinks[tx_id].sendto(ep.to_client(inb, b"\x80ok", _now_ms()), h.internal)
        h.settle()
        assert [d for d, _ in drain(client)] == [b"\x80ok"]
    return inb, ep


def _stat(h, name):
    return h.router.stats[STAT_NAMES.index(name)]


def _stun_success(inb):
    """A transceiver's Binding success response answering the check it received in `inb`."""
    txid = bytes(inb.payload[8:20])
    return stun.encode(stun.BINDING_SUCCESS, txid, [])


def test_ice_restart_cannot_take_a_live_flow_from_the_transceiver_serving_it(tmp_path):
    """Item 2: a spoofed restart request plus its answer leaves the victim with its transceiver."""
    t = [1000.0]
    h = Harness(tmp_path, transceivers={1: "sink", 2: "sink"}, clock=lambda: t[0])
    try:
        victim = h.client()
        inb1, ep1 = _sink_open(h, victim, 1)
        flow, = h.router.flows
        # The attacker holds its own valid session on transceiver 2 and spoofs the victim's
        # exact address (on loopback: it sends from the victim's socket).
        attack = binding_request(h.session(2)[0])
        victim.sendto(attack, h.public)
        h.settle()
        (got, _), = drain(h.sinks[2])
        from edge_relay import transceiver
        ep2 = transceiver.Endpoint(h.keyring, 2)
        inb2 = ep2.receive(got, _now_ms())
        # Transceiver 2 answers at once: nothing moves, the answer does not reach the victim.
        h.sinks[2].sendto(ep2.to_client(inb2, _stun_success(inb2), _now_ms()), h.internal)
        h.settle()
        assert drain(victim) == [] and flow.transceiver == 1
        # The victim's call goes on: media both ways with transceiver 1.
        victim.sendto(b"\x80voice", h.public)
        h.sinks[1].sendto(ep1.to_client(inb1, b"\x80agent", _now_ms()), h.internal)
        h.settle()
        assert len(drain(h.sinks[1])) == 1 and drain(victim) == [(b"\x80agent", h.public)]
        # Its next consent check is answered by transceiver 1: the restart is refused.
        t[0] += 5.0
        victim.sendto(binding_request(_ufrag_of(inb1)), h.public)
        h.settle()
        (got, _), = drain(h.sinks[1])
        check = ep1.receive(got, _now_ms())
        h.sinks[1].sendto(ep1.to_client(check, _stun_success(check), _now_ms()), h.internal)
        h.settle()
        assert len(drain(victim)) == 1 and flow.restart_to is None
        # Past the hold, transceiver 2's answers still cannot take the flow ...
        t[0] += h.router.restart_hold
        h.sinks[2].sendto(ep2.to_client(inb2, _stun_success(inb2), _now_ms()), h.internal)
        h.settle()
        assert drain(victim) == [] and flow.transceiver == 1
        # ... and the attacker's repeat is refused outright (rate limit per flow).
        victim.sendto(attack, h.public)
        h.settle()
        assert drain(h.sinks[2]) == [] and flow.restart_to is None
        assert h.drops() == {"RESTART_HELD": 1, "FLOW_OF_OTHER": 1, "RESTART_RATE": 1}
        assert _stat(h, "flows_restart_refused") == 1 and _stat(h, "flows_moved") == 0
    finally:
        h.close()


def _ufrag_of(inb):
    """The server ufrag of the Binding Request carried by Inbound `inb`."""
    username = stun.binding_username(bytes(inb.payload))
    return bytes(username).split(b":")[0].decode()


# max_flows_per_session stays at its default (16): the defaults must hold the flood
FLOOD_LIMITS = {"max_flows": 64, "max_pending_per_source": 10_000,
                "new_flows_per_source_rate": 1e6, "new_flows_per_source_burst": 10**6}


def test_one_session_spoofed_from_many_sources_cannot_fill_the_table(tmp_path):
    """Item 3: one valid session's check from 300 sources holds max_flows_per_session (16) flows."""
    h = Harness(tmp_path, transceivers={1: "demo"}, limits=FLOOD_LIMITS)
    try:
        ufrag, _ = h.session(1)
        flooders = [h.client() for _ in range(300)]       # 300 source addresses (ports on loopback)
        legit = []
        for i, s in enumerate(flooders):
            s.sendto(binding_request(ufrag), h.public)
            if i % 100 == 50:                              # new calls placed during the flood
                h.settle()
                vc = h.voice_client(1)
                assert h.connect(vc), h.drops()
                legit.append(vc)
        h.settle()
        assert len(legit) == 3
        assert h.drops().get("SESSION_FLOWS") == 300 - 16 and "FLOW_TABLE_FULL" not in h.drops()
        assert len(h.router.flows) == 16 + len(legit)
        assert h.router.flows.per_session(token.verify(ufrag, h.keyring, time.time(), 86400, 5).nonce) == 16
    finally:
        h.close()


def test_unanswered_sessions_cannot_lock_new_calls_out_of_a_full_table(tmp_path):
    """Item 3: many sessions' pending flows fill the table; a new call evicts the oldest pending."""
    h = Harness(tmp_path, transceivers={1: "demo", 2: "sink"}, limits=FLOOD_LIMITS)
    try:
        for _ in range(200):                        # 200 sessions on a transceiver that never answers
            h.client().sendto(binding_request(h.session(2)[0]), h.public)
            h.settle()
        assert len(h.router.flows) == 64 and h.router.flows.pending == 64
        calls = [h.voice_client(1) for _ in range(3)]
        assert all(h.connect(vc) for vc in calls), h.drops()
        assert h.router.flows.confirmed == 3 and len(h.router.flows) == 64
        assert h.drops() == {} and _stat(h, "flows_evicted") == 200 - 64 + 3
    finally:
        h.close()


def test_flows_per_transceiver_cap(tmp_path):
    h = Harness(tmp_path, transceivers={1: "sink", 2: "demo"},
                limits={**FLOOD_LIMITS, "max_flows_per_transceiver": 5})
    try:
        for _ in range(8):
            h.client().sendto(binding_request(h.session(1)[0]), h.public)
        h.settle()
        assert h.router.flows.per_transceiver(1) == 5 and h.drops() == {"TRANSCEIVER_FLOWS": 3}
        assert h.connect(h.voice_client(2))          # the other transceiver's calls are unaffected
    finally:
        h.close()


@pytest.mark.parametrize("io_mode", ["mmsg", "plain"])
@pytest.mark.parametrize("family_host", ["127.0.0.1", "::1"])
def test_maximum_size_datagram_round_trip(tmp_path, family_host, io_mode):
    """Item 5: a 2048-octet datagram goes up and its 2048-octet answer comes back (2096 inside)."""
    MAX_DATAGRAM = 2048             # docs/PROTOCOL.md section 9; worker.MAX_DATAGRAM
    h = Harness(tmp_path, transceivers={1: "sink"}, listeners=(family_host,), io_mode=io_mode)
    try:
        client = h.client(family_host)
        inb, ep = _sink_open(h, client, 1)
        big = b"\x80" + os.urandom(MAX_DATAGRAM - 1)
        client.sendto(big, h.public)
        h.settle()
        (up, _), = drain(h.sinks[1])
        assert len(up) == MAX_DATAGRAM + header.HEADER_LEN and bytes(ep.receive(up, _now_ms()).payload) == big
        h.sinks[1].sendto(ep.to_client(inb, big, _now_ms()), h.internal)
        h.settle()
        assert [d for d, _ in drain(client)] == [big]
        client.sendto(big + b"x", h.public)           # one octet over: dropped and counted, never cut
        h.settle()
        assert drain(h.sinks[1]) == [] and h.drops() == {"TRUNCATED": 1}
    finally:
        h.close()


def test_maximum_size_datagram_through_the_demo_transceiver(tmp_path):
    """Item 5's sibling: the demo transceiver's own buffer holds a maximum-size datagram plus header."""
    h = Harness(tmp_path, transceivers={1: "demo"})
    try:
        vc = h.voice_client(1)
        assert h.connect(vc)
        big = b"\x80" + os.urandom(2047)
        vc.sock.sendto(big, h.public)
        h.settle()
        assert [d for d, _ in drain(vc.sock)] == [big] and h.drops() == {}
    finally:
        h.close()


def _toml(data):
    """TOML text for the harness's config dict (tables, arrays of tables, scalars)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)
    lines = []
    for name, section in data.items():
        rows = section if isinstance(section, list) else [section]
        for row in rows:
            lines.append(f"[[{name}]]" if isinstance(section, list) else f"[{name}]")
            lines += [f"{k} = {value(v)}" for k, v in row.items()]
            lines.append("")
    return "\n".join(lines)


def test_reload_applies_flow_table_limits_to_the_live_table(tmp_path):
    """Item 6: SIGHUP lowering max_pending_per_source, pending_ttl, idle_timeout, max_flows takes effect."""
    import signal
    t = [1000.0]
    h = Harness(tmp_path, transceivers={1: "sink", 2: "demo"}, clock=lambda: t[0],
                limits={"max_pending_per_source": 16, "new_flows_per_source_burst": 1000})
    try:
        path = tmp_path / "edge-relay.toml"
        path.write_text(_toml(h.config_data))
        h.worker.config_path = path
        for _ in range(6):
            h.client().sendto(binding_request(h.session(1)[0]), h.public)
        h.settle()
        call = h.voice_client(2)
        assert h.connect(call, t[0]) and h.router.flows.pending == 6
        h.config_data["limits"].update(max_pending_per_source=4, pending_ttl=1.0, idle_timeout=7.0,
                                       max_flows=8)
        path.write_text(_toml(h.config_data))
        h.worker.handle_signal(signal.SIGHUP)
        assert h.worker.reloads == 1 and h.worker.reload_failures == 0
        h.client().sendto(binding_request(h.session(1)[0]), h.public)
        h.settle()
        assert h.drops() == {"PENDING_PER_SOURCE": 1}
        t[0] += 1.5                              # the new pending_ttl, not the old 5 s
        h.router.expire(t[0])
        assert h.router.flows.pending == 0 and h.router.flows.confirmed == 1
        t[0] += 6.0                              # the new idle_timeout (7 s), not the old 30 s
        h.router.expire(t[0])
        assert len(h.router.flows) == 0
        assert h.router.flows.max_flows == 8
    finally:
        h.close()
