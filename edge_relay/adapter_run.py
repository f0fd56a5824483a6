"""The adapter's I/O shell: sockets, the signaling hook over HTTP, timers (`edge-relay adapter`).

Theory of operation
  One selector loop owns every UDP socket: the relay-side socket (the
  address the relays have configured for this transceiver id) and one
  upstream socket per client flow, bound to `server_bind` port 0, so the
  stock server sees each client as its own peer. Datagrams go through
  `adapter.Adapter` (sans-IO) and its `Out`s are sent as they come. Once a
  second the loop forgets idle flows (closing their sockets) and stale
  sessions, and runs the server health check.

  The signaling hook is a small HTTP/1.1 server (http.server, one thread per
  request) on a local address; it calls the same Adapter under a lock that
  the loop also takes per datagram batch:

    POST /v1/offer    body: the client's offer SDP
                      200, the offer for the server (candidates removed)
    POST /v1/answer   body: JSON {"offer": SDP, "answer": the server's answer SDP}
                      200, JSON {"answer": SDP for the client, "ufrag": token}
    GET  /v1/stats    200, JSON counters, drops by reason, sessions, flows
  A bad SDP is 400 and a full session table 503, each with a one-line reason.

  Health (failover): with `health` = (host, port) a thread of its own tries
  a TCP connect to it once a second, and the adapter answers relay probes
  only while that works; without it the server counts as up.
"""

import http.server
import json
import selectors
import socket
import threading
import time

from . import adapter as adapter_mod
from .drops import Drop

TICK = 1.0
HEALTH_TIMEOUT = 0.5
RECV_SIZE = 65535


class HookHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edge-relay-adapter"
    MAX_BODY = 256 * 1024

    def log_message(self, fmt, *args):      # no per-request log lines
        pass

    def _reply(self, status, body, ctype="application/json"):
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n <= 0 or n > self.MAX_BODY:
            raise adapter_mod.AdapterError(f"body must be 1..{self.MAX_BODY} octets")
        return self.rfile.read(n).decode("utf-8")

    def do_GET(self):
        if self.path != "/v1/stats":
            return self._reply(404, "not found\n", "text/plain")
        return self._reply(200, json.dumps(self.server.shell.stats()))

    def do_POST(self):
        shell = self.server.shell
        try:
            body = self._body()
            if self.path == "/v1/offer":
                with shell.lock:
                    out = shell.adapter.offer_for_server(body)
                return self._reply(200, out, "application/sdp")
            if self.path == "/v1/answer":
                try:
                    doc = json.loads(body)
                    offer, answer = doc["offer"], doc["answer"]
                except (ValueError, KeyError, TypeError):
                    raise adapter_mod.AdapterError('body must be JSON {"offer": SDP, "answer": SDP}') from None
                with shell.lock:
                    sdp, session = shell.adapter.answer_for_client(offer, answer, time.time(), time.monotonic())
                return self._reply(200, json.dumps({"answer": sdp, "ufrag": session.token.decode("ascii")}))
            return self._reply(404, "not found\n", "text/plain")
        except adapter_mod.AdapterError as exc:
            status = 503 if "full" in str(exc) else 400
            return self._reply(status, f"{exc}\n", "text/plain")


class AdapterShell:
    """The adapter's sockets and loop around one `adapter.Adapter`."""

    def __init__(self, ad, listen, hook, server_bind="0.0.0.0", health=None, log=None, sock=None):
        self.adapter = ad
        self.lock = threading.Lock()
        self.server_bind = server_bind
        self.health = health
        self.log = log
        if sock is None:        # `sock`: an already bound relay-side socket (tests)
            sock = socket.socket(socket.AF_INET6 if ":" in listen[0] else socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(listen)
        self.sock = sock
        self.sock.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.httpd = http.server.ThreadingHTTPServer(hook, HookHandler)
        self.httpd.daemon_threads = True
        self.httpd.shell = self
        self._http_thread = None
        self._next_tick = 0.0
        self._stopping = threading.Event()

    @property
    def listen_address(self):
        return self.sock.getsockname()[:2]

    @property
    def hook_address(self):
        return self.httpd.server_address[:2]

    def stats(self):
        with self.lock:
            ad = self.adapter
            return {"counts": dict(ad.counts), "drops": ad.drop_counts(), "sessions": len(ad.sessions),
                    "flows": len(ad.flows), "server_up": ad.server_up}

    # -- sending
    def _send(self, out):
        try:
            if out.to == adapter_mod.TO_RELAY:
                sock = self.sock
            else:
                sock = out.flow.upstream or self._upstream(out.flow, out.dest)
            sock.sendto(out.data, out.dest)
        except OSError:         # ENOBUFS, EPERM from a firewall, EMFILE for a new socket, ...
            self.adapter.drops[Drop.SEND_FAILED] += 1

    def _upstream(self, flow, dest):
        """The flow's own socket toward the server (bound on first use)."""
        fam = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
        bind = self.server_bind
        if (":" in bind) != (fam == socket.AF_INET6):
            bind = "::" if fam == socket.AF_INET6 else "0.0.0.0"
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            sock.bind((bind, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        flow.upstream = sock
        self.sel.register(sock, selectors.EVENT_READ, flow)
        return sock

    # -- receiving
    def _pump(self, sock, flow):
        for _ in range(64):
            try:
                data, src = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:         # ICMP errors surfacing on the socket
                continue
            now_ms = time.time_ns() // 1_000_000
            if flow is None:
                out = self.adapter.from_relay(data, src[:2], now_ms, time.monotonic())
            else:
                out = self.adapter.from_server(flow, data, src[:2], now_ms)
            if out is not None:
                self._send(out)

    def _tick(self, mono):
        for flow in self.adapter.expire(mono, time.time()):
            if flow.upstream is not None:
                self.sel.unregister(flow.upstream)
                flow.upstream.close()

    def _health_loop(self):
        """Own thread: a connect can take its whole timeout, which the datagram loop must not wait for."""
        while not self._stopping.is_set():
            try:
                with socket.create_connection(self.health, timeout=HEALTH_TIMEOUT):
                    up = True
            except OSError:
                up = False
            if up != self.adapter.server_up and self.log is not None:
                self.log.notice("adapter-health", "server %s:%d is %s", self.health[0], self.health[1],
                                "up" if up else "down: not answering relay probes")
            self.adapter.server_up = up         # one attribute store: no lock needed
            self._stopping.wait(TICK)

    def start_hook(self):
        """Start the hook's HTTP thread (and the health check's, with `health`)."""
        self._http_thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                             daemon=True, name="adapter-hook")
        self._http_thread.start()
        if self.health is not None:
            threading.Thread(target=self._health_loop, daemon=True, name="adapter-health").start()

    def run_once(self, timeout):
        for key, _ in self.sel.select(timeout):
            with self.lock:
                self._pump(key.fileobj, key.data)
        mono = time.monotonic()
        if mono >= self._next_tick:
            self._next_tick = mono + TICK
            with self.lock:
                self._tick(mono)

    def serve(self, should_stop=lambda: False):
        self.start_hook()
        try:
            while not should_stop():
                self.run_once(0.2)
        finally:
            self.close()

    def close(self):
        self._stopping.set()
        if self._http_thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def main(keyring, transceiver_id, listen, hook, public, server_bind="0.0.0.0", health=None,
         idle_timeout=adapter_mod.DEFAULT_IDLE_TIMEOUT, session_ttl=adapter_mod.DEFAULT_SESSION_TTL,
         max_sessions=adapter_mod.DEFAULT_MAX_SESSIONS, duration=None):
    """`edge-relay adapter`: run until SIGTERM/SIGINT (or `duration` s); prints one JSON ready line."""
    import signal
    import sys

    from . import transceiver
    from .errors import StartupError
    from .log import Log

    log = Log()
    ad = adapter_mod.Adapter(transceiver.Endpoint(keyring, transceiver_id), public,
                             idle_timeout=idle_timeout, session_ttl=session_ttl, max_sessions=max_sessions)
    try:
        shell = AdapterShell(ad, listen, hook, server_bind=server_bind, health=health, log=log)
    except OSError as exc:
        raise StartupError(f"cannot bind {listen[0]}:{listen[1]} or hook {hook[0]}:{hook[1]}: "
                           f"{exc.strerror or exc}") from None
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    deadline = None if duration is None else time.monotonic() + duration
    lh, lp = shell.listen_address
    hh, hp = shell.hook_address
    print(json.dumps({"adapter": transceiver_id, "listen": f"{lh}:{lp}", "hook": f"http://{hh}:{hp}",
                      "public": [f"{h}:{p}" for h, p in public]}), flush=True)
    log.notice("adapter-start", "adapter %d: relay side %s:%d, hook http://%s:%d", transceiver_id, lh, lp, hh, hp)
    shell.serve(lambda: bool(stop) or (deadline is not None and time.monotonic() >= deadline))
    print(json.dumps({"counts": ad.counts, "drops": ad.drop_counts()}), file=sys.stderr, flush=True)
    return 0
