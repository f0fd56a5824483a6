"""Tests for edge_relay/config.py: defaults, every rule, the shipped example,
and a seeded property test that random wrong values only ever produce a
Config or a ConfigError made of "<key>: <problem>" lines."""

import copy
import dataclasses
import datetime
import math
import os
import pathlib
import pickle
import random
import re
import tomllib

import pytest

from edge_relay import config
from edge_relay.errors import ConfigError

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "packaging" / "edge-relay.toml"
BASE_DIR = pathlib.Path("/etc/edge-relay")


def minimal():
    """The smallest valid config: one listener, one transceiver."""
    return {
        "listeners": [{"address": "0.0.0.0"}],
        # the default internal.address, 127.0.0.1, cannot reach a remote transceiver
        "internal": {"address": "0.0.0.0"},
        "transceivers": [{"id": 1, "address": "192.0.2.10", "port": 5000}],
    }


def with_value(data, path, value):
    """Set `path` ("relay.workers", "transceivers[0].id") in a copy of `data`."""
    data = copy.deepcopy(data)
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        if m:
            node = node[m[1]][int(m[2])]
        else:
            node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


def problems_of(data, base_dir=BASE_DIR):
    """Problems from both entry points, checked to agree."""
    found = config.problems(data, base_dir)
    with pytest.raises(ConfigError) as info:
        config.parse(data, base_dir)
    assert info.value.problems == found
    assert str(info.value).split("\n") == [f"{k}: {p}" for k, p in found]
    return found


def assert_problem(found, key, *fragments):
    """Some problem is keyed exactly `key` and contains every fragment."""
    hits = [p for k, p in found if k == key and all(f in p for f in fragments)]
    assert hits, f"no problem for {key!r} containing {fragments}; got {found}"


# --------------------------------------------------------------------------
# Defaults and the shipped example
# --------------------------------------------------------------------------

def test_defaults():
    cfg = config.parse(minimal(), BASE_DIR)
    assert cfg.relay == config.Relay(workers=0, batch_size=32, io="auto", drain_seconds=10.0,
                                     recv_buffer_bytes=4194304, send_buffer_bytes=4194304)
    assert cfg.listeners == (config.Listener(address="0.0.0.0", port=3478),)
    assert cfg.internal == config.Internal(address="0.0.0.0", port=4478, allow=())
    assert config.Internal().address == "127.0.0.1"
    assert cfg.keys == config.Keys(dir=pathlib.Path("/etc/edge-relay/keys"), signing_key_id=None)
    assert cfg.transceivers == (config.Transceiver(id=1, address="192.0.2.10", port=5000,
                                                   backup=None, name="tx1"),)
    lim = cfg.limits
    assert (lim.max_flows, lim.max_pending_per_source) == (200000, 16)
    assert (lim.pending_ttl, lim.idle_timeout, lim.header_window) == (5.0, 30.0, 2.0)
    assert (lim.token_max_lifetime, lim.clock_skew) == (86400.0, 5.0)
    assert (lim.new_flows_per_source_rate, lim.new_flows_per_source_burst) == (20.0, 40)
    assert (lim.new_flows_rate, lim.new_flows_burst) == (20000.0, 40000)
    assert (lim.flow_packets_rate, lim.flow_packets_burst) == (1000.0, 2000)
    assert cfg.nftables == config.Nftables(source_pps=500, source_pps_burst=1000,
                                           source_bytes_per_second=500000,
                                           source_bytes_burst=1000000, total_pps=0)
    assert cfg.management == config.Management(address="127.0.0.1", port=9477)
    assert cfg.management.enabled
    assert cfg.log.level == "info"


def test_float_keys_take_ints_and_come_back_as_float():
    cfg = config.parse(with_value(minimal(), "limits.idle_timeout", 30), BASE_DIR)
    assert cfg.limits.idle_timeout == 30.0 and type(cfg.limits.idle_timeout) is float
    assert type(config.parse(minimal(), BASE_DIR).limits.token_max_lifetime) is float


def test_config_is_frozen_and_picklable():
    cfg = config.parse(minimal(), BASE_DIR)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.relay.workers = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.relay = None
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.transceiver_by_id == cfg.transceiver_by_id


def test_example_file_loads():
    cfg = config.load(EXAMPLE)
    assert cfg.listeners == (config.Listener(address="0.0.0.0", port=3478),)
    assert cfg.transceivers == (config.Transceiver(id=1, address="192.0.2.10", port=5000),)
    assert "replace" in EXAMPLE.read_text().lower()


def _example_lines():
    """(section, key, value text, commented?) for every `key = value` line."""
    section = None
    for line in EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"#?\[\[?(\w+)\]\]?", line)
        if m:
            section = (m[1], line.startswith("#"))
            continue
        m = re.fullmatch(r"(#?)(\w+) = (.*)", line)
        if m:
            yield section, m[2], m[3], bool(m[1])


def test_example_names_every_key():
    seen = {(s[0], key) for s, key, _, _ in _example_lines()}
    for sec in dataclasses.fields(config.Config):
        if "section" not in sec.metadata:
            continue
        for f in dataclasses.fields(sec.metadata["section"]):
            assert (sec.name, f.name) in seen, f"{sec.name}.{f.name} not in the example"


def test_example_commented_values_are_the_defaults():
    """A commented `key = value` line must show the built-in default, so
    uncommenting it changes nothing (the alternatives shown as examples
    of optional keys excepted)."""
    examples_only = {("keys", "signing_key_id"), ("transceivers", "backup"),
                     ("transceivers", "name")}
    checked = 0
    for (section, section_commented), key, text, commented in _example_lines():
        if not commented or section_commented or (section, key) in examples_only:
            continue
        cls = next(f.metadata["section"] for f in dataclasses.fields(config.Config)
                   if f.name == section)
        default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
        value = tomllib.loads(f"v = {text}")["v"]
        if isinstance(default, pathlib.Path):
            value = pathlib.Path(value)
        elif isinstance(default, tuple):
            value = tuple(value)
        assert value == default and type(value) is type(default), f"{section}.{key}"
        checked += 1
    assert checked > 30


def test_example_with_everything_uncommented_parses():
    """The commented alternatives are valid too, once their context exists."""
    text = re.sub(r"(?m)^#(\[\[listeners\]\]|\w+ = .*)$", r"\1", EXAMPLE.read_text())
    data = tomllib.loads(text)
    data["transceivers"].append({"id": 2, "address": "192.0.2.11", "port": 5000})
    # the uncommented IPv6 listener needs nothing more: the internal leg stays IPv4
    cfg = config.parse(data, EXAMPLE.parent)
    assert cfg.transceivers[0].backup == 2
    assert cfg.keys.signing_key_id == 1
    assert [lst.address for lst in cfg.listeners] == ["0.0.0.0", "::"]


# --------------------------------------------------------------------------
# Per-key rules: each asserts the exact key, the rule and the value shown
# --------------------------------------------------------------------------

INT_RULES = [
    # (path, bad values, fragment of the rule)
    ("relay.workers", [-1, 1025, "4", True, 2.0], "must be an integer in 0..1024"),
    ("relay.batch_size", [0, 1025, False], "must be an integer in 1..1024"),
    ("relay.recv_buffer_bytes", [65535, 2**31, "4M"], "must be an integer in 65536..2147483647"),
    ("relay.send_buffer_bytes", [0, 1.5e6], "must be an integer in 65536..2147483647"),
    ("relay.coalesce_us", [-1, 1001, "50", True], "must be an integer in 0..1000"),
    ("listeners[0].port", [0, 65536, "3478", True], "must be a port in 1..65535"),
    ("internal.port", [-1, 65536, "4478"], "must be a port in 0..65535 (0 = ephemeral)"),
    ("keys.signing_key_id", [-1, 256, "1", True], "must be an integer in 0..255"),
    ("transceivers[0].id", [-1, 65536, "1", True, 1.0], "must be an integer in 0..65535"),
    ("transceivers[0].port", [0, 65536, "5000"], "must be a port in 1..65535"),
    ("transceivers[0].backup", [-1, 65536, "2", True], "must be an integer in 0..65535"),
    ("limits.max_flows", [0, -5, "1", True], "must be an integer >= 1"),
    ("limits.max_pending_per_source", [0, 2.0], "must be an integer >= 1"),
    ("limits.new_flows_per_source_burst", [0, True], "must be an integer >= 1"),
    ("limits.new_flows_burst", [0, 40000.0], "must be an integer >= 1"),
    ("limits.flow_packets_burst", [0, "2000"], "must be an integer >= 1"),
    ("nftables.source_pps", [0, True], "must be an integer >= 1"),
    ("nftables.source_pps_burst", [0], "must be an integer >= 1"),
    ("nftables.source_bytes_per_second", [0, 1.0], "must be an integer >= 1"),
    ("nftables.source_bytes_burst", [0], "must be an integer >= 1"),
    ("nftables.total_pps", [-1, False], "must be an integer >= 0"),
    ("management.port", [-1, 65536, True], "must be a port in 0..65535 (0 = disabled)"),
]

NUMBER_RULES = [
    ("relay.drain_seconds", [-0.1, "10", True, math.nan, math.inf], "must be a number >= 0"),
    ("limits.pending_ttl", [0, -3, 0.0, True, math.nan], "must be a number > 0"),
    ("limits.idle_timeout", [-3, 0, "30", math.inf, -math.inf], "must be a number > 0"),
    ("limits.header_window", [0, False], "must be a number > 0"),
    ("limits.token_max_lifetime", [0, -1], "must be a number > 0"),
    ("limits.clock_skew", [-1, -0.5, True], "must be a number >= 0"),
    ("limits.new_flows_per_source_rate", [0, "20"], "must be a number > 0"),
    ("limits.new_flows_rate", [0.0, True], "must be a number > 0"),
    ("limits.flow_packets_rate", [-1000, math.nan], "must be a number > 0"),
]

STRING_RULES = [
    ("relay.io", ["fast", "AUTO", 1, ""], "must be one of auto, mmsg, plain"),
    ("log.level", ["error", "INFO", "warn", 3], "must be one of debug, info, notice, warning, err"),
    ("listeners[0].address", ["1.2.3", "example.com", 7, "", "224.0.0.1", "ff02::1",
                              "01.2.3.4"], "must be an IPv4 or IPv6 address"),
    ("internal.address", ["localhost", "127.0.0.256", ["127.0.0.1"]],
     "must be an IPv4 or IPv6 address"),
    ("management.address", ["::g", 0], "must be an IPv4 or IPv6 address"),
    ("transceivers[0].address", ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "tx.example",
                                 5], "must be a unicast IPv4 or IPv6 address"),
    ("transceivers[0].name", ["", "a b", "x" * 65, 5, "tx\n1"],
     "must be 1..64 characters of A-Z a-z 0-9 . _ -"),
    ("keys.dir", ["", 5, "a\0b", ["keys"]], "must be a non-empty path"),
]

CASES = [(path, value, rule) for path, values, rule in INT_RULES + NUMBER_RULES + STRING_RULES
         for value in values]


@pytest.mark.parametrize("path, value, rule", CASES,
                         ids=[f"{p}={v!r}"[:60] for p, v, _ in CASES])
def test_rule(path, value, rule):
    found = problems_of(with_value(minimal(), path, value))
    assert_problem(found, path, rule, f"got {config._show(value)}")
    assert len(found) == 1, found


@pytest.mark.parametrize("path, value", [
    ("relay.workers", 0), ("relay.workers", 1024), ("relay.batch_size", 1),
    ("relay.io", "mmsg"), ("relay.io", "plain"), ("relay.drain_seconds", 0),
    ("relay.recv_buffer_bytes", 65536), ("internal.port", 0), ("internal.port", 65535),
    ("management.port", 0), ("keys.signing_key_id", 0), ("keys.signing_key_id", 255),
    ("transceivers[0].id", 0), ("transceivers[0].id", 65535), ("limits.clock_skew", 0),
    ("nftables.total_pps", 0), ("log.level", "debug"), ("log.level", "err"),
    ("transceivers[0].name", "a" * 64), ("transceivers[0].name", "tx-1.eu_west"),
])
def test_boundary_values_accepted(path, value):
    data = with_value(minimal(), "relay.workers", 1)   # so internal.port 65535 fits
    config.parse(with_value(data, path, value), BASE_DIR)


def test_numbers_have_a_finite_ceiling():
    found = problems_of(with_value(minimal(), "limits.header_window", 1e306))
    assert found == [("limits.header_window", "must be a number <= 1e+09, got 1e+306")]
    found = problems_of(with_value(minimal(), "limits.new_flows_rate", 10**400))
    assert_problem(found, "limits.new_flows_rate", "must be a number > 0", "bits")
    config.parse(with_value(minimal(), "limits.header_window", 1e9), BASE_DIR)


def test_bool_rejected_for_ints_and_numbers():
    data = minimal()
    data["relay"] = {"workers": True, "drain_seconds": False}
    data["transceivers"][0]["id"] = True
    found = problems_of(data)
    assert_problem(found, "relay.workers", "got true")
    assert_problem(found, "relay.drain_seconds", "got false")
    assert_problem(found, "transceivers[0].id", "got true")


def test_required_keys():
    data = {"listeners": [{"port": 3478}], "transceivers": [{}]}
    found = problems_of(data)
    assert ("listeners[0].address", "required key is missing") in found
    for key in ("id", "address", "port"):
        assert (f"transceivers[0].{key}", "required key is missing") in found
    assert len(found) == 4


def test_listeners_and_transceivers_required():
    found = problems_of({})
    assert ("listeners", "at least one listener is required") in found
    assert ("transceivers", "at least one transceiver is required") in found
    found = problems_of({"listeners": [], "transceivers": []})
    assert ("listeners", "at least one listener is required") in found
    assert ("transceivers", "at least one transceiver is required") in found


def test_section_shapes():
    data = minimal()
    data["relay"] = 5
    data["listeners"] = {"address": "0.0.0.0"}        # [listeners] instead of [[listeners]]
    data["transceivers"].append("tx2")
    found = problems_of(data)
    assert ("relay", "must be a table, got 5") in found
    assert_problem(found, "listeners", "must be an array of tables ([[listeners]])", "a table")
    assert ("transceivers[1]", 'must be a table, got "tx2"') in found


def test_top_level_must_be_a_table():
    assert problems_of([]) == [("(top level)", "must be a table, got an array")]


def test_unknown_keys_and_sections():
    data = minimal()
    data["relay"] = {"wrokers": 4}
    data["relya"] = {"workers": 4}
    data["transceivers"][0]["adress"] = "192.0.2.11"
    data["debug"] = True
    data["limits"] = {"idle": {"timeout": 3}}
    found = problems_of(data)
    assert ("relay.wrokers", "unknown key (did you mean workers?)") in found
    assert ("relya", "unknown section (did you mean relay?)") in found
    assert_problem(found, "transceivers[0].adress", "unknown key", "address")
    assert ("debug", "unknown key") in found
    assert ("limits.idle", "unknown section") in found
    assert len(found) == 5


def test_strange_key_names_stay_on_one_line():
    data = minimal()
    data["relay"] = {"wor\nkers": 1, "a.b": 2, "": 3, "\u2028": 4}
    found = problems_of(data)
    keys = [k for k, _ in found]
    assert keys == ['relay."wor\\u000akers"', 'relay."a.b"', 'relay.""', 'relay."\\u2028"']
    for key, problem in found:
        assert key.isprintable() and problem.isprintable()


def test_long_values_are_shortened():
    found = problems_of(with_value(minimal(), "relay.io", "x" * 10000))
    (key, problem), = found
    assert key == "relay.io" and len(problem) < 150 and problem.endswith('..."')


def test_ip_addresses_are_normalised_and_ipv6_works():
    data = minimal()
    data["listeners"] = [{"address": "::", "port": 3478}, {"address": "2001:DB8::0001"}]
    data["internal"] = {"address": "::"}
    data["transceivers"][0]["address"] = "2001:db8:0:0::10"
    cfg = config.parse(data, BASE_DIR)
    assert [(lst.address, lst.port) for lst in cfg.listeners] == [("::", 3478), ("2001:db8::1", 3478)]
    assert cfg.transceivers[0].address == "2001:db8::10"


def test_zone_index_and_mapped_addresses_refused():
    found = problems_of(with_value(minimal(), "transceivers[0].address", "fe80::1%eth0"))
    assert_problem(found, "transceivers[0].address", "without a zone index", '"fe80::1%eth0"')
    found = problems_of(with_value(minimal(), "listeners[0].address", "::ffff:192.0.2.1"))
    assert_problem(found, "listeners[0].address", "write the IPv4 address 192.0.2.1 instead")


def test_internal_allow():
    cfg = config.parse(with_value(minimal(), "internal.allow",
                                  ["10.0.0.0/8", "2001:DB8::/32", "192.0.2.7"]), BASE_DIR)
    assert cfg.internal.allow == ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32")
    found = problems_of(with_value(minimal(), "internal.allow",
                                   ["10.0.0.0/8", "10.0.0.1/8", "10.0.0.0/33", 5, "fe80::/10%eth0"]))
    assert_problem(found, "internal.allow[1]", "must be a CIDR", '"10.0.0.1/8"',
                   'host bits set; did you mean "10.0.0.0/8"?')
    assert_problem(found, "internal.allow[2]", "must be a CIDR", '"10.0.0.0/33"')
    assert_problem(found, "internal.allow[3]", "must be a CIDR", "got 5")
    assert_problem(found, "internal.allow[4]", "must be a CIDR")
    assert len(found) == 4
    found = problems_of(with_value(minimal(), "internal.allow", "10.0.0.0/8"))
    assert_problem(found, "internal.allow", "must be an array of CIDR strings", '"10.0.0.0/8"')


# --------------------------------------------------------------------------
# Rules across keys
# --------------------------------------------------------------------------

def test_duplicate_listeners():
    data = minimal()
    data["listeners"] = [{"address": "0.0.0.0"}, {"address": "0.0.0.0", "port": 3479},
                         {"address": "0.0.0.0", "port": 3478}, {"address": "::"},
                         {"address": "::0", "port": 3478}]
    found = problems_of(data)
    assert found == [
        ("listeners[2]", "duplicate listener 0.0.0.0:3478 (also listeners[0])"),
        ("listeners[4]", "duplicate listener [::]:3478 (also listeners[3])"),
    ]


def test_duplicate_transceiver_ids():
    data = minimal()
    data["transceivers"] = [{"id": 7, "address": "192.0.2.10", "port": 5000},
                            {"id": 7, "address": "192.0.2.11", "port": 5000}]
    found = problems_of(data)
    assert ("transceivers[1].id", "duplicate id 7 (also transceivers[0])") in found


def test_transceivers_sharing_an_address():
    data = minimal()
    data["transceivers"].append({"id": 2, "address": "192.0.2.10", "port": 5000})
    found = problems_of(data)
    assert_problem(found, "transceivers[1]", "same address 192.0.2.10:5000 as transceivers[0]")
    data["transceivers"][1]["port"] = 5001  # same host, other port: fine
    config.parse(data, BASE_DIR)


def test_duplicate_transceiver_names():
    data = minimal()
    data["transceivers"].append({"id": 2, "address": "192.0.2.11", "port": 5000, "name": "tx1"})
    found = problems_of(data)
    assert ("transceivers[1].name", 'duplicate name "tx1" (also transceivers[0])') in found


def test_backup_rules():
    data = minimal()
    data["transceivers"] = [
        {"id": 1, "address": "192.0.2.10", "port": 5000, "backup": 2},
        {"id": 2, "address": "192.0.2.11", "port": 5000, "backup": 1},
    ]
    cfg = config.parse(data, BASE_DIR)
    assert cfg.transceiver_by_id[1].backup == 2
    found = problems_of(with_value(data, "transceivers[0].backup", 9))
    assert found == [("transceivers[0].backup", "no transceiver has id 9")]
    found = problems_of(with_value(data, "transceivers[1].backup", 2))
    assert found == [("transceivers[1].backup",
                      "names its own id 2; a backup must be another transceiver")]


def test_backup_not_reported_unknown_when_an_id_is_itself_invalid():
    data = minimal()
    data["transceivers"] = [
        {"id": 1, "address": "192.0.2.10", "port": 5000, "backup": 2},
        {"id": "2", "address": "192.0.2.11", "port": 5000},
    ]
    found = problems_of(data)
    assert [k for k, _ in found] == ["transceivers[1].id"]


def test_internal_family_must_reach_transceivers():
    data = with_value(minimal(), "transceivers[0].address", "2001:db8::10")
    found = problems_of(data)
    assert found == [("transceivers[0].address",
                      "IPv6 address 2001:db8::10 cannot be reached from "
                      "internal.address 0.0.0.0 (IPv4)")]
    found = problems_of(with_value(minimal(), "internal.address", "::1"))
    assert_problem(found, "transceivers[0].address", "IPv4 address 192.0.2.10", "(IPv6)")
    config.parse(with_value(data, "internal.address", "::"), BASE_DIR)


def test_internal_port_overflow(monkeypatch):
    data = with_value(minimal(), "internal.port", 65530)
    config.parse(with_value(data, "relay.workers", 6), BASE_DIR)       # 65530..65535
    found = problems_of(with_value(data, "relay.workers", 8))
    assert found == [("internal.port", "65530 + 8 workers - 1 = 65537 exceeds 65535; "
                                       "lower internal.port or relay.workers")]
    monkeypatch.setattr(config, "_online_cpus", lambda: 64)
    found = problems_of(with_value(data, "relay.workers", 0))
    assert_problem(found, "internal.port", "64 workers", "one per online CPU", "65593")
    config.parse(with_value(data, "internal.port", 0), BASE_DIR)       # ephemeral: no range


def test_many_problems_reported_together():
    data = {
        "relay": {"workers": -1, "io": "fast", "wrokers": 2},
        "listeners": [{"address": "1.2.3"}],
        "internal": {"address": "0.0.0.0"},
        "transceivers": [{"id": 7, "address": "192.0.2.10", "port": 5000, "backup": 7},
                         {"id": 7, "address": "192.0.2.11", "port": 0}],
        "limits": {"idle_timeout": -3},
        "log": {"level": "loud"},
    }
    found = problems_of(data)
    keys = [k for k, _ in found]
    assert keys == ["relay.wrokers", "relay.workers", "relay.io", "listeners[0].address",
                    "transceivers[1].port", "limits.idle_timeout", "log.level",
                    "transceivers[1].id", "transceivers[0].backup"]
    assert ("limits.idle_timeout", "must be a number > 0, got -3") in found


# --------------------------------------------------------------------------
# Files and paths
# --------------------------------------------------------------------------

MINIMAL_TOML = """
[[listeners]]
address = "0.0.0.0"
[internal]
address = "0.0.0.0"
[[transceivers]]
id = 1
address = "192.0.2.10"
port = 5000
"""


def test_relative_keys_dir_resolves_against_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "relay.toml").write_text(MINIMAL_TOML + '[keys]\ndir = "keys.d"\n')
    assert config.load(folder / "relay.toml").keys.dir == folder / "keys.d"
    monkeypatch.chdir(tmp_path)  # a relative file name still yields an absolute dir
    cfg = config.load("etc/relay.toml")
    assert cfg.keys.dir.is_absolute() and cfg.keys.dir == folder / "keys.d"
    data = with_value(minimal(), "keys.dir", "../keys")
    assert config.parse(data, pathlib.Path("/srv/relay")).keys.dir == pathlib.Path("/srv/relay/../keys")
    data = with_value(minimal(), "keys.dir", "/var/lib/keys")
    assert config.parse(data, pathlib.Path("/srv/relay")).keys.dir == pathlib.Path("/var/lib/keys")


def test_toml_syntax_error_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL_TOML + "[relay]\nworkers = = 4\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert len(info.value.problems) == 1
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: TOML syntax error: ") and "line 11," in text


def test_duplicate_toml_key_is_a_syntax_error(tmp_path):
    path = tmp_path / "dup.toml"
    path.write_text(MINIMAL_TOML + "[relay]\nworkers = 1\nworkers = 2\n")
    with pytest.raises(ConfigError, match=r"^.*dup\.toml: TOML syntax error"):
        config.load(path)


def test_unreadable_files(tmp_path):
    for path, why in [(tmp_path / "missing.toml", "cannot read"), (tmp_path, "cannot read")]:
        with pytest.raises(ConfigError) as info:
            config.load(path)
        assert info.value.problems[0][0] == str(path)
        assert why in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'# caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)


def test_load_reports_semantic_problems(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(MINIMAL_TOML + "[limits]\nidle_timeout = -3\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == "limits.idle_timeout: must be a number > 0, got -3"


# --------------------------------------------------------------------------
# Derived helpers
# --------------------------------------------------------------------------

def test_internal_port_for():
    cfg = config.parse(minimal(), BASE_DIR)
    assert [cfg.internal_port_for(i) for i in range(3)] == [4478, 4479, 4480]
    with pytest.raises(ValueError):
        cfg.internal_port_for(-1)
    with pytest.raises(ValueError):
        cfg.internal_port_for(65535 - 4478 + 1)
    ephemeral = config.parse(with_value(minimal(), "internal.port", 0), BASE_DIR)
    assert ephemeral.internal_port_for(0) == ephemeral.internal_port_for(7) == 0


def test_transceiver_by_id_and_names():
    data = minimal()
    data["transceivers"].append({"id": 9, "address": "192.0.2.11", "port": 5000, "name": "fra-9"})
    cfg = config.parse(data, BASE_DIR)
    assert sorted(cfg.transceiver_by_id) == [1, 9]
    assert cfg.transceiver_by_id[9].name == "fra-9"
    assert cfg.transceiver_by_id[1].name == "tx1"
    assert cfg.transceiver_by_id[1] is cfg.transceivers[0]


def test_effective_workers(monkeypatch):
    assert config.parse(with_value(minimal(), "relay.workers", 4), BASE_DIR).effective_workers() == 4
    cfg = config.parse(minimal(), BASE_DIR)
    assert cfg.effective_workers() == config._online_cpus() >= 1
    monkeypatch.setattr(config, "_online_cpus", lambda: 12)
    assert cfg.effective_workers() == 12


# --------------------------------------------------------------------------
# Property test: random wrong values never escape as anything but ConfigError
# --------------------------------------------------------------------------

WEIRD_VALUES = [
    -1, 0, 1, 2, 7, 255, 256, 1024, 1025, 65535, 65536, 2**31, 2**63 - 1, -2**63, 10**400,
    0.0, -0.0, 0.5, -3.5, 1e308, math.nan, math.inf, -math.inf, True, False,
    "", " ", "x", "auto", "info", "0.0.0.0", "::", "127.0.0.1", "192.0.2.10", "2001:db8::1",
    "::ffff:1.2.3.4", "fe80::1%eth0", "10.0.0.0/8", "10.0.0.1/8", "1.2.3.4/33", "256.1.1.1",
    "keys", "/abs/keys", "a\0b", "\n", "line\nbreak", "\u2028", "\x85", "caf\u00e9", "\U000e0001",
    "x" * 5000, [], [1], ["10.0.0.0/8"], ["x", 3], [{}], [[]], {}, {"a": 1}, {"id": 1},
    None, datetime.datetime(2026, 1, 2, 3, 4, 5), datetime.date(2026, 1, 2),
    datetime.time(3, 4), b"bytes", 3 + 4j, object(),
]
WEIRD_KEYS = ["wrokers", "", "a.b", "line\nbreak", "\u2028", "id", "port", "relay", 5]


def _valid_rich():
    data = tomllib.loads(EXAMPLE.read_text())
    data["listeners"].append({"address": "::", "port": 3478})
    data["internal"]["allow"] = ["10.0.0.0/8", "2001:db8::/32"]
    data["transceivers"][0]["backup"] = 2
    data["transceivers"].append({"id": 2, "address": "192.0.2.12", "port": 5000, "name": "b"})
    data["keys"] = {"dir": "keys", "signing_key_id": 3}
    return data


def _slots(data):
    """Every place a value can be put: (container, key) pairs, containers first."""
    out = [(None, None)]
    stack = [data]
    while stack:
        node = stack.pop()
        keys = range(len(node)) if isinstance(node, list) else list(node)
        for k in keys:
            out.append((node, k))
            if isinstance(node[k], (dict, list)):
                stack.append(node[k])
    return out


def _mutate(data, rng):
    slots = _slots(data)
    node, key = rng.choice(slots)
    if node is None:
        node, key = data, rng.choice(list(data) + WEIRD_KEYS)
    action = rng.random()
    if isinstance(node, dict) and action < 0.15:
        node.pop(key, None)
    elif isinstance(node, dict) and action < 0.3:
        node[rng.choice(WEIRD_KEYS)] = rng.choice(WEIRD_VALUES)
    elif isinstance(node, list) and action < 0.3:
        node.append(rng.choice(WEIRD_VALUES)) if action < 0.2 else node.clear()
    else:
        node[key] = copy.deepcopy(rng.choice(WEIRD_VALUES))


LINE = re.compile(r'^(\(top level\)|[A-Za-z0-9_-]+|"[^\n]*?")(\[\d+\])?(\.\S+)?: \S')


def test_property_random_mutations_give_config_or_config_error():
    rng = random.Random(20261124)
    base = _valid_rich()
    assert isinstance(config.parse(base, BASE_DIR), config.Config)
    outcomes = {"config": 0, "error": 0}
    for case in range(4000):
        data = copy.deepcopy(base)
        for _ in range(rng.choice((1, 1, 2, 3, 5))):
            _mutate(data, rng)
        try:
            cfg = config.parse(data, BASE_DIR)
        except ConfigError as err:
            outcomes["error"] += 1
            text = str(err)
            lines = text.splitlines()   # splits on \u2028 etc. too: none may hide inside
            assert lines and len(lines) == len(err.problems), (case, text)
            for line, (key, problem) in zip(lines, err.problems):
                assert line == f"{key}: {problem}", (case, line)
                assert key.isprintable() and problem.isprintable(), (case, line)
                assert LINE.match(line), (case, line)
                assert len(line) < 400, (case, line)
            assert config.problems(data, BASE_DIR) == err.problems
        else:
            outcomes["config"] += 1
            assert isinstance(cfg, config.Config)
            assert cfg.listeners and cfg.transceivers
            assert len(cfg.transceiver_by_id) == len(cfg.transceivers)
            assert all(1 <= t.port <= 65535 for t in cfg.transceivers)
    # Both outcomes must actually be exercised for the test to mean anything.
    assert outcomes["config"] > 100 and outcomes["error"] > 1000, outcomes


# -- [probes], [quality], [directory] (issue 8) ---------------------------------------

def test_probe_quality_directory_defaults():
    cfg = config.parse(minimal(), BASE_DIR)
    assert (cfg.probes.enabled, cfg.probes.interval, cfg.probes.timeout,
            cfg.probes.down_after, cfg.probes.up_after) == (True, 0.25, 0.0, 3, 2)
    assert (cfg.quality.sample_every, cfg.quality.max_sampled, cfg.quality.report_interval) == (16, 1024, 5.0)
    assert cfg.directory.address == "" and not cfg.directory.enabled
    assert (cfg.directory.ttl, cfg.directory.timeout, cfg.directory.max_held_per_flow) == (30, 0.1, 8)


@pytest.mark.parametrize("path, value, fragment", [
    ("probes.enabled", 1, "must be true or false"),
    ("probes.interval", 0.001, "must be a number >= 0.01"),
    ("probes.down_after", 0, "must be an integer in 1..100"),
    ("probes.timeout", 1.5, "must be a number in 0..1"),
    ("probes.timeout", -1, "must be a number >= 0"),
    ("probes.up_after", 101, "must be an integer in 1..100"),
    ("quality.sample_every", -1, "must be an integer in 0..1000000"),
    ("quality.report_interval", 0.0, "must be a number >= 0.1"),
    ("directory.address", "localhost:6379", 'must be "" (off)'),
    ("directory.address", "127.0.0.1:0", 'must be "" (off)'),
    ("directory.address", "127.0.0.1", 'must be "" (off)'),
    ("directory.ttl", 0, "must be an integer in 1..86400"),
    ("directory.timeout", 0, "must be a number >= 0.001"),
])
def test_probe_quality_directory_rules(path, value, fragment):
    found = problems_of(with_value(minimal(), path, value))
    assert len(found) == 1 and found[0][0] == path and fragment in found[0][1], found


@pytest.mark.parametrize("value, normal, target", [
    ("127.0.0.1:6379", "127.0.0.1:6379", ("127.0.0.1", 6379)),
    ("[::1]:6380", "[::1]:6380", ("::1", 6380)),
    ("/run/redis/redis.sock", "/run/redis/redis.sock", "/run/redis/redis.sock"),
])
def test_directory_address_forms(value, normal, target):
    cfg = config.parse(with_value(minimal(), "directory.address", value), BASE_DIR)
    assert cfg.directory.address == normal and cfg.directory.enabled
    assert config.redis_target(cfg.directory.address) == target


# -- configs that parse but cannot work (issue 13, item 5) ---------------------------

def test_loopback_internal_address_cannot_reach_a_remote_transceiver():
    data = with_value(minimal(), "internal.address", "127.0.0.1")
    found = problems_of(data)
    assert found == [("transceivers[0].address",
                      "192.0.2.10 is not on this host, and internal.address 127.0.0.1 is loopback: every "
                      "send would fail (EINVAL); set internal.address to this host's address on the "
                      "transceiver network, or 0.0.0.0")]
    assert_problem(problems_of(with_value(with_value(data, "internal.address", "::1"),
                                          "transceivers[0].address", "2001:db8::1")),
                   "transceivers[0].address", "is loopback", "or ::")
    # a transceiver on this host is fine from loopback, as is any transceiver from a real address
    config.parse(with_value(data, "transceivers[0].address", "127.0.0.2"), BASE_DIR)
    config.parse(with_value(data, "internal.address", "192.0.2.1"), BASE_DIR)


@pytest.mark.parametrize("listener,port,workers,bad", [
    ("0.0.0.0", 4478, 1, True), ("127.0.0.1", 4479, 2, True), ("0.0.0.0", 4480, 2, False),
    ("::", 4478, 1, False),                     # the other family: its own port space
    ("192.0.2.1", 4478, 1, True),               # internal is a wildcard
])
def test_listener_on_an_internal_port(listener, port, workers, bad):
    data = with_value(minimal(), "relay.workers", workers)
    data["listeners"] = [{"address": listener, "port": port}]
    found = config.problems(data, BASE_DIR)
    if bad:
        assert_problem(found, "listeners[0].port", f"{port} is the internal port of worker {port - 4478}",
                       "cannot both bind")
    else:
        assert found == []
    assert config.problems(with_value(data, "internal.port", 0), BASE_DIR) == []   # ephemeral


@pytest.mark.parametrize("address,port,what", [
    ("127.0.0.1", 3478, "listeners[0]"),        # the listener is 0.0.0.0: loopback is among its addresses
    ("127.0.0.1", 4479, "the internal sockets"),
    ("192.0.2.1", 4478, "the internal sockets"),
])
def test_transceiver_at_the_relays_own_socket(address, port, what):
    data = with_value(with_value(minimal(), "transceivers[0].address", address),
                      "transceivers[0].port", port)
    data = with_value(with_value(data, "relay.workers", 2), "internal.address",
                      "0.0.0.0" if address.startswith("127.") else "192.0.2.1")
    assert_problem(problems_of(data), "transceivers[0]", f"{address}:{port} is the relay's own socket ({what})")
    assert config.problems(with_value(data, "transceivers[0].port", 5000), BASE_DIR) == []


@pytest.mark.parametrize("path,value,floor", [
    ("limits.idle_timeout", 0.001, "must be at least 6 (RFC 7675"),
    ("limits.idle_timeout", 5.9, "must be at least 6 (RFC 7675"),
    ("limits.pending_ttl", 0.2, "must be at least 1 (a pending flow must outlive"),
])
def test_timers_too_short_to_work(path, value, floor):
    assert_problem(problems_of(with_value(minimal(), path, value)), path, floor, f"got {value}")
    boundary = 6 if path == "limits.idle_timeout" else 1
    config.parse(with_value(minimal(), path, boundary), BASE_DIR)


def test_management_on_every_address_is_a_warning():
    assert config.warnings(config.parse(minimal(), BASE_DIR)) == []
    for address in ("0.0.0.0", "::"):
        cfg = config.parse(with_value(minimal(), "management.address", address), BASE_DIR)
        [(key, text)] = config.warnings(cfg)
        assert key == "management.address" and text.startswith(f"{address} serves /metrics")
    cfg = config.parse(with_value(with_value(minimal(), "management.address", "::"), "management.port", 0),
                       BASE_DIR)
    assert config.warnings(cfg) == []       # disabled: nothing is served


# -- files that are not config files (issue 13, item 1) -------------------------------

def test_load_reads_only_bounded_regular_files(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * config.MAX_CONFIG_BYTES + b"\n")
    nested = tmp_path / "nested.toml"
    nested.write_text("max_flows = " + "[" * 5000 + "]" * 5000)
    for path, fragment in [(fifo, "not a regular file (a FIFO)"), (pathlib.Path("/dev/zero"), "(a character device)"),
                           (big, "larger than the 1048576 bytes"), (nested, "TOML nested too deeply")]:
        with pytest.raises(ConfigError) as info:
            config.load(path)
        assert info.value.problems == [(str(path), info.value.problems[0][1])], info.value.problems
        assert fragment in str(info.value) and "\n" not in str(info.value)
    ok = tmp_path / "ok.toml"
    ok.write_text(MINIMAL_TOML + "#" * (config.MAX_CONFIG_BYTES - len(MINIMAL_TOML) - 1) + "\n")
    assert config.load(ok).transceivers[0].id == 1     # exactly the limit is fine


def test_the_package_raises_the_buffer_ceilings_the_example_asks_for():
    """The kernel silently caps SO_RCVBUF/SO_SNDBUF at rmem_max/wmem_max: the package's sysctl.d
    drop-in must allow what the example's relay.*_buffer_bytes ask (issue 13, item 6)."""
    debian = EXAMPLE.parent / "debian"
    dropin = debian / "sysctl.d" / "50-edge-relay.conf"
    values = dict(re.findall(r"(?m)^(net\.core\.\w+) = (\d+)$", dropin.read_text()))
    relay = config.load(EXAMPLE).relay
    assert int(values["net.core.rmem_max"]) >= relay.recv_buffer_bytes
    assert int(values["net.core.wmem_max"]) >= relay.send_buffer_bytes
    assert "debian/sysctl.d/50-edge-relay.conf usr/lib/sysctl.d" in (debian / "install").read_text().splitlines()
    assert "50-edge-relay.conf" in (debian / "postinst").read_text()


def test_the_dual_stack_internal_wildcard_clashes_and_loops_in_both_families():
    """internal.address "::" is one dual-stack socket per worker: it takes the IPv4 port too."""
    data = with_value(minimal(), "internal.address", "::")
    data["listeners"] = [{"address": "0.0.0.0", "port": 4478}]
    assert_problem(problems_of(data), "listeners[0].port", "4478 is the internal port of worker 0")
    data = with_value(with_value(minimal(), "internal.address", "::"), "transceivers[0].address", "127.0.0.1")
    assert_problem(problems_of(with_value(data, "transceivers[0].port", 4478)), "transceivers[0]",
                   "127.0.0.1:4478 is the relay's own socket (the internal sockets)")
    config.parse(data, BASE_DIR)                    # port 5000: an IPv4 transceiver on this host is fine
