"""Tests for edge_relay/worker.py: its construction, and Worker.turn()'s waits against its timers
on a fake clock (the loop moving datagrams runs in test_relay.py and the e2e tests)."""

import select
import signal
import socket
import types

import pytest

import tomlconf
from edge_relay import stun, worker as worker_mod
from edge_relay.flows import FlowTable
from edge_relay.worker import Worker
from relayharness import Harness


def binding_request(ufrag):
    return stun.encode(stun.BINDING_REQUEST, bytes(12), [(stun.USERNAME, ufrag.encode() + b":clnt")])


def test_an_empty_flow_table_handed_in_is_the_one_used(tmp_path):
    """A restart with no flows to restore still hands its table over: it is used, not replaced from the config.

    (FlowTable defines __len__, so an empty one is falsy: `flows or ...` replaced it.)
    """
    h = Harness(tmp_path)
    try:
        handed = FlowTable(n_listeners=1, max_flows=7)
        assert len(handed) == 0
        w = Worker(h.cfg, h.keyring, h.listen_socks, h.internal_sock, h.log, flows=handed)
        assert w.router.flows is handed and w.router.flows.max_flows == 7
        assert h.router.flows is not handed and h.router.flows.max_flows == h.cfg.limits.max_flows
    finally:
        h.close()


# -- Worker.turn(): the wait never outlasts the nearest timer -------------------------------------
#
# A loop on a fake clock with a scripted poll: each wait records its timeout,
# the clock when it began and the nearest deadline then, and returns the
# events the test queued (none: the wait ran out). A turn waits correctly
# when its wait never ends after the nearest deadline (timeout 0 once it passed).

class Loop:
    def __init__(self, tmp_path, signals=False, **kw):
        self.signals = signals
        self.t = [100.0]
        self.h = Harness(tmp_path, clock=lambda: self.t[0], **kw)
        self.w = self.h.worker
        self.ctl, self.ctl_peer = socket.socketpair()
        self.on_ctl = None                      # what a control message does (set by the test)
        self.script = []                        # events for the next waits, in order
        self.waits = []                         # (timeout, clock, nearest) of every wait

    def __enter__(self):
        self.w._open_loop(self.signals, {self.ctl: lambda: self.on_ctl()})
        self.w._poll = self._poll
        return self

    def __exit__(self, *exc):
        self.w._close_loop()
        self.ctl.close()
        self.ctl_peer.close()
        self.h.close()

    def _poll(self, timeout):
        self.waits.append((timeout, self.t[0], self.w._nearest_deadline()))
        if self.script:
            return self.script.pop(0)
        self.t[0] += timeout                    # nothing came: the wait ran to its end
        return []

    def control(self, action):
        """The next wait returns a control message that runs `action`."""
        self.on_ctl = action
        self.script.append([(self.ctl.fileno(), select.EPOLLIN)])

    def sighup(self):
        """The next wait returns the signal wake-up fd with SIGHUP in it (as set_wakeup_fd writes it)."""
        wake_r, wake_w = self.w._wake
        wake_w.send(bytes([signal.SIGHUP]))
        self.script.append([(wake_r.fileno(), select.EPOLLIN)])

    def assert_waits_end_by_their_deadline(self):
        for timeout, clock, nearest in self.waits:
            assert timeout <= max(0.0, nearest - clock) + 1e-9, (timeout, clock, nearest)


@pytest.mark.parametrize("via", ["control message", "SIGHUP"])
def test_a_slow_reload_does_not_push_the_next_wake_up_past_the_timer_due_meanwhile(tmp_path, monkeypatch, via):
    """A reload (the supervisor's control message, or SIGHUP) that takes longer than the time left
    to the nearest timer: the next wait does not wait (the tick fell due during the reload) and that
    tick runs at once.

    The timeout was computed from the clock read before the reload, so the wait after a reload
    of d seconds ended d seconds late."""
    with Loop(tmp_path, signals=via == "SIGHUP") as loop:
        path = tmp_path / "edge-relay.toml"
        path.write_text(tomlconf.dumps(loop.h.config_data))
        loop.w.config_path = path
        tick = loop.w._next_publish
        config_mod = worker_mod.config_mod
        load = config_mod.load_with_keys

        def slow_load(p):
            loop.t[0] = tick + 2.0             # the reload took 2 s, past the publication tick
            return load(p)
        monkeypatch.setattr(config_mod, "load_with_keys", slow_load)
        if via == "SIGHUP":
            loop.sighup()
        else:
            loop.control(lambda: loop.w.reload())
        loop.w.turn()
        assert loop.w.reloads == 1
        loop.w.turn()
        loop.assert_waits_end_by_their_deadline()
        assert loop.waits[1][0] == 0.0
        assert loop.w._next_publish > tick + 2.0    # the tick ran in the turn that did not wait


def test_the_coalescing_sleep_does_not_push_the_next_wake_up_past_the_nearest_timer(tmp_path, monkeypatch):
    """[relay] coalesce_us: the sleep after a small batch counts toward the next wait's timeout."""
    with Loop(tmp_path, sections={"relay": {"batch_size": 8, "coalesce_us": 300}}) as loop:
        tick = loop.w._next_publish

        def sleep(seconds):
            loop.t[0] = tick + 1.0             # a sleep that ran long (a loaded host), past the tick
        monkeypatch.setattr(worker_mod, "time", types.SimpleNamespace(sleep=sleep))
        loop.script.append([(loop.h.listen_socks[0].fileno(), select.EPOLLIN)])
        loop.w.turn()
        loop.w.turn()
        loop.assert_waits_end_by_their_deadline()
        assert loop.w._next_publish > tick + 1.0


def test_a_drain_time_set_by_a_control_message_ends_the_next_wait(tmp_path):
    """The operator's drain arrives with a time earlier than every other timer: the next wait ends
    at it and the drain starts then (not at the publication tick read before the message)."""
    with Loop(tmp_path) as loop:
        at = loop.t[0] + 0.1
        assert at < loop.w._nearest_deadline()
        loop.control(lambda: loop.w.refuse_new_flows(at))
        loop.w.turn()
        assert not loop.w.router.draining
        loop.w.turn()
        loop.assert_waits_end_by_their_deadline()
        assert loop.waits[1][0] == pytest.approx(0.1) and loop.t[0] == pytest.approx(at)
        assert loop.w.router.draining


def test_a_reload_that_shortens_lifetimes_expires_flows_at_their_new_deadline(tmp_path):
    """A reload lowering pending_ttl (5 s -> 1 s) moves a pending flow's deadline earlier: the waits
    end by the new deadline and the flow goes then, not at the old one."""
    with Loop(tmp_path, transceivers={1: "sink"}) as loop:
        path = tmp_path / "edge-relay.toml"
        loop.h.client().sendto(binding_request(loop.h.session(1)[0]), loop.h.public)
        loop.h.settle()
        flows = loop.w.router.flows
        assert flows.pending == 1 and flows.next_deadline() > 105.0
        loop.h.config_data["limits"] = {"pending_ttl": 1.0}
        path.write_text(tomlconf.dumps(loop.h.config_data))
        loop.w.config_path = path
        loop.control(lambda: loop.w.reload())
        for _ in range(10):
            loop.w.turn()
            if not flows.pending:
                break
        assert loop.w.reloads == 1
        loop.assert_waits_end_by_their_deadline()
        assert flows.pending == 0 and loop.t[0] <= 101.0 + flows.granularity
