"""Demo transceiver session state shared through Redis, so a backup can take over a call.

Theory of operation
  Demo only (the relay itself keeps no session state and never talks to Redis
  except for the optional flow directory). A demo transceiver running as
  primary writes each session it creates; one running as its backup reads
  them when the relay fails a flow over to it (header FLAG_FAILOVER), so the
  client's consent checks keep passing (same ICE password) and the media
  counters continue where the primary stopped.

  Keys (prefix "edge-relay-demo:" by default), all with the session TTL,
  refreshed on every write:
      <prefix>ice:<ufrag>     string: the ICE password of the session
      <prefix>media:<ufrag>   hash: media counters (field -> integer), e.g.
                              "rtp_in", "rtp_out", "bytes_in", "bytes_out"
      <prefix>owner:<ufrag>   string: id of the transceiver serving it now
      <prefix>client:<host>:<port>  string: the ufrag of the session that client
                              address belongs to (DTLS/SRTP carry no ufrag, so a
                              backup needs it to find the session of a flow)

  It speaks RESP through blocking_resp.BlockingClient (blocking, with a timeout):
  fine for a demo, which should batch counter updates (`MediaCounters`)
  rather than write per packet. One reconnect is tried when the connection
  broke; other failures raise resp.RespError.
"""

from .. import resp
from .blocking_resp import BlockingClient

PREFIX = "edge-relay-demo:"


class DemoState:
    """Session state of demo transceivers in Redis at `address` ((host, port) or a Unix path)."""

    def __init__(self, address, *, prefix=PREFIX, ttl=600, timeout=2.0):
        self.address = address
        self.prefix = prefix
        self.ttl = int(ttl)
        self.timeout = timeout
        self._client = None

    def _pipeline(self, commands):
        for attempt in (0, 1):
            if self._client is None:
                self._client = BlockingClient(self.address, self.timeout)
            try:
                replies = self._client.pipeline(commands)
            except resp.Disconnected:
                self.close()
                if attempt:
                    raise
                continue
            for r in replies:
                if isinstance(r, resp.ReplyError):
                    raise r
            return replies

    def _key(self, kind, ufrag):
        return f"{self.prefix}{kind}:{ufrag}"

    def put_session(self, ufrag, password, owner=None):
        """Store a new session's ICE password (and optionally who serves it)."""
        cmds = [("SET", self._key("ice", ufrag), password, "EX", self.ttl)]
        if owner is not None:
            cmds.append(("SET", self._key("owner", ufrag), owner, "EX", self.ttl))
        self._pipeline(cmds)

    def put_client(self, client, ufrag):
        """Remember which session the client address (host, port) belongs to."""
        self._pipeline([("SET", self._key("client", f"{client[0]}:{client[1]}"), ufrag, "EX", self.ttl)])

    def session_of(self, client):
        """The ufrag (str) of the session of client (host, port), or None."""
        value, = self._pipeline([("GET", self._key("client", f"{client[0]}:{client[1]}"))])
        return None if value is None else value.decode("utf-8")

    def password(self, ufrag):
        """The ICE password of `ufrag` (str), or None if no transceiver stored it (or it expired)."""
        value, = self._pipeline([("GET", self._key("ice", ufrag))])
        return None if value is None else value.decode("utf-8")

    def claim(self, ufrag, owner):
        """Record `owner` as serving the session; returns the previous owner (str) or None."""
        value, = self._pipeline([("SET", self._key("owner", ufrag), owner, "EX", self.ttl, "GET")])
        return None if value is None else value.decode("utf-8")

    def add_media(self, ufrag, counters):
        """Add {field: increment} to the session's media counters; returns the new totals."""
        key = self._key("media", ufrag)
        fields = list(counters.items())
        cmds = [("HINCRBY", key, f, int(n)) for f, n in fields]
        cmds.append(("EXPIRE", key, self.ttl))
        cmds.append(("EXPIRE", self._key("ice", ufrag), self.ttl))
        replies = self._pipeline(cmds)
        return {f: v for (f, _), v in zip(fields, replies)}

    def media(self, ufrag):
        """The session's media counters as {field: int} ({} when none)."""
        flat, = self._pipeline([("HGETALL", self._key("media", ufrag))])
        return {flat[i].decode("utf-8"): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None


class MediaCounters:
    """Local counters flushed to DemoState in batches (at most every `interval` seconds)."""

    def __init__(self, state, ufrag, interval=0.2):
        self.state = state
        self.ufrag = ufrag
        self.interval = interval
        self.pending = {}
        self.last_flush = None

    def add(self, now, **increments):
        for f, n in increments.items():
            self.pending[f] = self.pending.get(f, 0) + n
        if self.last_flush is None or now - self.last_flush >= self.interval:
            self.flush(now)

    def flush(self, now):
        """Write what is pending (nothing if empty); returns the totals written or {}."""
        self.last_flush = now
        if not self.pending:
            return {}
        pending, self.pending = self.pending, {}
        return self.state.add_media(self.ufrag, pending)
