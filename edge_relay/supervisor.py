"""Process model: the supervisor owns the sockets and runs one pinned worker per core.

Theory of operation
  The supervisor validates the config and keys, creates (or takes back from
  systemd's fd store) every socket: one SO_REUSEPORT socket per worker per
  listener ("l<listener>w<worker>") and one internal socket per worker
  ("i<worker>", port internal.port + worker). It holds them for its whole
  life, so the reuseport group never changes when a worker dies: datagrams
  for a dead worker's socket wait in that socket's buffer for its successor.

  Each worker is a fork()ed child pinned to one CPU, running worker.Worker
  over its own sockets, with a SOCK_SEQPACKET control channel:
    supervisor -> worker   b"reload <generation>"  re-read config and keys (already
                                      validated); on success the worker runs and
                                      publishes that generation
                           b"drain"   refuse new flows, forward the rest, exit
                           b"stop"    exit now (hand-over to a new worker)
                           b"report-flows" + JSON filters: answer b"flow-report" +
                           a memfd with the matching flows (GET /flows; bounded)
    worker -> supervisor   b"reloaded" / b"reload-failed <reason>"
                           b"flows" + a memfd (SCM_RIGHTS) with the flow table
                           snapshot, sent as the worker exits
  Counters and the heartbeat go through metrics.SharedCounters (no per-packet
  IPC). A worker is "up" while its heartbeat is fresher than HEARTBEAT_STALE.

  A worker that dies unasked is restarted on the same sockets after an
  exponential backoff; CRASH_LIMIT deaths within CRASH_WINDOW seconds is a
  crash loop: logged, counted, shown in STATUS=, and backed off up to
  BACKOFF_MAX. Its confirmed flows are not lost: each slot has a crash
  journal (journal.py), a memfd the supervisor makes before the slot's first
  fork and holds, which the worker writes at every flow transition and its
  successor restores before reading its first datagram (worker.start_flows).

  Reload verdicts. Every SIGHUP gets one verdict, kept in `last_reload` and
  shown by GET /status and /metrics: "pending" from the moment the
  supervisor takes the signal (requested_usec, CLOCK_MONOTONIC, the clock
  `edge-relay reload` and systemd's MONOTONIC_USEC use), then "refused"
  (the config or keys did not validate: the reason, the old generation keeps
  serving), "failed" (a worker kept its old config or did not publish the
  new generation within RELOAD_ACK_TIMEOUT) or "ok" (every worker publishes
  the new generation in its slot). A requester that read the clock before
  sending SIGHUP knows the verdict is for its request once requested_usec is
  not older than that reading (cli.py `reload`).

  Readiness vs liveness: /livez is 200 while the supervisor answers; /healthz
  is 200 while every worker serves and nothing drains (process health);
  /readyz (and edge_relay_ready) add that calls can be routed: every serving
  worker's probes see at least one transceiver up (a backup is one too).

  The firewall follows accepted configs only: with $RUNTIME_DIRECTORY set
  (systemd's RuntimeDirectory=), the nftables ruleset of every accepted
  config is written to $RUNTIME_DIRECTORY/edge-relay.nft (atomically) at
  start and after a verdict "ok"; a refused config never reaches it.

  systemd (sdnotify.py): READY=1 once every worker serves; STATUS= every few
  seconds; SIGHUP -> RELOADING=1 (+MONOTONIC_USEC), then READY=1 with the
  verdict; SIGTERM -> STOPPING=1, /healthz 503, workers drain
  for relay.drain_seconds (or until no flow is left), their flow snapshots
  go to the fd store as "flows<worker>", BARRIER=1, exit 0. WATCHDOG=1 is
  sent at half $WATCHDOG_USEC only while every worker is up.
  At start, stored sockets whose family and address match the config are
  reused (they were never closed: no datagram is lost across a restart),
  others are closed and bound again; stored flows go back to their worker.

  Signals arrive through signal.set_wakeup_fd and are handled in the loop.
"""

import collections
import hashlib
import ipaddress
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback

from . import config as config_mod, httpd, metrics, nft, sdnotify, sockets
from .errors import EdgeRelayError, StartupError, reason
from .log import Log
from .worker import Worker, client_filter, journal_memory, start_flows

HEARTBEAT_STALE = 5.0       # seconds without a publication before a worker counts as down
STATUS_INTERVAL = 2.0       # seconds between STATUS= updates
CRASH_WINDOW = 30.0         # deaths counted over this many seconds ...
CRASH_LIMIT = 5             # ... this many of them is a crash loop
BACKOFF_MIN = 0.1           # first restart delay; doubles with each death in the window
BACKOFF_MAX = 30.0
RELOAD_ACK_TIMEOUT = 5.0    # verdict "failed" if a worker does not run the new generation by then
RULESET_FILE = "edge-relay.nft"     # in $RUNTIME_DIRECTORY: the accepted config's nftables ruleset
KILL_GRACE = 5.0            # after drain_seconds, SIGKILL workers still running
CTL_MAX = 256
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


def structure(cfg, n):
    """What a reload cannot change without new sockets and new workers."""
    return (tuple((lst.address, lst.port) for lst in cfg.listeners), cfg.internal.address, cfg.internal.port, n)


def wanted_sockets(cfg, n):
    """[(name, address, port, reuseport, what)] for `n` workers, in a stable order."""
    out = []
    for w in range(n):
        for li, l in enumerate(cfg.listeners):
            out.append((f"l{li}w{w}", l.address, l.port, True, f"listeners[{li}]"))
        out.append((f"i{w}", cfg.internal.address, cfg.internal_port_for(w), False, "internal"))
    return out


def socket_matches(sock, address, port, reuseport):
    """True when `sock` is a UDP socket bound where the config wants it."""
    try:
        if sock.type != socket.SOCK_DGRAM or sock.family != sockets.family_of_ip_text(address):
            return False
        host, bound = sock.getsockname()[:2]
        if ipaddress.ip_address(host.split("%")[0]) != ipaddress.ip_address(address):
            return False
        if port and bound != port:
            return False
        if reuseport and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            return False
        if sock.family == socket.AF_INET6:
            dual = not reuseport and sockets.internal_dual_stack(address)
            if bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)) == dual:
                return False        # e.g. an IPv6-only internal socket stored by an older version
        return True
    except (OSError, ValueError):
        return False


def bind_sockets(cfg, n, pool):
    """({name: socket}, fresh names): reuse matching sockets from `pool` (taken out of it), bind the rest.

    On StartupError every socket bound here is closed and `pool` is unchanged.
    """
    r = cfg.relay
    socks, fresh = {}, []
    try:
        for name, address, port, reuseport, what in wanted_sockets(cfg, n):
            old = pool.get(name)
            if old is not None and socket_matches(old, address, port, reuseport):
                old.setblocking(False)
                socks[name] = old
                continue
            socks[name] = sockets.udp_socket(address, port, reuseport=reuseport, rcvbuf=r.recv_buffer_bytes,
                                             sndbuf=r.send_buffer_bytes, what=what,
                                             dual_stack=not reuseport and sockets.internal_dual_stack(address))
            fresh.append(name)
    except StartupError:
        for name in fresh:
            socks[name].close()
        raise
    for name, sock in socks.items():
        if name not in fresh:
            del pool[name]
    return socks, fresh


class Slot:
    """One worker position: its process, control channel and restart history."""

    def __init__(self, index, cpu):
        self.index = index
        self.cpu = cpu
        self.pid = None
        self.ctl = None
        self.started = 0.0
        self.deaths = collections.deque()
        self.restart_at = None
        self.crash_loop = False
        self.restore = None         # flow snapshot bytes for the next process
        self.handed = None          # memfd the last process sent as it exited
        self.asked_to_stop = False
        self.reload_failed = None   # the worker's reason when it kept its old config
        self.report = None          # the last b"flow-report" (GET /flows)


def _usec():
    return metrics.monotonic_ns() // 1000


def config_digest(path):
    """sha256 hex of the config file's bytes ("" if unreadable): what /status says is running."""
    try:
        # the loader's bounded read: a FIFO or /dev/zero put there must not hang the supervisor
        return hashlib.sha256(config_mod.read_bounded(path, "config")).hexdigest()
    except EdgeRelayError:
        return ""


class Supervisor:
    def __init__(self, config_path, cfg, keyring, log, *, workers=None, env=os.environ):
        self.config_path = config_path
        self.cfg = cfg
        self.keyring = keyring
        self.log = log
        self.workers_override = workers
        self.n = workers or cfg.effective_workers()
        self.notifier = sdnotify.Notifier(env)
        try:
            self.watchdog = sdnotify.watchdog_interval(env)
        except ValueError as exc:
            log.warning("watchdog", "ignoring the watchdog: %s", exc)
            self.watchdog = None
        self.generation = 1
        self.reloads = 0
        self.reload_failures = 0
        self.config_sha256 = config_digest(config_path) if config_path else ""
        self.runtime_dir = env.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        self.last_reload = {"state": "none", "generation": 1, "requested_usec": 0, "finished_usec": 0,
                            "reason": ""}
        self.last_reload_success = time.time()     # wall clock of the last accepted config (start counts)
        self.last_reload_ok = True
        self._pending = None                        # (cfg, sha256) of the reload awaiting its verdict
        self.restarts = 0
        self.stopping = False
        self.stop_deadline = None
        self.ready_sent = False
        self.reload_deadline = None
        self.restructure = None
        self.done = False
        self.sel = selectors.DefaultSelector()
        self.http = None
        self.socks = {}
        self.by_pid = {}
        self._wake = None
        self._last_status = (0.0, 0)
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
        self._adopt(env)
        self.shared = metrics.SharedCounters(self.n)
        self.extra = metrics.ExtraShared(self.n)
        self.slots = [Slot(i, self.cpus[i % len(self.cpus)]) for i in range(self.n)]
        self.journals = {}          # slot index -> worker.JournalMemory (or None), made at its first spawn
        for i, data in self._stored_flows.items():
            if i < self.n:
                self.slots[i].restore = data
        if cfg.management.enabled:
            m = cfg.management
            try:
                sock = httpd.listen(m.address, m.port)
            except OSError as exc:
                raise StartupError(f"management {m.address}:{m.port}: cannot listen: "
                                   f"{exc.strerror or exc}") from None
            self.http = httpd.Server(sock, self.sel, {"/metrics": self._metrics, "/healthz": self._healthz,
                                                      "/livez": self._livez, "/readyz": self._readyz,
                                                      "/status": self._status,
                                                      "/flows": httpd.with_query(self._flows)})

    # -- sockets and the fd store ---------------------------------------------

    def _adopt(self, env):
        try:
            inherited = sdnotify.listen_fds(env)
        except (ValueError, OSError) as exc:
            self.log.warning("fdstore", "ignoring passed fds: %s", exc)
            inherited = {}
        self._stored_flows = {}
        pool = {}
        for name, fds in inherited.items():
            for extra in fds[1:]:
                os.close(extra)
            fd = fds[0]
            if name.startswith("flows") and name[5:].isdigit():
                try:
                    self._stored_flows[int(name[5:])] = sdnotify.memfd_read(fd)
                except (OSError, ValueError) as exc:
                    self.log.warning("fdstore", "stored %s unreadable: %s", name, exc)
                os.close(fd)
                self.notifier.fdstore_remove(name)      # consumed; a fresh one is stored at exit
                continue
            try:
                pool[name] = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                self.notifier.fdstore_remove(name)
        try:
            self.socks, fresh = bind_sockets(self.cfg, self.n, pool)
        except StartupError:
            for sock in pool.values():
                sock.close()
            raise
        self._retire_unused(pool)
        self._store(fresh)
        self._warn_buffers()
        reused = len(self.socks) - len(fresh)
        if inherited:
            self.log.notice("fdstore", "took back %d of %d sockets and the flows of %d workers from the fd store",
                            reused, len(self.socks), len(self._stored_flows))
        elif self.notifier.enabled:
            self.log.notice("fdstore", "fd store empty: starting fresh")
        else:
            self.log.notice("fdstore", "no NOTIFY_SOCKET or LISTEN_FDS: starting fresh, "
                            "sockets and flows will not outlive this process")

    def _warn_buffers(self):
        """One warning per buffer size the kernel capped (every socket asks the same)."""
        r = self.cfg.relay
        for sock in self.socks.values():
            for key, asked, granted, sysctl in sockets.buffer_shortfalls(
                    sock, r.recv_buffer_bytes, r.send_buffer_bytes):
                self.log.warning("sockets.buffer", "%s = %d, but the kernel granted %d (capped by %s); "
                                 "raise it: sysctl -w %s=%d (edge-relay ships "
                                 "/usr/lib/sysctl.d/edge-relay.conf)",
                                 key, asked, granted, sysctl, sysctl, asked)
            return

    def _retire_unused(self, pool):
        for name, sock in pool.items():
            sock.close()
            self.notifier.fdstore_remove(name)
        pool.clear()

    def _store(self, names):
        if not self.notifier.enabled:
            return
        for name in names:
            self.notifier.fdstore_remove(name)
            if not self.notifier.fdstore(name, [self.socks[name].fileno()]):
                self.log.warning("fdstore", "fd store refused %s (FileDescriptorStoreMax too low?)", name)

    def _worker_sockets(self, w):
        listeners = [self.socks[f"l{li}w{w}"] for li in range(len(self.cfg.listeners))]
        return listeners, self.socks[f"i{w}"]

    # -- workers ----------------------------------------------------------------

    def _spawn(self, slot):
        if slot.index not in self.journals:
            self.journals[slot.index] = journal_memory(self.cfg, slot.index, self.log)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                ours.close()
                code = self._child(slot, theirs)
            except BaseException:  # noqa: BLE001 - the child must never return into the supervisor
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        slot.pid, slot.ctl = pid, ours
        slot.started = time.monotonic()
        slot.restore = None
        slot.asked_to_stop = False
        slot.reload_failed = None
        self.by_pid[pid] = slot
        self.sel.register(ours, selectors.EVENT_READ, lambda s=slot: self._read_ctl(s))

    def _child(self, slot, ctl):
        i = slot.index
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        mine = {id(s) for s in (*self._worker_sockets(i)[0], self._worker_sockets(i)[1])}
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
        for j, memory in self.journals.items():
            if j != i and memory is not None:
                memory.close()
        for sock in self.socks.values():
            if id(sock) not in mine:
                sock.close()
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
        log = Log(level=self.cfg.log.level, name=f"edge-relay[w{i}]")
        flows = start_flows(self.cfg, log, i, slot.restore, self.journals.get(i))
        slot.restore = None
        view = self.shared.slot(i)
        extra = self.extra
        state = {"generation": self.generation, "started": metrics.monotonic_ns()}

        def publish(router, worker):
            extra.write(i, metrics.extra_of(worker))
            metrics.publish(view, router, state["generation"], worker.reloads, worker.reload_failures,
                            state["started"])

        listeners, internal = self._worker_sockets(i)
        worker = Worker(self.cfg, self.keyring, listeners, internal, log, config_path=self.config_path,
                        publish=publish, flows=flows, log_transceivers=i == 0)
        ctl.setblocking(False)

        def on_ctl():
            while True:
                try:
                    msg = ctl.recv(CTL_MAX)
                except BlockingIOError:
                    return True
                except OSError:
                    msg = b""
                if not msg:             # the supervisor is gone: drain and leave
                    worker.drain()
                    return False
                if msg.startswith(b"reload "):
                    ok = worker.reload()
                    if ok:
                        state["generation"] = int(msg[7:])
                    worker._publish()
                    _send(ctl, b"reloaded" if ok else b"reload-failed " +
                          (worker.last_reload_error or "").encode("utf-8", "replace")[:CTL_MAX - 16])
                elif msg.startswith(b"report-flows"):
                    _report_flows(ctl, worker, msg[len(b"report-flows"):], i)
                elif msg == b"drain":
                    worker.drain()
                elif msg == b"stop":
                    worker.stop()

        worker.run(handle_signals=True, extra={ctl: on_ctl})
        fd = sdnotify.memfd_write(f"edge-relay-flows{i}", worker.snapshot())
        try:
            ctl.setblocking(True)
            socket.send_fds(ctl, [b"flows"], [fd])
        except OSError:
            pass
        return 0

    def _read_ctl(self, slot):
        while slot.ctl is not None:
            try:
                msg, fds, _, _ = socket.recv_fds(slot.ctl, CTL_MAX, 4)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                self.sel.unregister(slot.ctl)
                slot.ctl.close()
                slot.ctl = None
                for fd in fds:
                    os.close(fd)
                return
            if msg == b"flows" and fds:
                if slot.handed is not None:
                    os.close(slot.handed)
                slot.handed = fds.pop(0)
            elif msg == b"flow-report" and fds:
                fd = fds.pop(0)
                try:
                    slot.report = json.loads(sdnotify.memfd_read(fd))
                except (OSError, ValueError):
                    slot.report = None
                finally:
                    os.close(fd)
            elif msg.startswith(b"reload-failed"):
                slot.reload_failed = msg[14:].decode("utf-8", "replace") or "see its log"
                self.log.verdict("err", "worker %d kept its old config: %s", slot.index, slot.reload_failed)
            for fd in fds:
                os.close(fd)

    def _send_all(self, msg):
        for slot in self.slots:
            if slot.ctl is not None:
                _send(slot.ctl, msg)

    def _reap(self):
        now = time.monotonic()
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
                self.sel.unregister(slot.ctl)
                slot.ctl.close()
                slot.ctl = None
            self.shared.retire(slot.index)
            self.extra.clear(slot.index)
            slot.pid = None
            code = os.waitstatus_to_exitcode(status)
            how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            if self.stopping or slot.asked_to_stop:
                self.log.info("worker.exit", "worker %d (pid %d) exited: %s", slot.index, pid, how)
                continue
            if slot.handed is not None:     # it left on its own (a stray SIGTERM): keep its flows
                slot.restore = self._take_handed(slot)
            while slot.deaths and now - slot.deaths[0] > CRASH_WINDOW:
                slot.deaths.popleft()
            slot.deaths.append(now)
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (len(slot.deaths) - 1))
            if len(slot.deaths) >= CRASH_LIMIT:
                if not slot.crash_loop:
                    self.log.err("worker.crash-loop", "worker %d died %d times in %.0f s: crash loop, "
                                 "restarting it in %.1f s", slot.index, len(slot.deaths), CRASH_WINDOW, delay)
                slot.crash_loop = True
                self.notifier.status(self._status_text())
            self.log.err("worker.died", "worker %d (pid %d) died (%s); restart in %.1f s",
                         slot.index, pid, how, delay)
            slot.restart_at = now + delay

    def _take_handed(self, slot):
        fd, slot.handed = slot.handed, None
        try:
            return sdnotify.memfd_read(fd)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def up(self):
        """Indexes of workers that serve: alive with a fresh heartbeat."""
        now = metrics.monotonic_ns()
        stale = int(HEARTBEAT_STALE * 1e9)
        out = set()
        for slot in self.slots:
            if slot.pid is None:
                continue
            hb = self.shared.words[slot.index * metrics.SLOT_WORDS + metrics.HEARTBEAT]
            if hb and now - hb < stale:
                out.add(slot.index)
        return out

    def healthy(self):
        return not self.stopping and self.restructure is None and len(self.up()) == self.n

    def readiness(self):
        """(ready, why): healthy, and every serving worker's probes see a transceiver up.

        A worker without probes (probes.enabled = false) cannot tell, and counts as able to route.
        """
        if self.stopping:
            return False, "draining"
        if self.restructure is not None:
            return False, "handing the flows to new workers"
        up = self.up()
        if len(up) < self.n:
            return False, f"{len(up)}/{self.n} workers up"
        for i in sorted(up):
            tx = (self.extra.read(i) or {}).get("tx")
            if tx is not None and not any(h["up"] for h in tx.values()):
                return False, f"worker {i}: every transceiver is down (probes)"
        return True, "ready"

    # -- reload and stop ----------------------------------------------------------

    def reload(self):
        requested = _usec()
        if self.stopping or self.restructure is not None:
            # no RELOADING=1: systemd is told of stopping, or waits for the pending reload's READY=1
            busy = "stopping" if self.stopping else "a previous reload is still handing flows to new workers"
            return self._refuse(requested, f"not now: {busy}", notify=False)
        self.notifier.reloading()
        try:
            cfg, keyring = config_mod.load_with_keys(self.config_path)
        except Exception as exc:  # noqa: BLE001 - no config, however broken, may end the supervisor
            return self._refuse(requested, reason(exc))
        sha = config_digest(self.config_path)
        n = self.workers_override or cfg.effective_workers()
        if structure(cfg, n) != structure(self.cfg, self.n):
            try:
                pool = dict(self.socks)
                socks, fresh = bind_sockets(cfg, n, pool)
            except (StartupError, ValueError) as exc:
                return self._refuse(requested, reason(exc))
            self.restructure = (cfg, keyring, n, socks, fresh, pool)
            for slot in self.slots:
                slot.restart_at = None
                if slot.pid is not None:
                    slot.asked_to_stop = True
            self._send_all(b"stop")
            self.log.notice("reload", "listeners or workers changed: handing the flows to new workers")
        if cfg.management != self.cfg.management:
            self.log.warning("reload", "management address changes take effect at the next restart")
        self.cfg, self.keyring = cfg, keyring
        self.log.set_level(cfg.log.level)
        self.generation += 1
        if self.restructure is None:
            for slot in self.slots:
                slot.reload_failed = None
            self._send_all(b"reload %d" % self.generation)
        self.reload_deadline = time.monotonic() + RELOAD_ACK_TIMEOUT
        self._pending = (cfg, sha)
        self.last_reload = {"state": "pending", "generation": self.generation, "requested_usec": requested,
                            "finished_usec": 0, "reason": ""}
        self.log.verdict("notice", "config generation %d: %d transceivers, signing key %d",
                         self.generation, len(cfg.transceivers), keyring.signing.key_id)
        return True

    def _refuse(self, requested, reason, notify=True):
        self.reload_failures += 1
        self.last_reload_ok = False
        self.last_reload = {"state": "refused", "generation": self.generation, "requested_usec": requested,
                            "finished_usec": _usec(), "reason": reason}
        self.log.verdict("err", "reload refused, keeping config generation %d: %s", self.generation, reason)
        if notify:
            self.notifier.ready(f"reload refused: {reason}; " + self._status_text())
        return False

    def _settle_reload(self, now):
        """The verdict of the pending reload, once every worker runs the new generation (or cannot)."""
        if self._pending is None or self.restructure is not None:
            return
        failed = [(s.index, s.reload_failed) for s in self.slots if s.reload_failed]
        up = self.up()
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
        v = dict(self.last_reload, state="failed" if reason else "ok", finished_usec=_usec(), reason=reason)
        self.last_reload = v
        self.last_reload_ok = not reason
        if reason:
            self.reload_failures += 1
            self.log.verdict("err", "reload of generation %d failed: %s", self.generation, reason)
            self.notifier.ready(f"reload failed: {reason}; " + self._status_text())
            return
        self.reloads += 1
        self.config_sha256 = sha
        self.last_reload_success = time.time()
        self.write_ruleset(cfg)
        self.log.verdict("notice", "every worker runs config generation %d", self.generation)
        self.notifier.ready(self._status_text())

    def _settle_now(self):
        # Whoever reads the workers' generations (a scrape, /status) reads the
        # verdict they imply, not the one of the previous tick.
        if self._pending is not None and self.reload_deadline is not None:
            self._settle_reload(time.monotonic())

    def write_ruleset(self, cfg):
        """The accepted config's nftables ruleset to $RUNTIME_DIRECTORY/edge-relay.nft (atomic)."""
        if self.runtime_dir is None:
            return
        path = os.path.join(self.runtime_dir, RULESET_FILE)
        try:
            text = nft.render_relay(cfg)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.chmod(path + ".tmp", 0o644)
            os.replace(path + ".tmp", path)
        except (OSError, ValueError) as exc:
            self.log.warning("nft", "cannot write %s: %s", path, exc)

    def _apply_restructure(self):
        cfg, keyring, n, socks, fresh, pool = self.restructure
        self.restructure = None
        handed = {slot.index: self._take_handed(slot) for slot in self.slots if slot.handed is not None}
        self._retire_unused(pool)           # old sockets the new config does not use
        self.socks = socks
        self._store(fresh)
        old = metrics.totals(self.shared)
        self.shared.close()
        self.shared = metrics.SharedCounters(n)
        self.shared.base[0] = old.stats + old.drops + old.journal
        self.extra.close()
        self.extra = metrics.ExtraShared(n)
        self.n = n
        for memory in self.journals.values():
            if memory is not None:
                memory.close()          # listener indexes may mean other sockets now: start afresh
        self.journals = {}
        self.slots = [Slot(i, self.cpus[i % len(self.cpus)]) for i in range(n)]
        for i, data in handed.items():
            if i < n:
                self.slots[i].restore = data
        for slot in self.slots:
            self._spawn(slot)
        self.reload_deadline = time.monotonic() + RELOAD_ACK_TIMEOUT

    def begin_stop(self):
        if self.stopping:
            self._send_all(b"stop")         # asked twice: skip the rest of the drain
            return
        self.stopping = True
        self.notifier.stopping(self._status_text())
        self.log.notice("stop", "stopping: draining %d workers for up to %.1f s",
                        len(self.by_pid), self.cfg.relay.drain_seconds)
        for slot in self.slots:
            slot.restart_at = None
        self._send_all(b"drain")
        self.stop_deadline = time.monotonic() + self.cfg.relay.drain_seconds + KILL_GRACE

    def _finish(self):
        kept = 0
        for slot in self.slots:
            if slot.handed is None:
                continue
            if self.notifier.enabled and self.notifier.fdstore(f"flows{slot.index}", [slot.handed]):
                kept += 1
            os.close(slot.handed)
            slot.handed = None
        if self.notifier.enabled:
            self.notifier.barrier()
            self.log.notice("stop", "stopped; flows of %d workers kept in the fd store", kept)
        else:
            self.log.notice("stop", "stopped")
        self.done = True

    # -- status, metrics, health ----------------------------------------------------

    def totals(self):
        self._settle_now()
        up = self.up()
        t = metrics.totals(self.shared, up)
        t.extra = [self.extra.read(i) for i in sorted(up)]
        t.worker_restarts = self.restarts
        t.crash_looping = sum(1 for s in self.slots if s.crash_loop)
        t.reloads = self.reloads
        t.reload_failures = self.reload_failures
        t.generation = self.generation
        t.ready = self.readiness()[0]
        t.last_reload_ok = int(self.last_reload_ok)
        t.last_reload_success = self.last_reload_success
        t.flows_max = self.cfg.limits.max_flows
        t.processes = [("supervisor", os.getpid())] + [(str(s.index), s.pid) for s in self.slots if s.pid]
        t.sockets = [(name, os.fstat(sock.fileno()).st_ino) for name, sock in sorted(self.socks.items())]
        return t

    def _status_text(self):
        t = self.totals()
        now = time.monotonic()
        packets = t.stats[0] + t.stats[4]
        last_time, last_packets = self._last_status
        pps = (packets - last_packets) / (now - last_time) if last_time and now > last_time else 0.0
        self._last_status = (now, packets)
        text = (f"{t.workers_up}/{t.workers} workers up, {t.flows_pending + t.flows_confirmed} flows, "
                f"{pps:.0f} pps, config generation {self.generation}")
        if t.crash_looping:
            text += f"; {t.crash_looping} workers in a crash loop"
        if self.stopping:
            text = "draining: " + text
        return text

    def _metrics(self):
        return 200, metrics.CONTENT_TYPE, metrics.render(self.totals()).encode("utf-8")

    def _flows(self, query):
        """GET /flows?limit=N&transceiver=ID|NAME&state=pending|confirmed&client=ADDR|CIDR: live flows as JSON.

        Asks every serving worker (b"report-flows") and waits for their answers for at most
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
        request = b"report-flows" + json.dumps({"limit": limit, "transceiver": tx, "state": state,
                                                "client": client}).encode()
        if len(request) > CTL_MAX:
            return 400, "text/plain", b"client: too long\n"
        asked = [self.slots[i] for i in sorted(self.up()) if self.slots[i].ctl is not None]
        for slot in asked:
            slot.report = None
            _send(slot.ctl, request)
        deadline = time.monotonic() + FLOWS_REPORT_TIMEOUT
        waiting = list(asked)
        while waiting:
            left = deadline - time.monotonic()
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
        if self.stopping:
            return 503, "text/plain", b"draining\n"
        if not self.ready_sent or not self.healthy():
            return 503, "text/plain", b"not ready\n"
        return 200, "text/plain", b"ok\n"

    def _livez(self):
        return 200, "text/plain", b"alive\n"

    def _readyz(self):
        ready, why = self.readiness()
        if ready and not self.ready_sent:
            ready, why = False, "starting"
        return (200 if ready else 503), "text/plain", (why + "\n").encode("utf-8")

    def status(self):
        """The document GET /status answers (docs: edge-relay(8), STATUS)."""
        self._settle_now()
        ready, why = self.readiness()
        t = metrics.totals(self.shared, self.up())
        return {"pid": os.getpid(), "generation": self.generation, "workers": self.n,
                "workers_up": t.workers_up, "workers_generation": t.workers_generation,
                "healthy": self.healthy(), "ready": ready and self.ready_sent,
                "ready_reason": why if self.ready_sent else "starting", "draining": self.stopping,
                "config": {"path": str(self.config_path), "sha256": self.config_sha256},
                "reloads": self.reloads, "reload_failures": self.reload_failures,
                "last_reload": dict(self.last_reload), "now_usec": _usec()}

    def _status(self):
        return 200, "application/json", (json.dumps(self.status(), sort_keys=True) + "\n").encode("utf-8")

    # -- the loop -----------------------------------------------------------------

    def _on_signal(self):
        signums = set(self._wake[0].recv(256))
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            self.begin_stop()
        if signal.SIGCHLD in signums:
            self._reap()
        if signal.SIGHUP in signums:
            self.reload()

    def _tick(self, now):
        """Timers; returns the select timeout."""
        deadlines = [now + 0.5]
        if self.stopping:
            if not self.by_pid:
                self._finish()
                return 0
            if now >= self.stop_deadline:
                for pid in self.by_pid:
                    self.log.err("stop", "worker pid %d did not drain in time: killing it", pid)
                    os.kill(pid, signal.SIGKILL)
                self.stop_deadline = now + KILL_GRACE
            deadlines.append(self.stop_deadline)
        elif self.restructure is not None:
            if not self.by_pid:
                self._apply_restructure()
        else:
            for slot in self.slots:
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        slot.restart_at = None
                        self.restarts += 1
                        self.log.notice("worker.restart", "restarting worker %d", slot.index)
                        self._spawn(slot)
                    else:
                        deadlines.append(slot.restart_at)
                elif slot.crash_loop and slot.pid is not None and now - slot.started > CRASH_WINDOW:
                    slot.crash_loop = False
                    slot.deaths.clear()
                    self.log.notice("worker.crash-loop", "worker %d is stable again", slot.index)
            healthy = self.healthy()
            if healthy and not self.ready_sent:
                self.ready_sent = True
                self.notifier.ready(self._status_text())
                self._next_status = now + STATUS_INTERVAL
                self.log.notice("ready", "serving with %d workers", self.n)
            if self.reload_deadline is not None:
                self._settle_reload(now)
                if self.reload_deadline is not None:
                    deadlines.append(min(self.reload_deadline, now + 0.05))
            if self.watchdog is not None and now >= self._next_watchdog:
                if healthy:
                    self.notifier.watchdog()
                self._next_watchdog = now + self.watchdog
        if now >= self._next_status:
            if self.ready_sent:
                self.notifier.status(self._status_text())
            self._next_status = now + STATUS_INTERVAL
        deadlines.append(self._next_status)
        if self.watchdog is not None:
            deadlines.append(self._next_watchdog)
        if self.http is not None:
            nearest = self.http.expire()
            if nearest is not None:
                deadlines.append(nearest)
        self.log.flush()
        return max(0.0, min(deadlines) - time.monotonic())

    def run(self):
        self._wake = socket.socketpair()
        for s in self._wake:
            s.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(self._wake[1].fileno(), warn_on_full_buffer=False)
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        old = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
        self.sel.register(self._wake[0], selectors.EVENT_READ, self._on_signal)
        now = time.monotonic()
        self._next_status = now + STATUS_INTERVAL
        self._next_watchdog = now
        self.log.info("start", "supervisor %d: %d workers, %d listeners, management %s",
                      os.getpid(), self.n, len(self.cfg.listeners),
                      f"{self.cfg.management.address}:{self.cfg.management.port}"
                      if self.http is not None else "off")
        self.write_ruleset(self.cfg)
        try:
            for slot in self.slots:
                self._spawn(slot)
            timeout = 0.0
            while not self.done:
                for key, _ in self.sel.select(timeout):
                    key.data()
                timeout = self._tick(time.monotonic())
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
        for memory in self.journals.values():
            if memory is not None:
                memory.close()
        self.journals = {}


def _report_flows(ctl, worker, payload, index):
    """Worker side of b"report-flows": the matching flows in a memfd, sent as b"flow-report"."""
    try:
        f = json.loads(payload)
        report = worker.flow_report(int(f["limit"]), f.get("transceiver"), f.get("state"), f.get("client"))
    except (ValueError, KeyError, TypeError):
        report = {"matched": 0, "flows": []}
    fd = sdnotify.memfd_write(f"edge-relay-report{index}", json.dumps(report).encode())
    try:
        socket.send_fds(ctl, [b"flow-report"], [fd])
    except OSError:
        pass
    finally:
        os.close(fd)


def _send(sock, msg):
    try:
        sock.send(msg)
    except OSError:
        pass
