"""edge-relay: an edge UDP relay for real-time voice AI over WebRTC.

The relay forwards a client's UDP to the transceiver named by the routing
token in the client's first STUN Binding Request, and forwards the
transceiver's authenticated answers back. It holds no session secrets.
Runtime code is the Python standard library only.

Layers (tests/test_layers.py reads this table and enforces it)
  codec     stun token header keys sockaddr drops errors histogram transceiver control batch
  policy    flows journal router ratelimit quality probes directory defaults lifecycle
  io        batchio memio worker sockets httpd supervisor fdstore workerproc sdnotify resp reexec upgrade adapter*
  operator  config cli log metrics nft effective __main__
  demo      demo

  codec     bytes <-> values: parse, build, seal, verify. Pure functions and
            small classes.
  policy    what to do with a datagram or a flow: routing, the flow table,
            rate limits, quality, probes, the flow directory's logic, and the
            defaults they share with the config. Takes `now` as an argument.
  io        the only modules that touch sockets, selectors, ctypes, signals
            and the clock: the event loop, batched I/O (batch.py states its
            contract; batchio implements it over sockets, memio in memory
            for tests), the supervisor.
  operator  the config, the command line, logs, metrics, the firewall.
  demo      the demo transceiver, voice callers, `edge-relay demo` and the
            blocking Redis client of the demo's shared state: the
            edge_relay.demo subpackage (its modules take its layer), never
            imported by the relay.

Rules
  * codec and policy modules import only codec and policy modules and the
    standard library, and never `selectors`, `select`, `ctypes`, `time`,
    `signal`, `threading`, `asyncio` or `subprocess`; `socket` only for its
    constants and address conversion (AF_INET, AF_INET6, inet_pton,
    inet_ntop). They never read a clock: time is passed in.
  * No module outside edge_relay.demo imports it, except cli, which
    dispatches `edge-relay demo` to it (inside the function).
  * Imports are acyclic.
"""

__version__ = "0.1.0"
