"""Counters shared by the workers with the supervisor, and their Prometheus text rendering.

Theory of operation
  The supervisor maps one anonymous MAP_SHARED region before it forks; each
  worker owns one slot of 8-byte unsigned counters and overwrites it whole
  at every publication (Worker.publish, every 0.5 s and at exit): its
  Router.stats and Router.drops, its flow gauges and a heartbeat. There is no
  per-packet IPC and no lock: a slot has one writer, and an aligned 8-byte
  store is never torn on the platforms we run on; a reader may see one
  publication half applied, which a scrape does not care about.

  Counters of a worker start at zero in a new process. When the supervisor
  reaps a dead worker it adds the slot's last values to that slot's `base`
  and clears the slot, so totals never go backwards across restarts (a
  SIGKILLed worker loses at most its last half second of counts).

  `render` turns a `Totals` into Prometheus text exposition format 0.0.4;
  `parse` reads that format back (for `edge-relay stats`).
"""

import mmap
import struct
import sys
import time

from . import __version__
from .drops import N_DROPS, Drop
from .router import N_STATS, STAT_NAMES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# slot header words
HEARTBEAT, PID, FLOWS_PENDING, FLOWS_CONFIRMED, RELOADS, RELOAD_FAILURES, GENERATION, STARTED = range(8)
HEAD_WORDS = 8
STATS_AT = HEAD_WORDS
DROPS_AT = STATS_AT + N_STATS
SLOT_WORDS = DROPS_AT + N_DROPS
_WORD = struct.calcsize("Q")


def monotonic_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class SharedCounters:
    """`n` slots of SLOT_WORDS unsigned 64-bit counters in memory shared across fork."""

    def __init__(self, n):
        self.n = n
        self._map = mmap.mmap(-1, max(1, n) * SLOT_WORDS * _WORD, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self._map).cast("Q")
        self.base = [[0] * (N_STATS + N_DROPS) for _ in range(n)]

    def slot(self, i):
        """A writable view of slot `i` (the worker's side)."""
        return self.words[i * SLOT_WORDS:(i + 1) * SLOT_WORDS]

    def read(self, i):
        return self.words[i * SLOT_WORDS:(i + 1) * SLOT_WORDS].tolist()

    def retire(self, i):
        """Slot `i`'s worker is gone: fold its counters into the base and clear the slot."""
        values = self.read(i)
        base = self.base[i]
        for k, v in enumerate(values[STATS_AT:]):
            base[k] += v
        self.slot(i)[:] = memoryview(bytes(SLOT_WORDS * _WORD)).cast("Q")

    def close(self):
        self.words.release()
        self._map.close()


def publish(slot, router, generation, reloads=0, reload_failures=0, started_ns=0):
    """Copy one worker's counters into its slot (called by the worker)."""
    flows = router.flows
    slot[STATS_AT:DROPS_AT] = memoryview(struct.pack(f"{N_STATS}Q", *router.stats)).cast("Q")
    slot[DROPS_AT:SLOT_WORDS] = memoryview(struct.pack(f"{N_DROPS}Q", *router.drops)).cast("Q")
    slot[FLOWS_PENDING] = flows.pending
    slot[FLOWS_CONFIRMED] = flows.confirmed
    slot[RELOADS] = reloads
    slot[RELOAD_FAILURES] = reload_failures
    slot[GENERATION] = generation
    slot[STARTED] = started_ns
    slot[HEARTBEAT] = monotonic_ns()


class Totals:
    """Everything /metrics shows, summed over workers (plain numbers, built by the supervisor)."""

    def __init__(self):
        self.stats = [0] * N_STATS
        self.drops = [0] * N_DROPS
        self.flows_pending = 0
        self.flows_confirmed = 0
        self.workers_up = 0
        self.workers = 0
        self.worker_restarts = 0
        self.crash_looping = 0
        self.reloads = 0
        self.reload_failures = 0
        self.generation = 0
        self.workers_generation = 0
        self.ready = False


def totals(shared, up=()):
    """Sum every slot plus its base; `up` is the set of slots whose worker is serving."""
    t = Totals()
    t.workers = shared.n
    for i in range(shared.n):
        values = shared.read(i)
        base = shared.base[i]
        for k in range(N_STATS):
            t.stats[k] += values[STATS_AT + k] + base[k]
        for k in range(N_DROPS):
            t.drops[k] += values[DROPS_AT + k] + base[N_STATS + k]
        if i in up:
            t.flows_pending += values[FLOWS_PENDING]
            t.flows_confirmed += values[FLOWS_CONFIRMED]
            gen = values[GENERATION]
            t.workers_generation = gen if not t.workers_generation else min(gen, t.workers_generation)
    t.workers_up = len(up)
    return t


_STAT = {name: i for i, name in enumerate(STAT_NAMES)}
DIRECTIONS = (("client_in", "client_in"), ("to_transceiver", "to_transceiver"),
              ("transceiver_in", "transceiver_in"), ("to_client", "to_client"))
FLOW_EVENTS = ("opened", "confirmed", "moved", "expired")


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(t):
    """Prometheus text format 0.0.4 for Totals `t`."""
    out = []

    def family(name, kind, text, samples):
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    family("edge_relay_packets_total", "counter", "Datagrams by direction.",
           [((("direction", d),), t.stats[_STAT[f"{d}_packets"]]) for d, _ in DIRECTIONS])
    family("edge_relay_bytes_total", "counter", "Payload bytes by direction.",
           [((("direction", d),), t.stats[_STAT[f"{d}_bytes"]]) for d, _ in DIRECTIONS])
    family("edge_relay_drops_total", "counter", "Datagrams not forwarded, by reason.",
           [((("reason", r.label),), t.drops[r]) for r in Drop if r != Drop.OK])
    family("edge_relay_flow_events_total", "counter", "Flows opened, confirmed, moved and expired.",
           [((("event", e),), t.stats[_STAT[f"flows_{e}"]]) for e in FLOW_EVENTS])
    family("edge_relay_flows", "gauge", "Live flows by state.",
           [((("state", "pending"),), t.flows_pending), ((("state", "confirmed"),), t.flows_confirmed)])
    family("edge_relay_workers", "gauge", "Configured worker processes.", [((), t.workers)])
    family("edge_relay_workers_up", "gauge", "Worker processes serving (fresh heartbeat).",
           [((), t.workers_up)])
    family("edge_relay_worker_restarts_total", "counter", "Worker processes restarted after dying.",
           [((), t.worker_restarts)])
    family("edge_relay_workers_crash_looping", "gauge", "Worker slots held back after repeated deaths.",
           [((), t.crash_looping)])
    family("edge_relay_reloads_total", "counter", "Successful configuration reloads.", [((), t.reloads)])
    family("edge_relay_reload_failures_total", "counter", "Reloads refused (invalid config or keys).",
           [((), t.reload_failures)])
    family("edge_relay_config_generation", "gauge", "Generation of the running config (1 at start).",
           [((), t.generation)])
    family("edge_relay_workers_config_generation", "gauge",
           "Oldest config generation a serving worker runs (equals edge_relay_config_generation once reloaded).",
           [((), t.workers_generation)])
    family("edge_relay_ready", "gauge", "1 when every worker serves and the relay is not draining.",
           [((), int(bool(t.ready)))])
    family("edge_relay_build_info", "gauge", "Version of edge-relay and Python.",
           [((("version", __version__), ("python", sys.version.split()[0])), 1)])
    return "\n".join(out) + "\n"


def _unescape(text):
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse(text):
    """{(name, ((label, value), ...)): float} from Prometheus text; ValueError on a bad line."""
    samples = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        labels = ()
        if "{" in line:
            name, rest = line.split("{", 1)
            body, _, value = rest.rpartition("}")
            pairs = []
            i = 0
            while i < len(body):
                eq = body.index("=", i)
                key = body[i:eq]
                if body[eq + 1] != '"':
                    raise ValueError(f"line {n}: label value not quoted")
                j = eq + 2
                while body[j] != '"':
                    j += 2 if body[j] == "\\" else 1
                pairs.append((key, _unescape(body[eq + 2:j])))
                i = j + 1
                if i < len(body) and body[i] == ",":
                    i += 1
            labels = tuple(pairs)
        else:
            name, _, value = line.partition(" ")
        try:
            samples[(name.strip(), labels)] = float(value.split()[0])
        except (ValueError, IndexError):
            raise ValueError(f"line {n}: bad sample value") from None
    return samples
