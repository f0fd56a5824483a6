"""A throwaway redis-server for tests: Unix socket or TCP on 127.0.0.1, in a tmp dir.

`redis_server(tmp_path, tcp=False)` is a context manager yielding a
`RedisServer` with `.address` (a Unix socket path, or ("127.0.0.1", port))
and `.stop()`/`.start()` to kill and restart it on the same address. The
server is always killed on exit. Tests skip when redis-server is missing
(install it with `scripts/bootstrap --apt redis-server` as root).
All waits are bounded.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest


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
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
            try:
                fam = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
                with socket.socket(fam, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect(self.address)
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer PING in time")

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
