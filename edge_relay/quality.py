"""Voice quality seen from the edge, without decryption (sans-IO, clock passed in).

Theory of operation
  SRTP (RFC 3711) encrypts the payload but leaves the 12-octet RTP header in
  clear: sequence number, timestamp, payload type, SSRC. For a *sample* of
  confirmed flows the relay feeds every RTP packet's header, in each direction,
  to `observe`, which keeps
    * RFC 3550 appendix A.1 sequence state: extended highest sequence number,
      cycles, probation, resynchronisation after a large jump; expected and
      received counts give loss. A.1 alone counts a duplicate as received (loss
      can go negative), so a 64-bit window of recently seen numbers below the
      highest tells a reordered packet (first sighting) from a duplicate
      (second sighting, not counted as received).
    * RFC 3550 appendix A.8 interarrival jitter, in timestamp units
      (J += (|D| - J) / 16), converted to seconds with the payload type's clock
      rate (48 kHz for Opus unless configured otherwise). A change of payload
      type or SSRC restarts the transit baseline: D is only meaningful between
      packets of one clock.
    * time to first media: from the flow's first STUN packet (the pending flow's
      creation time, which the router passes to `QualityMonitor.start`) to the
      first RTP packet in that direction.

  Memory: nothing lives on flows.Flow. `QualityMonitor` keeps a dict, keyed by
  whatever the caller uses (e.g. the Flow object itself), only for the sampled
  flows: one in `sample_every` confirmed flows, at most `max_sampled` at a
  time. A sampled flow costs about 700 bytes (FlowQuality, two StreamStats
  with their floats, the dict entry; measured with tracemalloc), so 1 in 16
  averages ~45 bytes per flow and `max_sampled` = 1024 caps it at ~0.7 MB per
  worker. An unsampled flow costs the router one failed dict lookup (~50 ns)
  per packet; a sampled packet costs ~0.6 us in `observe`.

  Export: per-flow numbers never become labels. Every `report_interval`
  (and when a flow ends) each sampled flow folds what happened since its last
  report into histograms across flows (loss fraction, reorder fraction,
  jitter, time to first media) labelled only by direction
  ("client" = client -> transceiver, "transceiver" = the reverse), plus plain
  counters. Series count is fixed whatever the number of flows.

  Nothing here raises on packet input: `observe` returns False for a datagram
  that is not RTP (short, version != 2, or RTCP per RFC 5761 section 4).
"""

import struct

from . import defaults
from .histogram import Histogram, header

# RFC 3550 appendix A.1
RTP_SEQ_MOD = 1 << 16
MAX_DROPOUT = 3000
MAX_MISORDER = 100
MIN_SEQUENTIAL = 2
WINDOW = 64               # reorder/duplicate memory below the highest sequence number

RTP_TS_MOD = 1 << 32      # RTP timestamps are 32 bits (RFC 3550 section 5.1)
RTP_HEADER_LEN = 12
_RTP = struct.Struct(">BBHII")          # V/P/X/CC, M/PT, seq, timestamp, SSRC

DEFAULT_CLOCK_RATE = 48000              # Opus (RFC 7587 section 4.1)

CLIENT = "client"                       # direction: client -> transceiver
TRANSCEIVER = "transceiver"             # direction: transceiver -> client
DIRECTIONS = (CLIENT, TRANSCEIVER)

LOSS_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
JITTER_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5)
TTFM_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def is_rtp(data):
    """True if `data` looks like RTP rather than RTCP (RFC 5761 section 4).

    Needs the first two octets: version 2 (first octet 128..191, the RTP range
    of RFC 7983) and a second octet (marker + payload type) outside 192..223,
    which is where RTCP packet types SR..(reserved) 192..223 fall (payload
    types 64..95 with the marker bit set).
    """
    if len(data) < 2:
        return False
    return 128 <= data[0] <= 191 and not 192 <= data[1] <= 223


class StreamStats:
    """One direction of one sampled flow: RFC 3550 A.1 + A.8 state and counters."""

    __slots__ = ("probation", "max_seq", "cycles", "base_seq", "bad_seq", "received",
                 "window", "reordered", "duplicates", "jitter", "transit", "pt", "ssrc",
                 "first_at", "expected_prior", "received_prior", "reordered_prior",
                 "packets")

    def __init__(self):
        self.probation = MIN_SEQUENTIAL
        self.max_seq = None        # None until the first packet
        self.cycles = 0            # count of wraps, times RTP_SEQ_MOD
        self.base_seq = 0
        self.bad_seq = RTP_SEQ_MOD + 1
        self.received = 0          # valid packets since init (duplicates excluded)
        self.window = 0            # bit i set: max_seq - i seen (bit 0 = max_seq)
        self.reordered = 0
        self.duplicates = 0
        self.jitter = 0.0          # RFC 3550 A.8, seconds
        self.transit = None        # last (arrival - timestamp/rate), seconds
        self.pt = None
        self.ssrc = None
        self.first_at = None       # arrival time of the first RTP packet
        self.expected_prior = 0
        self.received_prior = 0
        self.reordered_prior = 0
        self.packets = 0           # every RTP packet observed

    # RFC 3550 A.1 init_seq
    def _init_seq(self, seq):
        self.base_seq = seq
        self.max_seq = seq
        self.bad_seq = RTP_SEQ_MOD + 1
        self.cycles = 0
        self.received = 0
        self.received_prior = 0
        self.expected_prior = 0
        self.reordered_prior = 0
        self.reordered = 0
        self.window = 1

    def _update_seq(self, seq):
        """RFC 3550 A.1 update_seq plus the duplicate window. True if the packet counts."""
        if self.max_seq is None:
            # first packet: A.1 says init_seq(s, seq); max_seq = seq - 1; probation = MIN_SEQUENTIAL
            self._init_seq(seq)
            self.max_seq = (seq - 1) % RTP_SEQ_MOD
            self.window = 0
            self.probation = MIN_SEQUENTIAL
        udelta = (seq - self.max_seq) % RTP_SEQ_MOD
        if self.probation:
            # source is not valid until MIN_SEQUENTIAL packets in sequence
            if seq == (self.max_seq + 1) % RTP_SEQ_MOD:
                self.probation -= 1
                self.max_seq = seq
                if self.probation == 0:
                    self._init_seq(seq)
                    self.received += 1
                    return True
            else:
                self.probation = MIN_SEQUENTIAL - 1
                self.max_seq = seq
            return False
        if udelta == 0:
            self.duplicates += 1
            return False
        if udelta < MAX_DROPOUT:
            # in order, with permissible gap
            if seq < self.max_seq:
                self.cycles += RTP_SEQ_MOD     # sequence number wrapped
            self.max_seq = seq
            self.window = ((self.window << udelta) | 1) & ((1 << WINDOW) - 1)
        elif udelta <= RTP_SEQ_MOD - MAX_MISORDER:
            # the sequence number made a very large jump
            if seq == self.bad_seq:
                # two sequential packets: assume the other side restarted
                # without telling us, so just re-sync (i.e. pretend this was
                # the first packet)
                self._init_seq(seq)
            else:
                self.bad_seq = (seq + 1) % RTP_SEQ_MOD
                return False
        else:
            # duplicate or reordered packet
            behind = RTP_SEQ_MOD - udelta
            if behind < WINDOW:
                bit = 1 << behind
                if self.window & bit:
                    self.duplicates += 1
                    return False
                self.window |= bit
            self.reordered += 1
        self.received += 1
        return True

    @property
    def extended_max(self):
        return self.cycles + (self.max_seq or 0)

    @property
    def expected(self):
        """RFC 3550 A.3: packets expected since the sequence was (re)initialised."""
        if self.max_seq is None or self.probation:
            return 0
        return self.extended_max - self.base_seq + 1

    @property
    def lost(self):
        """Cumulative packets lost (RFC 3550 A.3); never negative thanks to the duplicate window."""
        return max(0, self.expected - self.received)


def observe(st, data, arrival, clock_rates=None, default_rate=DEFAULT_CLOCK_RATE):
    """Feed one datagram's RTP header to StreamStats `st`. False if not RTP (state untouched).

    `data` is bytes or a memoryview of at least the 12-octet RTP header;
    `arrival` is the receive time in seconds; `clock_rates` maps payload type
    -> timestamp clock rate in Hz.
    """
    if len(data) < RTP_HEADER_LEN or not is_rtp(data):
        return False
    _, m_pt, seq, ts, ssrc = _RTP.unpack_from(data)
    pt = m_pt & 0x7F
    st.packets += 1
    if st.first_at is None:
        st.first_at = arrival
    if ssrc != st.ssrc:
        # a new source: start over (RFC 3550 keeps state per SSRC; we keep one)
        if st.ssrc is not None:
            st.max_seq = None
            st.transit = None
        st.ssrc = ssrc
    counted = st._update_seq(seq)
    if not counted:
        return True
    rate = clock_rates.get(pt, default_rate) if clock_rates else default_rate
    if pt != st.pt:
        st.pt = pt
        st.transit = None
    # RFC 3550 A.8, in seconds: transit = arrival - timestamp / rate
    transit = arrival - ts / rate
    if st.transit is not None:
        d = transit - st.transit
        # timestamps wrap at 2^32: bring d back near zero
        span = RTP_TS_MOD / rate
        if d > span / 2:
            d -= span
        elif d < -span / 2:
            d += span
        st.jitter += (abs(d) - st.jitter) / 16.0
    st.transit = transit
    return True


class FlowQuality:
    """Both directions of one sampled flow."""

    __slots__ = ("client", "transceiver", "first_stun", "last_report", "ttfm_done")

    def __init__(self, first_stun, now):
        self.client = StreamStats()
        self.transceiver = StreamStats()
        self.first_stun = first_stun
        self.last_report = now
        self.ttfm_done = 0        # bit 1: client direction measured, bit 2: transceiver


class _Dir:
    """The histograms and counters of one direction."""

    __slots__ = ("loss", "reorder", "jitter", "ttfm", "expected", "lost", "reordered",
                 "duplicates", "packets")

    def __init__(self):
        self.loss = Histogram(LOSS_BUCKETS)
        self.reorder = Histogram(LOSS_BUCKETS)
        self.jitter = Histogram(JITTER_BUCKETS)
        self.ttfm = Histogram(TTFM_BUCKETS)
        self.expected = self.lost = self.reordered = self.duplicates = self.packets = 0


class QualityMonitor:
    """Sampling, per-flow state and the aggregated histograms of one worker.

    Parameters
      sample_every     sample one in this many confirmed flows (1 = all)
      max_sampled      cap on flows sampled at once
      clock_rates      payload type -> RTP clock rate in Hz (default 48000 for all)
      report_interval  seconds between folds of a flow's stats into the histograms

    Hot path (router):
        q = monitor.flows.get(flow)          # None for unsampled flows
        if q is not None: monitor.observe(q.client, data, now)
    """

    def __init__(self, sample_every=defaults.QUALITY_SAMPLE_EVERY, max_sampled=defaults.QUALITY_MAX_SAMPLED,
                 clock_rates=None, report_interval=defaults.QUALITY_REPORT_INTERVAL):
        if sample_every < 1 or max_sampled < 0 or report_interval <= 0:
            raise ValueError("bad quality monitor parameters")
        self.sample_every = sample_every
        self.max_sampled = max_sampled
        self.clock_rates = dict(clock_rates or {})
        self.report_interval = report_interval
        self.flows = {}
        self._seen = 0
        self.dirs = {CLIENT: _Dir(), TRANSCEIVER: _Dir()}
        self.sampled_total = 0

    def start(self, key, first_stun, now):
        """A flow was confirmed: maybe sample it. Returns its FlowQuality or None."""
        self._seen += 1
        if (self._seen - 1) % self.sample_every or len(self.flows) >= self.max_sampled \
                or key in self.flows:
            return self.flows.get(key)
        q = FlowQuality(first_stun, now)
        self.flows[key] = q
        self.sampled_total += 1
        return q

    def observe(self, st, data, now):
        """observe() with this monitor's clock rates; see the module function."""
        return observe(st, data, now, self.clock_rates)

    def _fold(self, q):
        for name, st in ((CLIENT, q.client), (TRANSCEIVER, q.transceiver)):
            d = self.dirs[name]
            bit = 1 if name == CLIENT else 2
            if st.first_at is not None and not q.ttfm_done & bit and q.first_stun is not None:
                d.ttfm.observe(max(0.0, st.first_at - q.first_stun))
                q.ttfm_done |= bit
            expected = st.expected - st.expected_prior
            received = st.received - st.received_prior
            reordered = st.reordered - st.reordered_prior
            st.expected_prior, st.received_prior = st.expected, st.received
            st.reordered_prior = st.reordered
            if expected > 0:
                lost = max(0, expected - received)
                d.loss.observe(lost / expected)
                d.reorder.observe(reordered / expected)
                d.expected += expected
                d.lost += lost
                d.reordered += reordered
            if st.transit is not None and st.packets:
                d.jitter.observe(st.jitter)    # once per interval that had packets
            d.duplicates += st.duplicates
            st.duplicates = 0
            d.packets += st.packets
            st.packets = 0

    def report(self, now):
        """Fold every sampled flow whose report is due (call about once a second)."""
        for q in self.flows.values():
            if now - q.last_report >= self.report_interval:
                self._fold(q)
                q.last_report = now

    def end(self, key, now):
        """The flow left the table: fold what remains and forget it."""
        q = self.flows.pop(key, None)
        if q is not None:
            self._fold(q)

    def render(self):
        """Prometheus text lines: histograms and counters labelled by direction only."""
        lines = []
        for metric, attr, text in (
                ("edge_relay_flow_loss_ratio", "loss", "fraction of RTP packets lost per report interval"),
                ("edge_relay_flow_reorder_ratio", "reorder", "fraction of RTP packets reordered per report interval"),
                ("edge_relay_flow_jitter_seconds", "jitter", "RFC 3550 interarrival jitter at report time"),
                ("edge_relay_flow_time_to_media_seconds", "ttfm", "first STUN packet to first RTP packet")):
            lines += header(metric, text + " (sampled flows)")
            for name in DIRECTIONS:
                lines += getattr(self.dirs[name], attr).render(metric, f'direction="{name}"')
        for metric, attr in (("edge_relay_rtp_expected_total", "expected"),
                             ("edge_relay_rtp_lost_total", "lost"),
                             ("edge_relay_rtp_reordered_total", "reordered"),
                             ("edge_relay_rtp_duplicates_total", "duplicates"),
                             ("edge_relay_rtp_packets_total", "packets")):
            lines += header(metric, f"RTP {attr} in sampled flows", "counter")
            lines += [f'{metric}{{direction="{n}"}} {getattr(self.dirs[n], attr)}' for n in DIRECTIONS]
        lines += header("edge_relay_flows_sampled", "flows whose RTP headers are sampled now", "gauge")
        lines.append(f"edge_relay_flows_sampled {len(self.flows)}")
        return lines
