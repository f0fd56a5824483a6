"""voice_figures: what the e2e reports a caller heard (no relay, no timing: records in, figures out)."""

import json

import pytest

import voice_figures as vf


def test_a_lost_packet_and_a_late_echo_are_counted_and_make_one_gap():
    # packets 0..9 sent; 3 never echoed, 4 echoed late (70 ms), 5 echoed twice (counted once)
    echoes = [(i, 0.010) for i in range(10) if i not in (3, 4)] + [(4, 0.070), (5, 0.012)]
    fig = vf.call_figures(10, echoes)
    assert fig == {"sent": 10, "lost": 1, "max_rtt_ms": 70.0, "late60": 1, "gap_ms": 2 * vf.PACKET_MS}


def test_an_echo_at_exactly_60_ms_is_not_late():
    assert vf.call_figures(1, [(0, vf.LATE)])["late60"] == 0


def test_trailing_packets_never_echoed_are_lost_and_a_gap():
    fig = vf.call_figures(5, [(0, 0.001), (1, 0.001)])
    assert (fig["lost"], fig["gap_ms"]) == (3, 3 * vf.PACKET_MS)


def call(address, lost, sent=100):
    return {"address": address, "sent": sent, "lost": lost, "max_rtt_ms": 5.0, "late60": 0,
            "gap_ms": lost * vf.PACKET_MS}


def test_worker_kill_splits_loss_between_the_killed_workers_calls_and_the_others():
    report = {"connected": 3, "calls": [call("10.0.0.3:1000", 40), call("10.0.0.3:1001", 7),
                                        call("10.0.0.3:1002", 0)],
              "new_call": {"connected": True, "ms": 123.4},
              "new_calls": [{"connected": True, "ms": 3.0}, {"connected": True, "ms": 123.4}]}
    flows = {"flows": [{"client": "10.0.0.3:1000", "worker": 1}, {"client": "10.0.0.3:1001", "worker": 1},
                       {"client": "10.0.0.3:1002", "worker": 0}, {"client": "10.0.0.3:9", "worker": 0}]}
    fig = vf.step_figures("worker-kill", report, flows, 1)
    assert (fig["lost"], fig["lost_affected"], fig["lost_max_per_affected_call"], fig["lost_other"]) == (47, 47, 40, 0)
    assert (fig["affected_calls"], fig["other_calls"], fig["unknown_calls"]) == (2, 1, 0)
    assert fig["new_call_ms"] == 123 and fig["new_call_connected"]
    assert (fig["new_calls"], fig["new_calls_connected"]) == (2, 2)
    met = {t["target"]: t["met"] for t in fig["targets"]}
    assert met == {"lost<=10 per affected call": False, "lost_other=0": True, "new_call_ms<=1000": True}
    assert "lost_other=0" in vf.line(fig)


def test_no_call_on_another_worker_is_none_not_zero():
    report = {"calls": [call("10.0.0.3:1000", 3)]}
    fig = vf.step_figures("worker-kill", report, {"flows": [{"client": "10.0.0.3:1000", "worker": 0}]}, 0)
    assert fig["lost_other"] is None
    assert not {t["target"]: t["met"] for t in fig["targets"]}["lost_other=0"]


def test_a_new_call_that_did_not_connect_has_no_figure_and_misses_its_target():
    fig = vf.step_figures("restart", {"calls": [call("10.0.0.3:1", 0)], "new_call": {"connected": False, "ms": None}})
    assert fig["new_call_ms"] is None and not fig["new_call_connected"]
    assert "new_call_ms=none" in vf.line(fig)
    assert [t["met"] for t in fig["targets"]] == [True, True, False]


def test_no_report_gives_none_figures_not_an_exception():
    fig = vf.step_figures("reload", {})
    assert (fig["lost"], fig["max_rtt_ms"], fig["new_call_ms"]) == (0, None, None)


@pytest.mark.parametrize("name", sorted(vf.TARGETS))
def test_every_target_names_a_field_the_step_reports(name):
    report = {"calls": [call("10.0.0.3:1", 0)], "new_call": {"connected": True, "ms": 1.0}}
    flows = {"flows": [{"client": "10.0.0.3:1", "worker": 0}]} if name == "worker-kill" else None
    fig = vf.step_figures(name, report, flows, 0 if flows else None)
    for field, _, _ in vf.TARGETS[name]:
        assert field in fig


def test_table_and_json_hold_every_step_beside_its_targets(tmp_path, capsys):
    outs = []
    for name in ("reload", "restart"):
        voice = tmp_path / f"{name}.json"
        voice.write_text(json.dumps({"calls": [call("10.0.0.3:1", 2)], "new_call": {"connected": True, "ms": 9.6}}))
        outs.append(str(tmp_path / f"{name}.fig"))
        assert vf.main(["step", name, str(voice), outs[-1]]) == 0
    summary = tmp_path / "figures.json"
    capsys.readouterr()
    assert vf.main(["table", *outs, "--json", str(summary)]) == 0
    restart_row = capsys.readouterr().out.splitlines()[2]
    assert restart_row.startswith("restart") and "lost=0 NO" in restart_row and "new_call_ms<=1000 yes" in restart_row
    doc = json.loads(summary.read_text())
    assert [s["step"] for s in doc["steps"]] == ["reload", "restart"]
    assert doc["steps"][1]["targets"][1] == {"target": "lost=0", "value": 2, "met": False}
