"""upgrade.Upgrader's slot hand-over driven by tick(now) over a stand-in supervisor (no processes).

The new image's successor worker reads nothing but TAKE until its turn
(workerproc.await_turn), and the supervisor's DRAIN/UNDRAIN go to the slots'
workers, not to a successor: whatever the operator did to the drain while the
successor was built must reach it right after TAKE.
"""

import selectors
import socket

import pytest

from edge_relay import metrics
from edge_relay.control import CTL_MAX, DRAIN, READY, TAKE, UNDRAIN, decode
from edge_relay.lifecycle import Drain, Phase
from edge_relay.upgrade import Upgrader
from edge_relay.workerproc import Slot


class Log:
    def verdict(self, *args):
        pass


class StandIn:
    """The few supervisor fields and methods Upgrader.tick uses, with one slot whose old worker is gone."""

    def __init__(self, drain):
        self.phase = Phase.UPGRADING
        self.drain = drain
        self.by_pid = {}
        self.sel = selectors.DefaultSelector()
        self.log = Log()
        self.shared = type("Shared", (), {"words": [0] * metrics.SLOT_WORDS})()
        self.slots = [Slot(0, None)]
        self.peers = []

    def _spawn(self, slot, now, on_ctl=None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.peers.append(theirs)
        slot.pid, slot.ctl, slot.started = 4242, ours, now
        self.sel.register(ours, selectors.EVENT_READ, on_ctl)

    def _read_ctl(self, slot):
        pass

    def close(self):
        self.sel.close()
        for s in self.peers:
            s.close()


def successor_messages(drain_at_fork, drain_at_take):
    """The messages the successor reads after READY, the drain being `drain_at_fork` when it was forked
    and `drain_at_take` when its turn came."""
    sup = StandIn(drain_at_fork)
    up = Upgrader(sup)
    up.todo = [0]
    sup.slots[0].pid = 1000                 # the old worker, gone before it is asked to stop
    try:
        up.tick(1.0, [])
        assert up.current is not None and up.current[2] == "starting"
        peer = sup.peers[0]
        peer.send(READY)
        up._successor_readable()
        sup.drain = drain_at_take
        sup.slots[0].pid = None             # its old worker died meanwhile: handed over at once
        up.tick(2.0, [])
        assert sup.slots[0].pid == 4242 and up.current[2] == "taking"
        peer.setblocking(False)
        got = []
        while True:
            try:
                got.append(decode(peer.recv(CTL_MAX)))
            except BlockingIOError:
                return got
    finally:
        up._release_kept()
        sup.close()


def test_a_drain_begun_while_the_successor_was_built_reaches_it_after_take():
    got = successor_messages(None, Drain(since=1.5, refuse_at=31.5))
    assert got[0][0] == TAKE
    assert got[1:] == [(DRAIN, pytest.approx(31.5))]


def test_a_drain_cancelled_while_the_successor_was_built_reaches_it_after_take():
    got = successor_messages(Drain(since=0.0, refuse_at=30.0), None)
    assert [verb for verb, _ in got] == [TAKE, UNDRAIN]


@pytest.mark.parametrize("drain", [None, Drain(since=0.0, refuse_at=30.0)])
def test_a_successor_forked_with_the_drain_as_it_is_gets_only_take(drain):
    assert [verb for verb, _ in successor_messages(drain, drain)] == [TAKE]
