"""One worker: an epoll loop that moves bytes between sockets and the Router.

Theory of operation
  The worker owns (or is handed) its share of the public listener sockets, its
  own internal socket and a signal wake-up fd. Readiness of a socket triggers
  a few batches of recvmmsg -> Router -> sendmmsg; each batch's output is sent
  before the next receive because payloads are views into receive buffers.
  Nothing here decides anything about a packet: that is router.py.

  One wake-up is `turn()`: one epoll wait (select.epoll directly: its fixed
  cost is what a batch of one datagram pays on top of the datagram), then
  one reading of each clock, which every batch and timer check of the turn
  uses. With [relay] coalesce_us set, a turn that found datagrams closer
  together than the window sleeps that long afterwards, so the next turn
  moves a batch (bounded: one sleep per turn).

  Timers are computed, never polled: the epoll timeout is the nearest of the
  flow table's next expiry, the stats publication tick, the drain deadlines,
  the router's own timer (probes due or timed out, directory lookups timed
  out) and the Redis client's timer when the flow directory is configured.

  Probes (probes.Prober, inside the Router) leave from the internal socket
  like any forwarded datagram, so the answers come back to this worker.
  Health transitions are logged here, once each. The flow directory's Redis
  connection (resp.Client) is one more non-blocking socket in the epoll set:
  lookups are pipelined, never awaited; their callbacks hand the answer to
  the router, and whatever it queued is sent at once.

  Signals arrive through `signal.set_wakeup_fd`, so a signal wakes the wait
  and is handled in the loop, never inside a handler:
    SIGHUP   reload config and keys; on error keep the old ones, log one line
    SIGTERM  stop at once (the supervisor hands the flow table to the next
             worker); nothing is refused on the way out
    SIGINT   as SIGTERM

  Two ways to refuse new flows (Drop.DRAINING), neither of them a restart:
  refuse_new_flows(at) is the operator's drain (edge-relay drain): from `at`
  on new flows are refused, existing ones keep forwarding, and the worker
  does not exit; refuse_new_flows(None) undoes it. drain() is for a worker
  whose supervisor is gone: refuse at once, exit when the flows are gone or
  after relay.drain_seconds.
"""

import gc
import ipaddress
import mmap
import os
import select
import selectors
import signal
import socket
import time

from . import batchio, config as config_mod, header, sockaddr, sockets
from .directory import Directory
from .drops import Drop
from .errors import reason
from .flows import FlowTable
from .journal import Journal, region_size
from .probes import Prober, State as ProbeState
from .quality import QualityMonitor
from .router import Policy, Router, failed_over

BATCHES_PER_WAKEUP = 8          # bounded work per readiness event keeps sockets fair
# The largest client datagram relayed (docs/PROTOCOL.md "Maximum datagram size"):
# the public receive buffers hold it, the internal ones it plus the header.
MAX_DATAGRAM = 2048
PUBLISH_INTERVAL = 0.5          # seconds between counter publications

# The loop's fd tags (listeners are tagged by their index, extra fds by their callback).
_INTERNAL, _REDIS, _SIGNAL = object(), object(), object()
_READ = getattr(select, "EPOLLIN", selectors.EVENT_READ)
_WRITE = getattr(select, "EPOLLOUT", selectors.EVENT_WRITE)


def _epoll_mask(events):
    """selectors EVENT_READ/EVENT_WRITE (what resp.Client asks for) as the poller's mask."""
    return (_READ if events & selectors.EVENT_READ else 0) | (_WRITE if events & selectors.EVENT_WRITE else 0)


def _selector_mask(mask):
    """A poller's event mask as selectors EVENT_* (as selectors.EpollSelector reports errors: both)."""
    events = 0
    if mask & ~_WRITE:
        events |= selectors.EVENT_READ
    if mask & ~_READ:
        events |= selectors.EVENT_WRITE
    return events


def _fine_timer_slack():
    """prctl(PR_SET_TIMERSLACK, 1000 ns) for this process; a no-op where libc has no prctl."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class _Poller:
    """select.epoll with fds, or (no epoll) the selectors layer behind the same four calls.

    The loop's fixed cost per wake-up is paid here: epoll.poll returns
    (fd, mask) pairs with no per-event key objects, which the selectors
    layer builds on every select.
    """

    def __init__(self):
        self._ep = select.epoll() if hasattr(select, "epoll") else None
        self._sel = None if self._ep is not None else selectors.DefaultSelector()

    def register(self, fileobj, mask):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if self._ep is not None:
            self._ep.register(fd, mask)
        else:
            self._sel.register(fd, mask)
        return fd

    def modify(self, fd, mask):
        if self._ep is not None:
            self._ep.modify(fd, mask)
        else:
            self._sel.modify(fd, mask)

    def unregister(self, fd):
        if self._ep is not None:
            self._ep.unregister(fd)
        else:
            self._sel.unregister(fd)

    def poll(self, timeout):
        if self._ep is not None:
            return self._ep.poll(timeout)
        return [(key.fd, mask) for key, mask in self._sel.select(timeout)]

    def close(self):
        (self._ep or self._sel).close()


def policy_of(cfg):
    return Policy.from_limits(cfg.limits)


def transceiver_addrs(cfg):
    """{id: raw sockaddr} as the internal socket sends to and hears from each transceiver.

    On a dual-stack internal socket ("::") an IPv4 transceiver is its IPv4-mapped address.
    """
    mapped = sockets.internal_dual_stack(cfg.internal.address)
    return {t.id: sockaddr.from_tuple((f"::ffff:{t.address}" if mapped and ":" not in t.address
                                       else t.address, t.port))
            for t in cfg.transceivers}


def sources_of(cfg):
    """Router.configure keywords: the sources a client datagram may not have (router.py "Ingress")."""
    return {"internal_nets": tuple(cfg.internal.allow),
            "own_addresses": tuple(lst.address for lst in cfg.listeners) + (cfg.internal.address,)}


def backups_of(cfg):
    return {t.id: t.backup for t in cfg.transceivers if t.backup is not None}


def prober_of(cfg, now):
    p = cfg.probes
    if not p.enabled:
        return None
    return Prober([t.id for t in cfg.transceivers], interval=p.interval, timeout=p.timeout or None,
                  down_after=p.down_after, up_after=p.up_after, now=now)


def quality_of(cfg):
    q = cfg.quality
    if not q.sample_every:
        return None
    return QualityMonitor(sample_every=q.sample_every, max_sampled=q.max_sampled,
                          report_interval=q.report_interval)


def directory_of(cfg):
    d = cfg.directory
    if not d.enabled:
        return None
    return Directory(ttl=d.ttl, timeout=d.timeout, max_held_per_flow=d.max_held_per_flow,
                     max_held_total=d.max_held_total, max_lookups=d.max_lookups,
                     negative_ttl=d.negative_ttl)


def _ignore(reply):
    pass


def flow_limits(cfg):
    """The flow table's caps and lifetimes from config.limits (FlowTable / FlowTable.set_limits keywords)."""
    lim = cfg.limits
    return {"max_flows": lim.max_flows, "max_pending_per_source": lim.max_pending_per_source,
            "pending_ttl": lim.pending_ttl, "idle_timeout": lim.idle_timeout,
            "max_flows_per_session": lim.max_flows_per_session,
            "max_flows_per_transceiver": lim.max_flows_per_transceiver}


def flow_table(cfg):
    return FlowTable(n_listeners=len(cfg.listeners), **flow_limits(cfg))


class JournalMemory:
    """One worker slot's crash journal region (journal.py): a memfd mapped MAP_SHARED.

    The supervisor makes it before the slot's first fork and holds it for its
    whole life; each worker of the slot uses the mapping it inherits through
    fork(), so what a killed worker wrote is there for its successor. Sized
    once for `capacity` flows (64 bytes each, allocated only as written).
    """

    def __init__(self, capacity, name="edge-relay-journal"):
        self.capacity = capacity
        self.size = region_size(capacity)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def adopt(cls, fd):
        """The region an earlier image of this process made, from its memfd `fd` (an upgrade's execve
        carries it, so an old worker still writing it keeps a journal its successor can restore)."""
        size = os.fstat(fd).st_size
        record = region_size(1) - region_size(0)
        capacity = (size - region_size(0)) // record
        if capacity < 0 or region_size(capacity) != size:
            raise ValueError(f"a crash journal memfd of {size} bytes is no journal region")
        self = cls.__new__(cls)
        self.capacity, self.size, self.fd = capacity, size, fd
        self.map = mmap.mmap(fd, size)
        return self

    def close(self):
        self.map.close()
        os.close(self.fd)


def journal_memory(cfg, index, log):
    """The crash journal region for worker slot `index`, or None (logged) when the kernel refuses one."""
    try:
        return JournalMemory(cfg.limits.max_flows, f"edge-relay-journal{index}")
    except (OSError, ValueError) as exc:
        log.warning("journal", "worker %d: no crash journal (%s): its flows will not outlive it",
                    index, exc.strerror if isinstance(exc, OSError) else exc)
        return None


def start_flows(cfg, log, index, snapshot=None, memory=None, clock=time.monotonic):
    """The flow table a worker starts with, built before it reads its first datagram.

    `snapshot` (FlowTable.snapshot bytes handed over by the slot's last
    worker as it exited) is restored first and, when it was accepted, is the
    truth: the journal is rewritten from it. Otherwise the journal in
    `memory` (a JournalMemory) is restored: the confirmed flows of a worker
    that died unasked. Either way the journal stays attached and is written
    from then on. One log line says what was restored and how long it took.
    """
    flows = flow_table(cfg)
    restore_flows(flows, log, index, snapshot, memory, clock)
    return flows


def restore_flows(flows, log, index, snapshot=None, memory=None, clock=time.monotonic, said="restored"):
    """start_flows into an existing (empty) table: an upgrade's new worker, once its turn came."""
    collecting = gc.isenabled()
    gc.disable()            # every object made here lives on: collecting them meanwhile halves the speed
    try:
        _restore(flows, log, index, snapshot, memory, clock, said)
    finally:
        if collecting:
            gc.enable()


def _restore(flows, log, index, snapshot, memory, clock, said):
    start = clock()
    handed = False
    if snapshot:
        try:
            added = flows.restore(snapshot, start)
            handed = True
            log.notice("restore", "worker %d: %s %d flows", index, said, added)
        except ValueError as exc:
            log.warning("restore", "worker %d: flow snapshot refused: %s", index, exc)
    if memory is None:
        return
    journal = Journal(memory.map)
    got = journal.attach(flows, clock(), fresh=handed)
    journal.restore_seconds = clock() - start
    if not handed and (got.restored or got.bad or got.duplicate or got.skipped or got.reformatted):
        log.notice("journal", "worker %d: %d flows restored from the crash journal in %.1f ms "
                   "(records: %d bad, %d duplicate, %d refused%s)", index, got.restored,
                   journal.restore_seconds * 1000, got.bad, got.duplicate, got.skipped,
                   "; unreadable header, region formatted afresh" if got.reformatted else "")


class Worker:
    """Runs the loop for one worker until stopped.

    `publish(router, worker)` (optional) is called every PUBLISH_INTERVAL and
    at exit with the router's counters, e.g. to copy them to shared memory.
    """

    _client_outs = None

    def __init__(self, cfg, keyring, listeners, internal, log, *, config_path=None,
                 publish=None, clock=time.monotonic, wall=time.time, flows=None, log_transceivers=True):
        self.cfg = cfg
        # Every worker probes every transceiver, so each sees each up/down:
        # only one of them (the supervisor picks worker 0) logs it.
        self.log_transceivers = log_transceivers
        self.config_path = config_path
        self.log = log
        self.clock = clock
        self.wall = wall
        self.publish = publish
        self.listeners = listeners
        self.internal = internal
        batch = cfg.relay.batch_size
        mode = cfg.relay.io
        # GSO runs (same destination and size) happen toward transceivers, not toward clients;
        # the public receive buffers hold MAX_DATAGRAM, the internal ones it plus the header
        self.listener_io = [batchio.open_io(s, batch, MAX_DATAGRAM, mode=mode, gso=False) for s in listeners]
        self.internal_io = batchio.open_io(internal, batch, MAX_DATAGRAM + header.HEADER_LEN, mode=mode)
        directory = directory_of(cfg)
        self.router = Router(flow_table(cfg) if flows is None else flows, keyring, transceiver_addrs(cfg),
                             [s.family for s in listeners], policy_of(cfg), backups=backups_of(cfg),
                             prober=prober_of(cfg, clock()), quality=quality_of(cfg),
                             directory=directory, **sources_of(cfg))
        self.redis = None
        if directory is not None:
            d = cfg.directory
            from . import resp  # only with [directory]: not every start pays for the client
            self._disconnected = resp.Disconnected
            self.redis = resp.Client(config_mod.redis_target(d.address), timeout=d.timeout,
                                     max_pending=65536, now=clock())
        self._sel = None
        self._redis_sock = None
        self._redis_fdno = -1
        self._coalesce = 0.0
        self._redis_events = 0
        self._redis_failures = 0
        self._tags = {}
        self.stopping = False
        self.drain_deadline = None
        self.refuse_at = None           # the operator's drain: refuse new flows from then on
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error = ""     # why the last reload was refused (the supervisor reports it)
        self.send_failed_seen = 0

    @property
    def io_name(self):
        return self.internal_io.name

    # -- one batch each way -------------------------------------------------

    def pump_listener(self, index, now=None, wall_ms=None):
        """Up to BATCHES_PER_WAKEUP batches from listener `index`.

        `now` and `wall_ms` are read once per wake-up by the loop (a batch
        takes microseconds; the clocks' resolution that matters here is
        flow ages in seconds and header timestamps in milliseconds). When
        not given they are read here, once.
        """
        io = self.listener_io[index]
        router = self.router
        if now is None:
            now, wall_ms = self.clock(), int(self.wall() * 1000)
        route = router.from_clients
        out = router.to_transceivers
        send = self.internal_io.send
        views, addrs, batch_size = io.views, io.addrs, io.batch_size
        for _ in range(BATCHES_PER_WAKEUP):
            n = io.recv()
            if n == 0:
                return
            route(index, views, addrs, n, now, wall_ms)
            if out.n:
                send(out, io)
                out.n = 0
            if router.dir_lookups:
                self._ask_directory()
            if n < batch_size:
                return

    def pump_internal(self, now=None, wall_ms=None):
        """Up to BATCHES_PER_WAKEUP batches from the internal socket (clocks: see pump_listener)."""
        io = self.internal_io
        router = self.router
        if now is None:
            now, wall_ms = self.clock(), int(self.wall() * 1000)
        route = router.from_transceivers
        pairs = self._client_outs
        if pairs is None:               # (each listener's Outbox, its socket), fixed for the router's life
            pairs = self._client_outs = tuple(zip(router.to_clients, self.listener_io))
        views, addrs, batch_size = io.views, io.addrs, io.batch_size
        for _ in range(BATCHES_PER_WAKEUP):
            n = io.recv()
            if n == 0:
                return
            route(views, addrs, n, now, wall_ms)
            for out, lio in pairs:
                if out.n:
                    lio.send(out, io)
                    out.n = 0
            if router.dir_commands:
                self._tell_directory()
            if n < batch_size:
                return

    def flush_to_transceivers(self):
        """Send what the router queued outside a received batch (timers, directory answers)."""
        out = self.router.to_transceivers
        if out.n:
            self.internal_io.send(out)
            out.n = 0

    # -- timers: probes, directory, quality -----------------------------------

    def run_timers(self, now):
        """The router's timer work (probes, directory timeouts) and its log lines."""
        router = self.router
        router.timer(now, int(self.wall() * 1000))
        self.flush_to_transceivers()
        if router.events and self.log_transceivers:
            names = {t.id: t.name for t in self.cfg.transceivers}
            for ev in router.events:
                srtt = "-" if ev.srtt is None else f"{ev.srtt * 1000:.2f} ms"
                backup = router.redirect.get(ev.transceiver)
                note = f"; its flows go to {names.get(backup, backup)}" if backup is not None else ""
                (self.log.warning if ev.state == ProbeState.DOWN else self.log.notice)(
                    "transceiver", "transceiver %s is %s (%s, srtt %s)%s",
                    names.get(ev.transceiver, ev.transceiver), ev.state, ev.reason, srtt, note)
        router.events.clear()

    # -- the flow directory's Redis connection --------------------------------

    def _ask_directory(self):
        router = self.router
        lookups, router.dir_lookups = router.dir_lookups, []
        now = self.clock()
        for lookup in lookups:
            if not self.redis.call(lookup.command, lambda reply, lk=lookup: self._answer(lk, reply), now):
                router.dir_resolved(lookup, self._disconnected("directory unavailable"), now,
                                    int(self.wall() * 1000))
        self.flush_to_transceivers()
        self._redis_register()

    def _answer(self, lookup, reply):
        self.router.dir_resolved(lookup, reply, self.clock(), int(self.wall() * 1000))

    def _tell_directory(self):
        router = self.router
        commands, router.dir_commands = router.dir_commands, []
        now = self.clock()
        for cmd in commands:
            self.redis.call(cmd, _ignore, now)
        self._redis_register()

    def _redis_register(self):
        """Keep the selector's registration of the Redis socket in step with the client.

        Tracked by socket object, not fd number: a reconnect may reuse the number.
        """
        sel = self._sel
        if sel is None or self.redis is None:
            return
        sock, events = self.redis.sock, self.redis.events()
        if sock is not self._redis_sock:
            if self._redis_sock is not None:
                self._tags.pop(self._redis_fdno, None)
                try:
                    sel.unregister(self._redis_fdno)
                except (KeyError, ValueError, OSError):
                    pass
            self._redis_sock = None
            if sock is not None and events:
                self._redis_fdno = sel.register(sock, _epoll_mask(events))
                self._tags[self._redis_fdno] = _REDIS
                self._redis_sock, self._redis_events = sock, events
        elif sock is not None and events != self._redis_events:
            sel.modify(self._redis_fdno, _epoll_mask(events))
            self._redis_events = events

    def _redis_ready(self, mask):
        now = self.clock()
        if mask & selectors.EVENT_WRITE:
            self.redis.on_writable(now)
        if mask & selectors.EVENT_READ:
            self.redis.on_readable(now)
        self.flush_to_transceivers()
        self._redis_register()

    def _periodic(self, now):
        """Every publication tick: fold quality stats, re-publish confirmed flows."""
        router = self.router
        router.report(now)
        if self.redis is not None and self.redis.stats["failures"] != self._redis_failures:
            # A Redis that cannot be reached: every lookup fails open (the flow
            # is not moved); say so, rate-limited, with the client's last error.
            self._redis_failures = self.redis.stats["failures"]
            self.log.warning("directory.unreachable", "flow directory %s unreachable (%s): flows that "
                             "move between relays are not picked up", self.cfg.directory.address,
                             self.redis.last_error)
        if router.directory is not None:
            # every confirmed flow once per ttl/3, spread over the publication ticks in between
            ticks = max(1.0, router.directory.ttl / 3 / PUBLISH_INTERVAL)
            budget = max(256, int(router.flows.confirmed / ticks) + 1)
            for cmd in router.directory.refresh(router.directory_snapshot, now, budget):
                router.dir_commands.append(cmd)
            if router.dir_commands:
                self._tell_directory()

    # -- control --------------------------------------------------------------

    def reload(self):
        """Re-read config and keys; keep the old ones and say why on any error."""
        if self.config_path is None:
            return False
        try:
            cfg, keyring = config_mod.load_with_keys(self.config_path)
        except Exception as exc:  # noqa: BLE001 - no config, however broken, may end a worker
            self.reload_failures += 1
            self.last_reload_error = reason(exc)
            self.log.verdict("err", "reload refused, keeping the running config: %s", self.last_reload_error)
            return False
        old, self.cfg = self.cfg, cfg
        router = self.router
        if cfg.probes != old.probes:
            # new probe settings: start over (every transceiver up, as at start)
            router.prober = prober_of(cfg, self.clock())
        if cfg.quality != old.quality:
            router.quality = quality_of(cfg)       # sampled flows start over too
        if cfg.directory != old.directory:
            self.log.warning("reload", "[directory] changes take effect at the next restart")
        router.configure(keyring, transceiver_addrs(cfg), policy_of(cfg), backups_of(cfg), **sources_of(cfg))
        router.flows.set_limits(**flow_limits(cfg))     # the live table, not just the next one
        self.log.set_level(cfg.log.level)
        self._set_coalesce(cfg.relay.coalesce_us)
        self.reloads += 1
        self.log.verdict("notice", "reloaded: %d transceivers, signing key %d",
                         len(cfg.transceivers), keyring.signing.key_id)
        return True

    def refuse_new_flows(self, at):
        """The operator's drain: refuse new flows from clock time `at` on (None: accept them again)."""
        if at is None:
            if self.refuse_at is not None or self.router.draining:
                self.log.notice("drain", "drain cancelled: accepting new flows")
            self.refuse_at = None
            self.router.draining = self.drain_deadline is not None
            return
        self.refuse_at = at
        self.check_drain(self.clock())

    def check_drain(self, now):
        """The operator's drain timer: start refusing new flows once its time has come."""
        if self.refuse_at is not None and now >= self.refuse_at and not self.router.draining:
            self.router.draining = True
            self.log.notice("drain", "draining: refusing new flows, forwarding %d", len(self.router.flows))

    def drain(self):
        """Refuse new flows now and exit once they are gone or after relay.drain_seconds."""
        if self.drain_deadline is None:
            self.router.draining = True
            self.drain_deadline = self.clock() + self.cfg.relay.drain_seconds
            self.log.notice("drain", "draining %d flows for up to %.1f s",
                            len(self.router.flows), self.cfg.relay.drain_seconds)

    def stop(self):
        self.stopping = True

    def snapshot(self):
        """The flow table as flows.FlowTable.snapshot bytes (handed to the next worker)."""
        return self.router.flows.snapshot(self.clock())

    def flow_report(self, limit, transceiver=None, state=None, client=None):
        """{"matched": n, "flows": [...]}: at most `limit` live flows matching the filters (for
        GET /flows; asked by the supervisor, never on the packet path). `client`: see
        client_filter; `state` is "pending" or "confirmed"."""
        return flow_report(self.router, self.cfg, self.clock(), limit, transceiver, state, client)

    def handle_signal(self, signum):
        if signum == signal.SIGHUP:
            self.reload()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stop()

    # -- the loop -------------------------------------------------------------

    def _nearest_deadline(self):
        """The nearest of every timer the loop waits for (see the module docstring)."""
        router = self.router
        nearest = self._next_publish
        d = router.flows.next_deadline()
        if d is not None and d < nearest:
            nearest = d
        d = self.drain_deadline
        if d is not None and d < nearest:
            nearest = d
        d = self.refuse_at
        if d is not None and not router.draining and d < nearest:
            nearest = d
        d = router.next_deadline()
        if d is not None and d < nearest:
            nearest = d
        redis = self.redis
        if redis is not None and redis.sock is not None:
            d = redis.next_deadline()
            if d is not None and d < nearest:
                nearest = d
        return nearest

    def _publish(self):
        failed = sum(io.send_failed for io in self.listener_io) + self.internal_io.send_failed
        if failed > self.send_failed_seen:
            # Counted as send_failed either way; a send the kernel refuses
            # (EINVAL from a loopback source, ENETUNREACH) is also said, rate-limited.
            io = self.internal_io if self.internal_io.send_errno else next(
                (i for i in self.listener_io if i.send_errno), self.internal_io)
            self.log.warning("send.failed", "%d datagrams could not be sent (last error on the %s socket: "
                             "%s)", failed - self.send_failed_seen,
                             "internal" if io is self.internal_io else "listener",
                             os.strerror(io.send_errno) if io.send_errno else "unknown")
        self.send_failed_seen = failed
        truncated = sum(io.truncated for io in self.listener_io) + self.internal_io.truncated
        drops = self.router.drops
        drops[Drop.SEND_FAILED] = failed
        drops[Drop.TRUNCATED] = truncated
        if self.publish is not None:
            self.publish(self.router, self)
        if self.log.level >= 7:
            self._log_flow_events()

    def _log_flow_events(self):
        """log.level "debug": one line per publication in which flows were opened, confirmed, moved,
        failed over, learned from the directory or expired (counts since the last line; never per packet)."""
        from .router import STAT_NAMES
        stats = self.router.stats
        now = {name[6:]: stats[i] for i, name in enumerate(STAT_NAMES) if name.startswith("flows_")}
        last = getattr(self, "_flow_events_logged", None) or dict.fromkeys(now, 0)
        self._flow_events_logged = now
        delta = {k: v - last.get(k, 0) for k, v in now.items() if v != last.get(k, 0)}
        if delta:
            self.log.debug("flow.events", "flows %s; %d pending, %d confirmed now",
                           ", ".join(f"{k} +{v}" for k, v in delta.items()),
                           self.router.flows.pending, self.router.flows.confirmed)

    def run(self, handle_signals=True, extra=None):
        """Loop until stopped or drained. `extra`: {fileobj: callback} for the supervisor's pipes.

        A callback that returns False is unregistered (its peer is gone).
        """
        self._open_loop(handle_signals, extra)
        try:
            while not self.stopping:
                self.turn()
        finally:
            self._close_loop()

    def _open_loop(self, handle_signals, extra):
        """Register every fd with one epoll set (or a selectors one where epoll is missing)."""
        self._ep = _Poller()
        self._tags = tags = {}
        self._wake = None
        self._old_wakeup = None
        self._old_handlers = {}
        if handle_signals:
            wake_r, wake_w = socket.socketpair()
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            self._wake = (wake_r, wake_w)
            self._old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, lambda *_: None)
            tags[self._ep.register(wake_r, _READ)] = _SIGNAL
        for index, sock in enumerate(self.listeners):
            tags[self._ep.register(sock, _READ)] = index
        tags[self._ep.register(self.internal, _READ)] = _INTERNAL
        self._sel = self._ep
        self._poll = self._ep.poll if self._ep._ep is None else self._ep._ep.poll    # no wrapper call per wake-up
        self._redis_register()
        for fileobj, callback in (extra or {}).items():
            tags[self._ep.register(fileobj, _READ)] = callback
        self.log.info("start", "worker %d serving %d listeners with %s I/O",
                      os.getpid(), len(self.listeners), self.io_name)
        self._next_publish = self.clock() + PUBLISH_INTERVAL
        self._now = self.clock()
        self._set_coalesce(self.cfg.relay.coalesce_us)
        self._publish()         # the first heartbeat: this worker serves

    def _set_coalesce(self, us):
        """[relay] coalesce_us; when on, timer slack 1 us so the wait is the window, not window + 50 us."""
        self._coalesce = us / 1e6
        if us:
            _fine_timer_slack()

    def turn(self):
        """One wake-up: wait for readiness or the nearest timer, move the batches, run what is due.

        The clocks are read once per wake-up, after the wait; that reading
        serves every batch moved and every timer check of this turn. The
        timers are read once too, before the wait: work done in a turn only
        sets deadlines after its `now`, so when `now` is short of the nearest
        one read before the wait, no timer check can find work and none runs.
        A deadline a turn moves earlier (a reload shortening lifetimes, a
        drain time, a new prober) is in the next turn's nearest, so at worst
        the next wait has timeout 0. The next wait's timeout counts from
        `self._now`: after what may take long (a control message, a signal,
        i.e. a reload; a Redis reply; the coalescing sleep) the clock is read
        again, so the wait never ends later than the nearest deadline (only a
        turn's batches, bounded by BATCHES_PER_WAKEUP, still count against it).
        """
        tags = self._tags
        nearest = self._nearest_deadline()
        coalesce = self._coalesce
        if coalesce:
            before = self.clock()
        timeout = nearest - self._now
        events = self._poll(timeout if timeout > 0.0 else 0.0)
        self._now = now = self.clock()
        wall_ms = int(self.wall() * 1000)
        for fd, mask in events:
            tag = tags.get(fd)
            if tag is _INTERNAL:
                self.pump_internal(now, wall_ms)
            elif tag.__class__ is int:
                self.pump_listener(tag, now, wall_ms)
            elif tag is _REDIS:
                self._redis_ready(_selector_mask(mask))
                self._now = self.clock()
            elif tag is _SIGNAL:
                for signum in self._wake[0].recv(64):
                    self.handle_signal(signum)
                self._now = self.clock()
            elif tag is not None:
                if tag() is False:
                    self._ep.unregister(fd)
                    del tags[fd]
                self._now = self.clock()
        if coalesce and events and now - before < coalesce:
            # datagrams come closer together than the window: let the next ones
            # queue up for one batch (bounded: one sleep per wake-up; [relay] coalesce_us)
            time.sleep(coalesce)
            self._now = self.clock()
        router = self.router
        if now < nearest:
            if self.drain_deadline is not None and not len(router.flows):
                self.stopping = True
            return
        deadline = router.flows.next_deadline()
        if deadline is not None and now >= deadline:
            router.expire(now)
        deadline = router.next_deadline()
        if deadline is not None and now >= deadline:
            self.run_timers(now)
        if self.redis is not None and self.redis.sock is not None:
            deadline = self.redis.next_deadline()
            if deadline is not None and now >= deadline:
                self.redis.handle_timer(now)
                self.flush_to_transceivers()
                self._redis_register()
        if now >= self._next_publish:
            self._periodic(now)
            self._publish()
            self._next_publish = now + PUBLISH_INTERVAL
        if self.refuse_at is not None:
            self.check_drain(now)
        if self.drain_deadline is not None and (now >= self.drain_deadline or not len(router.flows)):
            self.stopping = True

    def _close_loop(self):
        self._publish()
        self._sel = None
        if self.redis is not None:
            self.redis.close()
            self._redis_sock = None
        self._ep.close()
        if self._wake is not None:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            for s in self._wake:
                s.close()
            self._wake = None
        self.log.info("stop", "worker %d stopped with %d flows", os.getpid(), len(self.router.flows))


def client_filter(text):
    """A predicate on a flow's raw sockaddr for GET /flows?client=: `text` is an address
    ("203.0.113.7", "2001:db8::7"), an address and port ("203.0.113.7:5000", "[2001:db8::7]:5000")
    or a network ("203.0.113.0/24", "2001:db8::/32"). An IPv4 filter also matches IPv4-mapped
    IPv6 clients of a dual-stack listener. Raises ValueError on anything else."""
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(text)
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port is not None and not (port.isdigit() and int(port) <= 65535):
        raise ValueError(text)
    net = ipaddress.ip_network(host, strict=False)
    want, mask = int(net.network_address), int(net.netmask)
    port_bytes = None if port is None else int(port).to_bytes(2, "big")
    v4 = net.version == 4

    def match(key):
        if port_bytes is not None and key[2:4] != port_bytes:
            return False
        if len(key) == sockaddr.SOCKADDR_IN_LEN:
            addr = key[4:8] if v4 else None
        elif v4:
            addr = key[20:24] if key[8:20] == sockaddr.V4_MAPPED else None
        else:
            addr = key[8:24]
        return addr is not None and int.from_bytes(addr, "big") & mask == want
    return match


def flow_report(router, cfg, now, limit, transceiver=None, state=None, client=None):
    """See Worker.flow_report. Packets are counted only for flows the quality monitor samples
    (the hot path keeps no per-flow counter), so `packets` is null for the others, and `age`
    (since the first Binding Request) is known for pending and sampled flows only. Cost: one
    pass over the worker's flows with byte comparisons; only the flows shown are formatted
    (measured at 200,000 flows: 14 ms, 45 ms with a client filter; the worker forwards nothing
    meanwhile, once per request)."""
    from .flows import CONFIRMED, PENDING
    names = {t.id: t.name for t in cfg.transceivers}
    want_state = {"pending": PENDING, "confirmed": CONFIRMED, None: None}[state]
    match = client_filter(client) if client else None
    quality = router.quality.flows if router.quality is not None else {}
    matched, out = 0, []
    for flow in list(router.flows):
        if want_state is not None and flow.state != want_state:
            continue
        if transceiver is not None and flow.transceiver != transceiver:
            continue
        if match is not None and not match(flow.key):
            continue
        matched += 1
        if len(out) >= limit:
            continue
        host, port = sockaddr.to_tuple(flow.key)
        q = quality.get(flow)
        pending = flow.state == PENDING
        out.append({"client": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                    "listener": flow.listener, "transceiver": names.get(flow.transceiver),
                    "transceiver_id": flow.transceiver, "state": "pending" if pending else "confirmed",
                    "age": round(now - (flow.last_seen if pending else q.first_stun), 3)
                    if pending or q is not None else None,
                    "idle": None if pending else round(now - flow.last_seen, 3),
                    "failed_over": failed_over(flow), "restart_to": flow.restart_to,
                    "packets": None if q is None else {"client": q.client.packets,
                                                       "transceiver": q.transceiver.packets}})
    return {"matched": matched, "flows": out}
