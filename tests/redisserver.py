"""A throwaway redis-server for tests: Unix socket or TCP on 127.0.0.1, in a tmp dir.

`redis_server(tmp_path, tcp=False)` is a context manager yielding a
`RedisServer` with `.address` (a Unix socket path, or ("127.0.0.1", port))
and `.stop()`/`.start()` to kill and restart it on the same address. The
server is always killed on exit. Tests skip when redis-server is missing
(install it with `scripts/bootstrap --apt redis-server` as root).
All waits are bounded. `drive(client, cond)` runs a resp.Client until cond().
"""

import contextlib
import os
import selectors
import shutil
import socket
import subprocess
import time

import pytest

from waiting import wait_for


def require_redis():
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server not installed (scripts/bootstrap --apt redis-server)")
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, tmp_path, tcp):
        self.binary = require_redis()
        self.dir = tmp_path
        if tcp:
            self.address = ("127.0.0.1", _free_port())
        else:
            self.address = str(tmp_path / "redis.sock")
        self.proc = None

    def start(self, wait=10.0):
        args = [self.binary, "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--daemonize", "no", "--loglevel", "warning"]
        if isinstance(self.address, str):
            args += ["--port", "0", "--unixsocket", self.address, "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.address[1]), "--bind", "127.0.0.1"]
        self.log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        fam = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET

        def answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
            try:
                with socket.socket(fam, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect(self.address)
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        try:
            wait_for(answers, wait, interval=0.02, what="redis-server to answer PING")
        except AssertionError:
            self.stop()
            raise

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


@contextlib.contextmanager
def redis_server(tmp_path, tcp=False):
    server = RedisServer(tmp_path, tcp)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def drive(client, cond, timeout=5.0, what="condition"):
    """Run a selectors loop over one sans-IO resp.Client until cond() is true (bounded).

    Each round waits for the client's socket or its next timer, whichever comes
    first, then feeds it what happened, with the clock read once per step.
    """
    sel = selectors.DefaultSelector()

    def step():
        if cond():
            return True
        fd, ev = client.fileno(), client.events()
        due = client.next_deadline()
        wait = 0.05 if due is None else max(0.0, min(0.05, due - time.monotonic()))
        mask = 0
        if fd >= 0 and ev:
            sel.register(fd, ev)
            for _, m in sel.select(wait):
                mask = m
            sel.unregister(fd)
        else:
            sel.select(wait)        # no socket (backing off): wait for the client's own timer
        now = time.monotonic()
        if mask & selectors.EVENT_WRITE:
            client.on_writable(now)
        if mask & selectors.EVENT_READ:
            client.on_readable(now)
        client.handle_timer(now)
        return cond()
    try:
        wait_for(step, timeout, interval=0, what=what)
    finally:
        sel.close()
