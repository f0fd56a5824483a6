"""The relay's forwarding decisions, sans-IO: datagrams and clocks in, datagrams and counters out.

Theory of operation
  The event loop hands `Router` one received batch at a time, with the time
  read once for the batch (`now` monotonic seconds for flow ages, `wall_ms`
  Unix milliseconds for tokens and headers). The batch is batch.py's
  received batch (views, addrs, n). What must be sent goes into batch.Outbox
  objects: `to_transceivers` (sent from the worker's internal socket) and
  `to_clients[listener]` (sent from the very listener socket the client
  used); every datagram not forwarded is counted in `drops`. A forwarded
  datagram's body is the received view itself (or its payload after the
  header), its origin the index i in the batch: the router knows batch
  indexes, never buffer addresses. The loop sends the boxes with the
  receiving object as `src` and clears them before the next receive.

  What a batch call needs that changes only at a reload (keys, routes, the
  output boxes, the per-flow meter's tables, which it resets in place) is gathered once by
  `configure` (`_c2t`, `_t2c`): a batch call pays one tuple unpack for it,
  so a wake-up that moves one datagram pays little more than the datagram.

Rules (DESIGN.md "What the relay promises")
  Client side: a datagram from a known flow is forwarded if it is STUN, DTLS
  or RTP/RTCP (RFC 7983); a new flow opens only from a well-formed STUN
  Binding Request whose USERNAME carries a valid routing token naming a
  configured transceiver. Everything else is a Drop reason.
  Rate limits (ratelimit.py, the second line behind nftables): a source IP
  (IPv6: its /64) may try `new_flows_per_source_*` new flows, counted before
  the token's MAC is checked; the worker opens at most `new_flows_*` flows
  with valid tokens; a flow forwards at most `flow_packets_*` packets.
  Transceiver side: the source must be a configured transceiver address; the
  header must verify; the client it names must be a live flow owned by that
  transceiver (or one it is taking over by ICE restart). Only then does the
  relay send anything to a client: it never answers unauthenticated input.

Failover (probes.py decides health; docs/OPERATIONS.md)
  `redirect` maps a transceiver id that probes found down to the backup its
  traffic goes to now (empty when all is well: one falsy check per packet).
  A flow of a down transceiver moves to the backup at its next client
  datagram (FlowTable.move for a confirmed flow; a pending flow keeps its
  pending deadline) and its cached prefix then carries header.FLAG_FAILOVER;
  new tokens naming the down transceiver open flows on the backup. Moved
  flows stay with the backup when the primary returns (only new flows go
  back), and a consent check naming the primary on a flow its backup chain
  owns is forwarded to the owner, not treated as an ICE restart.

Quality and directory (optional, both sans-IO objects handed in)
  `quality` (quality.QualityMonitor) samples RTP headers of confirmed flows:
  one dict lookup per RTP datagram, an `observe` call for sampled flows only.
  `directory` (directory.Directory) holds DTLS/RTP of unknown addresses while
  the worker asks Redis (`dir_lookups` / `dir_commands` are the worker's to
  send) and `dir_resolved` forwards them once the answer comes.

Ingress sources (before any token work; only for addresses with no flow)
  A public-port datagram from an address with no flow is dropped first if its
  source could never be a client: UDP port 0 (SOURCE_PORT_ZERO), a multicast,
  broadcast or unspecified address (SOURCE_NOT_UNICAST), a configured
  transceiver address or a network of internal.allow (SOURCE_INTERNAL: the
  relay would otherwise send from its public socket into the internal
  network), or one of the relay's own configured addresses (SOURCE_SELF).
  Loopback sources are exempt: the kernel never accepts 127/8 or ::1 from a
  wire, so they are local processes (and the tests' clients). A flow never
  exists for such a source, so flows already known pay nothing.

ICE restart (docs/SECURITY.md "ICE restart")
  A Binding Request with a valid token naming another transceiver, on a live
  flow, is forwarded to that transceiver and recorded (`restarts`, bounded).
  A pending flow moves at the new owner's first answer. A confirmed flow
  moves only once `restart_hold` seconds have passed since the restart began
  without its old owner answering one of the client's checks (a STUN
  Binding success response from the old owner to the flow): the new owner's
  answers meanwhile are dropped (RESTART_HELD). If the old owner does
  answer, it still serves the client, so the restart is cancelled
  (counted in stats, flows_restart_refused) and further restart requests on that flow are dropped
  for `RESTART_BACKOFF` seconds (RESTART_RATE). A spoofed request plus an
  answer therefore never takes a flow from a transceiver still serving it.

State changes happen only after authentication: a token's MAC before a flow
opens, a header's MAC before a flow is confirmed or moved.
"""

import hmac
import ipaddress
from socket import AF_INET6

from . import defaults, directory as directory_mod, header, ratelimit, sockaddr, stun, token
from .batch import Outbox
from .drops import N_DROPS, Drop
from .flows import CONFIRMED, FAILED_OVER, PENDING, REMOVED
from .header import (FAMILY_V4, FAMILY_V6, HEADER_LEN, HEADER_VERSION, MAC_INPUT_LEN, MAGIC_WORD, PROBE_ACK,
                     RELAY_FIELDS, TAG_LEN, TO_CLIENT)
from .sockaddr import V4_MAPPED

_CLASS = stun._CLASS
_STUN, _DTLS, _RTP = stun.STUN, stun.DTLS, stun.RTP
_BINDING_REQUEST = b"\x00\x01"
_BINDING_SUCCESS = b"\x01\x01"

# ICE restart of a confirmed flow (module docstring): RFC 7675 consent checks
# come every 5 s +-20 %, so a hold past 6 s sees at least one of the client's
# checks answered by an old owner that still serves it.
RESTART_HOLD = 7.0
RESTART_BACKOFF = 30.0          # restart requests refused this long after a refused restart
RESTART_GIVE_UP = 60.0          # a restart the new owner never answers is forgotten
MAX_RESTARTS = 4096             # restarts in progress (and refusals remembered) per worker
_ZERO16 = bytes(16)
_LOOPBACK6 = bytes(15) + b"\x01"

# indexes into Router.stats
CLIENT_IN_PACKETS, CLIENT_IN_BYTES, TO_TX_PACKETS, TO_TX_BYTES = 0, 1, 2, 3
TX_IN_PACKETS, TX_IN_BYTES, TO_CLIENT_PACKETS, TO_CLIENT_BYTES = 4, 5, 6, 7
FLOWS_OPENED, FLOWS_CONFIRMED, FLOWS_MOVED, FLOWS_EXPIRED = 8, 9, 10, 11
FLOWS_FAILED_OVER, FLOWS_FROM_DIRECTORY, PROBES_SENT = 12, 13, 14
FLOWS_EVICTED, FLOWS_RESTART_REFUSED = 15, 16
N_STATS = 17
STAT_NAMES = ("client_in_packets", "client_in_bytes", "to_transceiver_packets", "to_transceiver_bytes",
              "transceiver_in_packets", "transceiver_in_bytes", "to_client_packets", "to_client_bytes",
              "flows_opened", "flows_confirmed", "flows_moved", "flows_expired",
              "flows_failed_over", "flows_from_directory", "probes_sent",
              "flows_evicted", "flows_restart_refused")


def failed_over(flow):
    """True if `flow` was failed over: its datagrams carry FLAG_FAILOVER (flows.FAILED_OVER)."""
    return bool(flow.flags & FAILED_OVER)


class Policy:
    """The numbers the router needs from config.limits (plain attributes, read at configure()).

    `rates` holds the app-level rate limits (ratelimit.RateLimiters keyword
    arguments); the defaults are config.Limits' (defaults.py). Build a Policy
    from a config with `Policy.from_limits(cfg.limits)` so they follow it.
    """

    __slots__ = ("header_window_ms", "token_max_lifetime", "clock_skew", "rates")

    def __init__(self, header_window=defaults.HEADER_WINDOW, token_max_lifetime=defaults.TOKEN_MAX_LIFETIME,
                 clock_skew=defaults.CLOCK_SKEW, **rates):
        self.header_window_ms = int(header_window * 1000)
        self.token_max_lifetime = token_max_lifetime
        self.clock_skew = clock_skew
        ratelimit.RateLimiters(**rates)     # refuse unknown names or bad values now, not at configure
        self.rates = rates

    @classmethod
    def from_limits(cls, lim):
        """Every number from a config.Limits section, rate limits included."""
        return cls(lim.header_window, lim.token_max_lifetime, lim.clock_skew,
                   **{name: getattr(lim, name) for name in ratelimit.CONFIG_KEYS})


class Router:
    """Forwarding decisions for one worker.

    Parameters
      flows         a flows.FlowTable with one dict per listener
      keyring       keys.KeyRing (verifies tokens and headers, seals headers)
      transceivers  {transceiver id: raw sockaddr of its internal address}
      listener_families  socket family of each listener, by listener index
      policy        Policy
      internal_nets, own_addresses  see `configure` (sources refused at ingress)
    """

    def __init__(self, flows, keyring, transceivers, listener_families, policy, *, backups=None,
                 prober=None, quality=None, directory=None, internal_nets=(), own_addresses=()):
        self.flows = flows
        self.listener_families = tuple(listener_families)
        self.drops = [0] * N_DROPS
        self.stats = [0] * N_STATS
        self.to_transceivers = Outbox()
        self.to_clients = [Outbox() for _ in self.listener_families]
        self._ts = (-1, b"")            # (wall_ms, its 6 timestamp octets): one conversion per millisecond
        self.draining = False
        self.prober = prober            # probes.Prober or None
        self.quality = quality          # quality.QualityMonitor or None
        self.directory = directory      # directory.Directory or None
        self.redirect = {}              # down transceiver id -> backup id in use now
        self.dir_lookups = []           # directory.Lookup objects for the worker to send
        self.dir_commands = []          # RESP commands (publish) for the worker to send
        self.events = []                # probes.Event transitions, for the worker's log
        self.restarts = {}              # flow -> [new owner, time begun]: ICE restarts in progress
        self.restart_backoff = {}       # flow -> time until which its restart requests are refused
        self.restart_hold = RESTART_HOLD
        self.configure(keyring, transceivers, policy, backups, internal_nets, own_addresses)

    def configure(self, keyring, transceivers, policy, backups=None, internal_nets=(), own_addresses=()):
        """Swap keys, routes and limits (reload). Flows stay; their cached headers are rebuilt lazily.

        `internal_nets` (internal.allow CIDRs) and `own_addresses` (the
        relay's configured addresses) join the transceiver addresses as
        sources a client datagram may not have; flows from a source that
        becomes one of them at a reload are removed.
        """
        self.keyring = keyring
        old = getattr(self, "policy", None)
        if old is None or old.rates != policy.rates:
            # New buckets only when the numbers change, so a reload does not refill them.
            self.limits = ratelimit.RateLimiters(**policy.rates)
        self.policy = policy
        self.transceivers = dict(transceivers)
        by_addr = {}
        for tx_id, sa in self.transceivers.items():
            by_addr.setdefault(sa, set()).add(tx_id)
        self.transceiver_ids_by_addr = {sa: frozenset(ids) for sa, ids in by_addr.items()}
        self._set_blocked_sources(internal_nets, own_addresses)
        self.backups = {t: b for t, b in (backups or {}).items() if t in self.transceivers}
        # tid -> every transceiver its backup chain may hand its flows to (loops cut)
        self.covered_by = {}
        for tid in self.transceivers:
            chain, nxt = set(), self.backups.get(tid)
            while nxt is not None and nxt not in chain and nxt != tid:
                chain.add(nxt)
                nxt = self.backups.get(nxt)
            self.covered_by[tid] = frozenset(chain)
        if self.prober is not None:
            self.prober.set_transceivers(sorted(self.transceivers), getattr(self, "_now", 0.0))
        self._reroute()
        banned = []
        for flow in self.flows:
            flow.route = None       # rebuilt lazily (with FLAG_FAILOVER from flow.flags)
            if self._source_drop(flow.key) is not None:
                banned.append(flow)
        for flow in banned:
            self.flows.remove(flow)
        self._set_batch_state()

    def _set_batch_state(self):
        """Gather what from_clients / from_transceivers read per batch and a reload alone changes.

        Everything here is replaced only by configure (keys, routes, limits,
        the quality monitor the worker swaps just before it), never between
        two batches, so caching it costs no correctness.
        """
        quality = self.quality
        qget = quality.flows.get if quality is not None else None
        out = self.to_transceivers
        meter = self.limits.per_flow
        inner, outer = self.keyring.signing.header_split
        self._c2t = (self.drops, out, out.dest, out.head, out.body, out.origin,
                     inner.copy, outer.copy, self.transceivers, meter.advance,
                     meter.mask, meter.row0, meter.row1, meter.threshold, meter.allow_heavy, quality, qget)
        boxes = self.to_clients
        self._t2c = (self.drops, self.transceiver_ids_by_addr, self.flows.by_listener, self.listener_families,
                     len(self.listener_families), self.keyring, self.policy.header_window_ms, boxes,
                     [(b.dest, b.head, b.body, b.origin) for b in boxes], quality, qget)

    def _set_blocked_sources(self, internal_nets, own_addresses):
        """Build the ingress source tables (module docstring) from the config's addresses."""
        blocked = {}
        nets = []
        for sa in self.transceivers.values():
            blocked[sockaddr.source_ip(sa)] = Drop.SOURCE_INTERNAL
        for text in own_addresses:
            ip = ipaddress.ip_address(text)
            if not ip.is_unspecified:
                blocked.setdefault(ip.packed, Drop.SOURCE_SELF)
        for text in internal_nets:
            net = ipaddress.ip_network(text, strict=False)
            nets.append((len(net.network_address.packed), int(net.network_address), int(net.netmask)))
        for ip in [ip for ip in blocked if ip[0] == 127 and len(ip) == 4 or ip == _LOOPBACK6]:
            del blocked[ip]         # loopback: a local process, never a wire (module docstring)
        self.blocked_sources = blocked
        self.blocked_nets = tuple(nets)

    def _source_drop(self, sa):
        """The Drop reason for a client source that can never be a client, or None (see above)."""
        if not (sa[2] or sa[3]):
            return Drop.SOURCE_PORT_ZERO
        ip = sockaddr.source_ip(sa)
        why = self.blocked_sources.get(ip)
        if why is not None:
            return why
        first = ip[0]
        if len(ip) == 4:
            # 224/4 multicast, 255.255.255.255 broadcast, 0/8 "this network"
            if 224 <= first <= 239 or first == 0 or ip == b"\xff\xff\xff\xff":
                return Drop.SOURCE_NOT_UNICAST
            if first == 127:
                return None
        elif first == 0xFF or ip == _ZERO16:
            return Drop.SOURCE_NOT_UNICAST
        elif ip == _LOOPBACK6:
            return None
        if self.blocked_nets:
            size, value = len(ip), int.from_bytes(ip, "big")
            for net_size, net, mask in self.blocked_nets:
                if net_size == size and value & mask == net:
                    return Drop.SOURCE_INTERNAL
        return None

    # -- client -> transceiver ------------------------------------------------

    def from_clients(self, listener, views, addrs, n, now, wall_ms):
        """Route `n` datagrams received on `listener` (views[i] from addrs[i]: batch.py) to transceivers."""
        flows = self.flows.by_listener[listener]
        (drops, out, dests, heads, bodies, origins, inner_copy, outer_copy, transceivers, advance,
         mask, row0, row1, threshold, allow_heavy, quality, qget) = self._c2t
        ts = self._ts
        if ts[0] != wall_ms:
            ts = self._ts = (wall_ms, header.timestamp_bytes(wall_ms))
        ts6 = ts[1]
        advance(now)
        k = out.n
        if k + n > len(dests):
            out.reserve(n)
        redirect = self.redirect
        in_bytes = sent_bytes = 0
        first = k
        for i in range(n):
            data = views[i]
            sa = addrs[i]
            in_bytes += len(data)
            # RFC 7983 demux on the first octet; an empty datagram has none
            kind = _CLASS[data[0]] if data else 0
            flow = flows.get(sa)
            if flow is None:
                flow = self._open(listener, kind, data, sa, now, wall_ms)
                if flow is None:
                    continue
            else:
                if not kind:
                    drops[Drop.NOT_WEBRTC] += 1
                    continue
                # ratelimit.FlowMeter.allow's fast path, inlined (its window moved by advance()
                # above, once per batch); sa is flow.key, its hash cached by flows.get above
                h = hash(sa)
                a = row0[h & mask]
                b = row1[(h >> 24) & mask]
                if (a if a < b else b) < threshold:
                    if a < 0xFFFFFFFF:
                        row0[h & mask] = a + 1
                    if b < 0xFFFFFFFF:
                        row1[(h >> 24) & mask] = b + 1
                elif not allow_heavy(sa):
                    drops[Drop.RATE_FLOW_PACKETS] += 1
                    continue
                if flow.state == CONFIRMED:
                    flow.last_seen = now
                if kind == _STUN and data[:2] == _BINDING_REQUEST:
                    out.n = k           # it may queue the request for a new owner (ICE restart)
                    if not self._pass_or_restart(flow, data, now, wall_ms):
                        first += out.n - k      # counted there, not here
                        k = out.n
                        continue
                if kind == _RTP and qget is not None:
                    q = qget(flow)
                    if q is not None:
                        quality.observe(q.client, data, now)
            if redirect and flow.transceiver in redirect:
                self._fail_over(flow, now)
            head = flow.route
            tx_sa = transceivers.get(flow.transceiver)
            if not head or tx_sa is None:
                head = self._prefix(flow)
                if tx_sa is None:       # its transceiver left the config at a reload
                    drops[Drop.UNKNOWN_TRANSCEIVER] += 1
                    continue
            # header.seal inlined with the key's bound copy methods (HMAC-SHA256 over
            # octets 0..31 and the payload, first 16 octets of the tag; tests hold it equal)
            head32 = head + ts6
            mac = inner_copy()
            mac.update(head32)
            mac.update(data)
            tag = outer_copy()
            tag.update(mac.digest())
            dests[k] = tx_sa
            heads[k] = head32 + tag.digest()[:16]
            bodies[k] = data
            origins[k] = i
            k += 1
            sent_bytes += len(data)
        out.n = k
        sent = k - first
        stats = self.stats
        stats[CLIENT_IN_PACKETS] += n
        stats[CLIENT_IN_BYTES] += in_bytes
        stats[TO_TX_PACKETS] += sent
        stats[TO_TX_BYTES] += sent_bytes + sent * header.HEADER_LEN

    def _open(self, listener, kind, data, sa, now, wall_ms):
        """A new pending flow for a Binding Request carrying a valid token, or None (counted)."""
        drops = self.drops
        bad = self._source_drop(sa)
        if bad is not None:
            drops[bad] += 1
            return None
        if kind != _STUN:
            if kind and self.directory is not None:
                self._hold(listener, sa, data, now)
                return None
            drops[Drop.UNKNOWN_FLOW if kind else Drop.NOT_WEBRTC] += 1
            return None
        limits = self.limits
        # Per source before the token's MAC: one source cannot make us verify
        # more than its allowance of tokens. Global after it: forged tokens
        # must not spend the budget of genuine new flows.
        if not limits.per_source.take(ratelimit.source_key(sa), now):
            drops[Drop.RATE_SOURCE_NEW_FLOWS] += 1
            return None
        tok = self._verified_token(data, wall_ms)
        if tok.__class__ is Drop:
            drops[tok] += 1
            return None
        if self.draining:
            drops[Drop.DRAINING] += 1
            return None
        if not limits.total.take(now):
            drops[Drop.RATE_GLOBAL_NEW_FLOWS] += 1
            return None
        tx_id = tok.transceiver
        backup = self.redirect.get(tx_id)
        flows = self.flows
        evicted = flows.evicted
        flow = flows.open(listener, sa, tx_id if backup is None else backup, now, tok.nonce)
        if flows.evicted != evicted:
            self.stats[FLOWS_EVICTED] += flows.evicted - evicted
        if flow.__class__ is Drop:
            drops[flow] += 1
            return None
        self.stats[FLOWS_OPENED] += 1
        if backup is not None and not flow.flags & FAILED_OVER and flow.transceiver == backup:
            self.stats[FLOWS_FAILED_OVER] += 1
            flow.flags |= FAILED_OVER       # pending: journaled when it is confirmed
            flow.route = self._prefix(flow)
        return flow

    def _verified_token(self, data, wall_ms):
        """The valid token (naming a configured transceiver) of a Binding Request, or the Drop reason."""
        username = stun.binding_username(data)
        if username.__class__ is Drop:
            return username
        parts = stun.split_username(username)
        if parts is None:
            return Drop.STUN_NO_USERNAME
        policy = self.policy
        tok = token.verify(parts[0], self.keyring, wall_ms / 1000.0,
                           policy.token_max_lifetime, policy.clock_skew)
        if tok.__class__ is Drop:
            return tok
        if tok.transceiver not in self.transceivers:
            return Drop.UNKNOWN_TRANSCEIVER
        return tok

    def _pass_or_restart(self, flow, data, now, wall_ms):
        """A Binding Request on a known flow: True to forward it to the flow's owner as usual.

        A consent check naming the flow's own transceiver (or, on a
        failed-over flow, its primary) passes: True. A valid token for
        another transceiver is an ICE restart: the request is queued for the
        new transceiver here and the restart recorded (the flow moves once
        the new owner answers and the old owner may lose it: module
        docstring, "ICE restart"): False. A malformed request or a refused
        restart: False, counted in drops.
        """
        username = stun.binding_username(data)
        if username.__class__ is Drop:
            # malformed STUN on a live flow: the transceiver's ICE agent would drop it too
            self.drops[username] += 1
            return False
        parts = stun.split_username(username)
        peeked = token.peek_transceiver(parts[0]) if parts else None
        if peeked is None or peeked == flow.transceiver:
            return True
        covered = self.covered_by.get(peeked)
        if covered and flow.transceiver in covered:
            return True     # a consent check naming the primary of a failed-over flow
        tok = self._verified_token(data, wall_ms)
        if tok.__class__ is Drop:
            self.drops[tok] += 1
            return False
        tx_id = tok.transceiver
        if not self._restart_begin(flow, tx_id, now):
            return False
        # forward this request to the new owner; everything else keeps going to the old one
        # (the new owner was chosen by the client: its prefix never says FLAG_FAILOVER)
        tx_sa, head = self.transceivers[tx_id], self._prefix(flow, cache=False, flags=0)
        self.to_transceivers.append(tx_sa, header.seal(self.keyring.signing.header_split, head,
                                                       header.timestamp_bytes(wall_ms), data), data)
        self.stats[TO_TX_PACKETS] += 1
        self.stats[TO_TX_BYTES] += len(data) + header.HEADER_LEN
        return False

    def _restart_begin(self, flow, tx_id, now):
        """Record (or continue) an ICE restart of `flow` to `tx_id`; False (counted) if refused."""
        restarts = self.restarts
        rec = restarts.get(flow)
        if rec is not None:
            if rec[0] == tx_id:
                return True             # the client's retransmission: the hold keeps its start
        else:
            until = self.restart_backoff.get(flow)
            if until is not None:
                if now < until:
                    self.drops[Drop.RESTART_RATE] += 1
                    return False
                del self.restart_backoff[flow]
            if len(restarts) >= MAX_RESTARTS:
                self.drops[Drop.RESTART_RATE] += 1
                return False
        # a new target (or a first request) starts the hold over
        restarts[flow] = [tx_id, now]
        flow.restart_to = tx_id
        return True

    def _restart_due(self, flow, now):
        """May the new owner's answer move `flow` now? (counted RESTART_HELD when not)."""
        if flow.state == PENDING:
            return True             # nobody serves it yet
        rec = self.restarts.get(flow)
        if rec is None:             # restart_to from a snapshot: start the hold now
            if len(self.restarts) >= MAX_RESTARTS:
                self.drops[Drop.RESTART_HELD] += 1
                return False
            self.restarts[flow] = rec = [flow.restart_to, now]
        if now - rec[1] < self.restart_hold:
            self.drops[Drop.RESTART_HELD] += 1
            return False
        return True

    def _restart_refused(self, flow, now):
        """The old owner answered the client's check: it still serves the flow, so no move."""
        flow.restart_to = None
        self.restarts.pop(flow, None)
        self.stats[FLOWS_RESTART_REFUSED] += 1
        if len(self.restart_backoff) < MAX_RESTARTS:
            self.restart_backoff[flow] = now + RESTART_BACKOFF

    def _expire_restarts(self, now):
        """Forget restarts of removed flows and ones never answered, and past refusals."""
        restarts = self.restarts
        if restarts:
            for flow in [f for f, rec in restarts.items()
                         if f.state == REMOVED or now - rec[1] >= RESTART_GIVE_UP]:
                del restarts[flow]
                if flow.restart_to is not None and flow.state != REMOVED:
                    flow.restart_to = None
        backoff = self.restart_backoff
        if backoff:
            for flow in [f for f, until in backoff.items() if f.state == REMOVED or now >= until]:
                del backoff[flow]

    def _prefix(self, flow, cache=True, flags=None):
        """Header octets 0..25 for `flow`'s datagrams, cached on the flow.

        Only the prefix is cached (about 60 bytes a flow); the transceiver's
        address is looked up by id per packet, which keeps a flow within its
        memory budget and lets a reload re-point a transceiver at once. The
        prefix is per (flow, owner): a failed-over flow's carries
        FLAG_FAILOVER (from flow.flags, so it survives every rebuild).
        """
        if flags is None:
            flags = header.FLAG_FAILOVER if flow.flags & FAILED_OVER else 0
        family, port, address = sockaddr.client_fields(flow.key)
        head = header.prefix(self.keyring.signing.key_id, header.TO_TRANSCEIVER, flags, flow.listener,
                             family, int.from_bytes(port, "big"), address)
        if cache:
            flow.route = head
        return head

    def _fail_over(self, flow, now):
        """Hand a flow of a down transceiver to its backup, for good (see the module docstring)."""
        backup = self.redirect[flow.transceiver]
        flow.flags |= FAILED_OVER           # before the move, which journals it
        if flow.state == PENDING:
            # not confirmed by anyone yet: keep its pending deadline, change the owner only
            self.flows.reassign(flow, backup)
            flow.restart_to = None
            self.restarts.pop(flow, None)
        else:
            self.restarts.pop(flow, None)
            self.flows.move(flow, backup, now)
        flow.route = self._prefix(flow)
        self.stats[FLOWS_FAILED_OVER] += 1
        if self.directory is not None and flow.state == CONFIRMED:
            self.dir_commands.append(self.directory.publish(flow.listener, flow.key, backup))

    # -- transceiver -> client ------------------------------------------------

    def from_transceivers(self, views, addrs, n, now, wall_ms):
        """Check `n` datagrams received on the internal socket and queue their payloads for clients."""
        (drops, ids_by_addr, by_listener, families, n_listeners, keyring, window, boxes, lists,
         quality, qget) = self._t2c
        unpack = RELAY_FIELDS.unpack_from
        by_id = keyring.by_id
        compare = hmac.compare_digest
        pack_v4, pack_v6 = sockaddr.pack_v4, sockaddr.pack_v6
        counts = []
        for box in boxes:
            if box.n + n > len(box.dest):
                box.reserve(n)
            counts.append(box.n)
        first = sum(counts)
        in_bytes = sent_bytes = 0
        for i in range(n):
            data = views[i]
            in_bytes += len(data)
            owners = ids_by_addr.get(addrs[i])
            if owners is None:
                drops[Drop.NOT_TRANSCEIVER] += 1
                continue
            # header.decode's receiver rules, in its order, for RELAY_ACCEPTS, inlined: no
            # Python call per datagram (tests/test_header.py::test_the_relay_check_* hold the two equal)
            if len(data) < HEADER_LEN:
                drops[Drop.HEADER_SHORT] += 1
                continue
            (magic, version, msg_type, key_id, listener, family, port2, address,
             ts_hi, ts_lo, tag) = unpack(data)
            if magic != MAGIC_WORD:
                drops[Drop.HEADER_MAGIC] += 1
                continue
            if version != HEADER_VERSION:
                drops[Drop.HEADER_VERSION] += 1
                continue
            if msg_type != TO_CLIENT and msg_type != PROBE_ACK:
                drops[Drop.HEADER_TYPE] += 1
                continue
            key = by_id[key_id]
            if key is None:
                drops[Drop.HEADER_KEY_ID] += 1
                continue
            if (family != FAMILY_V4 and family != FAMILY_V6) if msg_type == TO_CLIENT else family:
                drops[Drop.HEADER_FAMILY] += 1
                continue
            inner, outer = key.header_split
            mac = inner.copy()
            mac.update(data[:MAC_INPUT_LEN])
            payload = data[HEADER_LEN:]
            mac.update(payload)
            check = outer.copy()
            check.update(mac.digest())
            if not compare(check.digest()[:TAG_LEN], tag):
                drops[Drop.HEADER_MAC] += 1
                continue
            ts = (ts_hi << 32) | ts_lo
            if ts > wall_ms + window or ts < wall_ms - window:
                drops[Drop.HEADER_STALE] += 1
                continue
            if not family:
                # PROBE_ACK (family 0): consumed by health checks, never forwarded
                if self.prober is not None:
                    for tid in owners:
                        if self.prober.ack(tid, payload, now):
                            break
                continue
            if listener >= n_listeners:
                drops[Drop.NO_FLOW] += 1
                continue
            # sockaddr.from_fields, inlined
            if family == FAMILY_V4:
                sa = (pack_v4(port2, address) if families[listener] != AF_INET6
                      else pack_v6(port2, V4_MAPPED + address[:4]))
            else:
                sa = pack_v6(port2, address) if families[listener] == AF_INET6 else None
            flow = by_listener[listener].get(sa) if sa is not None else None
            if flow is None:
                drops[Drop.NO_FLOW] += 1
                continue
            if flow.transceiver not in owners:
                if flow.restart_to is None or flow.restart_to not in owners:
                    drops[Drop.FLOW_OF_OTHER] += 1
                    continue
                if not self._restart_due(flow, now):
                    continue
                self.restarts.pop(flow, None)
                flow.flags &= ~FAILED_OVER      # its new owner was chosen, not failed over to
                self.flows.move(flow, flow.restart_to, now)
                flow.route = None
                self.stats[FLOWS_MOVED] += 1
                if self.directory is not None:
                    self.dir_commands.append(self.directory.publish(listener, flow.key, flow.transceiver))
            elif flow.state == PENDING:
                first_stun = flow.last_seen
                self.flows.confirm(flow, now)
                self.stats[FLOWS_CONFIRMED] += 1
                if quality is not None:
                    quality.start(flow, first_stun, now)
                if self.directory is not None:
                    self.dir_commands.append(self.directory.publish(listener, flow.key, flow.transceiver))
            elif flow.restart_to is not None and payload[:2] == _BINDING_SUCCESS:
                self._restart_refused(flow, now)      # the old owner answers the client's check
            if qget is not None:
                q = qget(flow)
                if q is not None:           # observe() skips what is not RTP
                    quality.observe(q.transceiver, payload, now)
            dests, heads, bodies, origins = lists[listener]
            k = counts[listener]
            dests[k] = sa
            heads[k] = None
            bodies[k] = payload         # the tail of views[i] after the header
            origins[k] = i
            counts[listener] = k + 1
            sent_bytes += len(payload)
        for box, k in zip(boxes, counts):
            box.n = k
        sent = sum(counts) - first
        stats = self.stats
        stats[TX_IN_PACKETS] += n
        stats[TX_IN_BYTES] += in_bytes
        stats[TO_CLIENT_PACKETS] += sent
        stats[TO_CLIENT_BYTES] += sent_bytes

    # -- directory ------------------------------------------------------------

    def _hold(self, listener, sa, data, now):
        """DTLS/RTP from an unknown address: hold it while the directory is asked (or count why not)."""
        outcome, lookup = self.directory.hold(listener, sa, data, now)
        if outcome == directory_mod.Hold.LOOKUP:
            self.dir_lookups.append(lookup)
        elif outcome != directory_mod.Hold.HELD:
            self.drops[Drop.UNKNOWN_FLOW if outcome == directory_mod.Hold.DROP_NEGATIVE
                       else Drop.DIRECTORY_FULL] += 1

    def dir_resolved(self, lookup, reply, now, wall_ms):
        """The directory answered `lookup` (a value or a resp error): forward or count its packets."""
        res = self.directory.resolved(lookup, reply, now)
        if res is not None:
            self._resolution(res, now, wall_ms)

    def _resolution(self, res, now, wall_ms):
        drops = self.drops
        n = len(res.packets)
        tid = res.transceiver
        if tid is not None and tid not in self.transceivers:
            tid = None
        flow = None
        if tid is not None:
            flows = self.flows.by_listener[res.listener]
            flow = flows.get(res.sa)
            if flow is None:
                if self.draining:
                    drops[Drop.DRAINING] += n
                    return
                evicted = self.flows.evicted
                flow = self.flows.open(res.listener, res.sa, self.redirect.get(tid, tid), now)
                self.stats[FLOWS_EVICTED] += self.flows.evicted - evicted
                if flow.__class__ is Drop:
                    drops[flow] += n
                    return
                if flow.transceiver != tid:
                    flow.flags |= FAILED_OVER       # before confirm, which journals it
                # the directory is trusted like our own table: the flow was confirmed elsewhere
                self.flows.confirm(flow, now)
                self.stats[FLOWS_OPENED] += 1
                self.stats[FLOWS_FROM_DIRECTORY] += 1
        if flow is None:
            drops[Drop.DIRECTORY_MISS] += n
            return
        tx_sa = self.transceivers.get(flow.transceiver)
        if tx_sa is None:
            drops[Drop.UNKNOWN_TRANSCEIVER] += n
            return
        head = flow.route or self._prefix(flow)
        mac = self.keyring.signing.header_split
        ts6 = header.timestamp_bytes(wall_ms)
        out = self.to_transceivers
        size = 0
        for data in res.packets:
            out.append(tx_sa, header.seal(mac, head, ts6, data), data)
            size += len(data)
        self.stats[TO_TX_PACKETS] += n
        self.stats[TO_TX_BYTES] += size + n * header.HEADER_LEN

    # -- timers ---------------------------------------------------------------

    def next_deadline(self):
        """The earliest time `timer` has work (probes, directory timeouts), or None."""
        best = None
        if self.prober is not None:
            best = self.prober.next_deadline()
        if self.directory is not None:
            d = self.directory.next_deadline()
            if d is not None and (best is None or d < best):
                best = d
        return best

    def timer(self, now, wall_ms):
        """Probes due, probe timeouts, directory timeouts: queue what must be sent."""
        self._now = now
        prober = self.prober
        if prober is not None:
            due = prober.due(now)
            if due:
                key = self.keyring.signing
                ts = header.timestamp_bytes(wall_ms)
                for tid, payload in due:
                    tx_sa = self.transceivers.get(tid)
                    if tx_sa is None:
                        continue
                    head = header.prefix(key.key_id, header.PROBE, 0, 0, header.FAMILY_NONE, 0,
                                         header.ZERO_ADDRESS)
                    self.to_transceivers.append(tx_sa, header.seal(key.header_split, head, ts, payload),
                                                payload)
                    self.stats[PROBES_SENT] += 1
            events = prober.take_events()
            if events:
                self.events.extend(events)
                self._reroute()
        if self.directory is not None:
            for res in self.directory.expire(now):
                self._resolution(res, now, wall_ms)

    def _reroute(self):
        """Recompute `redirect` from the prober's view (after a transition or a reload)."""
        prober = self.prober
        redirect = {}
        if prober is not None:
            for tid in self.transceivers:
                eff, failover = prober.route_for(tid, self.backups)
                if failover and eff in self.transceivers:
                    redirect[tid] = eff
        self.redirect = redirect

    def report(self, now):
        """Fold quality stats of sampled flows (about once a second); forget flows that ended."""
        quality = self.quality
        if quality is None:
            return
        ended = [f for f in quality.flows if f.state == REMOVED]
        for f in ended:
            quality.end(f, now)
        quality.report(now)

    def directory_snapshot(self):
        """(listener, sa, tid) of every confirmed flow, for directory.refresh."""
        return [(f.listener, f.key, f.transceiver) for f in self.flows if f.state == CONFIRMED]

    def expire(self, now):
        """Drop flows past their deadline (cheap when nothing is due)."""
        expired = self.flows.expire(now)
        self.limits.per_source.expire(now)
        if self.restarts or self.restart_backoff:
            self._expire_restarts(now)
        self.stats[FLOWS_EXPIRED] += expired
        return expired

    def clear_output(self):
        self.to_transceivers.clear()
        for out in self.to_clients:
            out.clear()
