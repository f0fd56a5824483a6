"""Upgrade in place: the supervisor executes the code now on disk without giving up its PID or sockets.

Theory of operation
  An upgrade is asked for with SIGUSR2 (`edge-relay upgrade` sends it and
  waits for the verdict in GET /status, like `reload`). It runs in three steps,
  each of which can only fail in a way that leaves calls served:

  1. Preflight. The supervisor runs the command line that started it
     (`exec_argv`: sys.executable and sys.orig_argv, so the same interpreter
     path, options and script, which now resolve to the new files) with
     `--preflight` appended, as a child process that never touches a socket.
     That child imports every runtime module of the new code, loads the
     config and its keys, and prints PREFLIGHT_MARK and a JSON line: its
     version, the handover state versions it reads, and the socket structure
     the config asks for. Anything else (an ImportError, a bad key, an older
     version that knows no --preflight, a structure change, no answer within
     PREFLIGHT_TIMEOUT) is verdict "refused" with the child's last line as the
     reason: nothing has changed, the old code keeps serving.

  2. Exec. The supervisor writes its state (`capture`: which fd is which
     socket, the shared counter regions, the management socket, each worker's
     pid and control channel, the config generation, the reload and upgrade
     verdicts) as JSON into a sealed memfd, clears close-on-exec on exactly
     those fds, blocks the signals it handles (the mask survives execve(2), so
     a SIGHUP or SIGTERM arriving before the new image has its handlers waits
     instead of killing the process) and calls execve(2) with the same argv.
     The PID, the sockets (and their queued datagrams) and the worker
     processes are untouched. If execve itself fails, the old image carries
     on: verdict "refused".

  3. Takeover, in the new image (`take`). The state is read back and checked;
     the sockets, shared regions and workers are adopted, then each old
     worker is replaced in turn (supervisor.py): the new worker is forked and
     built (config and keys loaded) and says b"ready" before its old worker
     is asked to stop; the old one snapshots its flows and exits, the new one
     restores them and only then reads the sockets. Datagrams meanwhile wait
     in the socket buffers. Verdict "ok" once every slot runs the new code.

  After execve there is no going back to the old image (its files may be gone).
  A state the new code cannot read (`HandoverError`) falls back to a plain
  start on the inherited sockets (`stray_fds`, matched by address like the
  fd store's): the old workers are killed, their flows are lost (relearned at
  each client's next consent check), and the verdict is "failed" with the
  reason. The process still serves.
"""

import fcntl
import importlib
import json
import os
import pkgutil
import signal
import socket
import sys

# Only these at import: the preflight imports this module first, then every other one of the
# (new) package itself, so that a broken module is named in its reason rather than a traceback.
from . import sdnotify
from .control import CTL_MAX

ENV_STATE = "EDGE_RELAY_HANDOVER"     # "<state memfd> <request usec>", set only across our own execve
STATE_VERSION = 1                     # bump when `capture`'s document changes incompatibly
READS_VERSIONS = (1,)                 # the state versions this code can take over from
PREFLIGHT_FLAG = "--preflight"
PREFLIGHT_MARK = "edge-relay preflight ok "
PREFLIGHT_TIMEOUT = 60.0              # seconds the new code may take to import and load config and keys
PREFLIGHT_OUTPUT_MAX = 64 * 1024      # bytes of the child's output kept (its last line is the reason)
STATE_MAX = 4 << 20                   # a handover state larger than this is not ours
# Signals the supervisor handles in its loop; blocked across execve until the new image handles them.
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR2)
# The environment a preflight child must not see: it must not notify systemd nor take fds.
_CHILD_DROPS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                "LISTEN_FDNAMES", ENV_STATE)


class HandoverError(ValueError):
    """The state handed over by the previous image cannot be used (names what is wrong)."""


def exec_argv():
    """The command line that started this interpreter, to run again: the same paths, the new files.

    sys.executable (absolute) replaces argv[0], which the kernel took from a
    shebang or a PATH lookup; the rest is sys.orig_argv as given (interpreter
    options such as -I, the script or -m, the subcommand and its options).
    """
    return [sys.executable, *sys.orig_argv[1:]]


# -- step 1: preflight ------------------------------------------------------------------------

def runtime_modules():
    """Every module of the package the relay may import, lazily or not (not the demo, not __main__)."""
    import edge_relay
    return sorted(m.name for m in pkgutil.iter_modules(edge_relay.__path__)
                  if not m.name.startswith("demo") and m.name != "__main__")


def preflight_main(config_path, workers):
    """`edge-relay run --preflight`: what an upgrade checks in the new code; prints the verdict line.

    Raises what loading raises (cli.main turns an EdgeRelayError into one
    line and exit 78, anything else into a traceback and exit 70).
    """
    from . import __version__, config as config_mod
    for name in runtime_modules():
        try:
            importlib.import_module(f"edge_relay.{name}")
        except Exception as exc:  # noqa: BLE001 - whatever breaks an import, the reason is one line
            text = " ".join(str(exc).split())[:300]
            print(f"edge-relay preflight: cannot import edge_relay.{name}: {type(exc).__name__}: {text}",
                  file=sys.stderr, flush=True)
            return 70       # EX_SOFTWARE, as cli.main exits for a bug
    from .fdstore import structure
    cfg, _ = config_mod.load_with_keys(config_path)
    n = workers or cfg.effective_workers()
    doc = {"version": __version__, "reads": list(READS_VERSIONS), "structure": structure_doc(structure(cfg, n))}
    print(PREFLIGHT_MARK + json.dumps(doc, sort_keys=True), flush=True)
    return 0


def structure_doc(structure):
    """supervisor.structure(...) as JSON-comparable lists."""
    return json.loads(json.dumps(structure))


class Preflight:
    """The new code's check, run as a child (never waited on here: the supervisor's SIGCHLD loop reaps it).

    Register `fileno()` for reading and call `read()` when it is readable;
    `result` is None until the child's output ends, then (ok, reason, doc).
    """

    def __init__(self, argv, env, now, timeout=PREFLIGHT_TIMEOUT):
        child_env = {k: v for k, v in env.items() if k not in _CHILD_DROPS}
        r, w = os.pipe()        # both close-on-exec; the child gets w as its stdout and stderr
        try:
            self.pid = os.posix_spawn(argv[0], [*argv, PREFLIGHT_FLAG], child_env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, w, 2)])
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self.fd = r
        self.deadline = now + timeout
        self.timeout = timeout
        self.output = bytearray()
        self.result = None

    def fileno(self):
        return self.fd

    def read(self):
        """Take what the child wrote; at end of output, settle `result`."""
        while self.result is None:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.result = judge(bytes(self.output))
                return
            self.output += chunk
            del self.output[:-PREFLIGHT_OUTPUT_MAX]

    def expire(self, now):
        """Past the deadline: kill the child and settle "refused"; True if it did."""
        if self.result is not None or now < self.deadline:
            return False
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        self.result = (False, f"the new code's preflight did not finish within {self.timeout:g} s", None)
        return True

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def judge(output):
    """(ok, reason, doc) of a preflight child's whole output."""
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(PREFLIGHT_MARK):
            try:
                doc = json.loads(line[len(PREFLIGHT_MARK):])
                if isinstance(doc, dict) and isinstance(doc.get("reads"), list):
                    return True, "", doc
            except ValueError:
                pass
            return False, f"the new code's preflight answer is unreadable: {line[:200]!r}", None
    # cli.main's own last word after a traceback says only "internal error": the exception line says why
    lines = [line for line in lines if not line.endswith("internal error (a bug); exit 70")] or lines
    if not lines:
        return False, "the new code's preflight exited without a word", None
    return False, f"the new code does not start: {lines[-1][:300]}", None


def accepts(doc, structure):
    """Why the preflight answer `doc` cannot take over a supervisor of `structure`, or "" if it can."""
    if STATE_VERSION not in doc.get("reads", ()):
        return (f"the new code ({doc.get('version', '?')}) cannot read this version's handover state "
                f"(version {STATE_VERSION}; it reads {doc.get('reads')}): restart instead")
    if doc.get("structure") != structure_doc(structure):
        return ("the config on disk changes the listeners, the internal address or port, or the worker "
                "count: reload it first (edge-relay reload), then upgrade")
    return ""


# -- step 2: exec -----------------------------------------------------------------------------

def execute(argv, state, fds, env):
    """Replace this process image with `argv`, handing over `state` (a JSON-able dict) and `fds`.

    Returns only if execve failed, with every change undone (OSError raised).
    Caller: flush logs first; nothing after this runs in the old image.
    """
    fd = sdnotify.memfd_write("edge-relay-handover", json.dumps(state).encode("utf-8"))
    keep = [*fds, fd]
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        for k in keep:
            os.set_inheritable(k, True)
        sys.stdout.flush()
        sys.stderr.flush()
        requested = (state.get("last_upgrade") or {}).get("requested_usec", 0)
        os.execve(argv[0], argv, dict(env, **{ENV_STATE: f"{fd} {requested}"}))
    except BaseException:
        for k in fds:
            try:
                os.set_inheritable(k, False)
            except OSError:
                pass
        os.close(fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise


def unblock():
    """Undo the mask `execute` set (the new image calls this once its handlers are in place)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


# -- step 3: takeover -------------------------------------------------------------------------

def take(env):
    """The state the previous image handed over (a dict), or None when this process was not re-executed.

    Removes ENV_STATE from `env` (children must not see it) and closes the
    state memfd. Raises HandoverError when a state was handed over but cannot
    be used: the caller falls back to a plain start (`stray_fds`).
    """
    raw = env.pop(ENV_STATE, None)
    if raw is None:
        return None
    # "<fd> <requested_usec>": the request's time rides outside the state, so that even a
    # verdict about an unreadable state answers the request it belongs to
    text, _, requested = raw.partition(" ")
    usec = int(requested) if requested.isascii() and requested.isdigit() else 0
    try:
        return _read_state(text)
    except HandoverError as exc:
        exc.requested_usec = usec
        raise


def _read_state(text):
    if not (text.isascii() and text.isdigit()):
        raise HandoverError(f"${ENV_STATE}={text[:20]!r} is not an fd number")
    fd = int(text)
    try:
        data = sdnotify.memfd_read(fd, STATE_MAX)
    except (OSError, ValueError) as exc:
        raise HandoverError(f"state fd {fd} unreadable: {exc}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise HandoverError(f"state is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HandoverError("state is not a JSON object")
    if doc.get("version") not in READS_VERSIONS:
        raise HandoverError(f"state version {doc.get('version')!r} is not one this code reads {READS_VERSIONS}")
    return doc


def claim(fd, what):
    """An fd named by the state: checked open, made close-on-exec again (no later child inherits it)."""
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 3:
        raise HandoverError(f"{what}: {fd!r} is not an inherited fd")
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    except OSError as exc:
        raise HandoverError(f"{what}: fd {fd} is not open: {exc.strerror}") from None
    return fd


def claim_socket(fd, what, kind=socket.SOCK_DGRAM):
    sock = socket.socket(fileno=claim(fd, what))
    if sock.type != kind:
        sock.detach()
        raise HandoverError(f"{what}: fd {fd} is not the expected socket type")
    return sock


def stray_fds():
    """Inherited fds >= 3 (not close-on-exec): what a previous image left us when its state is unusable.

    Everything this interpreter opened itself is close-on-exec (PEP 446).
    """
    out = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        fd = int(name)
        if fd < 3:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                out.append(fd)
        except OSError:
            pass            # the fd listdir itself used
    return sorted(out)


def stray_pool(fds):
    """The UDP sockets among inherited `fds`, for supervisor.bind_sockets to match by address.

    The previous image's other fds are closed: its control channels and
    management socket (AF_UNIX and TCP sockets) and its memfds. Anything else
    came from whoever started us and is left alone.
    """
    socks = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            os.close(fd)
            continue
        if not target.startswith("socket:"):
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        sock.set_inheritable(False)
        if sock.type == socket.SOCK_DGRAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            socks.append(sock)
        else:
            sock.close()
    return socks


def children():
    """Pids of this process's children (the old image's workers, when its state is unusable)."""
    out = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


# -- the supervisor's side: one request, from SIGUSR2 to the verdict ----------------------------

SUCCESSOR_TIMEOUT = 30.0     # seconds a new worker may take to say READY (it loads config and keys)
HANDOVER_TIMEOUT = 5.0       # seconds an old worker may take to hand its flows over after STOP


def no_upgrade():
    """`last_upgrade` before any request (GET /status)."""
    return {"state": "none", "requested_usec": 0, "finished_usec": 0, "reason": "", "from_version": "",
            "to_version": ""}


def _usec(now):
    return int(now * 1_000_000)


class Upgrader:
    """The supervisor's upgrade path (see the module docstring). The supervisor calls:

      request(now)        on SIGUSR2 (this image): start the preflight
      tick(now, deadlines) every turn while the phase is UPGRADING
      take_over(env, cfg, now)  in the new image's __init__ (None if not re-executed)
      management_socket(m)      the handed-over management socket, if it fits
      start(now)          in run(): replace the workers taken over
      abort(why, now)     SIGTERM while UPGRADING
    and reads `sup.last_upgrade`. It drives the supervisor through a few of
    its fields and methods (phase, slots, sel, _spawn, _read_ctl).
    """

    def __init__(self, sup):
        self.sup = sup
        self.preflight = None
        self.todo = []              # slot indexes still running the old code (new image)
        self.current = None         # the slot being handed over: [slot, successor Slot, stage, deadline]
        self.notes = []             # what went less than perfectly, said in the "ok" verdict

    # -- this image: preflight and exec --------------------------------------------------

    def request(self, now):
        sup = self.sup
        from .lifecycle import Phase
        requested = _usec(now)
        from_version = _version()
        if sup.phase is Phase.UPGRADING and sup.last_upgrade["state"] == "pending":
            # a second request joins the one under way: its verdict answers both
            sup.last_upgrade["requested_usec"] = requested
            sup.log.notice("upgrade", "upgrade asked again: the one under way answers it")
            return True
        if sup.phase is not Phase.SERVING:
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
        sup.sel.register(self.preflight.fd, selectors_read(), self._preflight_readable)
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
            from .fdstore import structure
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
        from .lifecycle import Phase
        sup = self.sup
        sup.upgrade_failures += 1
        sup.last_upgrade = dict(no_upgrade(), state="refused", requested_usec=requested,
                                finished_usec=_usec(sup.clock()), reason=why, from_version=_version())
        sup.log.verdict("err", "upgrade refused, edge-relay %s keeps serving: %s", _version(), why)
        if sup.phase is Phase.UPGRADING:
            sup.life.set(Phase.SERVING, now, "upgrade refused")
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
        from . import metrics
        from .fdstore import bind_sockets
        from .lifecycle import Restarts
        from .workerproc import Slot
        pool = {name: claim_socket(fd, f"socket {name}") for name, fd in doc["sockets"].items()}
        socks, fresh = bind_sockets(cfg, sup.n, pool)
        sup.fdstore.retire(pool)
        sup.fdstore.store_sockets(socks, fresh)
        sup.shared = metrics.SharedCounters(sup.n, fd=claim(doc["shared"]["fd"], "counters"))
        sup.shared.base = [list(b) for b in doc["shared"]["base"]]
        sup.extra = metrics.ExtraShared(sup.n, fd=claim(doc["extra"], "extra counters"))
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
            if s["pid"] is not None and s["ctl"] is not None:
                slot.pid, slot.started = s["pid"], s["started"]
                slot.ctl = claim_socket(s["ctl"], f"worker {slot.index} control", socket.SOCK_SEQPACKET)
                slot.ctl.setblocking(False)
                sup.by_pid[slot.pid] = slot
                sup.sel.register(slot.ctl, selectors_read(), lambda sl=slot: sup._read_ctl(sl))
            sup.slots.append(slot)
        for key in ("generation", "reloads", "reload_failures", "last_reload", "last_reload_success",
                    "last_reload_ok", "restarts", "upgrades", "upgrade_failures"):
            setattr(sup, key, doc[key])
        if sup.config_sha256 != doc["config_sha256"]:
            sup.generation += 1
            sup.log.notice("upgrade", "the config file changed since generation %d was read: the new code runs "
                           "it as generation %d", doc["generation"], sup.generation)
        sup.last_upgrade = dict(no_upgrade(), **doc["last_upgrade"])
        sup.last_upgrade.update(state="pending", to_version=_version())
        self.todo = [slot.index for slot in sup.slots if slot.pid is not None]
        stored = {}
        for slot in sup.slots:      # a slot whose worker is not running: its flows go to its next one
            if slot.pid is None and slot.handed is not None:
                from .workerproc import take_handed
                stored[slot.index] = take_handed(slot)
        sup.log.notice("upgrade", "edge-relay %s took over from %s in pid %d: %d sockets, %d running workers, "
                       "config generation %d", _version(), doc["from_version"], os.getpid(), len(socks),
                       len(self.todo), sup.generation)
        return socks, stored

    def _fallback(self, exc, cfg, now):
        """The previous image's state is unusable: start afresh on the inherited sockets (see the module doc)."""
        sup = self.sup
        from .fdstore import bind_sockets
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
                                _usec(now), finished_usec=_usec(now), reason=why, to_version=_version())
        sup.log.verdict("err", "upgrade failed after execve: %s (killed %d old workers)", why, len(killed))
        return socks, {}

    def management_socket(self, m):
        """The management socket handed over, if it is bound where `m` (config.Management) wants it."""
        sock = getattr(self, "http_sock", None)
        self.http_sock = None
        if sock is None:
            return None
        try:
            import ipaddress
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
        from .lifecycle import Phase
        sup = self.sup
        if sup.last_upgrade["state"] != "pending":
            return
        sup.life.set(Phase.UPGRADING, now, f"took over {len(self.todo)} running workers: replacing them "
                                           "one at a time")

    def tick(self, now, deadlines):
        """Move the upgrade on; append the next time something is due to `deadlines`."""
        if self.preflight is not None:
            if self.preflight.expire(now):
                self._preflight_done(now)
            else:
                deadlines.append(self.preflight.deadline)
            return
        from .lifecycle import Phase
        sup = self.sup
        while sup.phase is Phase.UPGRADING:
            if self.current is None:
                if not self.todo:
                    return self._finish(now, "")
                slot = sup.slots[self.todo.pop(0)]
                if slot.pid is None:
                    continue        # died meanwhile: its restart (new code) is the supervisor's as usual
                from .workerproc import Slot
                succ = Slot(slot.index, slot.cpu)
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
                    slot.asked_to_stop = True
                    from .control import STOP
                    from .workerproc import send
                    send(slot.ctl, STOP)
                sup.log.verdict("info", "upgrade: worker %d: new pid %d ready; old pid %s stops reading and "
                                "hands over", slot.index, succ.pid, slot.pid)
                self.current[2:] = ["handing", now + HANDOVER_TIMEOUT]
                continue
            # handing: the old worker's flows came, or it is gone, or it took too long
            if slot.handed is None and slot.pid is not None:
                if now < deadline:
                    deadlines.append(deadline)
                    return
                self.notes.append(f"worker {slot.index}'s old process did not hand over within "
                                  f"{HANDOVER_TIMEOUT:g} s (killed; its flows are relearned)")
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except OSError:
                    pass
            self._hand_over(slot, succ, now)
            self.current = None

    def _successor_readable(self):
        slot, succ, stage, _ = self.current
        from .control import READY, decode
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
        from . import metrics
        from .control import TAKE
        old = slot.pid
        if slot.ctl is not None:
            sup._close_ctl(slot)
        if old is not None:
            sup.by_pid.pop(old, None)       # its exit is no death of the slot's worker
            base = slot.index * metrics.SLOT_WORDS
            heartbeat = sup.shared.words[base + metrics.HEARTBEAT]
            generation = sup.shared.words[base + metrics.GENERATION]
            sup.shared.retire(slot.index)
            # the slot is served throughout (datagrams wait in its socket): keep it "up" until
            # the new worker's first publication a moment from now
            sup.shared.words[base + metrics.HEARTBEAT] = heartbeat
            sup.shared.words[base + metrics.GENERATION] = generation
        fds = [slot.handed] if slot.handed is not None else []
        slot.handed = None
        try:
            socket.send_fds(succ.ctl, [TAKE], fds)
        except OSError:
            pass                            # it died this instant: the reaper restarts the slot
        finally:
            for fd in fds:
                os.close(fd)
        sup.sel.modify(succ.ctl, selectors_read(), lambda s=slot: sup._read_ctl(s))
        slot.pid, slot.ctl, slot.started = succ.pid, succ.ctl, succ.started
        slot.asked_to_stop = False
        slot.reload_failed = None
        sup.by_pid[slot.pid] = slot
        sup.log.verdict("notice", "upgrade: worker %d: new pid %d took over from old pid %s%s", slot.index,
                        slot.pid, old, " with its flows" if fds else " (no flows handed over)")

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
        from .lifecycle import Phase
        sup = self.sup
        v = sup.last_upgrade
        v.update(state="failed" if why else "ok", finished_usec=_usec(sup.clock()),
                 reason=why or "; ".join(self.notes))
        if why:
            sup.upgrade_failures += 1
            sup.log.verdict("err", "upgrade to edge-relay %s failed: %s", _version(), why)
        else:
            sup.upgrades += 1
            sup.log.verdict("notice", "upgrade done: every worker runs edge-relay %s (was %s), pid %d%s",
                            _version(), v.get("from_version") or "?", os.getpid(),
                            f"; {v['reason']}" if v["reason"] else "")
        if sup.phase is Phase.UPGRADING:
            sup.life.set(Phase.SERVING, now, "upgrade " + ("failed" if why else "done"))
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
        if self.current is not None:
            self._drop_successor()
        if sup.last_upgrade["state"] == "pending":
            sup.last_upgrade.update(state="failed", finished_usec=_usec(sup.clock()), reason=why)
            sup.upgrade_failures += 1
            sup.log.verdict("err", "upgrade to edge-relay %s stopped: %s", _version(), why)

    def close_in_child(self):
        """In a freshly forked worker: close what the upgrade holds (a successor's channel, the preflight's pipe)."""
        if self.current is not None and self.current[1].ctl is not None:
            self.current[1].ctl.close()
        if self.preflight is not None:
            os.close(self.preflight.fd)


def _version():
    from . import __version__
    return __version__


def selectors_read():
    import selectors
    return selectors.EVENT_READ


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
        flows = slot.handed
        if flows is None and slot.restore:
            flows = sdnotify.memfd_write(f"edge-relay-flows{slot.index}", slot.restore)
            made.append(flows)
        slots.append({"index": slot.index, "cpu": slot.cpu, "pid": slot.pid,
                      "ctl": keep(slot.ctl.fileno()) if slot.ctl is not None else None,
                      "started": slot.started, "flows": keep(flows) if flows is not None else None,
                      "deaths": list(slot.restarts.deaths), "crash_loop": slot.restarts.crash_loop,
                      "restart_at": slot.restarts.restart_at})
    doc = {
        "version": STATE_VERSION, "pid": os.getpid(), "from_version": _version(),
        "config_path": str(sup.config_path), "n": sup.n,
        "sockets": {name: keep(sock.fileno()) for name, sock in sup.socks.items()},
        "shared": {"fd": keep(sup.shared.fd), "base": sup.shared.base},
        "extra": keep(sup.extra.fd),
        "http": keep(sup.http.sock.fileno()) if sup.http is not None else None,
        "slots": slots,
        "generation": sup.generation, "reloads": sup.reloads, "reload_failures": sup.reload_failures,
        "config_sha256": sup.config_sha256, "last_reload": sup.last_reload,
        "last_reload_success": sup.last_reload_success, "last_reload_ok": sup.last_reload_ok,
        "restarts": sup.restarts, "upgrades": sup.upgrades, "upgrade_failures": sup.upgrade_failures,
        "last_upgrade": sup.last_upgrade,
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
            for key in ("ctl", "flows"):
                if s[key] is not None:
                    fd_ok(s[key], f"worker {s['index']} {key}")
            if s["pid"] is not None and not isinstance(s["pid"], int):
                raise HandoverError(f"worker {s['index']}: pid {s['pid']!r}")
        for key in ("generation", "reloads", "reload_failures", "restarts", "upgrades", "upgrade_failures"):
            if not isinstance(doc[key], int):
                raise HandoverError(f"{key}: {doc[key]!r} is not a number")
    except (KeyError, TypeError) as exc:
        raise HandoverError(f"state incomplete: {exc!r}") from None


def name_strays(socks, cfg, n):
    """{fd-store name: socket} for the unnamed inherited UDP `socks` that fit what `cfg` wants; the rest closed."""
    from .fdstore import socket_matches, wanted_sockets
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
