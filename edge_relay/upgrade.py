"""The supervisor's upgrade path: one SIGUSR2, from the new code's preflight to the verdict.

Theory of operation
  The process mechanics (the preflight child, the state memfd, execve with
  the fds kept, reading the state back) are reexec.py; this module is what
  the supervisor does with them, through a few of its fields and methods.

  This image (Phase SERVING -> UPGRADING): `request` starts the preflight;
  when it answers, a refusal settles the verdict "refused" (-> SERVING,
  READY=1 with the reason); a pass `capture`s the supervisor's state and
  execs. Nothing raised on the way may end this image: it is refused.

  The new image: `take_over`, called from Supervisor.__init__, adopts the
  sockets, the shared counter pages, the management socket and each slot's
  running worker with its control channel, and the verdicts and counters.
  In run(), `start` enters UPGRADING and `tick` replaces the workers one
  slot at a time:

    starting  a new worker is forked for the slot (workerproc, await_turn):
              it builds everything, then says READY; the old one serves on
    ready     the old worker gets STOP: it stops reading, publishes its last
              counters, sends its flow table (FLOWS) and exits
    handing   once FLOWS came (or the old worker is gone, or
              HANDOVER_TIMEOUT passed: then it is killed), its counters are
              folded into the slot's base and the new worker gets TAKE with
              the flows: it restores them, then reads. It is the slot's
              worker from then on.
    taking    the next slot waits for this one's first publication (it
              serves); the flows stay ours too until then, so that if the new
              worker dies first, its restart (new code, as after any death)
              gets them.

  Verdict "ok" (-> SERVING, READY=1) once no slot is left. A new worker that
  exits or is not READY within SUCCESSOR_TIMEOUT, or dies before it serves,
  ends the upgrade "failed" with the old workers of the remaining slots
  serving on (no old worker is asked to stop before its successor is ready). An unusable state is the
  fallback of reexec.py: a fresh start on the inherited sockets, "failed".
"""

import array
import fcntl
import ipaddress
import mmap
import os
import selectors
import signal
import socket

from . import __version__, metrics, sdnotify
from .control import CTL_MAX, READY, STOP, TAKE, UNDRAIN, decode, encode_drain
from .drops import Drop
from .fdstore import bind_sockets, socket_matches, structure, wanted_sockets
from .lifecycle import Drain, Phase, Restarts, steady
from .reexec import (STATE_VERSION, HandoverError, Preflight, accepts, children, claim, claim_socket, exec_argv,
                     execute, stray_fds, stray_pool, take)
from .router import STAT_NAMES
from .worker import JournalMemory
from .workerproc import Slot, send, take_handed

SUCCESSOR_TIMEOUT = 30.0     # seconds a new worker may take to say READY (it loads config and keys)
HANDOVER_TIMEOUT = 5.0       # seconds an old worker may take to hand its flows over after STOP


def no_upgrade():
    """`last_upgrade` before any request (GET /status)."""
    return {"state": "none", "requested_usec": 0, "finished_usec": 0, "reason": "", "from_version": "",
            "to_version": "", "pauses_ms": []}


def _usec(now):
    return int(now * 1_000_000)


_HEAD = {"heartbeat": metrics.HEARTBEAT, "pid": metrics.PID, "flows_pending": metrics.FLOWS_PENDING,
         "flows_confirmed": metrics.FLOWS_CONFIRMED, "reloads": metrics.RELOADS,
         "reload_failures": metrics.RELOAD_FAILURES, "generation": metrics.GENERATION, "started": metrics.STARTED}


def counters_layout():
    """Where each word of a metrics.SharedCounters slot is, by name: what the next version translates from."""
    return {"slot_words": metrics.SLOT_WORDS, "head": dict(_HEAD), "stats_at": metrics.STATS_AT,
            "stats": list(STAT_NAMES), "drops_at": metrics.DROPS_AT,
            "drops": [d.label for d in sorted(Drop, key=int)], "journal_at": metrics.JOURNAL_AT,
            "journal": list(metrics.JOURNAL_COUNTERS), "extra_bytes": metrics.EXTRA_BYTES}


class Translation:
    """Slot words of an older counters layout moved to this version's, by name (a name new here
    starts at 0, one gone is dropped). Only used when the layouts differ."""

    def __init__(self, old):
        new = counters_layout()
        self.old_words = old["slot_words"]
        self.pairs = [(old["head"][k], v) for k, v in new["head"].items() if k in old["head"]]
        kinds = ("stats", "drops", "journal")     # a layout without a kind (older versions) has none of it
        for kind in kinds:
            at = {name: old[f"{kind}_at"] + i for i, name in enumerate(old.get(kind, ()))}
            self.pairs += [(at[name], new[f"{kind}_at"] + i) for i, name in enumerate(new[kind]) if name in at]
        # a slot's `base` is its stats, drops and journal counters, without the head
        old_names = [(kind, n) for kind in kinds for n in old.get(kind, ())]
        new_names = [(kind, n) for kind in kinds for n in new[kind]]
        at = {key: i for i, key in enumerate(old_names)}
        self.base_pairs = [(at[key], j) for j, key in enumerate(new_names) if key in at]

    def slot(self, old_words, i):
        """Slot `i` of the old region (a memoryview of its words) as a whole slot of this version."""
        first = i * self.old_words
        out = [0] * metrics.SLOT_WORDS
        for src, dst in self.pairs:
            out[dst] = old_words[first + src]
        return out

    def base(self, old_base):
        out = [0] * (metrics.SLOT_WORDS - metrics.STATS_AT)
        for src, dst in self.base_pairs:
            out[dst] = old_base[src]
        return out


class Upgrader:
    """The supervisor's upgrade path (see the module docstring). The supervisor calls:

      request(now)        on SIGUSR2 (this image): start the preflight
      tick(now, deadlines) every turn while the phase is UPGRADING
      take_over(env, cfg, now)  in the new image's __init__ (None if not re-executed)
      management_socket(m)      the handed-over management socket, if it fits
      start(now)          in run(): replace the workers taken over
      abort(why, now)     SIGTERM while UPGRADING
      close_in_child()    in every freshly forked worker
    and reads `sup.last_upgrade`. It drives the supervisor through a few of
    its fields and methods (phase, slots, sel, _spawn, _read_ctl).
    """

    def __init__(self, sup):
        self.sup = sup
        self.preflight = None
        self.todo = []              # slot indexes still running the old code (new image)
        self.current = None         # the slot being handed over: [slot, successor Slot, stage, deadline]
        self.notes = []             # what went less than perfectly, said in the "ok" verdict
        # per replaced worker, ms from its old process's STOP to the new one's first publication:
        # how long its callers' datagrams waited in the socket (last_upgrade["pauses_ms"])
        self.pauses = []
        self.stop_ns = 0            # when the current slot's old worker was told to stop reading
        self.legacy = None          # (Translation, mmap, words view, fd) of an older counters layout
        self.legacy_pids = {}       # slot index -> pid of an old worker still writing that layout
        self.kept = (None, 0)       # (flows memfd given to the new worker, when): until it serves
        self.told_refuse_at = None  # the drain's refuse_at the current successor was forked with (or None)

    # -- this image: preflight and exec --------------------------------------------------

    def request(self, now):
        sup = self.sup
        requested = _usec(now)
        from_version = __version__
        if sup.phase is Phase.UPGRADING and sup.last_upgrade["state"] == "pending":
            # a second request joins the one under way: its verdict answers both
            sup.last_upgrade["requested_usec"] = requested
            sup.log.notice("upgrade", "upgrade asked again: the one under way answers it")
            return True
        if sup.phase not in (Phase.SERVING, Phase.DRAINING):     # a draining host may be upgraded too
            why = {Phase.STARTING: "starting: the workers do not all serve yet",
                   Phase.RELOADING: "a reload is waiting for its verdict",
                   Phase.RESTRUCTURING: "a reload is handing flows to new workers",
                   }.get(sup.phase, "stopping")
            return self._refuse(now, requested, f"not now: {why}", notify=False)
        sup.last_upgrade = dict(no_upgrade(), state="pending", requested_usec=requested, from_version=from_version)
        sup.life.set(Phase.UPGRADING, now, "SIGUSR2: checking the new code")
        sup.notifier.reloading("upgrading: checking the new code")
        self.argv = exec_argv()
        try:
            self.preflight = Preflight(self.argv, os.environ, now)
        except OSError as exc:
            return self._refuse(now, requested, f"cannot run {self.argv[0]}: {exc.strerror or exc}")
        sup.sel.register(self.preflight.fd, selectors.EVENT_READ, self._preflight_readable)
        sup.log.notice("upgrade", "upgrade asked: checking the new code (%s)", " ".join(self.argv))
        return True

    def _preflight_readable(self):
        self.preflight.read()
        if self.preflight.result is not None:
            self._preflight_done(self.sup.clock())

    def _preflight_done(self, now):
        sup, pf = self.sup, self.preflight
        self.preflight = None
        sup.sel.unregister(pf.fd)
        pf.close()
        ok, why, doc = pf.result
        if ok:
            why = accepts(doc, structure(sup.cfg, sup.n))
        requested = sup.last_upgrade["requested_usec"]
        if why:
            return self._refuse(now, requested, why)
        sup.last_upgrade["to_version"] = doc.get("version", "")
        made = []
        try:
            state, fds = capture(sup, made)
            sup.log.verdict("notice", "upgrade: the new code (edge-relay %s) passed its preflight; executing "
                            "it in place (pid %d)", doc.get("version", "?"), os.getpid())
            sup.log.flush()
            execute(self.argv, state, fds, os.environ)
        except Exception as exc:  # noqa: BLE001 - still the old image: it must keep serving whatever happened
            for fd in made:
                os.close(fd)
            why = f"execve {self.argv[0]}: {exc.strerror or exc}" if isinstance(exc, OSError) else \
                f"cannot hand over: {type(exc).__name__}: {exc}"
            return self._refuse(now, requested, why)

    def _refuse(self, now, requested, why, notify=True):
        sup = self.sup
        sup.upgrade_failures += 1
        sup.last_upgrade = dict(no_upgrade(), state="refused", requested_usec=requested,
                                finished_usec=_usec(sup.clock()), reason=why, from_version=__version__)
        sup.log.verdict("err", "upgrade refused, edge-relay %s keeps serving: %s", __version__, why)
        if sup.phase is Phase.UPGRADING:
            sup.life.set(steady(sup.drain), now, "upgrade refused")
        if notify:
            sup.notifier.ready(f"upgrade refused: {why}; " + sup._status_text(now))
        return False

    # -- the new image: takeover and worker by worker replacement ------------------------

    def take_over(self, env, cfg, now):
        """In Supervisor.__init__: (sockets, stored flows) handed over by the previous image, or None.

        None: this process was not re-executed (the caller starts as usual).
        With a usable state, the supervisor's counters, shared regions, slots
        (their running workers and control channels) and verdicts are set
        here and the workers are replaced once the loop runs (`start`). With
        an unusable one, the inherited sockets are matched by address, the
        old workers are killed, and the verdict is "failed".
        """
        sup = self.sup
        try:
            doc = take(env)
            if doc is None:
                return None
            check_state(doc, sup.n)
        except HandoverError as exc:
            return self._fallback(exc, cfg, now)
        pool = {name: claim_socket(fd, f"socket {name}") for name, fd in doc["sockets"].items()}
        socks, fresh = bind_sockets(cfg, sup.n, pool)
        sup.fdstore.retire(pool)
        sup.fdstore.store_sockets(socks, fresh)
        layout = doc["layout"]
        if layout == counters_layout():
            sup.shared = metrics.SharedCounters(sup.n, fd=claim(doc["shared"]["fd"], "counters"))
            sup.shared.base = [list(b) for b in doc["shared"]["base"]]
        else:
            # the old workers keep writing the old layout until replaced: copied across by name
            translation = Translation(layout)
            fd = claim(doc["shared"]["fd"], "counters")
            region = mmap.mmap(fd, sup.n * layout["slot_words"] * 8, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            self.legacy = (translation, region, memoryview(region).cast("Q"), fd)
            sup.shared = metrics.SharedCounters(sup.n)
            sup.shared.base = [translation.base(b) for b in doc["shared"]["base"]]
        if layout["extra_bytes"] == metrics.EXTRA_BYTES:
            sup.extra = metrics.ExtraShared(sup.n, fd=claim(doc["extra"], "extra counters"))
        else:
            os.close(claim(doc["extra"], "extra counters"))     # the old workers' probe numbers are not shown
            sup.extra = metrics.ExtraShared(sup.n)
        if doc["http"] is not None:
            self.http_sock = claim_socket(doc["http"], "management socket", socket.SOCK_STREAM)
        sup.slots = []
        for s in doc["slots"]:
            slot = Slot(s["index"], s["cpu"])
            slot.restarts = Restarts()
            slot.restarts.deaths.extend(s["deaths"])
            slot.restarts.crash_loop = s["crash_loop"]
            slot.restarts.restart_at = s["restart_at"]
            if s["flows"] is not None:
                slot.handed = claim(s["flows"], f"worker {slot.index} flows")
            if s.get("journal") is not None:
                fd = claim(s["journal"], f"worker {slot.index} journal")
                try:
                    sup.journals[slot.index] = JournalMemory.adopt(fd)
                except (OSError, ValueError) as exc:
                    os.close(fd)
                    sup.log.warning("upgrade", "worker %d: the old image's crash journal is not usable (%s): "
                                    "a new one is made at its next start", slot.index, exc)
            if s["pid"] is not None and s["ctl"] is not None:
                slot.pid, slot.started = s["pid"], s["started"]
                slot.ctl = claim_socket(s["ctl"], f"worker {slot.index} control", socket.SOCK_SEQPACKET)
                slot.ctl.setblocking(False)
                sup.by_pid[slot.pid] = slot
                if self.legacy is not None:
                    self.legacy_pids[slot.index] = slot.pid
                sup.sel.register(slot.ctl, selectors.EVENT_READ, lambda sl=slot: sup._read_ctl(sl))
            sup.slots.append(slot)
        for key in ("generation", "reloads", "reload_failures", "last_reload", "last_reload_success",
                    "last_reload_ok", "restarts", "upgrades", "upgrade_failures"):
            setattr(sup, key, doc[key])
        if sup.config_sha256 != doc["config_sha256"]:
            sup.generation += 1
            sup.log.notice("upgrade", "the config file changed since generation %d was read: the new code runs "
                           "it as generation %d", doc["generation"], sup.generation)
        if doc.get("drain"):            # the operator's drain outlives the execve as it outlives a restart
            try:
                sup.drain = Drain.decode(doc["drain"].encode())
            except ValueError as exc:
                sup.log.warning("upgrade", "the old image's drain record ignored: %s", exc)
        sup.last_upgrade = dict(no_upgrade(), **doc["last_upgrade"])
        sup.last_upgrade.update(state="pending", to_version=__version__)
        self.todo = [slot.index for slot in sup.slots if slot.pid is not None]
        self._copy_legacy()         # the old workers' heartbeats and counters, before anyone reads them
        stored = {}
        for slot in sup.slots:      # a slot whose worker is not running: its flows go to its next one
            if slot.pid is None and slot.handed is not None:
                stored[slot.index] = take_handed(slot)
        sup.log.notice("upgrade", "edge-relay %s took over from %s in pid %d: %d sockets, %d running workers, "
                       "config generation %d", __version__, doc["from_version"], os.getpid(), len(socks),
                       len(self.todo), sup.generation)
        return socks, stored

    def _fallback(self, exc, cfg, now):
        """The previous image's state is unusable: start afresh on the inherited sockets (see the module doc)."""
        sup = self.sup
        killed = children()
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)       # their control channels are unknown: they cannot hand over
            except OSError:
                pass
        pool = name_strays(stray_pool(stray_fds()), cfg, sup.n)
        inherited = len(pool)
        socks, fresh = bind_sockets(cfg, sup.n, pool)
        sup.fdstore.retire(pool)
        sup.fdstore.store_sockets(socks, fresh)
        why = (f"the new code could not take over the running state ({exc}): it started afresh on "
               f"{inherited} of {len(socks)} inherited sockets; the old workers' flows are lost (each client's "
               "next consent check opens its flow again)")
        sup.upgrade_failures += 1
        sup.last_upgrade = dict(no_upgrade(), state="failed", requested_usec=getattr(exc, "requested_usec", 0) or
                                _usec(now), finished_usec=_usec(now), reason=why, to_version=__version__)
        sup.log.verdict("err", "upgrade failed after execve: %s (killed %d old workers)", why, len(killed))
        return socks, {}

    def management_socket(self, m):
        """The management socket handed over, if it is bound where `m` (config.Management) wants it."""
        sock = getattr(self, "http_sock", None)
        self.http_sock = None
        if sock is None:
            return None
        try:
            host, port = sock.getsockname()[:2]
            if ipaddress.ip_address(host) == ipaddress.ip_address(m.address) and port == m.port:
                sock.setblocking(False)
                return sock
        except (OSError, ValueError):
            pass
        sock.close()
        return None

    def start(self, now):
        """In run(), once the loop exists: UPGRADING until every old worker is replaced (after a takeover)."""
        sup = self.sup
        if sup.last_upgrade["state"] != "pending":
            return
        sup.life.set(Phase.UPGRADING, now, f"took over {len(self.todo)} running workers: replacing them "
                                           "one at a time")

    def _copy_legacy(self, only=None):
        """Copy the old-layout slots of the old workers still running into this version's region."""
        if self.legacy is None:
            return
        translation, region, words, fd = self.legacy
        for i, pid in list(self.legacy_pids.items()):
            if self.sup.slots[i].pid != pid:
                del self.legacy_pids[i]         # replaced or reaped: that slot is this version's now
            elif only is None or i == only:
                self.sup.shared.slot(i)[:] = array.array("Q", translation.slot(words, i))
        if not self.legacy_pids:
            words.release()
            region.close()
            os.close(fd)
            self.legacy = None

    def tick(self, now, deadlines):
        """Every turn: copy old-layout counters if any; while UPGRADING, move the upgrade on
        (append the next time something is due to `deadlines`)."""
        self._copy_legacy()
        if self.sup.phase is not Phase.UPGRADING:
            return
        if self.preflight is not None:
            if self.preflight.expire(now):
                self._preflight_done(now)
            else:
                deadlines.append(self.preflight.deadline)
            return
        sup = self.sup
        while sup.phase is Phase.UPGRADING:
            if self.current is None:
                if not self.todo:
                    return self._finish(now, "")
                slot = sup.slots[self.todo.pop(0)]
                if slot.pid is None:
                    continue        # died meanwhile: its restart (new code) is the supervisor's as usual
                succ = Slot(slot.index, slot.cpu)
                self.told_refuse_at = sup.drain.refuse_at if sup.drain is not None else None
                sup._spawn(succ, now, on_ctl=self._successor_readable)
                self.current = [slot, succ, "starting", now + SUCCESSOR_TIMEOUT]
                # verdict(): a few lines per worker and per operator request, never to be suppressed
                sup.log.verdict("info", "upgrade: worker %d: new pid %d starting beside old pid %d",
                                slot.index, succ.pid, slot.pid)
            slot, succ, stage, deadline = self.current
            if stage == "starting":
                if succ.ctl is None:
                    return self._fail(now, f"worker {slot.index}: the new code's worker (pid {succ.pid}) exited "
                                           "before it was ready (its log says why); the old workers keep serving")
                if now >= deadline:
                    self._drop_successor()
                    return self._fail(now, f"worker {slot.index}: the new code's worker was not ready within "
                                           f"{SUCCESSOR_TIMEOUT:g} s; the old workers keep serving")
                deadlines.append(deadline)
                return
            if stage == "ready":
                if slot.pid is not None and slot.ctl is not None:
                    if slot.handed is not None:     # not from this worker's stop: what it sends now counts
                        os.close(slot.handed)
                        slot.handed = None
                    slot.asked_to_stop = True
                    self.stop_ns = metrics.monotonic_ns()
                    send(slot.ctl, STOP)
                    # its exit is no death of the slot's worker: the reaper leaves it to us (its FLOWS
                    # and its hang-up still come through its channel) and the slot keeps its pid
                    sup.by_pid.pop(slot.pid, None)
                sup.log.verdict("info", "upgrade: worker %d: new pid %d ready; old pid %s stops reading and "
                                "hands over", slot.index, succ.pid, slot.pid)
                self.current[2:] = ["handing", now + HANDOVER_TIMEOUT]
                continue
            if stage == "handing":
                # handing: the old worker's flows came, or it is gone, or it took too long
                if succ.ctl is None:
                    # the new worker died after READY, its old one is stopping: the slot restarts (with
                    # the new code) as after any death, with the flows the old one handed over
                    slot.asked_to_stop = False
                    if slot.ctl is not None and slot.pid is not None:
                        sup.by_pid[slot.pid] = slot     # still running: the reaper restarts the slot
                    else:
                        if slot.pid is not None:
                            sup.shared.retire(slot.index)
                            sup.extra.clear(slot.index)
                            slot.pid = None
                        if slot.handed is not None:
                            slot.restore = take_handed(slot)
                        slot.restarts.died(now)
                    self.current = None
                    return self._fail(now, f"worker {slot.index}: the new code's worker (pid {succ.pid}) died "
                                           "while taking over (its log says why); that slot restarts with the "
                                           "new code, the other old workers keep serving")
                if slot.handed is None and slot.ctl is not None:
                    if now < deadline:
                        deadlines.append(deadline)
                        return
                    self.notes.append(f"worker {slot.index}'s old process did not hand over within "
                                      f"{HANDOVER_TIMEOUT:g} s (killed; its flows are relearned)")
                    try:
                        os.kill(slot.pid, signal.SIGKILL)
                    except OSError:
                        pass
                elif slot.handed is None and slot.pid is not None:
                    self.notes.append(f"worker {slot.index}'s old process exited without handing over "
                                      "(its flows are relearned)")
                self._hand_over(slot, succ, now)
                self.current[2:] = ["taking", now + SUCCESSOR_TIMEOUT]
                continue
            # taking: the slot is the new worker's; the next slot waits until it serves (its first
            # publication), so that a new code that dies once it reads fails the upgrade at one slot
            handed_ns = self.kept[1]
            if slot.pid != succ.pid:
                # it died: the reaper restarts the slot (new code); the flows we kept go with it
                # (the reaper took them already when it restarts at once: kept_flows)
                if slot.pid is None and not slot.restore:
                    slot.restore = self.kept_flows(slot)
                self._release_kept()
                self.current = None
                return self._fail(now, f"worker {slot.index}: the new code's worker (pid {succ.pid}) died while "
                                       "taking over (its log says why); that slot restarts with the new code, "
                                       "the other old workers keep serving")
            served_ns = sup.shared.words[slot.index * metrics.SLOT_WORDS + metrics.HEARTBEAT]
            if served_ns > handed_ns:
                self._release_kept()
                self.current = None
                if self.stop_ns:
                    pause = round((served_ns - self.stop_ns) / 1e6, 1)
                    self.pauses.append(pause)
                    sup.log.verdict("info", "upgrade: worker %d: new pid %d serves, %.1f ms after its old "
                                    "process stopped reading (flows handed over after %.1f ms)", slot.index,
                                    succ.pid, pause, (handed_ns - self.stop_ns) / 1e6)
                    self.stop_ns = 0
                continue
            if now >= deadline:
                self._release_kept()
                self.current = None
                return self._fail(now, f"worker {slot.index}: the new code's worker (pid {succ.pid}) took over "
                                       f"but did not serve within {SUCCESSOR_TIMEOUT:g} s")
            deadlines.append(min(deadline, now + 0.01))
            return

    def kept_flows(self, slot):
        """The flows handed to `slot`'s new worker if that worker is still taking over (the reaper asks
        when it died: its restart gets them), else None."""
        fd = self.kept[0]
        if fd is None or self.current is None or self.current[0] is not slot:
            return None
        try:
            return sdnotify.memfd_read(fd)
        except (OSError, ValueError):
            return None

    def _release_kept(self):
        fd, self.kept = self.kept[0], (None, 0)
        if fd is not None:
            os.close(fd)

    def _successor_readable(self):
        slot, succ, stage, _ = self.current
        while succ.ctl is not None:
            try:
                msg = succ.ctl.recv(CTL_MAX)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                self.sup.sel.unregister(succ.ctl)
                succ.ctl.close()
                succ.ctl = None
                return
            if decode(msg)[0] == READY and stage == "starting":
                self.current[2] = stage = "ready"

    def _hand_over(self, slot, succ, now):
        """The old worker of `slot` has stopped: give its flows to `succ` and make `succ` the slot's process."""
        sup = self.sup
        old = slot.pid
        if slot.ctl is not None:
            sup._close_ctl(slot)
        if old is not None:
            self._copy_legacy(only=slot.index)      # its last publication, if it wrote an older layout
            self.legacy_pids.pop(slot.index, None)
            sup.by_pid.pop(old, None)       # its exit is no death of the slot's worker
            base = slot.index * metrics.SLOT_WORDS
            heartbeat = sup.shared.words[base + metrics.HEARTBEAT]
            generation = sup.shared.words[base + metrics.GENERATION]
            sup.shared.retire(slot.index)
            # the slot is served throughout (datagrams wait in its socket): keep it "up" until
            # the new worker's first publication a moment from now
            sup.shared.words[base + metrics.HEARTBEAT] = heartbeat
            sup.shared.words[base + metrics.GENERATION] = generation
        slot.restarts.cancel()              # an old worker that died meanwhile: the successor is its restart
        if slot.handed is None and slot.restore:
            slot.handed = sdnotify.memfd_write(f"edge-relay-flows{slot.index}", slot.restore)
        slot.restore = None
        fds = [slot.handed] if slot.handed is not None else []
        slot.handed = None
        # the flows stay ours too until the new worker serves: if it dies first, its restart gets them
        self.kept = (fds[0] if fds else None, metrics.monotonic_ns())
        try:
            socket.send_fds(succ.ctl, [TAKE], fds)
        except OSError:
            pass                            # it died this instant: the reaper restarts the slot
        # a drain begun or cancelled while it was built went to the slot's old worker only (until TAKE
        # it reads nothing else): the operator's drain as it is now, read right after TAKE
        want = sup.drain.refuse_at if sup.drain is not None else None
        if want != self.told_refuse_at:
            send(succ.ctl, encode_drain(want) if want is not None else UNDRAIN)
        sup.sel.modify(succ.ctl, selectors.EVENT_READ, lambda s=slot: sup._read_ctl(s))
        slot.pid, slot.ctl, slot.started = succ.pid, succ.ctl, succ.started
        slot.asked_to_stop = False
        slot.reload_failed = None
        sup.by_pid[slot.pid] = slot
        sup.log.verdict("notice", "upgrade: worker %d: new pid %d took over from %s%s", slot.index, slot.pid,
                        f"old pid {old}" if old is not None else "a worker that had died",
                        " with its flows" if fds else " (no flows handed over)")

    def _drop_successor(self):
        """Call the current successor off: it never read a datagram (hang up: it exits; kill to be sure)."""
        _, succ, _, _ = self.current
        self.current = None
        if succ.ctl is not None:
            self.sup.sel.unregister(succ.ctl)
            succ.ctl.close()
            succ.ctl = None
        try:
            os.kill(succ.pid, signal.SIGKILL)
        except OSError:
            pass

    def _fail(self, now, why):
        self.todo = []
        if self.current is not None:
            self._drop_successor()
        return self._finish(now, why)

    def _finish(self, now, why):
        sup = self.sup
        v = sup.last_upgrade
        v.update(state="failed" if why else "ok", finished_usec=_usec(sup.clock()),
                 reason=why or "; ".join(self.notes), pauses_ms=list(self.pauses))
        if why:
            sup.upgrade_failures += 1
            sup.log.verdict("err", "upgrade to edge-relay %s failed: %s", __version__, why)
        else:
            sup.upgrades += 1
            sup.log.verdict("notice", "upgrade done: every worker runs edge-relay %s (was %s), pid %d%s",
                            __version__, v.get("from_version") or "?", os.getpid(),
                            f"; {v['reason']}" if v["reason"] else "")
        if sup.phase is Phase.UPGRADING:
            sup.life.set(steady(sup.drain), now, "upgrade " + ("failed" if why else "done"))
        sup.notifier.ready((f"upgrade failed: {why}; " if why else "") + sup._status_text(now))

    def abort(self, why, now):
        """SIGTERM while UPGRADING: no more replacements; what runs now is what stops.

        A successor is called off (it never read a datagram); if its old worker
        was already stopping, that one's flows reach the fd store as any
        stopping worker's do.
        """
        sup = self.sup
        if self.preflight is not None:
            pf, self.preflight = self.preflight, None
            sup.sel.unregister(pf.fd)
            try:
                os.kill(pf.pid, signal.SIGKILL)
            except OSError:
                pass
            pf.close()
            self._refuse(now, sup.last_upgrade["requested_usec"], why, notify=False)
            return
        self.todo = []
        if self.current is not None and self.current[2] == "taking":
            self._release_kept()            # it is the slot's worker already: it stops like the others
            self.current = None
        if self.current is not None:
            slot = self.current[0]
            if self.current[2] == "handing" and slot.pid is not None:
                sup.by_pid[slot.pid] = slot     # stopping already: the stop waits for it and keeps its flows
            self._drop_successor()
        if sup.last_upgrade["state"] == "pending":
            sup.last_upgrade.update(state="failed", finished_usec=_usec(sup.clock()), reason=why)
            sup.upgrade_failures += 1
            sup.log.verdict("err", "upgrade to edge-relay %s stopped: %s", __version__, why)

    def close_in_child(self):
        """In a freshly forked worker: close what the upgrade holds (a successor's channel, the preflight's
        pipe, the flows kept for a new worker)."""
        if self.current is not None and self.current[1].ctl is not None:
            self.current[1].ctl.close()
        if self.preflight is not None:
            os.close(self.preflight.fd)
        if self.kept[0] is not None:
            os.close(self.kept[0])
        if self.legacy is not None:
            os.close(self.legacy[3])


# -- what crosses the execve --------------------------------------------------------------------

def capture(sup, made):
    """(state document, fds to keep) of supervisor `sup`, for the new image's `Upgrader.take_over`.

    Memfds created here are appended to `made` (the caller closes them if the execve fails).
    """
    fds = []

    def keep(fd):
        fds.append(fd)
        return fd

    slots = []
    for slot in sup.slots:
        flows, restore = slot.handed, slot.restore
        if flows is None and not restore and slot.pid is None:
            # dead, waiting for its restart: its flows are in this image's crash journal, which the
            # execve does not carry
            restore = sup._journaled_flows(slot.index, sup.clock())
        if flows is None and restore:
            flows = sdnotify.memfd_write(f"edge-relay-flows{slot.index}", restore)
            made.append(flows)
        slots.append({"index": slot.index, "cpu": slot.cpu, "pid": slot.pid,
                      "ctl": keep(slot.ctl.fileno()) if slot.ctl is not None else None,
                      "started": slot.started, "flows": keep(flows) if flows is not None else None,
                      "deaths": list(slot.restarts.deaths), "crash_loop": slot.restarts.crash_loop,
                      "restart_at": slot.restarts.restart_at,
                      # a running worker keeps writing its journal: the new image holds it on for its
                      # successor (a dead slot's journaled flows went into "flows" above)
                      "journal": keep(sup.journals[slot.index].fd)
                      if slot.pid is not None and sup.journals.get(slot.index) is not None else None})
    doc = {
        "version": STATE_VERSION, "pid": os.getpid(), "from_version": __version__,
        "config_path": str(sup.config_path), "n": sup.n,
        "sockets": {name: keep(sock.fileno()) for name, sock in sup.socks.items()},
        "shared": {"fd": keep(sup.shared.fd), "base": sup.shared.base},
        "extra": keep(sup.extra.fd),
        "http": keep(sup.http.sock.fileno()) if sup.http is not None else None,
        "layout": counters_layout(),
        "slots": slots,
        "generation": sup.generation, "reloads": sup.reloads, "reload_failures": sup.reload_failures,
        "config_sha256": sup.config_sha256, "last_reload": sup.last_reload,
        "last_reload_success": sup.last_reload_success, "last_reload_ok": sup.last_reload_ok,
        "restarts": sup.restarts, "upgrades": sup.upgrades, "upgrade_failures": sup.upgrade_failures,
        "last_upgrade": sup.last_upgrade,
        "drain": sup.drain.encode().decode() if sup.drain is not None else None,
    }
    return doc, fds


def check_state(doc, n):
    """Raise HandoverError unless `doc` is a whole state for `n` workers whose every fd is open."""
    def fd_ok(fd, what):
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 3:
            raise HandoverError(f"{what}: {fd!r} is not an inherited fd")
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as exc:
            raise HandoverError(f"{what}: fd {fd} is not open: {exc.strerror}") from None
    try:
        if doc["pid"] != os.getpid():
            raise HandoverError(f"state of pid {doc['pid']}, this is pid {os.getpid()}")
        if doc["n"] != n or len(doc["slots"]) != n:
            raise HandoverError(f"state for {doc['n']} workers, the config now asks for {n}")
        for name, fd in doc["sockets"].items():
            fd_ok(fd, f"socket {name}")
        fd_ok(doc["shared"]["fd"], "counters")
        fd_ok(doc["extra"], "extra counters")
        if doc["http"] is not None:
            fd_ok(doc["http"], "management socket")
        for s in doc["slots"]:
            for key in ("ctl", "flows", "journal"):       # "journal": not in older images' states
                if s.get(key) is not None:
                    fd_ok(s[key], f"worker {s['index']} {key}")
            if s["pid"] is not None and not isinstance(s["pid"], int):
                raise HandoverError(f"worker {s['index']}: pid {s['pid']!r}")
        for key in ("generation", "reloads", "reload_failures", "restarts", "upgrades", "upgrade_failures"):
            if not isinstance(doc[key], int):
                raise HandoverError(f"{key}: {doc[key]!r} is not a number")
        Translation(doc["layout"])      # every name and position it needs is there
        if not isinstance(doc["layout"]["extra_bytes"], int):
            raise HandoverError("layout: extra_bytes is not a number")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, HandoverError):
            raise
        raise HandoverError(f"state incomplete: {exc!r}") from None


def name_strays(socks, cfg, n):
    """{fd-store name: socket} for the unnamed inherited UDP `socks` that fit what `cfg` wants; the rest closed."""
    left = list(socks)
    pool = {}
    for name, address, port, reuseport, _ in wanted_sockets(cfg, n):
        for sock in left:
            if socket_matches(sock, address, port, reuseport):
                pool[name] = sock
                left.remove(sock)
                break
    for sock in left:
        sock.close()
    return pool
