"""The supervisor: the loop that owns the sockets, runs one pinned worker per core and answers for them.

Theory of operation
  The supervisor validates the config and keys, takes its sockets back from
  systemd's fd store or binds them (fdstore.py), and forks one worker per
  core (workerproc.py), each over its own sockets, with a control channel
  (control.py). Its lifecycle is one Phase (lifecycle.py); every transition
  goes through Lifecycle.set and is logged. The loop reads the clock once per
  turn and passes `now` to every decision.

  Counters and the heartbeat go through metrics.SharedCounters (no per-packet
  IPC). A worker is "up" while its heartbeat is fresher than HEARTBEAT_STALE.

  A worker that dies unasked is restarted on the same sockets after an
  exponential backoff (lifecycle.Restarts); CRASH_LIMIT deaths within
  CRASH_WINDOW seconds is a crash loop: logged, counted, shown in STATUS=,
  and backed off up to BACKOFF_MAX. Its confirmed flows are not lost: each
  slot has a crash journal (journal.py), a memfd the supervisor makes before
  the slot's first fork and holds, which the worker writes at every flow
  transition and its successor restores before reading its first datagram
  (worker.start_flows). An upgrade's new image makes new journals: the flows
  cross the execve in the handed-over snapshots, not in the old journals (a
  slot waiting for its restart sends its journal's flows as a snapshot).

  Reload verdicts. Every SIGHUP gets one verdict, kept in `last_reload` and
  shown by GET /status and /metrics: "pending" from the moment the
  supervisor takes the signal (requested_usec, CLOCK_MONOTONIC, the clock
  `edge-relay reload` and systemd's MONOTONIC_USEC use), then "refused"
  (the config or keys did not validate: the reason, the old generation keeps
  serving), "failed" (a worker kept its old config or did not publish the
  new generation within RELOAD_ACK_TIMEOUT) or "ok" (every worker publishes
  the new generation in its slot). A requester that read the clock before
  sending SIGHUP knows the verdict is for its request once requested_usec is
  not older than that reading (cli.py `reload`). A config that needs other
  sockets or another number of workers is RESTRUCTURING first: the old
  workers hand their flows over and exit, new ones start on the new sockets.

  Readiness vs liveness: /livez is 200 while the supervisor answers; /healthz
  is 200 while every worker serves, no drain lasts and it is not stopping
  (process health); /readyz (and edge_relay_ready) add that calls can be
  routed: every serving worker's probes see at least one transceiver up (a
  backup is one too).

  Restart is a hand-over, drain an operator's action. SIGTERM -> STOPPING=1:
  every worker exits at once (STOP), sending its flow table; the snapshots go
  to the fd store as "flows<worker>" beside the sockets, BARRIER=1, exit 0.
  A slot whose worker sent none (killed after KILL_GRACE, dead meanwhile or
  waiting for its restart) stores what its crash journal holds instead.
  Nothing is refused on the way out: a datagram that arrives meanwhile waits
  in its socket's buffer for the next process. DRAIN_SIGNAL (SIGTTOU,
  `edge-relay drain`) takes the host out of the pool: /healthz and /readyz
  503 at once, new flows accepted for relay.drain_seconds more (while the
  health checker and routing withdraw the host), then refused (DRAINING);
  existing flows keep forwarding and the relay keeps running. The drain
  lasts across reloads and restarts (a "drain" record in the fd store) until
  UNDRAIN_SIGNAL (SIGTTIN, `edge-relay drain --cancel`) or `systemctl stop`.

  The firewall follows accepted configs only: with $RUNTIME_DIRECTORY set
  (systemd's RuntimeDirectory=), the nftables ruleset of every accepted
  config is written to $RUNTIME_DIRECTORY/edge-relay.nft (atomically) at
  start and after a verdict "ok"; a refused config never reaches it.

  systemd (sdnotify.py): READY=1 once every worker serves; STATUS= every few
  seconds; SIGHUP -> RELOADING=1 (+MONOTONIC_USEC), then READY=1 with the
  verdict; SIGTERM -> STOPPING=1 and the hand-over above. WATCHDOG=1 is
  sent at half $WATCHDOG_USEC only while every worker is up.

  Upgrade in place (upgrade.py, reexec.py): SIGUSR2 -> UPGRADING, RELOADING=1;
  the new code on disk is checked in a child, then this process execve()s it
  with its sockets, workers and state; the new image replaces the workers one
  at a time with their flows and sends READY=1 with the verdict, kept in
  `last_upgrade` (GET /status) like a reload's.

  Signals arrive through signal.set_wakeup_fd and are handled in the loop
  (reexec.HANDLED; held blocked across an upgrade's execve until handled).
"""

import hashlib
import json
import os
import select
import selectors
import signal
import socket
import time

from . import __version__, config as config_mod, httpd, metrics, reexec, sdnotify, upgrade, workerproc
from .control import STOP, UNDRAIN, encode_drain, encode_reload, encode_report_flows
from .errors import EdgeRelayError, StartupError, reason
from .fdstore import FdStore, bind_sockets, structure, worker_sockets
from .journal import Journal
from .lifecycle import CRASH_WINDOW, Drain, Lifecycle, Phase, steady
from .log import Log
from .worker import client_filter, flow_table, journal_memory
from .workerproc import DRAIN_SIGNAL, UNDRAIN_SIGNAL, Slot, WorkerSpec, send

HEARTBEAT_STALE = 5.0       # seconds without a publication before a worker counts as down
STATUS_INTERVAL = 2.0       # seconds between STATUS= updates
RELOAD_ACK_TIMEOUT = 5.0    # verdict "failed" if a worker does not run the new generation by then
RULESET_FILE = "edge-relay.nft"     # in $RUNTIME_DIRECTORY: the accepted config's nftables ruleset
KILL_GRACE = 5.0            # SIGKILL a worker that has not exited this long after STOP
TICK_MAX = 0.5              # the loop wakes at least this often (heartbeats are read, not pushed)
STARTING_POLL = 0.005       # while starting, look for the workers' first heartbeats this often (READY=1)
FLOWS_LIMIT_MAX = 10000     # GET /flows?limit= at most this many flows in one answer
FLOWS_REPORT_TIMEOUT = 1.0  # GET /flows waits this long for the workers' reports at most


def run(config_path, cfg, workers=None):
    log = Log(level=cfg.log.level)
    keyring = config_mod.load_keys(cfg)
    for key, text in config_mod.warnings(cfg):
        log.warning("config.warning", "%s: %s", key, text)
    sup = Supervisor(config_path, cfg, keyring, log, workers=workers)
    try:
        return sup.run()
    finally:
        sup.close()


def _usec(now):
    """CLOCK_MONOTONIC microseconds of a time.monotonic() reading (the clock of /status's *_usec)."""
    return int(now * 1_000_000)


def config_digest(path):
    """sha256 hex of the config file's bytes ("" if unreadable): what /status says is running."""
    try:
        # the loader's bounded read: a FIFO or /dev/zero put there must not hang the supervisor
        return hashlib.sha256(config_mod.read_bounded(path, "config")).hexdigest()
    except EdgeRelayError:
        return ""


class Supervisor:
    def __init__(self, config_path, cfg, keyring, log, *, workers=None, env=os.environ,
                 clock=time.monotonic, wall=time.time):
        self.config_path = config_path
        self.cfg = cfg
        self.keyring = keyring
        self.log = log
        self.clock = clock
        self.wall = wall
        self.workers_override = workers
        self.n = workers or cfg.effective_workers()
        self.notifier = sdnotify.Notifier(env)
        try:
            self.watchdog = sdnotify.watchdog_interval(env)
        except ValueError as exc:
            log.warning("watchdog", "ignoring the watchdog: %s", exc)
            self.watchdog = None
        self.life = Lifecycle(self._phase_changed, clock())
        self.generation = 1
        self.reloads = 0
        self.reload_failures = 0
        self.config_sha256 = config_digest(config_path) if config_path else ""
        self.runtime_dir = env.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        self.last_reload = {"state": "none", "generation": 1, "requested_usec": 0, "finished_usec": 0,
                            "reason": ""}
        self.last_reload_success = wall()           # wall clock of the last accepted config (start counts)
        self.last_reload_ok = True
        self._pending = None                        # (cfg, sha256) of the reload awaiting its verdict
        self.restarts = 0
        self.stop_deadline = None
        self.reload_deadline = None
        self.restructure = None
        self.sel = selectors.DefaultSelector()
        self.http = None
        self.socks = {}
        self.by_pid = {}
        self._wake = None
        self._drain_cancelled = None
        self._last_status = (0.0, 0)
        self._next_status = self._next_watchdog = 0.0
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
        self.fdstore = FdStore(self.notifier, log)
        self.upgrades = self.upgrade_failures = 0
        self.last_upgrade = upgrade.no_upgrade()
        self.upgrader = upgrade.Upgrader(self)
        self.shared = self.extra = None
        self.journals = {}          # slot index -> worker.JournalMemory (or None), made at its first spawn
        self.drain = None           # the operator's drain (lifecycle.Drain) while it lasts
        taken = self.upgrader.take_over(env, cfg, clock())     # after an upgrade's execve: the old image's state
        if taken is None:
            self.socks, stored_flows = self.fdstore.adopt(env, cfg, self.n)
            if self.fdstore.adopted_drain is not None:
                try:
                    self.drain = Drain.decode(self.fdstore.adopted_drain)
                    log.notice("drain", "still draining (since before this process started): "
                               "edge-relay drain --cancel ends it")
                except ValueError as exc:
                    log.warning("fdstore", "stored drain record ignored: %s", exc)
        else:
            self.socks, stored_flows = taken
        if self.shared is None:
            self.shared = metrics.SharedCounters(self.n)
            self.extra = metrics.ExtraShared(self.n)
            self.slots = [Slot(i, self.cpus[i % len(self.cpus)]) for i in range(self.n)]
        for i, data in stored_flows.items():
            if i < self.n:
                self.slots[i].restore = data
        if cfg.management.enabled:
            m = cfg.management
            try:
                sock = self.upgrader.management_socket(m) or httpd.listen(m.address, m.port)
            except OSError as exc:
                raise StartupError(f"management {m.address}:{m.port}: cannot listen: "
                                   f"{exc.strerror or exc}") from None
            self.http = httpd.Server(sock, self.sel, {"/metrics": self._metrics, "/healthz": self._healthz,
                                                      "/livez": self._livez, "/readyz": self._readyz,
                                                      "/status": self._status,
                                                      "/flows": httpd.with_query(self._flows)})

    @property
    def phase(self):
        return self.life.phase

    def _phase_changed(self, old, new, why):
        self.log.info("phase", "%s -> %s%s", old.value, new.value, f": {why}" if why else "")

    # -- workers ----------------------------------------------------------------

    def _spawn(self, slot, now, on_ctl=None):
        """Fork `slot`'s worker. With `on_ctl`: an upgrade's new worker beside the running one (upgrade.py),
        built but waiting for TAKE, its channel read by `on_ctl` and its pid not yet the slot's."""
        listeners, internal = worker_sockets(self.socks, self.cfg, slot.index)
        if slot.index not in self.journals:
            self.journals[slot.index] = journal_memory(self.cfg, slot.index, self.log)
        journal = self.journals[slot.index]
        spec = WorkerSpec(cfg=self.cfg, keyring=self.keyring, config_path=self.config_path,
                          generation=self.generation, listeners=listeners, internal=internal,
                          shared=self.shared, extra=self.extra,
                          refuse_at=self.drain.refuse_at if self.drain is not None else None,
                          await_turn=on_ctl is not None, journal=journal)
        ours = workerproc.spawn(slot, spec, lambda: self._close_in_child(listeners, internal, journal), now)
        if on_ctl is not None:
            self.sel.register(ours, selectors.EVENT_READ, on_ctl)
            return
        self.by_pid[slot.pid] = slot
        self.sel.register(ours, selectors.EVENT_READ, lambda s=slot: self._read_ctl(s))

    def _close_in_child(self, listeners, internal, journal):
        """In a fresh worker: close every fd of the supervisor's that is not that worker's."""
        mine = {id(s) for s in (*listeners, internal)}
        self.sel.close()
        if self.http is not None:
            for c in list(self.http.conns):
                c.close()
            self.http.sock.close()
        for s in self._wake:
            s.close()
        for other in self.slots:
            if other.ctl is not None:
                other.ctl.close()
            if other.handed is not None:
                os.close(other.handed)
        for sock in self.socks.values():
            if id(sock) not in mine:
                sock.close()
        self._close_journals(keep=journal)
        self.upgrader.close_in_child()

    def _read_ctl(self, slot):
        if slot.ctl is not None and not workerproc.read_ctl(slot, self.log):
            self._close_ctl(slot)

    def _close_ctl(self, slot):
        self.sel.unregister(slot.ctl)
        slot.ctl.close()
        slot.ctl = None

    def _send_all(self, msg):
        for slot in self.slots:
            if slot.ctl is not None:
                send(slot.ctl, msg)

    def _reap(self, now):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.by_pid.pop(pid, None)
            if slot is None:
                continue
            self._read_ctl(slot)
            if slot.ctl is not None:
                self._close_ctl(slot)
            self.shared.retire(slot.index)
            self.extra.clear(slot.index)
            slot.pid = None
            code = os.waitstatus_to_exitcode(status)
            how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            if self.life.stopping or slot.asked_to_stop:
                self.log.info("worker.exit", "worker %d (pid %d) exited: %s", slot.index, pid, how)
                continue
            if slot.handed is not None:     # it left on its own (a stray SIGTERM): keep its flows
                slot.restore = workerproc.take_handed(slot)
            elif not slot.restore:          # an upgrade's new worker that died taking over: the flows it got
                slot.restore = self.upgrader.kept_flows(slot)
            delay, looping, began = slot.restarts.died(now)
            if began:
                self.log.err("worker.crash-loop", "worker %d died %d times in %.0f s: crash loop, "
                             "restarting it in %.1f s", slot.index, len(slot.restarts.deaths), CRASH_WINDOW,
                             delay)
            if looping:
                self.notifier.status(self._status_text(now))
            self.log.err("worker.died", "worker %d (pid %d) died (%s); restart in %.1f s",
                         slot.index, pid, how, delay)

    def up(self, now=None):
        """Indexes of workers that serve: alive with a fresh heartbeat (at `now`, time.monotonic() seconds)."""
        now_ns = metrics.monotonic_ns() if now is None else int(now * 1e9)
        stale = int(HEARTBEAT_STALE * 1e9)
        out = set()
        for slot in self.slots:
            if slot.pid is None:
                continue
            hb = self.shared.words[slot.index * metrics.SLOT_WORDS + metrics.HEARTBEAT]
            if hb and now_ns - hb < stale:
                out.add(slot.index)
        return out

    def healthy(self, now=None):
        """Every worker serves (process health: the watchdog's and READY=1's test; a drain does not count)."""
        return self.phase in (Phase.STARTING, Phase.SERVING, Phase.RELOADING, Phase.DRAINING, Phase.UPGRADING) and \
            len(self.up(now)) == self.n

    def readiness(self, now=None):
        """(ready, why): healthy, and every serving worker's probes see a transceiver up.

        A worker without probes (probes.enabled = false) cannot tell, and counts as able to route.
        """
        if self.life.stopping:
            return False, "stopping"
        if self.drain is not None:
            return False, "draining"
        if self.phase is Phase.RESTRUCTURING:
            return False, "handing the flows to new workers"
        up = self.up(now)
        if len(up) < self.n:
            return False, f"{len(up)}/{self.n} workers up"
        for i in sorted(up):
            tx = (self.extra.read(i) or {}).get("tx")
            if tx is not None and not any(h["up"] for h in tx.values()):
                return False, f"worker {i}: every transceiver is down (probes)"
        return True, "ready"

    # -- reload and stop ----------------------------------------------------------

    def reload(self, now):
        requested = _usec(now)
        if self.phase in (Phase.STARTING, Phase.STOPPING, Phase.STOPPED, Phase.RESTRUCTURING, Phase.UPGRADING):
            # no RELOADING=1: systemd is told of starting or stopping, or waits for the pending reload's
            # (or upgrade's) READY=1
            busy = {Phase.STARTING: "starting: the workers do not all serve yet",
                    Phase.RESTRUCTURING: "a previous reload is still handing flows to new workers",
                    Phase.UPGRADING: "an upgrade is under way"}
            return self._refuse(now, requested, f"not now: {busy.get(self.phase, 'stopping')}", notify=False)
        self.notifier.reloading()
        try:
            cfg, keyring = config_mod.load_with_keys(self.config_path)
        except Exception as exc:  # noqa: BLE001 - no config, however broken, may end the supervisor
            return self._refuse(now, requested, reason(exc))
        sha = config_digest(self.config_path)
        n = self.workers_override or cfg.effective_workers()
        if structure(cfg, n) != structure(self.cfg, self.n):
            try:
                pool = dict(self.socks)
                socks, fresh = bind_sockets(cfg, n, pool)
            except (StartupError, ValueError) as exc:
                return self._refuse(now, requested, reason(exc))
            self.restructure = (cfg, keyring, n, socks, fresh, pool)
            for slot in self.slots:
                slot.restarts.cancel()
                if slot.pid is not None:
                    slot.asked_to_stop = True
            self._send_all(STOP)
            self.life.set(Phase.RESTRUCTURING, now, "listeners or workers changed: handing the flows to "
                                                    "new workers")
            self.log.notice("reload", "listeners or workers changed: handing the flows to new workers")
        if cfg.management != self.cfg.management:
            self.log.warning("reload", "management address changes take effect at the next restart")
        self.cfg, self.keyring = cfg, keyring
        self.log.set_level(cfg.log.level)
        self.generation += 1
        if self.restructure is None:
            for slot in self.slots:
                slot.reload_failed = None
            self._send_all(encode_reload(self.generation))
            self.life.set(Phase.RELOADING, now, f"generation {self.generation} sent to the workers")
        self.reload_deadline = now + RELOAD_ACK_TIMEOUT
        self._pending = (cfg, sha)
        self.last_reload = {"state": "pending", "generation": self.generation, "requested_usec": requested,
                            "finished_usec": 0, "reason": ""}
        self.log.verdict("notice", "config generation %d: %d transceivers, signing key %d",
                         self.generation, len(cfg.transceivers), keyring.signing.key_id)
        return True

    def _refuse(self, now, requested, reason, notify=True):
        self.reload_failures += 1
        self.last_reload_ok = False
        # loading the config took time: the verdict's own time, not the request's
        self.last_reload = {"state": "refused", "generation": self.generation, "requested_usec": requested,
                            "finished_usec": _usec(self.clock()), "reason": reason}
        self.log.verdict("err", "reload refused, keeping config generation %d: %s", self.generation, reason)
        if notify:
            self.notifier.ready(f"reload refused: {reason}; " + self._status_text(now))
        return False

    def _settle_reload(self, now):
        """The verdict of the pending reload, once every worker runs the new generation (or cannot)."""
        if self.phase is not Phase.RELOADING:
            return
        failed = [(s.index, s.reload_failed) for s in self.slots if s.reload_failed]
        up = self.up(now)
        behind = [s.index for s in self.slots if s.pid is None or s.index not in up or
                  self.shared.words[s.index * metrics.SLOT_WORDS + metrics.GENERATION] != self.generation]
        if failed:
            reason = "; ".join(f"worker {i} kept its old config: {why}" for i, why in failed)
        elif behind and now >= self.reload_deadline:
            reason = (f"worker(s) {', '.join(map(str, behind))} did not run generation {self.generation} "
                      f"within {RELOAD_ACK_TIMEOUT:.0f} s")
        elif behind:
            return
        else:
            reason = ""
        cfg, sha = self._pending
        self._pending = None
        self.reload_deadline = None
        v = dict(self.last_reload, state="failed" if reason else "ok", finished_usec=_usec(now), reason=reason)
        self.last_reload = v
        self.last_reload_ok = not reason
        self.life.set(steady(self.drain), now, f"reload of generation {self.generation} "
                                               f"{'failed' if reason else 'ok'}")
        if reason:
            self.reload_failures += 1
            self.log.verdict("err", "reload of generation %d failed: %s", self.generation, reason)
            self.notifier.ready(f"reload failed: {reason}; " + self._status_text(now))
            return
        self.reloads += 1
        self.config_sha256 = sha
        self.last_reload_success = self.wall()
        self.write_ruleset(cfg)
        self.log.verdict("notice", "every worker runs config generation %d", self.generation)
        self.notifier.ready(self._status_text(now))

    def _settle_now(self, now):
        # Whoever reads the workers' generations (a scrape, /status) reads the
        # verdict they imply, not the one of the previous tick.
        self._settle_reload(now)

    def write_ruleset(self, cfg):
        """The accepted config's nftables ruleset to $RUNTIME_DIRECTORY/edge-relay.nft (atomic)."""
        if self.runtime_dir is None:
            return
        from . import nft  # after the workers are forked (run): not on the way to the first packet
        path = os.path.join(self.runtime_dir, RULESET_FILE)
        try:
            text = nft.render_relay(cfg)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.chmod(path + ".tmp", 0o644)
            os.replace(path + ".tmp", path)
        except (OSError, ValueError) as exc:
            self.log.warning("nft", "cannot write %s: %s", path, exc)

    def _apply_restructure(self, now):
        cfg, keyring, n, socks, fresh, pool = self.restructure
        self.restructure = None
        handed = {}
        for slot in self.slots:     # every worker is gone: what each slot has for its next one
            if slot.handed is not None:
                handed[slot.index] = workerproc.take_handed(slot)
            else:   # dead before the reload (a restart's flows, or its crash journal's) or while handing over
                handed[slot.index] = slot.restore or self._journaled_flows(slot.index, now)
        self.fdstore.retire(pool)           # old sockets the new config does not use
        self.socks = socks
        self.fdstore.store_sockets(socks, fresh)
        old = metrics.totals(self.shared)
        self.shared.close()
        self.shared = metrics.SharedCounters(n)
        self.shared.base[0] = old.stats + old.drops + old.journal
        self.extra.close()
        self.extra = metrics.ExtraShared(n)
        self.n = n
        self._close_journals()              # listener indexes may mean other sockets now: start afresh
        self.slots = [Slot(i, self.cpus[i % len(self.cpus)]) for i in range(n)]
        for i, data in handed.items():
            if i < n:
                self.slots[i].restore = data
        self.reload_deadline = now + RELOAD_ACK_TIMEOUT
        self.life.set(Phase.RELOADING, now, f"{n} new workers start on the new sockets")
        for slot in self.slots:
            self._spawn(slot, now)

    def begin_stop(self, now):
        """SIGTERM: hand over, do not drain. Every worker exits at once and sends its flow table; the
        sockets stay in the fd store, so what arrives meanwhile waits in their buffers for the next
        process. Nothing is refused on the way out."""
        if self.life.stopping:
            return
        if self.phase is Phase.UPGRADING:
            self.upgrader.abort("stopped (SIGTERM) during the upgrade", now)
        self._settle_reload(now)            # the verdict the workers' generations already imply, if any
        if self.last_reload["state"] == "pending":
            # every SIGHUP gets one verdict: `edge-relay reload` waits for it, not for a timeout
            why = "stopped (SIGTERM) before every worker ran it (the next start reads the config file again)"
            self._pending = self.reload_deadline = None
            self.reload_failures += 1
            self.last_reload_ok = False
            self.last_reload = dict(self.last_reload, state="failed", finished_usec=_usec(now), reason=why)
            self.log.verdict("err", "reload of generation %d failed: %s", self.generation, why)
        self.life.set(Phase.STOPPING, now, "SIGTERM: handing the sockets and flows to the next process")
        self.notifier.stopping(self._status_text(now))
        self.log.notice("stop", "stopping: %d workers hand their flows over and exit", len(self.by_pid))
        for slot in self.slots:
            slot.restarts.cancel()
        self._send_all(STOP)
        self.stop_deadline = now + KILL_GRACE

    # -- the operator's drain -------------------------------------------------------

    def begin_drain(self, now):
        """DRAIN_SIGNAL (edge-relay drain): /healthz 503 at once, new flows refused after relay.drain_seconds.

        Idempotent: a drain already under way keeps its times (only `requested` moves, which is what
        `edge-relay drain` waits for). Refused while stopping."""
        if self.life.stopping:
            self.log.verdict("err", "drain refused: the relay is stopping")
            return False
        if self.drain is None:
            grace = self.cfg.relay.drain_seconds
            self.drain = Drain(since=now, refuse_at=now + grace)
            self.fdstore.store_drain(self.drain.encode())
            self._send_all(encode_drain(self.drain.refuse_at))
            self.log.verdict("notice", "draining: /healthz and /readyz 503 now, new flows refused in %.1f s "
                             "(relay.drain_seconds), existing flows keep forwarding", grace)
            if self.phase is Phase.SERVING:
                self.life.set(Phase.DRAINING, now, "edge-relay drain")
        else:
            self.log.verdict("notice", "already draining (for %.0f s)", now - self.drain.since)
        self.drain.requested = now
        return True

    def cancel_drain(self, now):
        """UNDRAIN_SIGNAL (edge-relay drain --cancel): accept new flows again, /healthz as before."""
        self._drain_cancelled = now
        if self.drain is None:
            self.log.verdict("notice", "not draining: nothing to cancel")
            return True
        self.drain = None
        self.fdstore.remove_drain()
        self._send_all(UNDRAIN)
        self.log.verdict("notice", "drain cancelled: accepting new flows")
        if self.phase is Phase.DRAINING:
            self.life.set(Phase.SERVING, now, "edge-relay drain --cancel")
        return True

    def drain_status(self, now, flows):
        """The "drain" part of /status (edge-relay drain waits on it)."""
        d = self.drain
        doc = {"active": d is not None, "cancelled_usec": _usec(self._drain_cancelled)
               if self._drain_cancelled is not None else 0, "flows": flows}
        if d is not None:
            doc.update(since_usec=_usec(d.since), requested_usec=_usec(d.requested),
                       refuse_usec=_usec(d.refuse_at), refusing=d.refusing(now))
        return doc

    def _finish(self, now):
        kept = 0
        for slot in self.slots:
            if slot.handed is None and not slot.restore:
                # it did not hand over (killed after KILL_GRACE, died while stopping, or was waiting for
                # its restart): its crash journal holds its confirmed flows, and no worker writes it now
                slot.restore = self._journaled_flows(slot.index, now)
            if slot.handed is None and slot.restore:
                # a dead worker's flows, waiting for its restart: the next process restarts it
                slot.handed = sdnotify.memfd_write(f"edge-relay-flows{slot.index}", slot.restore)
            if slot.handed is None:
                continue
            if self.fdstore.store_flows(slot.index, slot.handed):
                kept += 1
            os.close(slot.handed)
            slot.handed = None
        if self.notifier.enabled:
            self.fdstore.barrier()
            self.log.notice("stop", "stopped; flows of %d workers kept in the fd store", kept)
        else:
            self.log.notice("stop", "stopped")
        self.life.set(Phase.STOPPED, now, "every worker is gone")

    def _journaled_flows(self, index, now):
        """Slot `index`'s crash journal as flow snapshot bytes (None when it holds no flow); only while
        no worker of the slot runs."""
        memory = self.journals.get(index)
        if memory is None:
            return None
        table = flow_table(self.cfg)
        Journal(memory.map).attach(table, now)
        data = table.snapshot(now) if len(table) else None
        table.journal = None            # the last view of the mapping goes with it: close() may unmap
        return data

    # -- status, metrics, health ----------------------------------------------------

    def totals(self, now=None):
        now = self.clock() if now is None else now
        self._settle_now(now)
        up = self.up(now)
        t = metrics.totals(self.shared, up)
        t.extra = [self.extra.read(i) for i in sorted(up)]
        t.worker_restarts = self.restarts
        t.crash_looping = sum(1 for s in self.slots if s.restarts.crash_loop)
        t.reloads = self.reloads
        t.reload_failures = self.reload_failures
        t.generation = self.generation
        t.ready = self.readiness(now)[0]
        t.last_reload_ok = int(self.last_reload_ok)
        t.last_reload_success = self.last_reload_success
        t.flows_max = self.cfg.limits.max_flows
        t.processes = [("supervisor", os.getpid())] + [(str(s.index), s.pid) for s in self.slots if s.pid]
        t.sockets = [(name, os.fstat(sock.fileno()).st_ino) for name, sock in sorted(self.socks.items())]
        return t

    def _status_text(self, now):
        t = self.totals(now)
        packets = t.stats[0] + t.stats[4]
        last_time, last_packets = self._last_status
        pps = (packets - last_packets) / (now - last_time) if last_time and now > last_time else 0.0
        self._last_status = (now, packets)
        text = (f"{t.workers_up}/{t.workers} workers up, {t.flows_pending + t.flows_confirmed} flows, "
                f"{pps:.0f} pps, config generation {self.generation}")
        if t.crash_looping:
            text += f"; {t.crash_looping} workers in a crash loop"
        if self.life.stopping:
            text = "stopping: " + text
        elif self.drain is not None:
            text = "draining: " + text
        return text

    def _metrics(self):
        return 200, metrics.CONTENT_TYPE, metrics.render(self.totals(self.clock())).encode("utf-8")

    def _flows(self, query):
        """GET /flows?limit=N&transceiver=ID|NAME&state=pending|confirmed&client=ADDR|CIDR: live flows as JSON.

        Asks every serving worker (REPORT_FLOWS) and waits for their answers for at most
        FLOWS_REPORT_TIMEOUT; a worker that does not answer in time is counted in "missing"."""
        def one(name, default=None):
            values = query.get(name)
            return values[-1] if values else default
        try:
            limit = int(one("limit", "100"))
            if not 1 <= limit <= FLOWS_LIMIT_MAX:
                raise ValueError
        except ValueError:
            return 400, "text/plain", f"limit: expected 1..{FLOWS_LIMIT_MAX}\n".encode()
        state = one("state")
        if state not in (None, "pending", "confirmed"):
            return 400, "text/plain", b"state: expected pending or confirmed\n"
        tx = one("transceiver")
        if tx is not None:
            ids = {t.name: t.id for t in self.cfg.transceivers}
            if tx in ids:
                tx = ids[tx]
            elif tx.isdigit() and int(tx) in ids.values():
                tx = int(tx)
            else:
                return 400, "text/plain", f"transceiver: {tx[:64]!r} is not a configured name or id\n".encode()
        client = one("client")
        if client is not None:
            try:
                client_filter(client)
            except ValueError:
                return 400, "text/plain", b"client: expected an address, address:port or network (CIDR)\n"
        try:
            request = encode_report_flows(limit, tx, state, client)
        except ValueError:
            return 400, "text/plain", b"client: too long\n"
        now = self.clock()
        asked = [self.slots[i] for i in sorted(self.up(now)) if self.slots[i].ctl is not None]
        for slot in asked:
            slot.report = None
            send(slot.ctl, request)
        # the one blocking wait of the supervisor: bounded, and only for this request
        deadline = now + FLOWS_REPORT_TIMEOUT
        waiting = list(asked)
        while waiting:
            left = deadline - self.clock()
            if left <= 0:
                break
            ready, _, _ = select.select([s.ctl for s in waiting], [], [], left)
            for slot in [s for s in waiting if s.ctl in ready]:
                self._read_ctl(slot)
            waiting = [s for s in waiting if s.report is None and s.ctl is not None]
        flows, matched = [], 0
        for slot in asked:
            if slot.report is None:
                continue
            matched += slot.report["matched"]
            flows += [dict(f, worker=slot.index) for f in slot.report["flows"]]
        flows.sort(key=lambda f: (f["idle"] is None, f["idle"] or 0.0, f["client"]))
        doc = {"matched": matched, "shown": min(limit, len(flows)), "flows": flows[:limit],
               "workers": len(asked) - len(waiting), "missing": len(waiting)}
        return 200, "application/json", (json.dumps(doc, indent=1) + "\n").encode()

    def _healthz(self):
        now = self.clock()
        if self.life.stopping:
            return 503, "text/plain", b"stopping\n"
        if self.drain is not None:
            return 503, "text/plain", b"draining\n"
        if not self.life.started or not self.healthy(now):
            return 503, "text/plain", b"not ready\n"
        return 200, "text/plain", b"ok\n"

    def _livez(self):
        return 200, "text/plain", b"alive\n"

    def _readyz(self):
        ready, why = self.readiness(self.clock())
        if ready and not self.life.started:
            ready, why = False, "starting"
        return (200 if ready else 503), "text/plain", (why + "\n").encode("utf-8")

    def status(self, now=None):
        """The document GET /status answers (docs: edge-relay(8), STATUS)."""
        now = self.clock() if now is None else now
        self._settle_now(now)
        ready, why = self.readiness(now)
        started = self.life.started
        t = metrics.totals(self.shared, self.up(now))
        return {"pid": os.getpid(), "generation": self.generation, "workers": self.n,
                "workers_up": t.workers_up, "workers_generation": t.workers_generation,
                "healthy": self.healthy(now), "ready": ready and started,
                "ready_reason": why if started else "starting", "draining": self.drain is not None,
                "phase": self.phase.value, "drain": self.drain_status(now, t.flows_pending + t.flows_confirmed),
                "config": {"path": str(self.config_path), "sha256": self.config_sha256},
                "reloads": self.reloads, "reload_failures": self.reload_failures,
                "last_reload": dict(self.last_reload), "now_usec": _usec(now),
                "version": __version__, "upgrades": self.upgrades, "upgrade_failures": self.upgrade_failures,
                "last_upgrade": dict(self.last_upgrade)}

    def _status(self):
        return 200, "application/json", (json.dumps(self.status(), sort_keys=True) + "\n").encode("utf-8")

    # -- the loop -----------------------------------------------------------------

    def _on_signal(self):
        signums = set(self._wake[0].recv(256))
        now = self.clock()
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            self.begin_stop(now)
        if signal.SIGCHLD in signums:
            self._reap(now)
        if signal.SIGHUP in signums:
            self.reload(now)
        if signal.SIGUSR2 in signums:
            self.upgrader.request(now)
        if DRAIN_SIGNAL in signums:
            self.begin_drain(now)
        if UNDRAIN_SIGNAL in signums:
            self.cancel_drain(now)

    def _tick(self, now):
        """Everything due at `now`; returns the time of the next thing due (the loop waits until then)."""
        deadlines = [now + TICK_MAX]
        phase = self.phase
        if phase is Phase.STOPPING:
            if not self.by_pid:
                self._finish(now)
                return now
            if now >= self.stop_deadline:
                for pid in self.by_pid:
                    self.log.err("stop", "worker pid %d did not stop in time: killing it", pid)
                    os.kill(pid, signal.SIGKILL)
                self.stop_deadline = now + KILL_GRACE
            deadlines.append(self.stop_deadline)
        elif phase is Phase.RESTRUCTURING:
            if not self.by_pid:
                self._apply_restructure(now)
        elif phase is not Phase.STOPPED:
            self._tend_workers(now, deadlines)
            self.upgrader.tick(now, deadlines)
            healthy = self.healthy(now)
            if phase is Phase.STARTING:
                deadlines.append(now + STARTING_POLL)
            if healthy and phase is Phase.STARTING:
                self.life.set(steady(self.drain), now, f"every one of {self.n} workers serves")
                self.notifier.ready(self._status_text(now))
                self._next_status = now + STATUS_INTERVAL
                self.log.notice("ready", "serving with %d workers", self.n)
            if self.phase is Phase.RELOADING:
                self._settle_reload(now)
                if self.phase is Phase.RELOADING:
                    deadlines.append(min(self.reload_deadline, now + 0.05))
            if self.watchdog is not None and now >= self._next_watchdog:
                if healthy:
                    self.notifier.watchdog()
                self._next_watchdog = now + self.watchdog
        if now >= self._next_status:
            if self.life.started:
                self.notifier.status(self._status_text(now))
            self._next_status = now + STATUS_INTERVAL
        deadlines.append(self._next_status)
        if self.watchdog is not None:
            deadlines.append(self._next_watchdog)
        if self.http is not None:
            nearest = self.http.expire()
            if nearest is not None:
                deadlines.append(nearest)
        self.log.flush()
        return min(deadlines)

    def _tend_workers(self, now, deadlines):
        """Restart the dead workers whose backoff is over; say when a crash loop has ended."""
        for slot in self.slots:
            if slot.restarts.due(now):
                self.restarts += 1
                self.log.notice("worker.restart", "restarting worker %d", slot.index)
                self._spawn(slot, now)
            elif slot.restarts.restart_at is not None:
                deadlines.append(slot.restarts.restart_at)
            elif slot.pid is not None and slot.restarts.stable(slot.started, now):
                self.log.notice("worker.crash-loop", "worker %d is stable again", slot.index)

    def run(self):
        self._wake = socket.socketpair()
        for s in self._wake:
            s.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(self._wake[1].fileno(), warn_on_full_buffer=False)
        old = {sig: signal.signal(sig, lambda *_: None) for sig in reexec.HANDLED}
        reexec.unblock()        # held across an upgrade's execve until these handlers were in place
        self.sel.register(self._wake[0], selectors.EVENT_READ, self._on_signal)
        now = self.clock()
        self._next_status = now + STATUS_INTERVAL
        self._next_watchdog = now
        self.log.info("start", "supervisor %d: %d workers, %d listeners, management %s",
                      os.getpid(), self.n, len(self.cfg.listeners),
                      f"{self.cfg.management.address}:{self.cfg.management.port}"
                      if self.http is not None else "off")
        try:
            # the workers first: they are what callers wait for after a restart
            for slot in self.slots:
                if slot.pid is None:        # not a worker taken over by an upgrade
                    self._spawn(slot, now)
            self.write_ruleset(self.cfg)
            self.upgrader.start(now)
            timeout = 0.0
            while self.phase is not Phase.STOPPED:
                for key, _ in self.sel.select(timeout):
                    key.data()
                timeout = max(0.0, self._tick(self.clock()) - self.clock())
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            for pid in list(self.by_pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except OSError:
                    pass
        return 0

    def close(self):
        if self.http is not None:
            self.http.close()
        self.sel.close()
        for sock in self.socks.values():
            sock.close()
        if self._wake:
            for s in self._wake:
                s.close()
        self.shared.close()
        self.extra.close()
        self._close_journals()

    def _close_journals(self, keep=None):
        for memory in self.journals.values():
            if memory is not None and memory is not keep:
                memory.close()
        self.journals = {}
