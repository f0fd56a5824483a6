"""The nftables rulesets: rendered text (anywhere), then `nft -c` and real loads (root).

Root tests need nft (scripts/bootstrap installs nftables when root); they skip
with the reason when it is missing.
"""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from edge_relay import cli, config, nft

REPO = pathlib.Path(__file__).resolve().parent.parent
NFTABLES = REPO / "nftables"


def cfg_of(listeners, internal=None, transceivers=None, nftables=None, workers=2):
    data = {"relay": {"workers": workers},
            "listeners": [{"address": a, "port": p} for a, p in listeners],
            "internal": internal or {"address": "10.0.0.1", "port": 4478},
            "transceivers": transceivers or [{"id": 1, "address": "10.0.0.2", "port": 5000}],
            "nftables": nftables or {}}
    return config.parse(data, ".")


CONFIGS = {
    "ipv4": cfg_of([("192.0.2.1", 3478)]),
    "ipv4-wildcard": cfg_of([("0.0.0.0", 3478)], internal={"address": "0.0.0.0", "port": 4478}),
    "dual-stack": cfg_of([("192.0.2.1", 3478), ("2001:db8::1", 3478)],
                         internal={"address": "::", "port": 4478,
                                   "allow": ["10.1.0.0/16", "2001:db8:1::/48"]},
                         transceivers=[{"id": 1, "address": "10.0.0.2", "port": 5000},
                                       {"id": 2, "address": "2001:db8:1::2", "port": 5000}],
                         nftables={"total_pps": 100000}),
    "several-listeners": cfg_of([("192.0.2.1", 3478), ("192.0.2.1", 443), ("::", 3479)],
                                nftables={"source_pps": 50, "source_pps_burst": 60,
                                          "source_bytes_per_second": 9000,
                                          "source_bytes_burst": 20000, "total_pps": 5},
                                workers=1),
    "ephemeral-internal": cfg_of([("192.0.2.1", 3478)], internal={"address": "10.0.0.1", "port": 0}),
}


def tables_named(text):
    """Every `table FAMILY NAME` the ruleset itself (not its comments) names."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return set(re.findall(r"table\s+(\w+\s+\w+)", code))


# -- rendered text ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_relay_ruleset_is_one_atomic_table_of_our_own(name):
    text = nft.render_relay(CONFIGS[name])
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert body[:2] == ["table inet edge_relay {}", "delete table inet edge_relay"]
    assert body[2] == "table inet edge_relay {"
    assert tables_named(text) == {"inet edge_relay"}
    assert re.search(r"\baccept\b", text.replace("policy accept;", "")) is None   # only take packets away
    assert text.count("{") == text.count("}")


def test_relay_ruleset_meters_each_listener_in_both_families():
    cfg = CONFIGS["several-listeners"]
    text = nft.render_relay(cfg)
    assert "ip daddr 192.0.2.1 udp dport 3478 jump listener0" in text
    assert "ip daddr 192.0.2.1 udp dport 443 jump listener1" in text
    assert "fib daddr type local udp dport 3479 jump listener2" in text    # "::" is dual-stack
    for i in range(3):
        assert f"update @l{i}_pps4 {{ ip saddr limit rate over 50/second burst 60 packets }}" in text
        assert f"update @l{i}_pps6 {{ ip6 saddr limit rate over 50/second burst 60 packets }}" in text
        assert (f"update @l{i}_bytes4 {{ ip saddr limit rate over 9000 bytes/second burst 20000 bytes }}"
                in text)
        assert f"counter name l{i}_over_pps drop" in text
        assert f"counter name l{i}_passed" in text
    assert "limit public_total { rate over 5/second }" in text
    assert "udp dport 4478 jump internal" in text           # one worker: one port


def test_listeners_drop_sources_of_the_internal_network_before_the_meters():
    """issue 14 items 1 and 4: a client datagram from a transceiver address or internal.allow,
    from port 0, or from a local, broadcast or multicast address never reaches the meters."""
    text = nft.render_relay(CONFIGS["dual-stack"])
    for i in range(2):
        chain = text[text.index(f"chain listener{i} {{"):]
        chain = chain[:chain.index("}\n")]
        rules = [line.strip() for line in chain.splitlines()[1:]]
        assert rules[:4] == [
            f"ip saddr != 127.0.0.0/8 ip saddr @internal_allow4 counter name l{i}_from_internal drop",
            f"ip6 saddr != ::1 ip6 saddr @internal_allow6 counter name l{i}_from_internal drop",
            f"udp sport 0 counter name l{i}_bad_source drop",
            f"iif != lo fib saddr type {{ local, broadcast, multicast }} counter name l{i}_bad_source drop"]
        assert f"counter l{i}_from_internal {{ }}" in text and f"counter l{i}_bad_source {{ }}" in text


def test_wildcard_ipv4_listener_matches_only_ipv4_local_addresses():
    text = nft.render_relay(CONFIGS["ipv4-wildcard"])
    assert "meta nfproto ipv4 fib daddr type local udp dport 3478 jump listener0" in text
    assert "meta nfproto ipv4 fib daddr type local udp dport 4478-4479 jump internal" in text


def test_internal_ports_span_the_workers_and_admit_transceivers_and_allow():
    text = nft.render_relay(CONFIGS["dual-stack"])
    assert "fib daddr type local udp dport 4478-4479 jump internal" in text
    assert "elements = { 10.0.0.2, 10.1.0.0/16 }" in text
    assert "elements = { 2001:db8:1::/48, 2001:db8:1::2 }" in text
    assert "counter name internal_refused drop" in text


def test_no_total_cap_unless_configured_and_no_internal_chain_for_ephemeral_ports():
    text = nft.render_relay(CONFIGS["ephemeral-internal"])
    assert "public_total" not in text and "jump total" not in text
    assert "jump internal" not in text


def test_transceiver_side_ruleset():
    cfg = CONFIGS["dual-stack"]
    with pytest.raises(ValueError, match="relay-address"):
        nft.render_transceiver(cfg)                     # internal.address is "::"
    text = nft.render_transceiver(cfg, ["198.18.0.1", "fd00::/64"])
    assert tables_named(text) == {"inet edge_relay_transceiver"}
    assert text.splitlines()[3:5] == ["table inet edge_relay_transceiver {}",
                                      "delete table inet edge_relay_transceiver"]
    assert "ip daddr 10.0.0.2 udp dport 5000 jump transceiver0" in text
    assert "ip6 daddr 2001:db8:1::2 udp dport 5000 jump transceiver1" in text
    assert "elements = { 198.18.0.1 }" in text and "elements = { fd00::/64 }" in text
    assert "counter name t1_refused drop" in text
    default = nft.render_transceiver(CONFIGS["ipv4"])  # internal.address 10.0.0.1
    assert "elements = { 10.0.0.1 }" in default


def test_static_files_are_rendered_from_the_example_config():
    cfg = config.load(NFTABLES / "example.toml")
    assert (NFTABLES / "edge-relay.nft").read_text() == nft.render_relay(cfg)
    assert (NFTABLES / "edge-relay-transceiver.nft").read_text() == nft.render_transceiver(cfg)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_relay", "render-nft", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=30)


def test_cli_render_nft(tmp_path):
    r = run_cli(str(NFTABLES / "example.toml"))
    assert r.returncode == 78 and "keys" in r.stderr    # its key directory is not here
    r = run_cli("--no-keys", str(NFTABLES / "example.toml"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == (NFTABLES / "edge-relay.nft").read_text()
    r = run_cli("--transceiver-side", "--relay-address", "192.0.2.99", str(NFTABLES / "example.toml"))
    assert r.returncode == 0 and "elements = { 192.0.2.99 }" in r.stdout
    r = run_cli("--remove")
    assert r.stdout == "table inet edge_relay {}\ndelete table inet edge_relay\n"
    r = run_cli("--remove", "--transceiver-side")
    assert "delete table inet edge_relay_transceiver" in r.stdout
    r = run_cli(str(tmp_path / "missing.toml"))
    assert r.returncode == cli.EXIT_CONFIG and "cannot read" in r.stderr


# -- with nft (root) ------------------------------------------------------------

def requires_nft():
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (scripts/bootstrap installs nftables when root)")


def rulesets():
    out = {name: nft.render_relay(cfg) for name, cfg in CONFIGS.items()}
    out["transceiver-side"] = nft.render_transceiver(CONFIGS["dual-stack"], ["198.18.0.1", "fd00::/64"])
    out["static"] = (NFTABLES / "edge-relay.nft").read_text()
    out["static-transceiver"] = (NFTABLES / "edge-relay-transceiver.nft").read_text()
    return out


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(rulesets()))
def test_nft_check_accepts_rendered_ruleset(name, tmp_path):
    requires_nft()
    path = tmp_path / "r.nft"
    path.write_text(rulesets()[name])
    r = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def counters(ns, table="edge_relay"):
    r = ns.exec("nft", "-j", "list", "counters", "table", "inet", table)
    return {o["counter"]["name"]: o["counter"]["packets"]
            for o in json.loads(r.stdout)["nftables"] if "counter" in o}


@pytest.mark.netns
def test_load_is_atomic_idempotent_leaves_other_tables_and_removes(netns_factory, tmp_path):
    requires_nft()
    ns = netns_factory()
    ns.exec("nft", "add table inet someone_else; add chain inet someone_else c; "
            "add rule inet someone_else c counter")
    path = tmp_path / "r.nft"
    path.write_text(nft.render_relay(CONFIGS["dual-stack"]))
    for _ in range(2):                                      # first load, then replace
        ns.exec("nft", "-f", str(path))
    listed = ns.exec("nft", "list", "tables").stdout.split()
    assert listed.count("edge_relay") == 1 and "someone_else" in listed
    got = counters(ns)
    assert {"l0_passed", "l1_over_pps", "public_over_total", "internal_refused"} <= set(got)
    assert all(v == 0 for v in got.values())
    remove = tmp_path / "rm.nft"
    remove.write_text(nft.render_remove())
    ns.exec("nft", "-f", str(remove))
    ns.exec("nft", "-f", str(remove))                       # removing twice is fine too
    listed = ns.exec("nft", "list", "tables").stdout.split()
    assert "edge_relay" not in listed and "someone_else" in listed
