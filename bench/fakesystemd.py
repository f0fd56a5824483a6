"""A stand-in for systemd's side of sd_notify: the notify socket and the fd store.

For the tests and make bench-startup, which restart a relay the way
`systemctl restart` does without a systemd to do it. It understands what the
relay sends (sdnotify.py): READY=1 and the other state lines (kept in
`messages`, in arrival order), FDSTORE=1 with FDNAME (the fds are added under
that name, as systemd adds them), FDSTOREREMOVE=1 (closed and forgotten) and
BARRIER=1 (its fd is closed, which is the answer). Call `pump()` to read what
arrived; `close()` closes the socket and every stored fd.
"""

import array
import os
import socket


class FakeSystemd:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.path = path
        self.messages = []          # (dict of VAR: value) in arrival order
        self.store = {}             # name -> [fd]

    @property
    def ready(self):
        """How many READY=1 have arrived."""
        return sum(1 for m in self.messages if m.get("READY") == "1")

    def pump(self):
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
            except BlockingIOError:
                return
            fds = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            msg = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append(msg)
            if msg.get("FDSTORE") == "1":
                self.store.setdefault(msg["FDNAME"], []).extend(fds)
                fds = []
            elif msg.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(msg["FDNAME"], []):
                    os.close(fd)
            for fd in fds:          # BARRIER=1: closing its fd is the answer
                os.close(fd)

    def seen(self, key, value=None, since=0):
        """Whether a message since index `since` set `key` (to `value`, when given)."""
        return any(key in m and (value is None or m[key] == value) for m in self.messages[since:])

    def close(self):
        self.sock.close()
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
