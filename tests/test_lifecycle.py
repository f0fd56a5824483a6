"""The supervisor's phase machine and restart timing, with `now` passed in (no process, no clock)."""

import pytest

from edge_relay import lifecycle
from edge_relay.lifecycle import (BACKOFF_MAX, BACKOFF_MIN, CRASH_LIMIT, CRASH_WINDOW, TRANSITIONS, Drain, Lifecycle,
                                  Phase, Restarts, steady)


def test_every_phase_has_a_row_and_every_target_is_a_phase():
    assert set(TRANSITIONS) == set(Phase)
    assert all(targets <= set(Phase) for targets in TRANSITIONS.values())
    assert TRANSITIONS[Phase.STOPPED] == set()      # the end


def test_every_phase_can_reach_stopped():
    """No phase is a trap: SIGTERM always ends the process."""
    for start in Phase:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert Phase.STOPPED in seen, start


def test_set_logs_each_transition_once_with_its_time_and_reason():
    told = []
    life = Lifecycle(lambda old, new, why: told.append((old, new, why)), now=1.0)
    assert life.phase is Phase.STARTING and not life.started and not life.stopping
    life.set(Phase.SERVING, 2.5, "every worker serves")
    life.set(Phase.RELOADING, 3.0, "generation 2")
    assert told == [(Phase.STARTING, Phase.SERVING, "every worker serves"),
                    (Phase.SERVING, Phase.RELOADING, "generation 2")]
    assert life.since == 3.0 and life.started
    assert [(t, new) for t, _, new, _ in life.history] == [(2.5, Phase.SERVING), (3.0, Phase.RELOADING)]


@pytest.mark.parametrize("old,new", [(old, new) for old in Phase for new in Phase if new not in TRANSITIONS[old]])
def test_a_transition_not_in_the_table_is_refused_and_changes_nothing(old, new):
    told = []
    life = Lifecycle(lambda *a: told.append(a))
    life.phase = old
    with pytest.raises(ValueError, match=f"{old.value} -> {new.value}"):
        life.set(new, 5.0)
    assert life.phase is old and told == []


def test_stopping_covers_stopped_too():
    life = Lifecycle()
    life.set(Phase.STOPPING, 1.0)
    assert life.stopping
    life.set(Phase.STOPPED, 2.0)
    assert life.stopping and life.started


def test_backoff_doubles_within_the_window_and_is_capped():
    r = Restarts()
    delays = [r.died(100.0 + i)[0] for i in range(12)]
    assert delays[:4] == [0.0, BACKOFF_MIN, 2 * BACKOFF_MIN, 4 * BACKOFF_MIN]    # the first one at once
    assert max(delays) == BACKOFF_MAX and delays[-1] == BACKOFF_MAX


def test_deaths_older_than_the_window_are_forgotten():
    r = Restarts()
    r.died(0.0)
    r.died(1.0)
    delay, looping, _ = r.died(CRASH_WINDOW + 0.5)     # the first is out of the window ...
    assert delay == BACKOFF_MIN and not looping                 # ... the second is not: it counts once more


def test_restart_is_due_once_at_its_time():
    r = Restarts()
    assert r.died(9.0)[0] == 0.0 and r.due(9.0)                 # a first death: due at once
    delay, _, _ = r.died(10.0)
    assert not r.due(10.0 + delay / 2)
    assert r.due(10.0 + delay)
    assert not r.due(10.0 + delay + 1)     # once
    r.died(20.0)
    r.cancel()
    assert not r.due(1000.0)


def test_crash_loop_begins_at_the_limit_and_ends_after_a_stable_window():
    r = Restarts()
    began = [r.died(float(i))[2] for i in range(CRASH_LIMIT + 2)]
    assert began == [False] * (CRASH_LIMIT - 1) + [True, False, False]     # said once
    assert r.crash_loop
    started = 50.0
    assert not r.stable(started, started + CRASH_WINDOW)
    assert r.stable(started, started + CRASH_WINDOW + 0.1)
    assert not r.crash_loop and not r.deaths
    assert not r.stable(started, started + 2 * CRASH_WINDOW)    # said once


def test_the_module_reads_no_clock():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(lifecycle))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert names == {"collections", "enum", "json"}


def test_a_drain_passes_through_a_reload_and_comes_back():
    """Start, drain, reload while draining: the verdict lands in DRAINING, and a cancel goes back to SERVING."""
    life = Lifecycle()
    drain = None
    life.set(steady(drain), 1.0, "started")
    assert life.phase is Phase.SERVING
    drain = Drain(since=2.0, refuse_at=12.0)
    life.set(steady(drain), 2.0, "drain")
    life.set(Phase.RELOADING, 3.0, "SIGHUP")
    life.set(steady(drain), 4.0, "verdict ok")
    assert life.phase is Phase.DRAINING
    drain = None
    life.set(steady(drain), 5.0, "cancelled")
    assert life.phase is Phase.SERVING


def test_drain_refuses_from_its_time_on_and_survives_the_fd_store():
    d = Drain(since=100.0, refuse_at=110.0)
    assert not d.refusing(109.999) and d.refusing(110.0)
    back = Drain.decode(d.encode())
    assert (back.since, back.refuse_at) == (100.0, 110.0)
    for junk in (b"", b"{}", b"[1]", b'{"since": "x", "refuse_at": 1}', b"\xff"):
        with pytest.raises(ValueError):
            Drain.decode(junk)
