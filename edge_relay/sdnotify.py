"""The systemd service protocols, in pure Python: sd_notify, sd_listen_fds, memfd state.

Contract (sd_notify(3), sd_listen_fds(3), sd_pid_notify_with_fds):
  - A notification is ONE datagram on the AF_UNIX SOCK_DGRAM socket named by
    $NOTIFY_SOCKET: a filesystem path ("/...") or, when it starts with "@",
    a name in the abstract namespace. The payload is newline-separated
    VAR=value lines, UTF-8, no NUL, at most 4096 bytes (PID 1 reads PIPE_BUF
    bytes and drops a truncated message). File descriptors ride along as one
    SCM_RIGHTS control message.
  - Without a usable $NOTIFY_SOCKET every Notifier call returns False at once.
    A vanished or refusing socket also returns False: telling systemd is
    best effort and must never take the relay down. A malformed request (a
    line with a newline, a bad fd name) is a bug and raises ValueError, with
    or without systemd, so tests catch it off systemd too.
  - Passed fds start at 3; they are ours only if $LISTEN_PID is our pid.
    listen_fds() marks them close-on-exec and, as sd_listen_fds(1) does,
    unsets LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES whatever the outcome, so a
    child never mistakes them for its own.
  - The fd store keeps every fd sent under a name; storing under a name that
    is already there adds a second fd rather than replacing it (systemd
    itself removes first, then pushes). Names come back in $LISTEN_FDNAMES,
    hence the dict of lists.

State handed over through the fd store lives in sealed memfds: nothing on
disk, freed by the kernel with its last reference, immutable once sealed.
"""

import array
import errno
import fcntl
import os
import select
import socket
import time

LISTEN_FDS_START = 3
NOTIFY_MAX = 4096          # PID 1's receive buffer (NOTIFY_BUFFER_MAX = PIPE_BUF)
FDNAME_MAX = 255
SCM_MAX_FD = 253           # kernel limit on fds in one SCM_RIGHTS message
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# Linux >= 6.3; older kernels reject the unknown flag with EINVAL, and a host
# with vm.memfd_noexec=2 rejects memfds that do not ask for it.
_MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _address(value):
    """The sockaddr for a $NOTIFY_SOCKET value, or None when we cannot use it."""
    if not value or len(value) < 2:
        return None
    if value[0] == "/":
        return value
    if value[0] == "@":
        return "\0" + value[1:]
    # Relative paths are refused by libsystemd too; "vsock:" (VM guests)
    # is not something an edge host runs under.
    return None


def _encode(lines):
    if not lines:
        raise ValueError("a notification needs at least one VAR=value line")
    for line in lines:
        if not isinstance(line, str):
            raise TypeError(f"notification line must be str, not {type(line).__name__}")
        # A newline would smuggle in another variable; PID 1 drops NULs.
        if "\n" in line or "\r" in line or "\0" in line:
            raise ValueError(f"notification line contains a newline or NUL: {line!r}")
    payload = "\n".join(lines).encode("utf-8")
    if len(payload) > NOTIFY_MAX:
        raise ValueError(f"notification is {len(payload)} bytes, systemd reads at most {NOTIFY_MAX}")
    return payload


def _check_fdname(name):
    if not isinstance(name, str):
        raise TypeError(f"fd name must be str, not {type(name).__name__}")
    # Empty is legal to systemd but becomes "stored"; we always look ours up by name.
    if not name:
        raise ValueError("fd name is empty")
    if len(name) > FDNAME_MAX:
        raise ValueError(f"fd name is {len(name)} chars, at most {FDNAME_MAX}")
    # systemd's fdname_is_valid: printable ASCII only, ':' separates $LISTEN_FDNAMES.
    for ch in name:
        if ch == ":" or not " " <= ch <= "~":
            raise ValueError(f"fd name {name!r} contains {ch!r} (no ':', control or non-ASCII chars)")
    return name


def _one_line(text):
    return " ".join(str(text).replace("\0", " ").splitlines())


def _with_status(lines, status):
    """`lines` plus a one-line STATUS= cut on a UTF-8 boundary to keep the datagram whole."""
    if status is None:
        return lines
    used = sum(len(line.encode()) + 1 for line in lines)   # each line and its newline
    room = max(0, NOTIFY_MAX - used - len(b"STATUS="))
    raw = _one_line(status).encode("utf-8")
    return [*lines, "STATUS=" + raw[:room].decode("utf-8", "ignore")]


def _monotonic_usec():
    # The same clock PID 1 compares against for Type=notify-reload.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Speaks sd_notify to the service manager named by $NOTIFY_SOCKET.

    Every method returns True when the datagram was sent whole, else False.
    A socket is opened per message, like libsystemd: nothing to go stale
    across a fork or a restart of PID 1. The send blocks only if PID 1's
    queue is full, as libsystemd's does; the watchdog covers that case.
    """

    def __init__(self, env=os.environ):
        self.socket_name = env.get("NOTIFY_SOCKET") or None
        self._addr = _address(self.socket_name)
        self.enabled = self._addr is not None

    def __repr__(self):
        return f"Notifier(socket={self.socket_name!r}, enabled={self.enabled})"

    def send(self, *lines, fds=()):
        payload = _encode(lines)
        fds = list(fds)
        for fd in fds:
            if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
                raise ValueError(f"not a file descriptor: {fd!r}")
        if len(fds) > SCM_MAX_FD:
            raise ValueError(f"{len(fds)} fds in one message, the kernel allows {SCM_MAX_FD}")
        if not self.enabled:
            return False
        try:
            for fd in fds:
                # Must be open before our socket exists: a closed number would be
                # reused by that very socket, and we would store it instead.
                fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            return False
        ancillary = []
        if fds:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sent = sock.sendmsg([payload], ancillary, 0, self._addr)
        except OSError:
            # ENOENT/ECONNREFUSED (manager gone), EBADF (fd closed under us),
            # EMFILE, ETOOMANYREFS: all mean "not delivered", none is fatal.
            return False
        return sent == len(payload)

    def ready(self, status=None):
        return self.send(*_with_status(["READY=1"], status))

    def reloading(self, status=None):
        # systemd >= 253 (Type=notify-reload) matches MONOTONIC_USEC against the
        # reload it asked for; older managers ignore the extra line.
        return self.send(*_with_status(
            ["RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}"], status))

    def stopping(self, status=None):
        return self.send(*_with_status(["STOPPING=1"], status))

    def status(self, text):
        return self.send(*_with_status([], text))

    def watchdog(self):
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self):
        """Ask the manager to act as if the watchdog expired (we know we are wedged)."""
        return self.send("WATCHDOG=trigger")

    def fdstore(self, name, fds, poll=True):
        """Hand `fds` to the fd store under `name` (needs FileDescriptorStoreMax>0).

        The fds stay ours too; close them when done. With poll=False the
        manager does not drop them on EPOLLHUP/EPOLLERR (FDPOLL=0).
        """
        _check_fdname(name)
        fds = list(fds)
        if not fds:
            raise ValueError(f"fdstore {name!r}: no fds to store")
        lines = ["FDSTORE=1", f"FDNAME={name}"]
        if not poll:
            lines.append("FDPOLL=0")
        return self.send(*lines, fds=fds)

    def fdstore_remove(self, name):
        _check_fdname(name)
        return self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def barrier(self, timeout=5.0):
        """Wait until the manager has processed every message we sent before (BARRIER=1).

        Send FDSTORE then barrier() before exiting, so the stored fds are
        known to be in the store before our exit is. True when synced, False
        on timeout or without a manager.
        """
        if not self.enabled:
            return False
        r, w = os.pipe()
        try:
            sent = self.send("BARRIER=1", fds=[w])
            # The manager closes its copy once it got here in its queue; ours
            # must be gone too, or the hangup never comes.
            os.close(w)
            w = -1
            if not sent:
                return False
            poller = select.poll()
            poller.register(r, 0)   # POLLHUP is always reported
            return bool(poller.poll(max(0, int(timeout * 1000))))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def mainpid(self, pid):
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"not a pid: {pid!r}")
        return self.send(f"MAINPID={pid}")


def _uint(env, var):
    raw = env[var]
    # Strict: systemd writes plain decimal, anything else means a foreign value.
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"${var}={raw!r} is not a decimal number")
    return int(raw)


def _is_our_pid(env, var):
    pid = _uint(env, var)
    if pid == 0:
        raise ValueError(f"${var}=0 is not a pid")
    return pid == os.getpid()


def watchdog_interval(env=os.environ):
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None if no watchdog is ours.

    Raises ValueError on a malformed value: silently pinging never would get
    the service killed with no clue why.
    """
    if "WATCHDOG_USEC" not in env:
        return None
    usec = _uint(env, "WATCHDOG_USEC")
    if "WATCHDOG_PID" in env and not _is_our_pid(env, "WATCHDOG_PID"):
        return None
    if usec == 0 or usec >= 2**64 - 1:  # unset / infinity, as sd_watchdog_enabled treats them
        return None
    return usec / 2 / 1_000_000


def listen_fds(env=os.environ, unset=True):
    """The fds systemd passed us, as {name: [fd, ...]}, fds from 3 upward in order.

    {} when nothing was passed or $LISTEN_PID is another process's. Raises
    ValueError when the variables are malformed (as sd_listen_fds_with_names
    returns -EINVAL), OSError if a promised fd is not open.
    """
    try:
        if "LISTEN_PID" not in env or not _is_our_pid(env, "LISTEN_PID"):
            return {}
        if "LISTEN_FDS" not in env:
            return {}
        count = _uint(env, "LISTEN_FDS")
        if count == 0:
            return {}
        names = env.get("LISTEN_FDNAMES")
        names = ["unknown"] * count if names is None else names.split(":")
        if len(names) != count:
            raise ValueError(f"$LISTEN_FDNAMES has {len(names)} names for $LISTEN_FDS={count}")
        fds = range(LISTEN_FDS_START, LISTEN_FDS_START + count)
        for fd in fds:
            # Inherited fds are not close-on-exec; our own children must not keep
            # the public socket (or a state memfd) alive behind our back.
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            if not flags & fcntl.FD_CLOEXEC:
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        result = {}
        for name, fd in zip(names, fds):
            result.setdefault(name, []).append(fd)
        return result
    finally:
        if unset:
            for var in _LISTEN_VARS:
                env.pop(var, None)


def _memfd_create(name):
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create(name, flags | _MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.memfd_create(name, flags)


def memfd_write(name, data):
    """A new close-on-exec memfd holding `data`, sealed when the kernel allows, offset 0."""
    fd = _memfd_create(name)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except OSError:
            pass  # sealing is a guard against our own bugs, not a requirement
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def memfd_read(fd, limit=64 << 20):
    """The whole content of `fd` from offset 0 (the fd's offset is not moved).

    Raises ValueError when it holds more than `limit` bytes: a state file
    that large is not ours, and reading it would only exhaust memory.
    """
    size = os.fstat(fd).st_size
    if size > limit:
        raise ValueError(f"fd {fd} holds {size} bytes, more than the {limit} allowed")
    buf = bytearray()
    while True:
        # Read past st_size: an unsealed file may still be growing.
        want = min(max(size - len(buf), 1 << 16), limit + 1 - len(buf))
        chunk = os.pread(fd, want, len(buf))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"fd {fd} holds more than the {limit} bytes allowed")
