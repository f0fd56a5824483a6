"""A real WebRTC call between two headless Chromium instances, through relay + adapter.

    ns caller                 ns relay                         ns server
    Chromium (caller) --- 198.18.221.1:PUB  edge-relay run --- edge-relay adapter --- Chromium ("stock
    198.18.221.2          nftables loaded   198.18.222.1       198.18.222.2            media server")
                                                               signaling (tests/browser/signal.py)

The server browser chooses its own ufrag and password and speaks plain UDP:
it is an unmodified WebRTC endpoint. Signaling goes through the adapter's
HTTP hook (tests/browser/signal.py); each page (tests/browser/call.html)
runs its side on load and POSTs its getStats() back. The caller's only
route to anything is the relay's namespace (which forwards the signaling
HTTP, nothing else matters); the server gets no caller candidates, so media
can only take caller -> relay public port -> adapter -> server.

No --allow-loopback-in-peer-connection: these namespaces have a veth each,
and a loopback candidate would only add checks that can never arrive.

Skips only when Chromium is not installed (scripts/bootstrap installs
Debian's chromium package when root).
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import netns
import relayproc
import tomlconf
from edge_relay import keys, nft
from edge_relay.config import load as load_config
from waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = str(netns.REPO_ROOT)
BROWSER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "browser")
PUBLIC, CALLER = "198.18.221.1", "198.18.221.2"
INTERNAL, SERVER = "198.18.222.1", "198.18.222.2"
PUBLIC_PORT, INTERNAL_PORT, TX_PORT, MGMT_PORT, HOOK_PORT = 3478, 4000, 5000, 9477, 8479
CALL_TIMEOUT = 90.0


def relay_config(key_dir, idle_timeout):
    return tomlconf.dumps({
        "relay": {"workers": 1},
        "listeners": [{"address": PUBLIC, "port": PUBLIC_PORT}],
        "internal": {"address": INTERNAL, "port": INTERNAL_PORT},
        "keys": {"dir": key_dir},
        "transceivers": [{"id": 1, "address": SERVER, "port": TX_PORT}],
        "limits": {"idle_timeout": idle_timeout},
        "management": {"address": "127.0.0.1", "port": MGMT_PORT},
    })


METRICS = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.stdout.write(r.read().decode())
"""


def chromium():
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("needs Debian's chromium package (scripts/bootstrap installs it when root)")
    return path


class CallBench:
    def __init__(self, factory, tmp, idle_timeout=30.0):
        netns.requires_command("nft", "nftables")
        self.chromium = chromium()
        self.tmp = tmp
        self.c, self.r, self.s = factory(), factory(), factory()
        factory.veth(self.c, self.r, f"{CALLER}/24", f"{PUBLIC}/24")
        factory.veth(self.r, self.s, f"{INTERNAL}/24", f"{SERVER}/24")
        self.c.ip("route", "add", "default", "via", PUBLIC)
        self.s.ip("route", "add", "default", "via", INTERNAL)
        self.r.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        key_dir = tmp / "keys"
        key_dir.mkdir(mode=0o700)
        keys.write_key_file(key_dir, 1)
        config = tmp / "edge-relay.toml"
        config.write_text(relay_config(key_dir, idle_timeout))
        (tmp / "relay.nft").write_text(nft.render_relay(load_config(config)))
        self.r.exec("nft", "-f", str(tmp / "relay.nft"))
        self.relay = self.r.popen(sys.executable, "-m", "edge_relay", "run", "--config", str(config), cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "relay.log", "w"))
        wait_for(lambda: self._metrics_text() is not None, 15, 0.2, "relay /metrics")
        self.adapter = self.s.popen(sys.executable, "-m", "edge_relay", "adapter", "--listen",
                                    f"{SERVER}:{TX_PORT}", "--id", "1", "--public", f"{PUBLIC}:{PUBLIC_PORT}",
                                    "--hook", f"127.0.0.1:{HOOK_PORT}", "--keys", str(key_dir), cwd=REPO,
                                    stderr=open(tmp / "adapter.log", "w"))
        assert json.loads(self.adapter.readline(15))["adapter"] == 1
        self.signal = self.s.popen(sys.executable, "-u", os.path.join(BROWSER_DIR, "signal.py"), SERVER, "0",
                                   f"http://127.0.0.1:{HOOK_PORT}", stderr=open(tmp / "signal.log", "w"))
        self.origin = f"http://{SERVER}:{json.loads(self.signal.readline(15))['port']}"

    def _metrics_text(self):
        p = self.r.python(METRICS, f"http://127.0.0.1:{MGMT_PORT}/metrics")
        out, _ = p.communicate(timeout=10)
        return out.decode() if p.returncode == 0 else None

    def metrics(self):
        text = self._metrics_text()
        assert text is not None, "relay /metrics unreachable"
        return relayproc.parse_prometheus(text)

    def adapter_stats(self):
        p = self.s.python("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], "
                          "timeout=3).read().decode())", f"http://127.0.0.1:{HOOK_PORT}/v1/stats")
        out, _ = p.communicate(timeout=10)
        return json.loads(out)

    def browser(self, ns, role, query):
        profile = self.tmp / f"profile-{role}"
        profile.mkdir(exist_ok=True)
        url = f"{self.origin}/call.html?role={role}&{query}"
        return ns.popen(
            self.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required",
            "--disable-features=WebRtcHideLocalIpsWithMdns",
            f"--unsafely-treat-insecure-origin-as-secure={self.origin}", f"--user-data-dir={profile}", url,
            stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"chromium-{role}.log", "w"))

    def call(self, query):
        """Run one call; {"caller": report, "server": report, "negotiated": [...]}."""
        started = time.monotonic()
        browsers = [self.browser(self.s, "server", query), self.browser(self.c, "caller", query)]
        out = {"negotiated": []}
        try:
            while "caller" not in out or "server" not in out:
                left = CALL_TIMEOUT - (time.monotonic() - started)
                assert left > 0, f"call did not finish in {CALL_TIMEOUT}s: {sorted(out)}"
                line = json.loads(self.signal.readline(left))
                assert line["event"] != "hook-error", line
                if line["event"] == "negotiated":
                    out["negotiated"].append(line)
                elif line["event"] == "stats":
                    assert "error" not in line["report"], line["report"]
                    out[line["role"]] = line["report"]
        finally:
            for b in browsers:
                b.stop()
        return out


def by_type(report, stat_type):
    return [s for s in report["stats"] if s["type"] == stat_type]


def one(report, stat_type, **match):
    found = [s for s in by_type(report, stat_type) if all(s.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (stat_type, match, found)
    return found[0]


def selected_pair(report, snapshot="stats"):
    transport = one({"stats": report[snapshot]}, "transport")
    stats = {s["id"]: s for s in report[snapshot]}
    pair = stats[transport["selectedCandidatePairId"]]
    return transport, pair, stats[pair["localCandidateId"]], stats[pair["remoteCandidateId"]]


def check_media(report):
    """ICE + DTLS connected, SRTP negotiated, Opus both ways with the tone heard; returns figures.

    States come from the last snapshot taken while connected (`live`: at the
    end the other side may already have closed), counters from the final one.
    """
    assert report["live"] is not None, report["log"]
    transport, pair, local, remote = selected_pair(report, "live")
    assert transport["dtlsState"] == "connected" and transport["iceState"] == "connected", transport
    assert transport.get("srtpCipher"), transport
    assert pair["state"] == "succeeded" and pair["nominated"], pair
    out_rtp = one(report, "outbound-rtp", kind="audio")
    in_rtp = one(report, "inbound-rtp", kind="audio")
    codec = next(s for s in report["stats"] if s["id"] == in_rtp["codecId"])
    assert codec["mimeType"].lower() == "audio/opus", codec
    assert out_rtp["packetsSent"] > 50 and in_rtp["packetsReceived"] > 50, (out_rtp, in_rtp)
    assert in_rtp["totalAudioEnergy"] > 0 and report["maxLevel"] > 0, (in_rtp, report["maxLevel"])
    log = dict((what, ms) for ms, what in reversed(report["log"]))          # first time of each note
    setup = log["connected"] - log["offer"] if "offer" in log else None      # caller: offer sent -> connected
    return {"connected_ms": report["connectedMs"], "offer_to_connected_ms": setup, "rtp_sent": out_rtp["packetsSent"],
            "rtp_received": in_rtp["packetsReceived"], "max_audio_level": round(report["maxLevel"], 4),
            "total_audio_energy": round(in_rtp["totalAudioEnergy"], 4), "srtp": transport["srtpCipher"],
            "remote": f"{remote.get('address')}:{remote.get('port')}", "remote_type": remote["candidateType"],
            "local": f"{local.get('address')}:{local.get('port')}"}


def sent_on_wire(report):
    """Datagrams a browser sent over ICE: media/DTLS packets plus STUN requests and responses, all pairs."""
    # (Chromium's requestsSent already counts the consent checks, consentRequestsSent is a part of it)
    return sum(p.get("packetsSent", 0) + p.get("requestsSent", 0) + p.get("responsesSent", 0)
               for p in by_type(report, "candidate-pair"))


def relay_counts(fams):
    packets = {dict(k)["direction"]: int(v) for k, v in fams["edge_relay_packets_total"]["samples"].items()}
    events = {dict(k)["event"]: int(v) for k, v in fams["edge_relay_flow_events_total"]["samples"].items()}
    drops = {dict(k)["reason"]: int(v) for k, v in fams["edge_relay_drops_total"]["samples"].items() if v}
    return packets, events, drops


def figures(name, caller, server, packets, events, adapter):
    line = {"case": name, "caller": caller, "server": server, "relay_packets": packets, "relay_flows": events,
            "adapter": {k: v for k, v in adapter["counts"].items() if v}, "adapter_drops": adapter["drops"]}
    print("\nbrowser-call " + json.dumps(line))
    return line


def test_browser_call_through_relay_and_adapter(netns_factory, tmp_path):
    bench = CallBench(netns_factory, tmp_path)
    out = bench.call("dur=6")
    caller, server = check_media(out["caller"]), check_media(out["server"])
    assert caller["remote"] == f"{PUBLIC}:{PUBLIC_PORT}"          # the caller talked to the relay only
    # the server learnt the adapter's per-flow socket from its checks (Chromium hides a
    # peer-reflexive candidate's address in getStats)
    assert server["remote_type"] == "prflx" and caller["remote_type"] == "host"
    assert len(out["negotiated"]) == 1
    token = out["caller"]["tokens"][0]
    assert f"a=ice-ufrag:{token}" in out["negotiated"][0]["answer"]
    assert token != out["server"]["localUfrag"]                     # the server kept its own ufrag

    def settled():
        p, e, d = relay_counts(bench.metrics())
        return (p, e, d) if p["to_client"] >= sent_on_wire(out["server"]) - 5 else None
    packets, events, drops = wait_for(settled, 10, 0.25, "relay counters")
    assert events["opened"] == 1 and events["confirmed"] == 1, events
    assert drops == {}, drops
    # forwarded counts equal what the browsers sent, within a few packets
    assert abs(packets["client_in"] - sent_on_wire(out["caller"])) <= 5, (packets, sent_on_wire(out["caller"]))
    assert abs(packets["to_client"] - sent_on_wire(out["server"])) <= 5, (packets, sent_on_wire(out["server"]))
    assert packets["to_transceiver"] == packets["client_in"]
    adapter = bench.adapter_stats()
    assert adapter["drops"] == {}, adapter
    figures("call", caller, server, packets, events, adapter)


def test_browser_call_outlives_relay_idle_timeout(netns_factory, tmp_path):
    """Both sides send no media for 2 relay idle timeouts; consent checks keep the flow; media resumes."""
    idle = 6.0          # the smallest idle_timeout check-config accepts (RFC 7675 consent interval)
    bench = CallBench(netns_factory, tmp_path, idle_timeout=idle)
    out = bench.call(f"dur={2 * idle + 6}&mute={2 * idle}")
    caller, server = check_media(out["caller"]), check_media(out["server"])
    for role in ("caller", "server"):
        rep = out[role]
        assert rep["state"] == "connected", rep["log"]
        after = one(rep, "inbound-rtp", kind="audio")["packetsReceived"] - rep["afterUnmute"]
        assert after > 50, (role, after, rep["log"])                # media flows again after the silence
    packets, events, drops = relay_counts(bench.metrics())
    assert events["opened"] == 1 and events.get("expired", 0) == 0, events
    assert drops == {}, drops
    figures("idle", caller, server, packets, events, bench.adapter_stats())


def test_browser_call_survives_ice_restart(netns_factory, tmp_path):
    bench = CallBench(netns_factory, tmp_path)
    out = bench.call("dur=10&restart=3")
    caller, server = check_media(out["caller"]), check_media(out["server"])
    tokens = out["caller"]["tokens"]
    assert len(out["negotiated"]) == 2 and len(set(tokens)) == 2, tokens
    transport, _, _, remote = selected_pair(out["caller"], "live")
    assert transport["iceLocalUsernameFragment"] == out["caller"]["localUfrag"]
    assert out["caller"]["localUfrag"] not in out["negotiated"][0]["offer"]   # a new ICE generation
    assert f"{remote['address']}:{remote['port']}" == f"{PUBLIC}:{PUBLIC_PORT}"
    assert "restart" in [w for _, w in out["caller"]["log"]]
    packets, events, drops = relay_counts(bench.metrics())
    # Chromium gathers new sockets for the new ICE generation: a new client address, so
    # a second relay flow (opened by the new token), confirmed by the adapter's answer
    assert events["opened"] == 2 and events["confirmed"] == 2, events
    assert drops == {}, drops
    adapter = bench.adapter_stats()
    assert adapter["counts"]["sessions_created"] == 2 and adapter["counts"]["flows_opened"] == 2, adapter
    # The server browser starts checking the new generation (toward the adapter socket it
    # already knows) as soon as it has set its answer, before the hook has seen that answer:
    # those few checks name no session yet, are dropped and counted, and the server
    # retransmits them (docs/ADAPTER.md section 6). Nothing else may be dropped.
    assert set(adapter["drops"]) <= {"STUN_NO_USERNAME"} and adapter["drops"].get("STUN_NO_USERNAME", 0) <= 8, \
        adapter
    figures("restart", caller, server, packets, events, adapter)
