"""nftables rulesets rendered from the relay's config: text in, text out (no nft calls here).

Contract
  * `render_relay(cfg)` is the ruleset for the relay host, `render_transceiver(cfg,
    relay_addresses)` the one for a transceiver host, `render_remove(family_table)`
    the removal. Each returns the text of one `nft -f` file.
  * Each ruleset lives in its own table and never names another: `inet edge_relay`
    on the relay host, `inet edge_relay_transceiver` on a transceiver host. The
    file opens with `table inet X {}` then `delete table inet X` and then the
    whole table, so `nft -f FILE` replaces the old table in one transaction
    (the empty declaration makes the delete succeed on first load), loading
    the same file twice changes nothing, and no packet ever sees a half table.
  * Our chains never accept: a packet we do not drop goes on to every other
    table and chain of the host untouched (an `accept` in one base chain would
    not override another table's drop anyway, but "no verdict" says plainly
    that we only ever take packets away).
  * Everything is named and counted. Counters (`nft -j list counters table
    inet edge_relay`):
      l<i>_passed        datagrams to listener i that passed the meters
      l<i>_from_internal dropped: to listener i from a transceiver address or internal.allow
                         (a client never has one; loopback sources are left to the relay)
      l<i>_bad_source    dropped: to listener i from UDP port 0, or (not on lo) from a
                         local, broadcast or multicast address: no reply could reach it
      l<i>_over_pps      dropped: the source IP was over source_pps (burst source_pps_burst)
      l<i>_over_bytes    dropped: the source IP was over source_bytes_per_second
      public_over_total  dropped: all listeners together over total_pps (if set)
      internal_passed    datagrams to the internal ports from an allowed source
      internal_refused   dropped: to the internal ports from anywhere else
    Transceiver side (table inet edge_relay_transceiver):
      t<i>_passed / t<i>_refused   for transceiver i of the config
  * Meters are dynamic sets keyed by source address (`l<i>_pps4`, `l<i>_pps6`,
    `l<i>_bytes4`, `l<i>_bytes6`), SET_SIZE elements each, an element expiring
    SET_TIMEOUT after its source's last packet. A full set cannot add a new
    source, and nft then lets that source's packet through unmetered: the
    `total_pps` cap is what bounds a flood from more sources than that.

Theory of operation
  The base chain hooks prerouting at priority raw - 10, before connection
  tracking, so a flood is dropped before it costs a conntrack entry, and jumps
  to one chain per listener and one for the internal ports. Destinations are
  matched on address and port; a wildcard listener ("0.0.0.0" / "::") matches
  any local address (`fib daddr type local`), "::" in both families.
"""

import ipaddress

TABLE = "edge_relay"
TRANSCEIVER_TABLE = "edge_relay_transceiver"
SET_SIZE = 65536            # sources tracked per meter
SET_TIMEOUT = "10s"         # a source's meter is forgotten this long after its last packet
PRIORITY = "raw - 10"       # before conntrack (raw is -300)


def _daddr(address):
    """nft match for packets to `address` (a wildcard means any local address)."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        if ip.version == 4:
            return "meta nfproto ipv4 fib daddr type local"
        return "fib daddr type local"       # "::" receives both families (dual-stack socket)
    return f"{'ip' if ip.version == 4 else 'ip6'} daddr {ip}"


def _header(table, what):
    return [
        f"# {what}",
        "# Rendered by `edge-relay render-nft`; load with `nft -f FILE` (atomic, idempotent),",
        f"# remove with `nft delete table inet {table}`. Touches no other table.",
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        "",
        f"table inet {table} {{",
    ]


def _elements(items):
    return "{ " + ", ".join(items) + " }"


def _split_families(items):
    v4, v6 = [], []
    for item in items:
        (v4 if ipaddress.ip_network(item, strict=False).version == 4 else v6).append(item)
    return v4, v6


def render_relay(cfg):
    """The relay host's ruleset (table inet edge_relay) for config `cfg`."""
    nf = cfg.nftables
    lines = _header(TABLE, f"edge-relay host ruleset: {len(cfg.listeners)} listener(s), "
                    f"internal port(s) {_internal_ports(cfg) or 'ephemeral (not filtered)'}")
    counters = []
    for i, _ in enumerate(cfg.listeners):
        counters += [f"l{i}_passed", f"l{i}_over_pps", f"l{i}_over_bytes", f"l{i}_from_internal",
                     f"l{i}_bad_source"]
    counters += ["public_over_total", "internal_passed", "internal_refused"]
    for name in counters:
        lines.append(f"\tcounter {name} {{ }}")
    if nf.total_pps:
        # A named limit object: one budget shared by every listener chain.
        lines.append(f"\tlimit public_total {{ rate over {nf.total_pps}/second }}")
    lines.append("")
    for i, _ in enumerate(cfg.listeners):
        for kind in ("pps", "bytes"):
            for fam, addr_type in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
                lines.append(f"\tset l{i}_{kind}{fam} {{ type {addr_type}; size {SET_SIZE}; "
                             f"flags dynamic,timeout; timeout {SET_TIMEOUT}; }}")
    allowed = sorted({t.address for t in cfg.transceivers} | set(cfg.internal.allow),
                     key=lambda a: (ipaddress.ip_network(a, strict=False).version, a))
    v4, v6 = _split_families(allowed)
    for fam, addr_type, items in (("4", "ipv4_addr", v4), ("6", "ipv6_addr", v6)):
        body = f"type {addr_type}; flags interval; auto-merge;"
        if items:
            body += f" elements = {_elements(items)};"
        lines.append(f"\tset internal_allow{fam} {{ {body} }}")
    lines.append("")

    # Entry: classify by destination, jump to the chain that meters it.
    lines += ["\tchain prerouting {",
              f"\t\ttype filter hook prerouting priority {PRIORITY}; policy accept;"]
    for i, lst in enumerate(cfg.listeners):
        lines.append(f"\t\t{_daddr(lst.address)} udp dport {lst.port} jump listener{i}")
    ports = _internal_ports(cfg)
    if ports:
        lines.append(f"\t\t{_daddr(cfg.internal.address)} udp dport {ports} jump internal")
    lines += ["\t}", ""]

    for i, _ in enumerate(cfg.listeners):
        lines += [f"\tchain listener{i} {{",
                  # before the meters: the relay's SOURCE_INTERNAL rule, in the kernel
                  f"\t\tip saddr != 127.0.0.0/8 ip saddr @internal_allow4 counter name l{i}_from_internal drop",
                  f"\t\tip6 saddr != ::1 ip6 saddr @internal_allow6 counter name l{i}_from_internal drop",
                  # the relay's SOURCE_PORT_ZERO / SOURCE_NOT_UNICAST / SOURCE_SELF rules
                  f"\t\tudp sport 0 counter name l{i}_bad_source drop",
                  f"\t\tiif != lo fib saddr type {{ local, broadcast, multicast }} "
                  f"counter name l{i}_bad_source drop",
                  f"\t\tupdate @l{i}_pps4 {{ ip saddr limit rate over {nf.source_pps}/second "
                  f"burst {nf.source_pps_burst} packets }} counter name l{i}_over_pps drop",
                  f"\t\tupdate @l{i}_pps6 {{ ip6 saddr limit rate over {nf.source_pps}/second "
                  f"burst {nf.source_pps_burst} packets }} counter name l{i}_over_pps drop",
                  f"\t\tupdate @l{i}_bytes4 {{ ip saddr limit rate over "
                  f"{nf.source_bytes_per_second} bytes/second burst {nf.source_bytes_burst} bytes }} "
                  f"counter name l{i}_over_bytes drop",
                  f"\t\tupdate @l{i}_bytes6 {{ ip6 saddr limit rate over "
                  f"{nf.source_bytes_per_second} bytes/second burst {nf.source_bytes_burst} bytes }} "
                  f"counter name l{i}_over_bytes drop"]
        if nf.total_pps:
            lines.append("\t\tjump total")
        lines += [f"\t\tcounter name l{i}_passed", "\t}", ""]
    if nf.total_pps:
        lines += ["\tchain total {",
                  "\t\tlimit name public_total counter name public_over_total drop",
                  "\t}", ""]

    lines += ["\tchain internal {",
              "\t\tip saddr @internal_allow4 counter name internal_passed return",
              "\t\tip6 saddr @internal_allow6 counter name internal_passed return",
              "\t\tcounter name internal_refused drop",
              "\t}",
              "}"]
    return "\n".join(lines) + "\n"


def _internal_ports(cfg):
    """`port` or `first-last` for the workers' internal ports, or None if ephemeral."""
    port = cfg.internal.port
    if not port:
        return None
    last = port + cfg.effective_workers() - 1
    return str(port) if last == port else f"{port}-{last}"


def relay_addresses_of(cfg):
    """The addresses the relay sends to transceivers from, as far as the config says."""
    ip = ipaddress.ip_address(cfg.internal.address)
    return [] if ip.is_unspecified else [str(ip)]


def render_transceiver(cfg, relay_addresses=()):
    """A transceiver host's ruleset (table inet edge_relay_transceiver).

    Each configured transceiver's address:port accepts UDP only from
    `relay_addresses` (addresses or CIDRs; default: internal.address when it
    is not a wildcard). Load the same file on every transceiver host of the
    PoP: rules for addresses that are not local to a host never match there.
    Raises ValueError when no relay address is known.
    """
    relays = list(relay_addresses) or relay_addresses_of(cfg)
    if not relays:
        raise ValueError("internal.address is a wildcard: name the relay's source "
                         "address(es) with --relay-address")
    relays = [str(ipaddress.ip_network(r, strict=False)) if "/" in r else str(ipaddress.ip_address(r))
              for r in relays]
    v4, v6 = _split_families(relays)
    lines = _header(TRANSCEIVER_TABLE, "edge-relay transceiver-side ruleset: the internal "
                    "port accepts only the relay")
    for i, _ in enumerate(cfg.transceivers):
        lines += [f"\tcounter t{i}_passed {{ }}", f"\tcounter t{i}_refused {{ }}"]
    lines.append("")
    for fam, addr_type, items in (("4", "ipv4_addr", v4), ("6", "ipv6_addr", v6)):
        body = f"type {addr_type}; flags interval; auto-merge;"
        if items:
            body += f" elements = {_elements(items)};"
        lines.append(f"\tset relays{fam} {{ {body} }}")
    lines += ["", "\tchain prerouting {",
              f"\t\ttype filter hook prerouting priority {PRIORITY}; policy accept;"]
    for i, t in enumerate(cfg.transceivers):
        lines.append(f"\t\t{_daddr(t.address)} udp dport {t.port} jump transceiver{i}")
    lines += ["\t}", ""]
    for i, t in enumerate(cfg.transceivers):
        lines += [f"\tchain transceiver{i} {{",
                  f"\t\tip saddr @relays4 counter name t{i}_passed return",
                  f"\t\tip6 saddr @relays6 counter name t{i}_passed return",
                  f"\t\tcounter name t{i}_refused drop",
                  "\t}", ""]
    lines[-1] = "}"
    return "\n".join(lines) + "\n"


def render_remove(table=TABLE):
    """A file that removes our table whether or not it is loaded (nft -f, atomic)."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n"
