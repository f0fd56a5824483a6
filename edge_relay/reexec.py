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
     worker is replaced in turn (upgrade.py, the supervisor's side of all this): the new worker is forked and
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

# Only this at import: the preflight imports this module first, then every other one of the
# (new) package itself, so that a broken module is named in its reason rather than a traceback.
from . import sdnotify

ENV_STATE = "EDGE_RELAY_HANDOVER"     # "<state memfd> <request usec>", set only across our own execve
STATE_VERSION = 1                     # bump when `capture`'s document changes incompatibly
READS_VERSIONS = (1,)                 # the state versions this code can take over from
PREFLIGHT_FLAG = "--preflight"
PREFLIGHT_MARK = "edge-relay preflight ok "
PREFLIGHT_TIMEOUT = 60.0              # seconds the new code may take to import and load config and keys
PREFLIGHT_OUTPUT_MAX = 64 * 1024      # bytes of the child's output kept (its last line is the reason)
STATE_MAX = 4 << 20                   # a handover state larger than this is not ours
# Signals the supervisor handles in its loop; blocked across execve until the new image handles them.
# the supervisor's signals (workerproc.DRAIN_SIGNAL/UNDRAIN_SIGNAL are SIGTTOU/SIGTTIN)
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR2, signal.SIGTTOU,
           signal.SIGTTIN)
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
