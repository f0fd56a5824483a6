"""The processes of the end-to-end bench: load generator, sink, and the forwarders under test.

Theory of operation
  bench/run.py forks one process per role, each pinned to a CPU, and hands it
  its sockets by inheritance. The load generator plays the clients (one UDP
  socket, hence one flow, per client address 127.1.x.y), the sink plays the
  transceiver. Both are built on edge_relay.batchio and do no per-packet
  Python work in the throughput phases: datagrams are built (and, for the
  transceiver -> client direction, sealed) ahead of time and re-sealed every
  RESEAL_INTERVAL, well inside the relay's header window.

  The load generator and the sink obey commands on a multiprocessing Pipe;
  every phase starts at an absolute CLOCK_MONOTONIC time `t0` (one clock for
  every process on the host) and is counted only between t0 + warm and
  t0 + duration. Throughput phases are closed-loop: the sender keeps at most
  `window` datagrams in flight (sent minus received, read from a shared
  counter) so that nothing is lost to a full socket buffer and the slowest
  stage sets the rate; a stall of STALL_S without progress writes the
  in-flight datagrams off as lost and carries on.

  Forwarders: the relay (edge_relay.worker.Worker, as shipped), the null
  forwarder (batchio with no per-packet logic), the naive forwarder
  (recvfrom/sendto, no authentication) and cfwd.c (run by run.py).
"""

import array
import ctypes
import os
import selectors
import signal
import socket
import struct
import time

from edge_relay import batchio, demo, header, sockaddr, transceiver
from edge_relay.batch import Outbox
from edge_relay.drops import Drop

SINK_RX, CLIENT_RX, SETUP_DONE = 0, 1, 2          # indexes into the shared counters
N_COUNTERS = 4
RESEAL_INTERVAL = 0.5                             # seconds; the relay accepts +-2 s
STALL_S = 0.02
BATCH = 32
PER_SOCK = 8                                      # datagrams per sendmmsg from one client socket
RTP = struct.Struct(">BBHII")
STAMP = struct.Struct(">Q")
STAMP_AT = RTP.size                               # the send time (ns) follows the RTP header
PAYLOAD = demo.PACKET_SIZE                        # 160 octets, voice-shaped


def pin(cpu):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def fine_timers():
    """Timer slack 1 us (prctl PR_SET_TIMERSLACK) so short sleeps pace accurately."""
    try:
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def rtp_payload(ssrc, seq=1):
    head = RTP.pack(0x80, demo.RTP_PAYLOAD_TYPE, seq, seq * 960, ssrc)
    return head + bytes(PAYLOAD - len(head))


def _cpu_self():
    r = os.times()
    return r.user + r.system


# ---------------------------------------------------------------------------
# load generator (the clients)

class LoadGen:
    def __init__(self, socks, counters):
        self.socks = socks
        self.counters = counters
        self.ios = [batchio.open_io(s, BATCH, 512, mode="mmsg") for s in socks]
        self.payloads = [rtp_payload(0x1000 + i) for i in range(len(socks))]

    def setup(self, cmd):
        """ICE connectivity check from every client through `target`; returns how many connected."""
        relay = cmd["target"]
        clients = [demo.VoiceClient(relay, cmd["ufrag"], cmd["password"], sock=s) for s in self.socks]
        deadline = time.monotonic() + cmd["timeout"]
        pending = list(clients)
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            for i, c in enumerate(pending):
                c.send_check(now)
                if i % 16 == 15:
                    time.sleep(0.0005)      # let the relay and sink keep up; their queues are bounded
            end = time.monotonic() + 0.3
            while time.monotonic() < end and any(not c.connected for c in pending):
                for c in pending:
                    c.pump(time.monotonic())
                time.sleep(0.002)
            pending = [c for c in pending if not c.connected]
        for s in self.socks:        # VoiceClient left nothing queued we care about
            s.setblocking(False)
        self.counters[SETUP_DONE] = 1
        return {"connected": len(clients) - len(pending), "clients": len(clients),
                "check_failures": sum(c.check_failures for c in clients)}

    def send_closed_loop(self, cmd):
        """Throughput, client -> transceiver: windowed against the sink's receive counter."""
        dst = sockaddr.from_tuple(cmd["target"])
        msgs = [Outbox.of([(dst, p)] * PER_SOCK) for p in self.payloads]
        ios = self.ios
        k_max = len(ios)
        counters = self.counters
        t0, end = cmd["t0"], cmd["t0"] + cmd["duration"]
        _sleep_until(t0)
        win = Window(counters, SINK_RX, cmd["window"] - PER_SOCK)
        k = 0
        now = t0
        while now < end:
            if win.full():
                now = time.monotonic()
                continue
            win.sent += ios[k].send(msgs[k])
            k += 1
            if k == k_max:
                k = 0
                now = time.monotonic()
        return win.result()

    def send_paced(self, cmd):
        """Latency: `rate` datagrams per second, each stamped with its send time."""
        dst = sockaddr.from_tuple(cmd["target"])
        ios = self.ios
        k_max = len(ios)
        rate = cmd["rate"]
        bufs = [bytearray(p) for p in self.payloads]
        pack_into = STAMP.pack_into
        clock = time.monotonic_ns
        t0, end = cmd["t0"], cmd["t0"] + cmd["duration"]
        _sleep_until(t0)
        t0_ns = int(t0 * 1e9)
        sent = 0
        k = 0
        gap = 1.0 / rate
        while True:
            now_ns = clock()
            if now_ns >= end * 1e9:
                break
            due = int((now_ns - t0_ns) * rate / 1e9) + 1 - sent
            if due <= 0:
                time.sleep(min(gap, 0.0002) * 0.5)
                continue
            due = min(due, PER_SOCK)
            batch = []
            for j in range(due):
                b = bufs[(k + j) % k_max]
                pack_into(b, STAMP_AT, now_ns)
                batch.append((dst, b))
            sent += ios[k].send(Outbox.of(batch))
            k = (k + 1) % k_max
        return {"sent": sent}

    def receive(self, cmd):
        """Throughput, transceiver -> client: count what reaches the client sockets."""
        counters = self.counters
        sel = selectors.DefaultSelector()
        for io, s in zip(self.ios, self.socks):
            sel.register(s, selectors.EVENT_READ, io)
        t0, end = cmd["t0"], cmd["t0"] + cmd["duration"]
        w0 = t0 + cmd["warm"]
        counted = total = 0
        try:
            while True:
                now = time.monotonic()
                if now >= end + 0.1:
                    break
                for key, _ in sel.select(0.05):
                    io = key.data
                    while True:
                        n = io.recv()
                        if not n:
                            break
                        total += n
                        counters[CLIENT_RX] += n
                        if w0 <= now < end:
                            counted += n
                        if n < BATCH:
                            break
        finally:
            sel.close()
        return {"received": total, "counted": counted}

    def drain(self):
        for io in self.ios:
            while io.recv():
                pass


def loadgen_main(ctl, socks, counters, cpu):
    pin(cpu)
    fine_timers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gen = LoadGen(socks, counters)
    ops = {"setup": gen.setup, "send": gen.send_closed_loop, "paced": gen.send_paced,
           "receive": gen.receive}
    while True:
        cmd = ctl.recv()
        if cmd["op"] == "stop":
            return
        cpu0 = _cpu_self()
        result = ops[cmd["op"]](cmd)
        gen.drain()
        result["cpu_s"] = _cpu_self() - cpu0
        ctl.send(result)


# ---------------------------------------------------------------------------
# sink (the transceiver)

class Sink:
    def __init__(self, sock, counters, keyring, tx_id, window_ms):
        self.sock = sock
        self.counters = counters
        self.keyring = keyring
        self.io = batchio.open_io(sock, 64, 2048, mode="mmsg")
        self.demo = demo.DemoTransceiver(keyring, tx_id, sock, window_ms=window_ms, io_mode="mmsg")
        self.endpoint = self.demo.endpoint
        self.flows = {}     # target name -> [(relay sockaddr, Inbound)], learnt at setup or given

    def setup(self, cmd):
        """Answer connectivity checks as the demo transceiver until the clients are done."""
        learnt = {}
        io = self.io
        deadline = time.monotonic() + cmd["timeout"] + 1.0
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if self.counters[SETUP_DONE] and not sel.select(0.05):
                    break
                sel.select(0.01)
                while True:
                    n = io.recv()
                    if not n:
                        break
                    now_ms = int(time.time() * 1000)
                    out = Outbox(n)
                    for i in range(n):
                        data = io.views[i]
                        inb = self.endpoint.receive(data, now_ms)
                        if inb.__class__ is not Drop and inb.header.type == header.TO_TRANSCEIVER:
                            learnt[inb.client] = (io.addrs[i], inb._replace(payload=b"", header=None))
                        reply = self.demo.handle(data, now_ms)
                        if reply is not None:
                            out.append(io.addrs[i], None, reply)
                    if out.n:
                        io.send(out)
        finally:
            sel.close()
        self.flows[cmd["name"]] = list(learnt.values())
        return {"flows": len(learnt), "checks_answered": self.demo.checks_answered,
                "drops": dict(self.demo.drops)}

    def learn(self, cmd):
        """Flows of a baseline forwarder: no check, the clients' addresses are given."""
        relay_sa = sockaddr.from_tuple(cmd["internal"])
        flows = []
        for host, port in cmd["clients"]:
            addr = socket.inet_pton(socket.AF_INET, host) + bytes(12)
            flows.append((relay_sa, transceiver.Inbound((host, port), 0, header.FAMILY_V4, port,
                                                        addr, False, b"", None)))
        self.flows[cmd["name"]] = flows
        return {"flows": len(flows)}

    def _sealed(self, flows, payloads):
        now_ms = int(time.time() * 1000)
        return [(sa, self.endpoint.to_client(inb, payloads[i % len(payloads)], now_ms))
                for i, (sa, inb) in enumerate(flows)]

    def count(self, cmd):
        """Throughput or latency, client -> transceiver: count (and time) what arrives."""
        io = self.io
        counters = self.counters
        t0, end = cmd["t0"], cmd["t0"] + cmd["duration"]
        w0 = t0 + cmd["warm"]
        w0_ns, end_ns = int(w0 * 1e9), int(end * 1e9)
        stamps = cmd.get("latency", False)
        lat = array.array("q")
        unpack_from = STAMP.unpack_from
        counted = total = 0
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        try:
            while True:
                if time.monotonic() >= end + 0.1:
                    break
                if not sel.select(0.05):
                    continue
                while True:
                    n = io.recv()
                    if not n:
                        break
                    now_ns = time.monotonic_ns()
                    total += n
                    counters[SINK_RX] += n
                    if w0_ns <= now_ns < end_ns:
                        counted += n
                        if stamps:
                            views = io.views
                            for i in range(n):
                                v = views[i]
                                off = STAMP_AT + (header.HEADER_LEN if v[0] == 0xEE else 0)
                                if len(v) >= off + 8:
                                    lat.append(now_ns - unpack_from(v, off)[0])
                    if n < io.batch_size:
                        break
        finally:
            sel.close()
        result = {"received": total, "counted": counted}
        if stamps:
            result["latency_ns"] = lat.tobytes()
        return result

    def send_closed_loop(self, cmd):
        """Throughput, transceiver -> client: sealed datagrams, windowed against the clients' counter."""
        flows = self.flows[cmd["name"]]
        payloads = [rtp_payload(0x2000 + i) for i in range(min(len(flows), 64))]
        counters = self.counters
        io = self.io
        t0, end = cmd["t0"], cmd["t0"] + cmd["duration"]
        sealed = self._sealed(flows, payloads)
        resealed = time.monotonic()
        ring = sealed * (1 + 2 * BATCH // len(sealed)) + sealed
        boxes = {}                      # pos -> Outbox of ring[pos:pos + BATCH], made at first use
        _sleep_until(t0)
        win = Window(counters, CLIENT_RX, cmd["window"] - BATCH)
        pos = 0
        n_flows = len(sealed)
        now = t0
        while now < end:
            if win.full():
                now = time.monotonic()
                continue
            box = boxes.get(pos)
            if box is None:
                box = boxes[pos] = Outbox.of(ring[pos:pos + BATCH])
            win.sent += io.send(box)
            pos = (pos + BATCH) % n_flows
            now = time.monotonic()
            if now - resealed > RESEAL_INTERVAL:
                sealed = self._sealed(flows, payloads)
                ring = sealed * (1 + 2 * BATCH // len(sealed)) + sealed
                boxes = {}
                resealed = now
        return win.result()

    def drain(self):
        while self.io.recv():
            pass


def sink_main(ctl, sock, counters, key_dir, tx_id, window_ms, cpu):
    from edge_relay import keys
    pin(cpu)
    fine_timers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sink = Sink(sock, counters, keys.load_dir(key_dir), tx_id, window_ms)
    ops = {"setup": sink.setup, "learn": sink.learn, "count": sink.count, "send": sink.send_closed_loop}
    while True:
        cmd = ctl.recv()
        if cmd["op"] == "stop":
            return
        cpu0 = _cpu_self()
        result = ops[cmd["op"]](cmd)
        sink.drain()
        result["cpu_s"] = _cpu_self() - cpu0
        ctl.send(result)


class Window:
    """Closed-loop pacing: at most `size` datagrams in flight against the receiver's counter.

    The sender adds what it sent to `sent`; `full()` is true (after a short
    sleep) while the window is full. When the counter has not moved for
    STALL_S, the datagrams in flight are written off as lost, so one loss
    burst cannot stop the sender for the rest of the window.
    """

    def __init__(self, counters, index, size):
        self.counters, self.index, self.size = counters, index, size
        self.base = self.last_rx = counters[index]
        self.last_change = time.monotonic()
        self.sent = self.written_off = self.stalls = 0

    def full(self):
        rx = self.counters[self.index]
        if self.sent - self.written_off - (rx - self.base) <= self.size:
            return False
        now = time.monotonic()
        if rx != self.last_rx:
            self.last_rx, self.last_change = rx, now
        elif now - self.last_change > STALL_S:
            self.written_off = self.sent - (rx - self.base)
            self.stalls += 1
            self.last_change = now
        time.sleep(0.00005)
        return True

    def result(self):
        return {"sent": self.sent, "written_off": self.written_off, "stalls": self.stalls}


def _sleep_until(t):
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# ---------------------------------------------------------------------------
# forwarders

def _stop_on_term():
    flag = []
    signal.signal(signal.SIGTERM, lambda *_: flag.append(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return flag


def null_main(pub, internal, tx_addr, back_addrs, cpu):
    """The ceiling of this design: batchio moving datagrams, no per-packet decision.

    Client -> transceiver: a constant 48-octet head plus the payload, to the
    sink. Transceiver -> client: the datagram minus its 48-octet head, to the
    clients in turn. The sink sends to its flows in turn, so this spreads the
    datagrams over the client sockets as reading the header would (cfwd and
    the relay do), without reading it. Sending everything to one client
    instead (as this did first) costs the kernel more per datagram on the
    receiving socket, and made the null forwarder look 0.7x cfwd.
    """
    pin(cpu)
    stop = _stop_on_term()
    pio = batchio.open_io(pub, BATCH, mode="mmsg")
    iio = batchio.open_io(internal, BATCH, mode="mmsg")
    tx_sa = sockaddr.from_tuple(tx_addr)
    dests = [sockaddr.from_tuple(a) for a in back_addrs]
    ring = dests * (2 + BATCH // len(dests))     # ring[pos:pos + BATCH] never wraps
    pos = 0
    head = bytes(header.HEADER_LEN)
    hl = header.HEADER_LEN
    to_tx, to_clients = Outbox(BATCH), Outbox(BATCH)
    to_tx.dest[:] = [tx_sa] * BATCH
    to_tx.head[:] = [head] * BATCH
    to_tx.origin[:] = range(BATCH)
    to_clients.origin[:] = range(BATCH)
    sel = selectors.DefaultSelector()
    sel.register(pub, selectors.EVENT_READ, 0)
    sel.register(internal, selectors.EVENT_READ, 1)
    while not stop:
        for key, _ in sel.select(0.2):
            if key.data == 0:
                for _ in range(8):
                    n = pio.recv()
                    if not n:
                        break
                    to_tx.body[:n] = pio.views[:n]
                    to_tx.n = n
                    iio.send(to_tx, pio)
                    if n < BATCH:
                        break
            else:
                for _ in range(8):
                    n = iio.recv()
                    if not n:
                        break
                    to_clients.dest[:n] = ring[pos:pos + n]
                    to_clients.body[:n] = [v[hl:] for v in iio.views[:n]]
                    to_clients.n = n
                    pio.send(to_clients, iio)
                    pos = (pos + n) % len(dests)
                    if n < BATCH:
                        break


def naive_main(pub, internal, tx_addr, cpu):
    """recvfrom/sendto, one system call per datagram, no authentication: what one writes first."""
    pin(cpu)
    stop = _stop_on_term()
    pub.setblocking(False)
    internal.setblocking(False)
    heads = {}
    sel = selectors.DefaultSelector()
    sel.register(pub, selectors.EVENT_READ, 0)
    sel.register(internal, selectors.EVENT_READ, 1)
    ntop = socket.inet_ntop
    while not stop:
        for key, _ in sel.select(0.2):
            if key.data == 0:
                for _ in range(256):
                    try:
                        data, addr = pub.recvfrom(2048)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    head = heads.get(addr)
                    if head is None:
                        head = heads[addr] = header.prefix(0, header.TO_TRANSCEIVER, 0, 0, 4, addr[1],
                                                           socket.inet_aton(addr[0]) + bytes(12)) + bytes(22)
                    try:
                        internal.sendto(head + data, tx_addr)
                    except (BlockingIOError, ConnectionRefusedError):
                        pass
            else:
                for _ in range(256):
                    try:
                        data = internal.recv(2048)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    if len(data) < 48 or data[0] != 0xEE:
                        continue
                    dest = (ntop(socket.AF_INET, data[10:14]), int.from_bytes(data[8:10], "big"))
                    try:
                        pub.sendto(data[48:], dest)
                    except (BlockingIOError, ConnectionRefusedError):
                        pass


def relay_main(cfg_data, base_dir, key_dir, listeners, internal, cpu):
    """One relay worker exactly as shipped (edge_relay.worker.Worker), until SIGTERM."""
    from edge_relay import config, keys
    from edge_relay.log import Log
    from edge_relay.worker import Worker
    pin(cpu)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = config.parse(cfg_data, base_dir)
    log = Log(level="err", stream=open(os.devnull, "w"))
    Worker(cfg, keys.load_dir(key_dir), listeners, internal, log).run()
