"""The supervisor's decisions in-process: no worker is forked, `now` is passed in, the fd store is a recorder."""

import os

import pytest

from edge_relay import config, keys, sdnotify
from edge_relay.flows import CONFIRMED, FlowTable
from edge_relay.journal import Journal
from edge_relay.lifecycle import Phase
from edge_relay.log import Log
from edge_relay.supervisor import Supervisor
from edge_relay.worker import flow_table, journal_memory
from relayproc import free_port
from test_journal import sa4


@pytest.fixture
def sup(tmp_path):
    """A Supervisor of one worker slot that never forks; `sup.stored` records what reaches the fd store."""
    (tmp_path / "keys").mkdir(mode=0o700)
    keys.write_key_file(tmp_path / "keys", 1)
    cfg = config.parse({"listeners": [{"address": "127.0.0.1", "port": free_port()}],
                        "internal": {"address": "127.0.0.1", "port": free_port()},
                        "keys": {"dir": str(tmp_path / "keys")},
                        "transceivers": [{"id": 1, "address": "127.0.0.1", "port": 9}],
                        "management": {"port": 0}, "probes": {"enabled": False}}, tmp_path)
    log = Log(level="err", stream=open(os.devnull, "w"))
    s = Supervisor(None, cfg, keys.load_dir(tmp_path / "keys"), log, workers=1, env={})
    s.stored = {}

    def store_flows(index, fd):
        s.stored[index] = sdnotify.memfd_read(fd)
        return True
    s.fdstore.store_flows = store_flows
    yield s
    s.close()


def journal_of(sup, index, clients):
    """Slot `index`'s crash journal as a dead worker left it: `clients` confirmed flows to transceiver 1."""
    sup.journals[index] = memory = journal_memory(sup.cfg, index, sup.log)
    table = flow_table(sup.cfg)
    Journal(memory.map).attach(table, 0.0)
    for i in range(clients):
        flow = table.open(0, sa4(i), 1, 1.0)
        assert table.confirm(flow, 1.0)
    table.journal = None
    return memory


def snapshot_flows(data):
    table = FlowTable(n_listeners=1)
    table.restore(data, 10.0)
    return sorted(f.key for f in table if f.state == CONFIRMED)


def test_a_worker_that_did_not_hand_over_at_stop_leaves_its_journaled_flows_in_the_fd_store(sup):
    """Killed after KILL_GRACE, dead while stopping, or waiting for its restart at SIGTERM: no FLOWS came,
    but its crash journal holds its confirmed calls; the next process gets them as a snapshot."""
    journal_of(sup, 0, 3)
    sup.life.set(Phase.STOPPING, 1.0, "SIGTERM")
    sup._finish(2.0)
    assert sup.phase is Phase.STOPPED
    assert snapshot_flows(sup.stored[0]) == sorted(sa4(i) for i in range(3))


def test_a_handed_over_snapshot_is_stored_as_it_came_not_the_journal(sup):
    journal_of(sup, 0, 3)
    other = FlowTable(n_listeners=1)
    flow = other.open(0, sa4(7), 1, 1.0)
    assert other.confirm(flow, 1.0)
    sup.slots[0].handed = sdnotify.memfd_write("flows0", other.snapshot(1.0))
    sup.life.set(Phase.STOPPING, 1.0, "SIGTERM")
    sup._finish(2.0)
    assert snapshot_flows(sup.stored[0]) == [sa4(7)]


def test_an_empty_journal_stores_nothing(sup):
    journal_of(sup, 0, 0)
    sup.life.set(Phase.STOPPING, 1.0, "SIGTERM")
    sup._finish(2.0)
    assert sup.stored == {}


def test_an_upgrade_carries_a_dead_workers_journaled_flows_across_the_execve(sup):
    """A slot waiting for its restart when SIGUSR2 came: the new image makes new journals, so its flows
    ride in the state document as a snapshot, as a handed-over worker's do."""
    from edge_relay.upgrade import capture
    journal_of(sup, 0, 2)
    assert sup.slots[0].pid is None
    made = []
    doc, fds = capture(sup, made)
    try:
        fd = doc["slots"][0]["flows"]
        assert fd is not None and fd in made
        assert snapshot_flows(sdnotify.memfd_read(fd)) == sorted(sa4(i) for i in range(2))
    finally:
        for fd in made:
            os.close(fd)


def restructured(sup):
    """Run the restructure of a reload to the same one slot; the restore each new worker is spawned with."""
    spawned = []
    sup._spawn = lambda slot, now: spawned.append(slot.restore)
    sup.life.set(Phase.SERVING, 0.5, "started")
    sup.life.set(Phase.RESTRUCTURING, 1.0, "reload")
    sup.restructure = (sup.cfg, sup.keyring, 1, dict(sup.socks), [], {})
    sup._apply_restructure(2.0)
    assert sup.phase is Phase.RELOADING
    return spawned


def test_a_restructure_gives_a_dead_workers_journaled_flows_to_the_new_worker(sup):
    journal_of(sup, 0, 2)
    assert snapshot_flows(restructured(sup)[0]) == sorted(sa4(i) for i in range(2))


def test_a_restructure_gives_the_flows_waiting_for_a_restart_to_the_new_worker(sup):
    other = FlowTable(n_listeners=1)
    assert other.confirm(other.open(0, sa4(9), 1, 1.0), 1.0)
    sup.slots[0].restore = other.snapshot(1.0)       # e.g. a worker that left on a stray SIGTERM
    assert snapshot_flows(restructured(sup)[0]) == [sa4(9)]


@pytest.mark.parametrize("phase", [Phase.RELOADING, Phase.RESTRUCTURING])
def test_sigterm_before_a_reloads_verdict_gives_it_one(sup, phase):
    """Every SIGHUP gets one verdict: a stop while it is pending says "failed" and why, at once, rather
    than leaving `edge-relay reload` to time out on "pending"."""
    sup.life.set(Phase.SERVING, 0.5, "started")
    sup.life.set(phase, 1.0, "SIGHUP")
    sup.generation = 2
    sup._pending = (sup.cfg, "")
    sup.reload_deadline = 6.0
    sup.last_reload = {"state": "pending", "generation": 2, "requested_usec": 1_000_000, "finished_usec": 0,
                       "reason": ""}
    sup.begin_stop(2.0)
    assert sup.phase is Phase.STOPPING
    v = sup.status(2.0)["last_reload"]
    assert v["state"] == "failed" and v["finished_usec"] == 2_000_000 and "SIGTERM" in v["reason"]
    assert v["requested_usec"] == 1_000_000 and sup.reload_failures == 1
