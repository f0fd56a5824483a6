"""The supervisor's sockets and systemd's fd store: which sockets it wants, which it takes back, which it binds.

Theory of operation
  For n workers the relay wants one SO_REUSEPORT socket per worker per
  listener, named "l<listener>w<worker>", and one internal socket per worker,
  "i<worker>" (port internal.port + worker). The supervisor holds them for
  its whole life, so the reuseport group never changes when a worker dies:
  datagrams for a dead worker's socket wait in that socket's buffer for its
  successor.

  systemd's fd store keeps them across a restart. At start (FdStore.adopt)
  every fd passed in LISTEN_FDS is sorted: a socket whose family, address,
  port and options match what the config wants is reused (it was never
  closed: no datagram is lost across a restart); any other is closed and
  removed from the store, and a fresh one is bound and stored in its place.
  A memfd named "flows<worker>" is a worker's flow table snapshot from the
  previous process: read, removed from the store (consumed) and handed to
  that worker. At exit each worker's snapshot is stored under the same name.
  A memfd named "drain" is the operator's drain (lifecycle.Drain): stored
  while it lasts, so a restarted relay stays out of the pool; it is read
  and kept (FdStore.adopted_drain).

  Without $NOTIFY_SOCKET the store is a no-op: sockets and flows then do not
  outlive the process (said once in the log).
"""

import ipaddress
import os
import socket

from . import sdnotify, sockets
from .errors import StartupError

FLOWS_PREFIX = "flows"
DRAIN_NAME = "drain"


def flows_name(index):
    """The fd store name of worker `index`'s flow snapshot."""
    return f"{FLOWS_PREFIX}{index}"


def flows_index(name):
    """The worker index of a "flows<worker>" name, or None for any other name."""
    rest = name[len(FLOWS_PREFIX):]
    return int(rest) if name.startswith(FLOWS_PREFIX) and rest.isdigit() else None


def wanted_sockets(cfg, n):
    """[(name, address, port, reuseport, what)] for `n` workers, in a stable order."""
    out = []
    for w in range(n):
        for li, l in enumerate(cfg.listeners):
            out.append((f"l{li}w{w}", l.address, l.port, True, f"listeners[{li}]"))
        out.append((f"i{w}", cfg.internal.address, cfg.internal_port_for(w), False, "internal"))
    return out


def worker_sockets(socks, cfg, w):
    """(listener sockets, internal socket) of worker `w`."""
    return [socks[f"l{li}w{w}"] for li in range(len(cfg.listeners))], socks[f"i{w}"]


def structure(cfg, n):
    """What a reload cannot change without new sockets and new workers."""
    return (tuple((lst.address, lst.port) for lst in cfg.listeners), cfg.internal.address, cfg.internal.port, n)


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


def warn_buffers(cfg, socks, log):
    """One warning per buffer size the kernel capped (every socket asks the same, so one socket tells)."""
    r = cfg.relay
    for sock in socks.values():
        for key, asked, granted, sysctl in sockets.buffer_shortfalls(
                sock, r.recv_buffer_bytes, r.send_buffer_bytes):
            log.warning("sockets.buffer", "%s = %d, but the kernel granted %d (capped by %s); "
                        "raise it: sysctl -w %s=%d (edge-relay ships "
                        "/usr/lib/sysctl.d/edge-relay.conf)",
                        key, asked, granted, sysctl, sysctl, asked)
        return


class FdStore:
    """systemd's fd store as the supervisor uses it (a no-op without $NOTIFY_SOCKET)."""

    def __init__(self, notifier, log):
        self.notifier = notifier
        self.log = log
        self.adopted_drain = None       # the stored drain record's bytes, if adopt() found one

    def adopt(self, env, cfg, n):
        """({name: socket}, {worker: flow snapshot bytes}) from what systemd passed, bound to fit `cfg`.

        Raises StartupError (and closes everything passed) when a wanted socket cannot be bound.
        """
        try:
            inherited = sdnotify.listen_fds(env)
        except (ValueError, OSError) as exc:
            self.log.warning("fdstore", "ignoring passed fds: %s", exc)
            inherited = {}
        stored_flows, pool = {}, {}
        for name, fds in inherited.items():
            for extra in fds[1:]:
                os.close(extra)
            fd = fds[0]
            index = flows_index(name)
            if name == DRAIN_NAME:
                try:
                    self.adopted_drain = sdnotify.memfd_read(fd)
                except (OSError, ValueError) as exc:
                    self.log.warning("fdstore", "stored %s unreadable: %s", name, exc)
                    self.notifier.fdstore_remove(name)
                os.close(fd)                            # systemd still holds it: it stays stored
                continue
            if index is not None:
                try:
                    stored_flows[index] = sdnotify.memfd_read(fd)
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
            socks, fresh = bind_sockets(cfg, n, pool)
        except StartupError:
            for sock in pool.values():
                sock.close()
            raise
        self.retire(pool)
        self.store_sockets(socks, fresh)
        warn_buffers(cfg, socks, self.log)
        reused = len(socks) - len(fresh)
        if inherited:
            self.log.notice("fdstore", "took back %d of %d sockets and the flows of %d workers from the fd store",
                            reused, len(socks), len(stored_flows))
        elif self.notifier.enabled:
            self.log.notice("fdstore", "fd store empty: starting fresh")
        else:
            self.log.notice("fdstore", "no NOTIFY_SOCKET or LISTEN_FDS: starting fresh, "
                            "sockets and flows will not outlive this process")
        return socks, stored_flows

    def store_sockets(self, socks, names):
        """Put `names` of `socks` in the store, replacing what was stored under those names."""
        if not self.notifier.enabled:
            return
        for name in names:
            self.notifier.fdstore_remove(name)
            if not self.notifier.fdstore(name, [socks[name].fileno()]):
                self.log.warning("fdstore", "fd store refused %s (FileDescriptorStoreMax too low?)", name)

    def retire(self, pool):
        """Close the sockets of `pool` (not used by the config) and remove them from the store."""
        for name, sock in pool.items():
            sock.close()
            self.notifier.fdstore_remove(name)
        pool.clear()

    def store_flows(self, index, fd):
        """Keep worker `index`'s flow snapshot memfd for the next process; True when stored."""
        return self.notifier.enabled and self.notifier.fdstore(flows_name(index), [fd])

    def store_drain(self, data):
        """Keep the operator's drain record for the next process (replacing an older one)."""
        if not self.notifier.enabled:
            return
        self.notifier.fdstore_remove(DRAIN_NAME)
        fd = sdnotify.memfd_write("edge-relay-drain", data)
        try:
            if not self.notifier.fdstore(DRAIN_NAME, [fd]):
                self.log.warning("fdstore", "fd store refused %s: a restart will end the drain", DRAIN_NAME)
        finally:
            os.close(fd)

    def remove_drain(self):
        self.notifier.fdstore_remove(DRAIN_NAME)

    def barrier(self):
        """Wait until systemd has every fd sent so far (before exiting)."""
        if self.notifier.enabled:
            self.notifier.barrier()
