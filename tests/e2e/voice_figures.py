"""What a caller hears across one e2e step, from voice.py's report, and the targets of issue 12.

"No packet lost" is not enough for voice: a packet later than a frame or two
is lost to the listener. So each under-traffic step of tests/e2e/run reports,
for the calls that were up across the action:
  lost         packets never echoed back, summed over the calls
  max_rtt_ms   the longest round trip of any echo
  late60       echoes whose round trip exceeded LATE (60 ms)
  gap_ms       the longest run of consecutive packets of one call that were
               lost or late, in ms of audio (PACKET_MS each)
  new_call_ms  time from the first Binding Request of a call placed while the
               action was under way to its first Binding success answer
               (the call must connect within voice.NEW_CALL_TIMEOUT); where
               several were placed at once, the slowest
and, for worker-kill, the same loss split between the calls the killed
worker served (lost_affected, lost_max_per_affected_call) and the others
(lost_other), from the relay's GET /flows taken just before the kill.

The targets are figures to compare with, not pass/fail rules: the step's
own rules (tests/e2e/run) decide pass or fail.

Usage (tests/e2e/run; host python, standard library only):
  voice_figures.py step NAME VOICE_JSON OUT_JSON [FLOWS_JSON WORKER]
      prints the step's fields as one line (`lost=0 max_rtt_ms=8.1 ...`)
      and writes them, with the targets and whether each is met, to OUT_JSON
  voice_figures.py table OUT_JSON... --json FILE
      prints the table of every step beside its targets and writes it to FILE
"""

import json
import sys

LATE = 0.060            # seconds: a round trip longer than this is a late echo (issue 12)
PACKET_MS = 20          # one packet is 20 ms of audio (demo.PACKET_INTERVAL)

# (field, limit, what): "field <= limit" is the target. From issue 12, "How it is shown".
TARGETS = {
    "reload": [("late60", 0, "late60=0"), ("max_rtt_ms", 40, "max_rtt_ms<=40"),
               ("new_call_ms", 1000, "new_call_ms<=1000")],
    "restart": [("max_rtt_ms", 60, "max_rtt_ms<=60"), ("lost", 0, "lost=0"),
                ("new_call_ms", 1000, "new_call_ms<=1000")],
    "upgrade": [("late60", 0, "late60=0"), ("max_rtt_ms", 40, "max_rtt_ms<=40"),
                ("new_call_ms", 1000, "new_call_ms<=1000")],
    "worker-kill": [("lost_max_per_affected_call", 10, "lost<=10 per affected call"),
                    ("lost_other", 0, "lost_other=0"), ("new_call_ms", 1000, "new_call_ms<=1000")],
}


def call_figures(sent, echoes):
    """lost, max_rtt_ms, late60 and gap_ms of one call from its (index, rtt seconds) echoes."""
    on_time = {i for i, rtt in echoes if rtt <= LATE}
    gap = run = 0
    for i in range(sent):
        run = 0 if i in on_time else run + 1
        gap = max(gap, run)
    return {"sent": sent, "lost": sent - len({i for i, _ in echoes}),
            "max_rtt_ms": round(max((rtt for _, rtt in echoes), default=0.0) * 1000, 1),
            "late60": sum(1 for _, rtt in echoes if rtt > LATE), "gap_ms": gap * PACKET_MS}


def step_figures(name, report, flows=None, worker=None):
    """The fields of one step from voice.py's report; with GET /flows and the killed worker, the split."""
    calls = report.get("calls", [])
    fig = {"step": name, "calls": len(calls), "connected": report.get("connected", 0),
           "sent": sum(c["sent"] for c in calls),
           "lost": sum(c["lost"] for c in calls),
           "max_rtt_ms": max((c["max_rtt_ms"] for c in calls), default=None),
           "late60": sum(c["late60"] for c in calls),
           "gap_ms": max((c["gap_ms"] for c in calls), default=None)}
    new = report.get("new_call")
    fig["new_call_ms"] = None if not new or new.get("ms") is None else round(new["ms"])
    fig["new_call_connected"] = bool(new and new.get("connected"))     # new_call: a failed one if any
    placed = report.get("new_calls") or []
    fig["new_calls"] = len(placed)
    fig["new_calls_connected"] = sum(1 for c in placed if c["connected"])
    if flows is not None:
        served = {f["client"]: f["worker"] for f in flows.get("flows", [])}
        affected = [c for c in calls if served.get(c["address"]) == worker]
        other = [c for c in calls if c["address"] in served and served[c["address"]] != worker]
        fig.update(killed_worker=worker, affected_calls=len(affected), other_calls=len(other),
                   unknown_calls=len(calls) - len(affected) - len(other),
                   lost_affected=sum(c["lost"] for c in affected),
                   lost_max_per_affected_call=max((c["lost"] for c in affected), default=None),
                   lost_other=sum(c["lost"] for c in other) if other else None,
                   gap_ms_other=max((c["gap_ms"] for c in other), default=None))
    fig["targets"] = [{"target": what, "value": fig.get(field),
                       "met": fig.get(field) is not None and fig[field] <= limit}
                      for field, limit, what in TARGETS.get(name, [])]
    return fig


def _show(v):
    return "none" if v is None else str(v)


def line(fig):
    """The fields on the step's own result line."""
    keys = ["lost", "max_rtt_ms", "late60", "gap_ms", "new_call_ms"]
    if "killed_worker" in fig:
        keys[1:1] = ["lost_affected", "lost_max_per_affected_call", "lost_other"]
    text = " ".join(f"{k}={_show(fig[k])}" for k in keys)
    if "killed_worker" in fig:
        text += (f" (worker {fig['killed_worker']} served {fig['affected_calls']} of {fig['calls']} calls,"
                 f" other workers {fig['other_calls']})")
    return text


def table(figs):
    """The closing table: each step's figures beside its targets."""
    rows = [("STEP", "CALLS", "LOST", "MAX_RTT_MS", "LATE60", "GAP_MS", "NEW_CALL_MS", "TARGETS (met?)")]
    for f in figs:
        lost = _show(f["lost"])
        if "killed_worker" in f:
            lost += f" (max/affected call {_show(f['lost_max_per_affected_call'])}, other {_show(f['lost_other'])})"
        targets = ", ".join(f"{t['target']} {'yes' if t['met'] else 'NO'}" for t in f["targets"])
        rows.append((f["step"], str(f["calls"]), lost, _show(f["max_rtt_ms"]), _show(f["late60"]), _show(f["gap_ms"]),
                     _show(f["new_call_ms"]), targets))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def main(argv):
    if argv[:1] == ["step"] and len(argv) in (4, 6):
        name, voice_json, out = argv[1:4]
        try:
            with open(voice_json) as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = {}                 # no report: every figure "none", the step fails on its own rules
        flows = worker = None
        if len(argv) == 6:
            with open(argv[4]) as f:
                flows = json.load(f)
            worker = int(argv[5])
        fig = step_figures(name, report, flows, worker)
        with open(out, "w") as f:
            json.dump(fig, f)
        print(line(fig))
        return 0
    if argv[:1] == ["table"] and len(argv) >= 3 and argv[-2] == "--json":
        figs = []
        for path in argv[1:-2]:
            with open(path) as f:
                figs.append(json.load(f))
        print(table(figs))
        with open(argv[-1], "w") as f:
            json.dump({"late_ms": LATE * 1000, "steps": figs}, f, indent=1)
            f.write("\n")
        return 0
    print(__doc__.split("Usage", 1)[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
