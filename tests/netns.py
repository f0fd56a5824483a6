"""Throwaway network namespaces for tests that build small test networks.

    ns_a, ns_b = NetNS(), NetNS()          # or the netns_factory fixture
    link = veth(ns_a, ns_b)                 # 198.18.k.1/24 <-> 198.18.k.2/24,
                                            # fd00:0:0:k::1/64 <-> fd00:0:0:k::2/64
    rx = ns_b.python(code, link.ipv4_b)     # a Python process inside ns_b
    ns_a.exec("ping", "-c1", link.ipv4_b)   # a command run to completion
    ...
    ns_a.close(); ns_b.close()              # kills their processes, deletes them

Everything here needs root and a working `ip netns` (iproute2); requires_root()
skips the calling test with the reason when that is missing. Use the
netns_factory fixture (tests/conftest.py) rather than NetNS directly: it removes
every namespace it made, and kills every process in them, whatever the test
does.

Names carry a per-run prefix, ``er-<pid>-<n>`` with the pid of the test run, so
that leftovers can be found: this run's are swept at exit (sweep()), and those
of runs that died without cleaning up (their pid is gone) are swept the first
time a run here needs namespaces (sweep_stale()).

Addresses come from the benchmarking range 198.18.0.0/15 (RFC 2544) and the
unique-local range fd00::/8, and exist only inside the namespaces.

Every wait here is bounded: commands and waits take a timeout and raise when it
runs out (there is no per-test timeout plugin).
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from waiting import wait_for  # the one wait helper; netns.wait_for is it too

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every namespace this run creates is named PREFIX + a number.
PREFIX = f"er-{os.getpid()}-"
_NAME = re.compile(r"er-(\d+)-(?:\d+|probe)")
_OWNER_PID = os.getpid()

_names = itertools.count(1)
_links = itertools.count(1)
_live: dict[str, NetNS] = {}  # namespaces of this run not yet deleted
_created_any = False
_NOT_PROBED = object()
_probe: object = _NOT_PROBED


class NetNSError(RuntimeError):
    """A command building or removing a test network failed."""


def run(
    *cmd: str, check: bool = True, timeout: float = 10.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, within timeout seconds, capturing output.

    Raises NetNSError naming the command and its stderr when it fails (with
    check) or does not finish in time.
    """
    try:
        proc = subprocess.run(
            cmd,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise NetNSError(f"{shlex.join(cmd)}: still running after {timeout}s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise NetNSError(f"{shlex.join(cmd)}: exit status {proc.returncode}: {detail}")
    return proc


# --- can this machine do it? -------------------------------------------------


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can.

    Needs root; then, once per process, probes `ip netns`: add a namespace, run
    a command in it (this mounts /sys, which some containers refuse), delete it.
    After a successful probe, namespaces left by dead earlier runs are swept.
    """
    global _probe
    if os.geteuid() != 0:
        return "needs root"
    if _probe is _NOT_PROBED:
        _probe = _probe_once()
        if _probe is None:
            sweep_stale()
    return _probe  # type: ignore[return-value]


def _probe_once() -> str | None:
    if shutil.which("ip") is None:
        return "needs the ip command (Debian package iproute2)"
    name = f"{PREFIX}probe"
    try:
        run("ip", "netns", "add", name)
        try:
            run("ip", "netns", "exec", name, "true")
        finally:
            run("ip", "netns", "delete", name, check=False)
    except (NetNSError, OSError) as exc:
        return f"ip netns does not work here: {exc}"
    return None


def requires_root() -> None:
    """Skip the calling test, with the reason, unless namespaces work here."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def requires_command(command: str, package: str | None = None) -> None:
    """Skip the calling test unless command is on PATH (e.g. "nft", "nftables")."""
    if shutil.which(command) is None:
        pytest.skip(f"needs the {command} command" + (f" (Debian package {package})" if package else ""))


def ipv6_available() -> bool:
    """Whether this kernel has IPv6 at all."""
    return socket.has_ipv6 and os.path.exists("/proc/sys/net/ipv6")


# --- processes ----------------------------------------------------------------


class Process(subprocess.Popen):
    """A process started inside a namespace, leader of its own process group.

    Read its stdout with readline(timeout), not through .stdout (readline reads
    the pipe's file descriptor directly, so that select() can bound the wait).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending = b""

    def readline(self, timeout: float = 5.0) -> str:
        """The next line of stdout, without its newline, waiting at most timeout s.

        Raises TimeoutError when no full line arrives in time, EOFError when the
        process closes stdout first.
        """
        if self.stdout is None:
            raise ValueError("readline() needs stdout=subprocess.PIPE")
        fd = self.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from {shlex.join(map(str, self.args))} within {timeout}s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(
                    f"{shlex.join(map(str, self.args))} closed stdout (exit status {self.poll()}),"
                    f" after {self._pending!r}"
                )
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def stop(self, timeout: float = 2.0) -> int:
        """SIGTERM the process group, SIGKILL it after timeout seconds, reap the
        process, close its pipes. Returns the exit status. Idempotent."""
        if self.returncode is None:
            # Not reaped yet, so the group id still cannot belong to anyone else.
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.wait(10)
        for pipe in (self.stdin, self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        return self.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _pid_alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# --- namespaces --------------------------------------------------------------


class NetNS:
    """A network namespace named PREFIX<n>, with lo up. Close it when done."""

    def __init__(self, name: str | None = None) -> None:
        global _created_any
        self.name = name or f"{PREFIX}{next(_names)}"
        self.processes: list[Process] = []
        self.closed = False
        run("ip", "netns", "add", self.name)
        _live[self.name] = self
        if not _created_any:
            _created_any = True
            atexit.register(_sweep_at_exit)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"NetNS({self.name!r}{', closed' if self.closed else ''})"

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ip(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        """Run `ip -n NAME ARGS...` (see run() for keyword arguments)."""
        return run("ip", "-n", self.name, *args, **kwargs)

    def exec(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess[str]:
        """Run a command inside to completion: `ip netns exec NAME CMD...`."""
        return run("ip", "netns", "exec", self.name, *cmd, **kwargs)

    def popen(
        self,
        *cmd: str,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
        **kwargs,
    ) -> Process:
        """Start a command inside, in its own process group; close() stops it."""
        proc = Process(
            ["ip", "netns", "exec", self.name, *cmd],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            **kwargs,
        )
        self.processes.append(proc)
        return proc

    def python(self, code: str, *args: str, env: dict[str, str] | None = None, **kwargs) -> Process:
        """Start `python -u -c CODE ARGS...` inside, with this test run's
        interpreter and the repo root on PYTHONPATH (so it can import edge_relay)."""
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return self.popen(sys.executable, "-u", "-c", code, *args, env=env, **kwargs)

    def pids(self) -> list[int]:
        """Every process inside, whoever started it."""
        return namespace_pids(self.name)

    def close(self) -> None:
        """Stop the processes started here, kill any other process inside, and
        delete the namespace (its interfaces go with it). Idempotent."""
        if self.closed:
            return
        errors: list[BaseException] = []
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception as exc:  # keep going: the namespace must go
                errors.append(exc)
        try:
            delete_namespace(self.name)
        except Exception as exc:
            errors.append(exc)
        else:
            self.closed = True
            _live.pop(self.name, None)
        if errors:
            raise NetNSError(f"closing {self.name}: " + "; ".join(map(str, errors)))


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on this machine."""
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Every process inside the named namespace."""
    out = run("ip", "netns", "pids", name, check=False).stdout
    return [int(pid) for pid in out.split()]


def delete_namespace(name: str, timeout: float = 5.0) -> None:
    """SIGKILL every process inside the named namespace, then delete it."""
    pids = namespace_pids(name)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(
        lambda: not any(_pid_alive(pid) for pid in pids),
        timeout,
        what=f"processes {pids} in {name} to die",
    )
    result = run("ip", "netns", "delete", name, check=False)
    if result.returncode != 0 and name in list_namespaces():
        raise NetNSError(f"ip netns delete {name}: {result.stderr.strip()}")


def sweep(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace named prefix* (this run's by default), killing
    whatever runs in them. Returns the names it removed."""
    removed = []
    for ns in [ns for name, ns in _live.items() if name.startswith(prefix)]:
        try:
            ns.close()
            removed.append(ns.name)
        except Exception:
            pass  # the pass by name below tries again
    for name in list_namespaces():
        if name.startswith(prefix):
            delete_namespace(name)
            removed.append(name)
    return removed


def sweep_stale() -> list[str]:
    """Delete namespaces left by earlier runs that died: those named
    er-<pid>-<n> where no process <pid> runs any more."""
    removed = []
    for name in list_namespaces():
        match = _NAME.fullmatch(name)
        if match and int(match[1]) != os.getpid() and not _pid_alive(int(match[1])):
            delete_namespace(name)
            removed.append(name)
    return removed


def sweep_if_used() -> list[str]:
    """sweep(), but only if this process ever created a namespace."""
    return sweep() if _created_any and os.getpid() == _OWNER_PID else []


def _sweep_at_exit() -> None:
    try:
        removed = sweep_if_used()
    except Exception as exc:
        print(f"netns: sweeping namespaces {PREFIX}* at exit failed: {exc}", file=sys.stderr)
        return
    if removed:
        print(f"netns: removed leftover namespaces at exit: {' '.join(removed)}", file=sys.stderr)


# --- links ---------------------------------------------------------------------

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Veth:
    """A veth pair: dev_a in ns_a, dev_b in ns_b, and the addresses of each end."""

    ns_a: NetNS
    ns_b: NetNS
    dev_a: str
    dev_b: str
    addrs_a: tuple[Interface, ...]
    addrs_b: tuple[Interface, ...]

    @staticmethod
    def _first(addrs: tuple[Interface, ...], version: int) -> str | None:
        return next((str(a.ip) for a in addrs if a.version == version), None)

    @property
    def ipv4_a(self) -> str | None:
        return self._first(self.addrs_a, 4)

    @property
    def ipv4_b(self) -> str | None:
        return self._first(self.addrs_b, 4)

    @property
    def ipv6_a(self) -> str | None:
        return self._first(self.addrs_a, 6)

    @property
    def ipv6_b(self) -> str | None:
        return self._first(self.addrs_b, 6)


_BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")


def veth(
    ns_a: NetNS,
    ns_b: NetNS,
    addr_a: str | Iterable[str] | None = None,
    addr_b: str | Iterable[str] | None = None,
    timeout: float = 5.0,
) -> Veth:
    """Join ns_a and ns_b with a veth pair, address both ends, bring them up,
    and wait (at most timeout s) until the link carries packets.

    addr_a, addr_b: "address/prefix" strings for each end, one or several. Left
    out, the k-th pair of this run gets 198.18.k.1/24 and 198.18.k.2/24 (k from
    1 to 511, within 198.18.0.0/15) and, when the kernel has IPv6,
    fd00:0:0:k::1/64 and fd00:0:0:k::2/64. IPv6 addresses are added with nodad,
    so they are usable at once rather than after duplicate address detection.
    The devices are named ve<k>a and ve<k>b.
    """
    k = next(_links)
    if (addr_a is None) != (addr_b is None):
        raise ValueError("give addresses for both ends, or for neither")
    if addr_a is None:
        subnet = ipaddress.IPv4Network((int(_BENCH_NET.network_address) + (k << 8), 24))
        if not subnet.subnet_of(_BENCH_NET):
            raise NetNSError("more than 511 veth pairs in one run: 198.18.0.0/15 is used up")
        addr_a, addr_b = [f"{subnet[1]}/24"], [f"{subnet[2]}/24"]
        if ipv6_available():
            addr_a.append(f"fd00:0:0:{k:x}::1/64")
            addr_b.append(f"fd00:0:0:{k:x}::2/64")
    addrs_a = tuple(ipaddress.ip_interface(a) for a in ([addr_a] if isinstance(addr_a, str) else addr_a))
    addrs_b = tuple(ipaddress.ip_interface(a) for a in ([addr_b] if isinstance(addr_b, str) else addr_b))

    dev_a, dev_b = f"ve{k}a", f"ve{k}b"
    # Created inside ns_a with its peer directly in ns_b: never in this namespace.
    ns_a.ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b.name)
    for ns, dev, addrs in ((ns_a, dev_a, addrs_a), (ns_b, dev_b, addrs_b)):
        for addr in addrs:
            ns.ip("addr", "add", str(addr), "dev", dev, *(["nodad"] if addr.version == 6 else []))
        ns.ip("link", "set", dev, "up")
    # Until the kernel's link watcher has seen the carrier, a device drops what
    # is sent through it: wait for operational state UP on both ends.
    wait_for(
        lambda: _is_up(ns_a, dev_a) and _is_up(ns_b, dev_b),
        timeout,
        what=f"{ns_a.name}/{dev_a} <-> {ns_b.name}/{dev_b} to come up",
    )
    return Veth(ns_a, ns_b, dev_a, dev_b, addrs_a, addrs_b)


def _is_up(ns: NetNS, dev: str) -> bool:
    return " state UP " in ns.ip("-o", "link", "show", "dev", dev).stdout


# --- the factory behind the netns_factory fixture -----------------------------


class Factory:
    """Makes namespaces and remembers them: factory() is a new NetNS,
    factory.veth(a, b, ...) joins two (see veth()), factory.close() removes all
    of them. Also a context manager."""

    def __init__(self) -> None:
        self.namespaces: list[NetNS] = []

    def __call__(self, name: str | None = None) -> NetNS:
        ns = NetNS(name)
        self.namespaces.append(ns)
        return ns

    def veth(self, ns_a: NetNS, ns_b: NetNS, *args, **kwargs) -> Veth:
        return veth(ns_a, ns_b, *args, **kwargs)

    def close(self) -> None:
        """Close every namespace made here, even when some fail to close."""
        errors = []
        while self.namespaces:
            ns = self.namespaces.pop()
            try:
                ns.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise NetNSError("; ".join(map(str, errors)))

    def __enter__(self) -> Factory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
