"""The supervisor <-> worker control messages: each encodes to what decode reads back, and junk decodes to nothing."""

import pytest

from edge_relay import control
from edge_relay.control import (CTL_MAX, DRAIN, FLOW_REPORT, FLOWS, RELOAD, RELOAD_FAILED, RELOADED, REPORT_FLOWS, STOP,
                                UNDRAIN, decode, encode_drain, encode_reload, encode_reload_failed, encode_report_flows)


@pytest.mark.parametrize("verb", [UNDRAIN, STOP, RELOADED, FLOWS, FLOW_REPORT])
def test_plain_verbs(verb):
    assert decode(verb) == (verb, None)


def test_reload_carries_the_generation():
    assert encode_reload(17) == b"reload 17"
    assert decode(encode_reload(17)) == (RELOAD, 17)


def test_drain_carries_the_time_to_refuse_from_in_microseconds():
    assert encode_drain(1234.5) == b"drain 1234500000"
    assert decode(encode_drain(1234.5)) == (DRAIN, 1234.5)
    assert decode(encode_drain(-3.0)) == (DRAIN, 0.0)       # "now", never a negative number on the wire


def test_reload_failed_carries_the_reason_and_fits_one_message():
    assert decode(encode_reload_failed("limits.idle_timeout: must be > 0")) == \
        (RELOAD_FAILED, "limits.idle_timeout: must be > 0")
    long = encode_reload_failed("é" * 1000)
    assert len(long) <= CTL_MAX
    verb, why = decode(long)
    assert verb == RELOAD_FAILED and why.startswith("é")      # a cut character is replaced, not an error
    assert decode(encode_reload_failed("")) == (RELOAD_FAILED, "")


def test_report_flows_round_trip_and_limit():
    msg = encode_report_flows(100, 2, "confirmed", "203.0.113.0/24")
    assert decode(msg) == (REPORT_FLOWS, {"limit": 100, "transceiver": 2, "state": "confirmed",
                                          "client": "203.0.113.0/24"})
    with pytest.raises(ValueError):
        encode_report_flows(1, client="x" * CTL_MAX)


@pytest.mark.parametrize("junk", [b"", b"reload", b"reload x", b"reload -1", b"reload 1 2",
                                  b"drain", b"drain ", b"drain 1.5",
                                  b"stopp", b"report-flows{", b"report-flows[1]", b"report-flows\xff",
                                  b"hello"])
def test_junk_decodes_to_nothing(junk):
    assert decode(junk) == (None, None)


def test_no_other_module_spells_a_verb():
    """One place for the protocol: the byte literals live in control.py only."""
    import pathlib
    import re
    pkg = pathlib.Path(control.__file__).parent
    verbs = [b"reload", b"drain", b"undrain", b"stop", b"report-flows", b"reloaded", b"reload-failed", b"flows",
             b"flow-report"]
    pattern = re.compile(r'b"(%s)[ "]' % "|".join(re.escape(v.decode()) for v in verbs))
    bad = [f"{p.name}: {m.group(0)}" for p in pkg.rglob("*.py") if p.name != "control.py"
           for m in pattern.finditer(p.read_text())]
    assert not bad, bad
