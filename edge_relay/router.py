"""The relay's forwarding decisions, sans-IO: datagrams and clocks in, datagrams and counters out.

Theory of operation
  The event loop hands `Router` one received batch at a time, with the time
  read once for the batch (`now` monotonic seconds for flow ages, `wall_ms`
  Unix milliseconds for tokens and headers). The router appends what must be
  sent to `to_transceivers` (one list, sent from the worker's internal
  socket) and `to_clients[listener]` (sent from the very listener socket the
  client used), and counts every datagram it does not forward in `drops`.
  The loop sends those lists and clears them before the next receive, since
  payloads are views into the receive buffers.

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

State changes happen only after authentication: a token's MAC before a flow
opens, a header's MAC before a flow is confirmed or moved.
"""

from . import header, ratelimit, sockaddr, stun, token
from .drops import N_DROPS, Drop
from .flows import CONFIRMED, PENDING

_CLASS = stun._CLASS
_STUN, _DTLS, _RTP = stun.STUN, stun.DTLS, stun.RTP
_BINDING_REQUEST = b"\x00\x01"

# indexes into Router.stats
CLIENT_IN_PACKETS, CLIENT_IN_BYTES, TO_TX_PACKETS, TO_TX_BYTES = 0, 1, 2, 3
TX_IN_PACKETS, TX_IN_BYTES, TO_CLIENT_PACKETS, TO_CLIENT_BYTES = 4, 5, 6, 7
FLOWS_OPENED, FLOWS_CONFIRMED, FLOWS_MOVED, FLOWS_EXPIRED = 8, 9, 10, 11
N_STATS = 12
STAT_NAMES = ("client_in_packets", "client_in_bytes", "to_transceiver_packets", "to_transceiver_bytes",
              "transceiver_in_packets", "transceiver_in_bytes", "to_client_packets", "to_client_bytes",
              "flows_opened", "flows_confirmed", "flows_moved", "flows_expired")


class Policy:
    """The numbers the router needs from config.limits (plain attributes, read per batch).

    `rates` holds the app-level rate limits (ratelimit.Limits keyword
    arguments); the defaults are config.Limits' defaults. Build a Policy
    from a config with `Policy.from_limits(cfg.limits)` so they follow it.
    """

    __slots__ = ("header_window_ms", "token_max_lifetime", "clock_skew", "rates")

    def __init__(self, header_window=2.0, token_max_lifetime=86400.0, clock_skew=5.0, **rates):
        self.header_window_ms = int(header_window * 1000)
        self.token_max_lifetime = token_max_lifetime
        self.clock_skew = clock_skew
        ratelimit.Limits(**rates)           # refuse unknown names or bad values now, not at configure
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
    """

    def __init__(self, flows, keyring, transceivers, listener_families, policy):
        self.flows = flows
        self.listener_families = tuple(listener_families)
        self.drops = [0] * N_DROPS
        self.stats = [0] * N_STATS
        self.to_transceivers = []
        self.to_clients = [[] for _ in self.listener_families]
        self.draining = False
        self.configure(keyring, transceivers, policy)

    def configure(self, keyring, transceivers, policy):
        """Swap keys, routes and limits (reload). Flows stay; their cached headers are rebuilt lazily."""
        self.keyring = keyring
        old = getattr(self, "policy", None)
        if old is None or old.rates != policy.rates:
            # New buckets only when the numbers change, so a reload does not refill them.
            self.limits = ratelimit.Limits(**policy.rates)
        self.policy = policy
        self.transceivers = dict(transceivers)
        by_addr = {}
        for tx_id, sa in self.transceivers.items():
            by_addr.setdefault(sa, set()).add(tx_id)
        self.transceiver_ids_by_addr = {sa: frozenset(ids) for sa, ids in by_addr.items()}
        for flow in self.flows:
            flow.route = None

    # -- client -> transceiver ------------------------------------------------

    def from_clients(self, listener, views, addrs, n, now, wall_ms):
        """Route `n` datagrams received on `listener` (views[i] from addrs[i])."""
        flows = self.flows.by_listener[listener]
        drops = self.drops
        out = self.to_transceivers
        mac = self.keyring.signing.header_mac
        ts6 = header.timestamp_bytes(wall_ms)
        sent = sent_bytes = in_bytes = 0
        seal = header.seal
        transceivers = self.transceivers
        flow_allow = self.limits.per_flow.allow
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
                if not flow_allow(flow.key, now):
                    drops[Drop.RATE_FLOW_PACKETS] += 1
                    continue
                if flow.state == CONFIRMED:
                    flow.last_seen = now
                if kind == _STUN and data[:2] == _BINDING_REQUEST and not self._same_owner(flow, data, now, wall_ms):
                    continue
            head = flow.route
            tx_sa = transceivers.get(flow.transceiver)
            if head is None or tx_sa is None:
                head = self._prefix(flow)
                if tx_sa is None:       # its transceiver left the config at a reload
                    drops[Drop.UNKNOWN_TRANSCEIVER] += 1
                    continue
            out.append((tx_sa, seal(mac, head, ts6, data), data))
            sent += 1
            sent_bytes += len(data)
        stats = self.stats
        stats[CLIENT_IN_PACKETS] += n
        stats[CLIENT_IN_BYTES] += in_bytes
        stats[TO_TX_PACKETS] += sent
        stats[TO_TX_BYTES] += sent_bytes + sent * header.HEADER_LEN

    def _open(self, listener, kind, data, sa, now, wall_ms):
        """A new pending flow for a Binding Request carrying a valid token, or None (counted)."""
        drops = self.drops
        if kind != _STUN:
            drops[Drop.UNKNOWN_FLOW if kind else Drop.NOT_WEBRTC] += 1
            return None
        limits = self.limits
        # Per source before the token's MAC: one source cannot make us verify
        # more than its allowance of tokens. Global after it: forged tokens
        # must not spend the budget of genuine new flows.
        if not limits.per_source.take(ratelimit.source_key(sa), now):
            drops[Drop.RATE_SOURCE_NEW_FLOWS] += 1
            return None
        tx_id = self._verified_transceiver(data, wall_ms)
        if tx_id.__class__ is Drop:
            drops[tx_id] += 1
            return None
        if self.draining:
            drops[Drop.DRAINING] += 1
            return None
        if not limits.total.take(now):
            drops[Drop.RATE_GLOBAL_NEW_FLOWS] += 1
            return None
        flow = self.flows.open(listener, sa, tx_id, now)
        if flow.__class__ is Drop:
            drops[flow] += 1
            return None
        self.stats[FLOWS_OPENED] += 1
        return flow

    def _verified_transceiver(self, data, wall_ms):
        """The configured transceiver id a Binding Request's token names, or the Drop reason."""
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
        return tok.transceiver

    def _same_owner(self, flow, data, now, wall_ms):
        """False (counted) when a Binding Request on a known flow must not be forwarded.

        A consent check naming the flow's own transceiver passes untouched. A
        valid token for another transceiver is an ICE restart: the request
        goes to the new transceiver and the flow moves once it answers.
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
        tx_id = self._verified_transceiver(data, wall_ms)
        if tx_id.__class__ is Drop:
            self.drops[tx_id] += 1
            return False
        # forward this request to the new owner; everything else keeps going to the old one
        flow.restart_to = tx_id
        out = self.to_transceivers
        tx_sa, head = self.transceivers[tx_id], self._prefix(flow, cache=False)
        out.append((tx_sa, header.seal(self.keyring.signing.header_mac, head,
                                       header.timestamp_bytes(wall_ms), data), data))
        self.stats[TO_TX_PACKETS] += 1
        self.stats[TO_TX_BYTES] += len(data) + header.HEADER_LEN
        return False

    def _prefix(self, flow, cache=True):
        """Header octets 0..25 for `flow`'s datagrams, cached on the flow.

        Only the prefix is cached (about 60 bytes a flow); the transceiver's
        address is looked up by id per packet, which keeps a flow within its
        memory budget and lets a reload re-point a transceiver at once.
        """
        family, port, address = sockaddr.client_fields(flow.key)
        head = header.prefix(self.keyring.signing.key_id, header.TO_TRANSCEIVER, 0, flow.listener,
                             family, int.from_bytes(port, "big"), address)
        if cache:
            flow.route = head
        return head

    # -- transceiver -> client ------------------------------------------------

    def from_transceivers(self, views, addrs, n, now, wall_ms):
        """Check `n` datagrams received on the internal socket and queue their payloads for clients."""
        drops = self.drops
        ids_by_addr = self.transceiver_ids_by_addr
        by_listener = self.flows.by_listener
        families = self.listener_families
        n_listeners = len(families)
        keyring = self.keyring
        window = self.policy.header_window_ms
        decode = header.decode
        from_fields = sockaddr.from_fields
        to_clients = self.to_clients
        sent = sent_bytes = in_bytes = 0
        for i in range(n):
            data = views[i]
            in_bytes += len(data)
            owners = ids_by_addr.get(addrs[i])
            if owners is None:
                drops[Drop.NOT_TRANSCEIVER] += 1
                continue
            hdr = decode(data, keyring, wall_ms, window)
            if hdr.__class__ is Drop:
                drops[hdr] += 1
                continue
            if hdr.type != header.TO_CLIENT:
                continue            # PROBE_ACK: consumed by health checks
            listener = hdr.route
            if listener >= n_listeners:
                drops[Drop.NO_FLOW] += 1
                continue
            sa = from_fields(hdr.family, hdr.port.to_bytes(2, "big"), hdr.address, families[listener])
            flow = by_listener[listener].get(sa) if sa is not None else None
            if flow is None:
                drops[Drop.NO_FLOW] += 1
                continue
            if flow.transceiver not in owners:
                if flow.restart_to is None or flow.restart_to not in owners:
                    drops[Drop.FLOW_OF_OTHER] += 1
                    continue
                self.flows.move(flow, flow.restart_to, now)
                flow.route = None
                self.stats[FLOWS_MOVED] += 1
            elif flow.state == PENDING:
                self.flows.confirm(flow, now)
                self.stats[FLOWS_CONFIRMED] += 1
            payload = hdr.payload
            to_clients[listener].append((sa, payload))
            sent += 1
            sent_bytes += len(payload)
        stats = self.stats
        stats[TX_IN_PACKETS] += n
        stats[TX_IN_BYTES] += in_bytes
        stats[TO_CLIENT_PACKETS] += sent
        stats[TO_CLIENT_BYTES] += sent_bytes

    # -- timers ---------------------------------------------------------------

    def expire(self, now):
        """Drop flows past their deadline (cheap when nothing is due)."""
        expired = self.flows.expire(now)
        self.stats[FLOWS_EXPIRED] += expired
        return expired

    def clear_output(self):
        self.to_transceivers.clear()
        for out in self.to_clients:
            out.clear()
