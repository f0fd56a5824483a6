"""Counters shared by the workers with the supervisor, and their Prometheus text rendering.

Theory of operation
  The supervisor maps one MAP_SHARED region before it forks; each
  worker owns one slot of 8-byte unsigned counters and overwrites it whole
  at every publication (Worker.publish, every 0.5 s and at exit): its
  Router.stats and Router.drops, its flow gauges and a heartbeat. There is no
  per-packet IPC and no lock: a slot has one writer, and an aligned 8-byte
  store is never torn on the platforms we run on; a reader may see one
  publication half applied, which a scrape does not care about.

  Counters of a worker start at zero in a new process. When the supervisor
  reaps a dead worker it adds the slot's last values to that slot's `base`
  and clears the slot, so totals never go backwards across restarts (a
  SIGKILLed worker loses at most its last half second of counts). The
  crash journal's counters (JOURNAL_COUNTERS: writes it could not make,
  what each start restored) are carried the same way; its gauges (records
  in use, capacity, the last start's restore) are the serving worker's own.

  Host-side numbers are read only when /metrics is scraped, never on the
  packet path: `process_*` of the supervisor and each worker from
  /proc/<pid>/stat and /proc/<pid>/fd (label worker="supervisor" or the
  index), and `edge_relay_socket_drops_total` from the drops column of
  /proc/net/udp and /proc/net/udp6 for the inodes of the relay's sockets
  (the kernel's receive-buffer overflows, label socket="l<listener>w<worker>"
  or "i<worker>", the fd-store names).

  `render` turns a `Totals` into Prometheus text exposition format 0.0.4;
  `parse` reads that format back (for `edge-relay stats`).

  Probe, voice-quality and directory numbers have a shape that depends on the
  config (one histogram per transceiver), so they travel separately: each
  worker writes a small JSON document (`extra_of`) into its slot of
  `ExtraShared` at every publication, framed by a sequence word that is odd
  while a write is in progress (a seqlock: the reader retries, then keeps the
  last good copy). The supervisor sums counters and histogram words across
  workers (histogram.add_words); `edge_relay_transceiver_up` is 1 only if
  every serving worker sees the transceiver up, srtt is the mean of the
  workers' estimates. Names: docs/OPERATIONS.md. These extra
  counters restart from zero with a restarted worker (only the main counters
  are carried over by `retire`).

  Both regions are memfds (`fd`), not anonymous maps: a supervisor that
  re-executes itself (reexec.py) hands the fd to its new image, which maps
  the very pages its running workers keep writing.
"""

import json
import mmap
import os
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
# The crash journal (journal.py): counters carried across restarts like the
# stats and drops, then gauges of the worker's own journal and start.
JOURNAL_COUNTERS = ("full", "unjournaled", "restored", "bad", "duplicate", "refused", "reformatted")
JOURNAL_AT = DROPS_AT + N_DROPS
N_JOURNAL = len(JOURNAL_COUNTERS)
J_RECORDS, J_CAPACITY, J_RESTORED, J_RESTORE_US = range(JOURNAL_AT + N_JOURNAL, JOURNAL_AT + N_JOURNAL + 4)
SLOT_WORDS = J_RESTORE_US + 1
CARRIED = N_STATS + N_DROPS + N_JOURNAL        # words from STATS_AT folded into `base` by retire
_WORD = struct.calcsize("Q")


def monotonic_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _shared_map(name, size, fd):
    """(fd, MAP_SHARED map of `size` bytes): a new close-on-exec memfd, or `fd` (taken over) if given.

    Raises ValueError when a given `fd` is smaller than `size` (not the region we expect).
    """
    if fd is None:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
    elif os.fstat(fd).st_size < size:
        raise ValueError(f"shared region fd {fd} holds {os.fstat(fd).st_size} bytes, {size} expected")
    return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class SharedCounters:
    """`n` slots of SLOT_WORDS unsigned 64-bit counters in memory shared across fork (and re-exec: `fd`)."""

    def __init__(self, n, fd=None):
        self.n = n
        self.fd, self._map = _shared_map("edge-relay-counters", max(1, n) * SLOT_WORDS * _WORD, fd)
        self.words = memoryview(self._map).cast("Q")
        self.base = [[0] * CARRIED for _ in range(n)]

    def slot(self, i):
        """A writable view of slot `i` (the worker's side)."""
        return self.words[i * SLOT_WORDS:(i + 1) * SLOT_WORDS]

    def read(self, i):
        return self.words[i * SLOT_WORDS:(i + 1) * SLOT_WORDS].tolist()

    def retire(self, i):
        """Slot `i`'s worker is gone: fold its counters into the base and clear the slot."""
        values = self.read(i)
        base = self.base[i]
        for k, v in enumerate(values[STATS_AT:STATS_AT + CARRIED]):
            base[k] += v
        self.slot(i)[:] = memoryview(bytes(SLOT_WORDS * _WORD)).cast("Q")

    def close(self):
        self.words.release()
        self._map.close()
        os.close(self.fd)


EXTRA_BYTES = 128 * 1024      # per worker slot: sequence word, length word, JSON
_EXTRA_HEAD = struct.Struct("=QQ")


class ExtraShared:
    """`n` slots of EXTRA_BYTES in shared memory for each worker's `extra_of` document."""

    def __init__(self, n, fd=None):
        self.n = n
        self.fd, self._map = _shared_map("edge-relay-extra", max(1, n) * EXTRA_BYTES, fd)
        self._last = [None] * max(1, n)

    def write(self, i, doc):
        """Worker side: store `doc` (a JSON-able dict) in slot `i`; False if it does not fit."""
        data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        if len(data) > EXTRA_BYTES - _EXTRA_HEAD.size:
            return False
        base = i * EXTRA_BYTES
        seq, _ = _EXTRA_HEAD.unpack_from(self._map, base)
        seq += 1 if seq % 2 == 0 else 2           # odd: writing
        _EXTRA_HEAD.pack_into(self._map, base, seq, 0)
        self._map[base + _EXTRA_HEAD.size:base + _EXTRA_HEAD.size + len(data)] = data
        _EXTRA_HEAD.pack_into(self._map, base, seq + 1, len(data))
        return True

    def read(self, i):
        """Supervisor side: slot `i`'s last complete document, or None."""
        base = i * EXTRA_BYTES
        for _ in range(3):
            seq, length = _EXTRA_HEAD.unpack_from(self._map, base)
            if seq % 2 or not length:
                continue
            data = bytes(self._map[base + _EXTRA_HEAD.size:base + _EXTRA_HEAD.size + length])
            if _EXTRA_HEAD.unpack_from(self._map, base)[0] != seq:
                continue
            try:
                self._last[i] = json.loads(data)
            except ValueError:
                continue
            break
        return self._last[i]

    def clear(self, i):
        base = i * EXTRA_BYTES
        _EXTRA_HEAD.pack_into(self._map, base, 0, 0)
        self._last[i] = None

    def close(self):
        self._map.close()
        os.close(self.fd)


_PROBE_COUNTERS = (("edge_relay_transceiver_probes_sent_total", "sent", "probes sent"),
                   ("edge_relay_transceiver_probes_lost_total", "lost", "probes not answered in time"),
                   ("edge_relay_transceiver_probes_bad_total", "bad_acks",
                    "probe answers matching no outstanding probe"),
                   ("edge_relay_transceiver_transitions_total", "transitions", "up/down changes"))
_QUALITY_HISTOGRAMS = (("edge_relay_flow_loss_ratio", "loss", "fraction of RTP packets lost per report interval"),
                       ("edge_relay_flow_reorder_ratio", "reorder",
                        "fraction of RTP packets reordered per report interval"),
                       ("edge_relay_flow_jitter_seconds", "jitter", "RFC 3550 interarrival jitter at report time"),
                       ("edge_relay_flow_time_to_media_seconds", "ttfm", "first STUN packet to first RTP packet"))
_QUALITY_COUNTERS = ("expected", "lost", "reordered", "duplicates", "packets")


def extra_of(worker):
    """The probe/quality/directory document one worker publishes (see ExtraShared)."""
    router = worker.router
    doc = {}
    if router.prober is not None:
        names = {t.id: t.name for t in worker.cfg.transceivers}
        doc["tx"] = {names.get(tid, f"tx{tid}"): {
            "up": int(h.up), "srtt": h.srtt, "rtt": h.histogram.to_words(),
            **{attr: getattr(h, attr) for _, attr, _ in _PROBE_COUNTERS}}
            for tid, h in router.prober.health.items()}
    q = router.quality
    if q is not None:
        doc["q"] = {"sampled": len(q.flows), "dirs": {
            name: {**{attr: getattr(d, attr).to_words() for _, attr, _ in _QUALITY_HISTOGRAMS},
                   **{c: getattr(d, c) for c in _QUALITY_COUNTERS}}
            for name, d in q.dirs.items()}}
    if router.directory is not None:
        stats = dict(router.directory.stats)
        if worker.redis is not None:
            stats.update({f"redis_{k}": v for k, v in worker.redis.stats.items()})
            stats["redis_connected"] = int(worker.redis.state == "connected") \
                if isinstance(worker.redis.state, str) else int(worker.redis.sock is not None)
        doc["dir"] = stats
    return doc


def render_extra(docs):
    """Prometheus lines for the documents of the serving workers (summed; see ExtraShared)."""
    from .histogram import Histogram, header
    from .probes import RTT_BUCKETS
    from .quality import JITTER_BUCKETS, LOSS_BUCKETS, TTFM_BUCKETS
    docs = [d for d in docs if d]
    lines = []
    tx = {}
    for d in docs:
        for name, h in d.get("tx", {}).items():
            agg = tx.setdefault(name, {"up": 1, "srtt": [], "rtt": Histogram(RTT_BUCKETS),
                                       **{attr: 0 for _, attr, _ in _PROBE_COUNTERS}})
            agg["up"] = min(agg["up"], h["up"])
            if h["srtt"] is not None:
                agg["srtt"].append(h["srtt"])
            agg["rtt"].add_words(h["rtt"])
            for _, attr, _ in _PROBE_COUNTERS:
                agg[attr] += h[attr]
    if tx:
        rows = sorted(tx.items())
        lines += header("edge_relay_transceiver_up", "1 if every worker's probes say the transceiver is up",
                        "gauge")
        lines += [f'edge_relay_transceiver_up{{transceiver="{_escape(n)}"}} {a["up"]}' for n, a in rows]
        for metric, attr, text in _PROBE_COUNTERS:
            lines += header(metric, text, "counter")
            lines += [f'{metric}{{transceiver="{_escape(n)}"}} {a[attr]}' for n, a in rows]
        lines += header("edge_relay_transceiver_srtt_seconds", "smoothed probe RTT (RFC 6298)", "gauge")
        lines += [f'edge_relay_transceiver_srtt_seconds{{transceiver="{_escape(n)}"}} '
                  f'{sum(a["srtt"]) / len(a["srtt"])!r}' for n, a in rows if a["srtt"]]
        lines += header("edge_relay_transceiver_rtt_seconds", "probe round-trip time")
        for n, a in rows:
            lines += a["rtt"].render("edge_relay_transceiver_rtt_seconds", f'transceiver="{_escape(n)}"')
    qdocs = [d["q"] for d in docs if "q" in d]
    if qdocs:
        bounds = {"loss": LOSS_BUCKETS, "reorder": LOSS_BUCKETS, "jitter": JITTER_BUCKETS, "ttfm": TTFM_BUCKETS}
        dirs = {}
        for q in qdocs:
            for name, dd in q["dirs"].items():
                agg = dirs.setdefault(name, {**{a: Histogram(b) for a, b in bounds.items()},
                                             **{c: 0 for c in _QUALITY_COUNTERS}})
                for attr in bounds:
                    agg[attr].add_words(dd[attr])
                for c in _QUALITY_COUNTERS:
                    agg[c] += dd[c]
        for metric, attr, text in _QUALITY_HISTOGRAMS:
            lines += header(metric, text + " (sampled flows)")
            for name in sorted(dirs):
                lines += dirs[name][attr].render(metric, f'direction="{name}"')
        for c in _QUALITY_COUNTERS:
            metric = f"edge_relay_rtp_{c}_total"
            lines += header(metric, f"RTP {c} in sampled flows", "counter")
            lines += [f'{metric}{{direction="{n}"}} {dirs[n][c]}' for n in sorted(dirs)]
        lines += header("edge_relay_flows_sampled", "flows whose RTP headers are sampled now", "gauge")
        lines.append(f"edge_relay_flows_sampled {sum(q['sampled'] for q in qdocs)}")
    ddocs = [d["dir"] for d in docs if "dir" in d]
    if ddocs:
        total = {}
        for dd in ddocs:
            for k, v in dd.items():
                total[k] = total.get(k, 0) + v
        lines += render_directory(total)
        lines += header("edge_relay_directory_connected", "workers connected to the directory's Redis", "gauge")
        lines.append(f"edge_relay_directory_connected {total.get('redis_connected', 0)}")
    return lines


# One counter per meaning (directory.py and resp.py stats keys -> metric, label).
# A key not in this table is not exported (tests/test_metrics.py checks the table
# covers every key the directory and its Redis client count).
DIRECTORY_COUNTERS = (
    ("edge_relay_directory_publications_total", "flows published to the directory", None,
     ("published",)),
    ("edge_relay_directory_lookups_total", "lookups started for an unknown client address", None, ("lookups",)),
    ("edge_relay_directory_held_packets_total", "packets held while their lookup runs", None, ("held",)),
    ("edge_relay_directory_lookup_results_total", "finished lookups by result", "result",
     ("hit", "miss", "error", "invalid", "timeout")),
    ("edge_relay_directory_late_replies_total", "lookup replies that came after their lookup ended", None,
     ("late_replies",)),
    ("edge_relay_directory_not_held_total", "packets of unknown flows not held, by reason", "reason",
     ("directory_negative", "directory_flow_full", "directory_total_full", "directory_lookups_full")),
    ("edge_relay_directory_redis_calls_total", "commands sent to Redis", None, ("redis_calls",)),
    ("edge_relay_directory_redis_connects_total", "connections made to Redis", None, ("redis_connects",)),
    ("edge_relay_directory_redis_failures_total", "Redis connections lost or refused", None, ("redis_failures",)),
    ("edge_relay_directory_redis_timeouts_total", "Redis commands that timed out", None, ("redis_timeouts",)),
    ("edge_relay_directory_redis_refused_total", "commands not sent to Redis, by reason", "reason",
     ("redis_refused_down", "redis_refused_full")),
    ("edge_relay_directory_redis_late_replies_total", "Redis replies to commands already timed out", None,
     ("redis_late_replies",)),
)


def render_directory(total):
    """Prometheus lines for the summed directory stats `total` (see DIRECTORY_COUNTERS)."""
    from .histogram import header
    lines = []
    for metric, text, label, keys in DIRECTORY_COUNTERS:
        lines += header(metric, text, "counter")
        if label is None:
            lines.append(f"{metric} {total.get(keys[0], 0)}")
            continue
        for k in keys:
            value = k.removeprefix("directory_").removeprefix("redis_refused_")
            lines.append(f'{metric}{{{label}="{value}"}} {total.get(k, 0)}')
    return lines


# -- read at scrape time by the supervisor, never on the packet path ----------

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time():
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


_BTIME = _boot_time()


def process_stats(pid):
    """(cpu seconds, resident bytes, open fds, start time in Unix seconds) of `pid` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()      # comm may hold spaces: skip past it
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    # fields[0] is field 3 (state) of proc(5): utime 14, stime 15, starttime 22, rss 24
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return cpu, int(fields[21]) * _PAGE, fds, _BTIME + int(fields[19]) / _CLK_TCK


def socket_drops(inodes):
    """{inode: drops} for the UDP sockets in `inodes`, from /proc/net/udp and udp6 (proc(5))."""
    out = {}
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) >= 13 and int(cols[9]) in inodes:
                        out[int(cols[9])] = int(cols[12])
        except (OSError, ValueError):
            continue
    return out


def render_host(processes, sockets):
    """process_* lines for `processes` [(worker label, pid)] and edge_relay_socket_drops_total for
    `sockets` [(socket name, inode)]: read from /proc when called (at scrape time)."""
    from .histogram import header
    stats = [(label, process_stats(pid)) for label, pid in processes]
    stats = [(label, st) for label, st in stats if st is not None]
    lines = []
    for i, (metric, kind, text) in enumerate((
            ("process_cpu_seconds_total", "counter", "user and system CPU time of the process"),
            ("process_resident_memory_bytes", "gauge", "resident memory of the process"),
            ("process_open_fds", "gauge", "open file descriptors of the process"),
            ("process_start_time_seconds", "gauge", "start time of the process since the Unix epoch"))):
        lines += header(metric, text, kind)
        lines += [f'{metric}{{worker="{_escape(label)}"}} {st[i]!r}' for label, st in stats]
    if sockets:
        drops = socket_drops({inode for _, inode in sockets})
        lines += header("edge_relay_socket_drops_total",
                        "datagrams the kernel dropped because the socket's receive buffer was full", "counter")
        lines += [f'edge_relay_socket_drops_total{{socket="{_escape(name)}"}} {drops[inode]}'
                  for name, inode in sockets if inode in drops]
    return lines


def publish(slot, router, generation, reloads=0, reload_failures=0, started_ns=0):
    """Copy one worker's counters into its slot (called by the worker)."""
    flows = router.flows
    slot[STATS_AT:DROPS_AT] = memoryview(struct.pack(f"{N_STATS}Q", *router.stats)).cast("Q")
    slot[DROPS_AT:JOURNAL_AT] = memoryview(struct.pack(f"{N_DROPS}Q", *router.drops)).cast("Q")
    journal = getattr(flows, "journal", None)
    if journal is not None:
        got = journal.restored
        slot[JOURNAL_AT:J_RECORDS] = memoryview(struct.pack(
            f"{N_JOURNAL}Q", journal.full, journal.unjournaled,
            *((got.restored, got.bad, got.duplicate, got.skipped, int(got.reformatted)) if got else (0,) * 5))
        ).cast("Q")
        slot[J_RECORDS] = journal.in_use
        slot[J_CAPACITY] = journal.capacity
        slot[J_RESTORED] = got.restored if got else 0
        slot[J_RESTORE_US] = int(journal.restore_seconds * 1e6)
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
        self.last_reload_ok = 1
        self.last_reload_success = 0.0
        self.extra = []         # extra_of documents of the serving workers
        self.worker_flows = {}  # {worker index: live flows} of the serving workers
        self.flows_max = 0      # limits.max_flows: each worker's own cap
        self.journal = [0] * N_JOURNAL      # JOURNAL_COUNTERS summed over workers, dead ones included
        self.worker_journal = {}  # {worker index: (records, capacity, restored, restore seconds)} of serving
        #                           workers that have a crash journal
        self.processes = []     # [(worker label, pid)]: process_* read at render time
        self.sockets = []       # [(socket name, inode)]: edge_relay_socket_drops_total read at render time


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
        for k in range(N_JOURNAL):
            t.journal[k] += values[JOURNAL_AT + k] + base[N_STATS + N_DROPS + k]
        if i in up and values[J_CAPACITY]:
            t.worker_journal[i] = (values[J_RECORDS], values[J_CAPACITY], values[J_RESTORED],
                                   values[J_RESTORE_US] / 1e6)
        if i in up:
            t.flows_pending += values[FLOWS_PENDING]
            t.flows_confirmed += values[FLOWS_CONFIRMED]
            t.worker_flows[i] = values[FLOWS_PENDING] + values[FLOWS_CONFIRMED]
            gen = values[GENERATION]
            t.workers_generation = gen if not t.workers_generation else min(gen, t.workers_generation)
    t.workers_up = len(up)
    return t


_STAT = {name: i for i, name in enumerate(STAT_NAMES)}
DIRECTIONS = (("client_in", "client_in"), ("to_transceiver", "to_transceiver"),
              ("transceiver_in", "transceiver_in"), ("to_client", "to_client"))
FLOW_EVENTS = ("opened", "confirmed", "moved", "expired", "failed_over", "from_directory",
               "evicted", "restart_refused")


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
    family("edge_relay_bytes_total", "counter",
           "UDP payload bytes by direction; to_transceiver and transceiver_in include the 48-octet "
           "forwarding header, client_in and to_client do not.",
           [((("direction", d),), t.stats[_STAT[f"{d}_bytes"]]) for d, _ in DIRECTIONS])
    family("edge_relay_drops_total", "counter", "Datagrams not forwarded, by reason.",
           [((("reason", r.label),), t.drops[r]) for r in Drop if r != Drop.OK])
    family("edge_relay_flow_events_total", "counter", "Flows opened, confirmed, moved and expired.",
           [((("event", e),), t.stats[_STAT[f"flows_{e}"]]) for e in FLOW_EVENTS])
    family("edge_relay_flows", "gauge", "Live flows by state.",
           [((("state", "pending"),), t.flows_pending), ((("state", "confirmed"),), t.flows_confirmed)])
    family("edge_relay_worker_flows", "gauge", "Live flows of each serving worker (pending and confirmed).",
           [((("worker", str(i)),), n) for i, n in sorted(t.worker_flows.items())])
    family("edge_relay_flows_max", "gauge", "Cap on one worker's live flows (limits.max_flows).",
           [((), t.flows_max)])
    journal = dict(zip(JOURNAL_COUNTERS, t.journal))
    workers = sorted(t.worker_journal.items())
    family("edge_relay_journal_records", "gauge",
           "Crash-journal records holding a confirmed flow, by serving worker.",
           [((("worker", str(i)),), j[0]) for i, j in workers])
    family("edge_relay_journal_capacity", "gauge",
           "Records in each worker slot's crash journal (limits.max_flows when the slot first started).",
           [((("worker", str(i)),), j[1]) for i, j in workers])
    family("edge_relay_journal_unjournaled_total", "counter",
           "Confirmed-flow transitions not written to the crash journal: every record in use (full), "
           "or an owner id wider than 32 bits (transceiver_id).",
           [((("reason", "full"),), journal["full"]), ((("reason", "transceiver_id"),), journal["unjournaled"])])
    family("edge_relay_journal_restore_records_total", "counter",
           "Crash-journal records found by restarted workers: restored as flows, bad (failed a check), "
           "duplicate (an older record of the same flow), refused (by the flow table: no such listener, full).",
           [((("result", r),), journal[r]) for r in ("restored", "bad", "duplicate", "refused")])
    family("edge_relay_journal_reformatted_total", "counter",
           "Crash journals whose header was unreadable at a worker's start, so formatted afresh (flows lost).",
           [((), journal["reformatted"])])
    family("edge_relay_journal_restored_flows", "gauge",
           "Flows the serving worker restored from the crash journal when it started (0 after a clean start).",
           [((("worker", str(i)),), j[2]) for i, j in workers])
    family("edge_relay_journal_restore_seconds", "gauge",
           "Time the serving worker's start spent restoring flows (handed-over snapshot and crash journal).",
           [((("worker", str(i)),), repr(j[3])) for i, j in workers])
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
    family("edge_relay_ready", "gauge",
           "1 when calls can be routed (/readyz): every worker serves, a transceiver is up, not draining.",
           [((), int(bool(t.ready)))])
    family("edge_relay_last_reload_successful", "gauge",
           "0 when the last reload was refused or failed (the old generation serves), else 1.",
           [((), t.last_reload_ok)])
    family("edge_relay_last_reload_success_timestamp_seconds", "gauge",
           "Unix time the running config was accepted (start or reload).", [((), repr(float(t.last_reload_success)))])
    family("edge_relay_build_info", "gauge", "Version of edge-relay and Python.",
           [((("version", __version__), ("python", sys.version.split()[0])), 1)])
    family("edge_relay_probes_sent_total", "counter", "Health probes sent to transceivers (all workers).",
           [((), t.stats[_STAT["probes_sent"]])])
    out.extend(render_extra(t.extra))
    out.extend(render_host(t.processes, t.sockets))
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
