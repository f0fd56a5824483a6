"""A worker process: its slot in the supervisor, the fork, the child side and the control channel.

Theory of operation
  Each worker position is a Slot: the process running in it (pid, control
  channel), its restart history (lifecycle.Restarts) and what passes from one
  process to the next (the flow snapshot the last one sent as it exited).

  spawn() forks. The child closes everything of the supervisor's it does
  not need (the `close_inherited` callback), resets the signals, pins itself
  to the slot's CPU, restores the flow snapshot into a fresh flow table, and
  runs worker.Worker over its own sockets until stopped. Control
  messages (control.py) arrive on the SOCK_SEQPACKET channel between turns of
  the worker's loop; as it exits the worker sends its flow table (FLOWS + a
  memfd). A closed channel means the supervisor is gone: the worker drains
  and leaves (worker.Worker.drain). SIGTERM to a worker alone stops it; the
  supervisor restarts it with the flows it handed over.

  An upgrade's new worker (spec.await_turn) is built first, then says READY
  and blocks until TAKE: only then has its old worker stopped reading, and
  it restores the flows TAKE carries before its first read (upgrade.py).

  read_ctl() is the supervisor side: it reads every pending message of one
  slot and records what it says in the slot (the handed-over flows, a flow
  report, a refused reload).
"""

import json
import os
import signal
import socket
import sys

from . import control, metrics, sdnotify
from .lifecycle import Restarts
from .log import Log
from .worker import Worker, flow_table, restore_flows, start_flows

CHILD_CRASHED = 70      # EX_SOFTWARE: the child raised

# The operator's drain and its cancel (edge-relay drain [--cancel]), after HAProxy's
# "pause"/"resume" pair. They are the supervisor's; a worker ignores them, because
# `systemctl kill -s ...` without --kill-whom=main signals every process of the unit.
DRAIN_SIGNAL = signal.SIGTTOU
UNDRAIN_SIGNAL = signal.SIGTTIN


class Slot:
    """One worker position: its process, control channel and restart history."""

    def __init__(self, index, cpu):
        self.index = index
        self.cpu = cpu
        self.pid = None
        self.ctl = None
        self.started = 0.0
        self.restarts = Restarts()
        self.restore = None         # flow snapshot bytes for the next process
        self.handed = None          # memfd the last process sent as it exited
        self.asked_to_stop = False
        self.reload_failed = None   # the worker's reason when it kept its old config
        self.report = None          # the last FLOW_REPORT (GET /flows)


class WorkerSpec:
    """What a worker process is started with (a plain class: a dataclass costs each start its exec)."""

    __slots__ = ("cfg", "keyring", "config_path", "generation", "listeners", "internal", "shared", "extra",
                 "refuse_at", "await_turn", "journal")

    def __init__(self, cfg, keyring, config_path, generation, listeners, internal, shared, extra,
                 refuse_at=None, await_turn=False, journal=None):
        self.cfg = cfg
        self.keyring = keyring
        self.config_path = config_path
        self.generation = generation
        self.listeners = listeners
        self.internal = internal
        self.shared = shared            # metrics.SharedCounters
        self.extra = extra              # metrics.ExtraShared
        self.refuse_at = refuse_at      # the operator's drain: refuse new flows from then on (time.monotonic())
        self.await_turn = await_turn    # an upgrade's new worker: build, say READY, read only after TAKE
        self.journal = journal          # worker.JournalMemory: the slot's crash journal (None: the kernel refused)


def spawn(slot, spec, close_inherited, now):
    """Fork a worker into `slot`; returns the supervisor's end of the control channel.

    `close_inherited()` runs first in the child: it closes the supervisor's fds
    that are not the worker's (the selector, the management socket, other slots').
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = CHILD_CRASHED
        try:
            _reset_signals()
            ours.close()
            close_inherited()
            code = _child(slot, spec, theirs)
        except BaseException:  # noqa: BLE001 - the child must never return into the supervisor
            import traceback  # only when the worker crashed: not on every start
            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    ours.setblocking(False)
    slot.pid, slot.ctl = pid, ours
    slot.started = now
    slot.restore = None
    slot.asked_to_stop = False
    slot.reload_failed = None
    return ours


def _reset_signals():
    # first of all: the supervisor's wake-up fd is shared until closed, and a
    # signal the child took would wake the supervisor with it
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (DRAIN_SIGNAL, UNDRAIN_SIGNAL):
        signal.signal(sig, signal.SIG_IGN)


def _child(slot, spec, ctl):
    i = slot.index
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(var, None)
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(f"edge-relay w{i}")
    except OSError:
        pass
    if slot.cpu is not None:
        try:
            os.sched_setaffinity(0, {slot.cpu})
        except OSError:
            pass
    cfg = spec.cfg
    log = Log(level=cfg.log.level, name=f"edge-relay[w{i}]")
    # an upgrade's new worker attaches the journal only after TAKE: until then
    # the old worker of this slot is its writer
    flows = flow_table(cfg) if spec.await_turn else start_flows(cfg, log, i, slot.restore, spec.journal)
    slot.restore = None
    view = spec.shared.slot(i)
    extra = spec.extra
    state = {"generation": spec.generation, "started": metrics.monotonic_ns()}

    def publish(router, worker):
        extra.write(i, metrics.extra_of(worker))
        metrics.publish(view, router, state["generation"], worker.reloads, worker.reload_failures,
                        state["started"])

    worker = Worker(cfg, spec.keyring, spec.listeners, spec.internal, log, config_path=spec.config_path,
                    publish=publish, flows=flows, log_transceivers=i == 0)
    if spec.await_turn:
        # built (config, keys, buffers): only now does the old worker of this slot stop reading,
        # so the gap in service is its snapshot and our restore, not our start-up
        handed = await_turn(ctl)
        if handed is None:
            return 0                # the supervisor called the upgrade off: never served
        restore_flows(worker.router.flows, log, i, handed, spec.journal, said="took over")
    if spec.refuse_at is not None:
        worker.refuse_new_flows(spec.refuse_at)
    ctl.setblocking(False)

    def on_ctl():
        while True:
            try:
                msg = ctl.recv(control.CTL_MAX)
            except BlockingIOError:
                return True
            except OSError:
                msg = b""
            if not msg:             # the supervisor is gone: drain and leave
                worker.drain()
                return False
            verb, arg = control.decode(msg)
            if verb == control.RELOAD:
                ok = worker.reload()
                if ok:
                    state["generation"] = arg
                worker._publish()
                send(ctl, control.RELOADED if ok else control.encode_reload_failed(worker.last_reload_error))
            elif verb == control.REPORT_FLOWS:
                _report_flows(ctl, worker, arg, i)
            elif verb == control.DRAIN:
                worker.refuse_new_flows(arg)
            elif verb == control.UNDRAIN:
                worker.refuse_new_flows(None)
            elif verb == control.STOP:
                worker.stop()

    worker.run(handle_signals=True, extra={ctl: on_ctl})
    fd = sdnotify.memfd_write(f"edge-relay-flows{i}", worker.snapshot())
    try:
        ctl.setblocking(True)
        socket.send_fds(ctl, [control.FLOWS], [fd])
    except OSError:
        pass
    return 0


def await_turn(ctl):
    """Child side of a takeover: send READY, block until TAKE; the flow snapshot bytes (b"" for none).

    None when the supervisor hung up instead (the upgrade was called off).
    """
    ctl.setblocking(True)
    try:
        ctl.send(control.READY)
        while True:
            msg, fds, _, _ = socket.recv_fds(ctl, control.CTL_MAX, 1)
            data = b""
            for fd in fds:
                try:
                    data = sdnotify.memfd_read(fd)
                except (OSError, ValueError):
                    data = b""
                finally:
                    os.close(fd)
            if not msg:
                return None
            if control.decode(msg)[0] == control.TAKE:
                return data
    except OSError:
        return None


def _report_flows(ctl, worker, filters, index):
    """Worker side of REPORT_FLOWS: the matching flows in a memfd, sent as FLOW_REPORT."""
    try:
        report = worker.flow_report(int(filters["limit"]), filters.get("transceiver"), filters.get("state"),
                                    filters.get("client"))
    except (ValueError, KeyError, TypeError):
        report = {"matched": 0, "flows": []}
    fd = sdnotify.memfd_write(f"edge-relay-report{index}", json.dumps(report).encode())
    try:
        socket.send_fds(ctl, [control.FLOW_REPORT], [fd])
    except OSError:
        pass
    finally:
        os.close(fd)


def send(sock, msg):
    """Send one control message; a worker that is gone is the reaper's business, not the sender's."""
    try:
        sock.send(msg)
    except OSError:
        pass


def read_ctl(slot, log):
    """Read every pending message of `slot`'s channel into the slot.

    Returns False when the channel closed (the caller unregisters and
    closes slot.ctl), True otherwise.
    """
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(slot.ctl, control.CTL_MAX, 4)
        except BlockingIOError:
            return True
        except OSError:
            msg, fds = b"", []
        if not msg:
            for fd in fds:
                os.close(fd)
            return False
        verb, arg = control.decode(msg)
        if verb == control.FLOWS and fds:
            if slot.handed is not None:
                os.close(slot.handed)
            slot.handed = fds.pop(0)
        elif verb == control.FLOW_REPORT and fds:
            fd = fds.pop(0)
            try:
                slot.report = json.loads(sdnotify.memfd_read(fd))
            except (OSError, ValueError):
                slot.report = None
            finally:
                os.close(fd)
        elif verb == control.RELOAD_FAILED:
            slot.reload_failed = arg or "see its log"
            log.verdict("err", "worker %d kept its old config: %s", slot.index, slot.reload_failed)
        for fd in fds:
            os.close(fd)


def take_handed(slot):
    """The flow snapshot bytes the slot's last process sent (None if unreadable); closes the memfd."""
    fd, slot.handed = slot.handed, None
    try:
        return sdnotify.memfd_read(fd)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
