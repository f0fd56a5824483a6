"""tests/tomlconf.py writes what tomllib reads back, and merges the way relay configs need."""

import pathlib
import tomllib

import pytest

import tomlconf


def test_dumps_round_trips_a_relay_config():
    data = {
        "relay": {"workers": 2, "drain_seconds": 0.5, "io": "auto"},
        "listeners": [{"address": "127.0.0.1", "port": 3478}, {"address": "::1", "port": 3479}],
        "keys": {"dir": 'a "quoted" \\ path\tx'},
        "probes": {"enabled": False},
        "limits": {},
        "nftables": {"allow": ["10.0.0.0/8", "fd00::/8"], "total_pps": 50000},
    }
    assert tomllib.loads(tomlconf.dumps(data)) == data


def test_dumps_takes_paths_and_refuses_what_it_cannot_write():
    assert tomllib.loads(tomlconf.dumps({"keys": {"dir": pathlib.Path("/x/y")}})) == {"keys": {"dir": "/x/y"}}
    for bad in (None, float("nan"), {1, 2}, b"bytes"):
        with pytest.raises(TypeError):
            tomlconf.dumps({"relay": {"x": bad}})


def test_merged_merges_tables_appends_arrays_of_tables_and_changes_neither_input():
    base = {"relay": {"workers": 2}, "transceivers": [{"id": 1}], "probes": {"enabled": False}}
    extra = {"relay": {"batch_size": 8}, "transceivers": [{"id": 2}], "probes": {"enabled": True}, "log": {}}
    out = tomlconf.merged(base, extra)
    assert out == {"relay": {"workers": 2, "batch_size": 8}, "transceivers": [{"id": 1}, {"id": 2}],
                   "probes": {"enabled": True}, "log": {}}
    assert base == {"relay": {"workers": 2}, "transceivers": [{"id": 1}], "probes": {"enabled": False}}
