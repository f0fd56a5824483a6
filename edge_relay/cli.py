"""The `edge-relay` command line.

Exit codes (documented in --help and edge-relay(8)):
  0  success
  1  an operator error: invalid config, unusable key file, socket that cannot be bound;
     the message names the key or file
  2  usage error (unknown subcommand or option)
"""

import argparse
import json
import os
import socket
import sys
import time

from . import __version__, config as config_mod, keys
from .errors import EdgeRelayError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = "/etc/edge-relay/edge-relay.toml"
DEFAULT_KEY_DIR = "/etc/edge-relay/keys"


def _log(args_level="info"):
    from .log import Log
    return Log(level=args_level)


def cmd_run(args):
    cfg = config_mod.load(args.config)
    from . import supervisor
    return supervisor.run(args.config, cfg, workers=args.workers)


def cmd_check_config(args):
    try:
        cfg = config_mod.load(args.file)
    except EdgeRelayError as exc:
        for line in str(exc).splitlines():
            # problems are "key: problem"; file-level ones already start with the path
            print(line if line.startswith(str(args.file)) else f"{args.file}: {line}", file=sys.stderr)
        return EXIT_ERROR
    if args.keys:
        try:
            config_mod.load_keys(cfg)
        except EdgeRelayError as exc:
            print(f"{args.file}: keys.dir: {exc}", file=sys.stderr)
            return EXIT_ERROR
    if not args.quiet:
        print(f"{args.file}: ok ({len(cfg.listeners)} listeners, {len(cfg.transceivers)} transceivers)")
    return EXIT_OK


def cmd_keygen(args):
    os.makedirs(args.dir, mode=0o750, exist_ok=True)
    group = None
    if args.group:
        import grp
        try:
            group = grp.getgrnam(args.group).gr_gid
        except KeyError:
            print(f"keygen: group {args.group!r} does not exist", file=sys.stderr)
            return EXIT_ERROR
    path = keys.write_key_file(args.dir, args.id, group=group)
    print(path)
    return EXIT_OK


def _keyring_for(args):
    if args.config:
        cfg, keyring = config_mod.load_with_keys(args.config)
        return keyring, cfg
    return keys.load_dir(args.keys), None


def cmd_mint_ufrag(args):
    from . import demo
    keyring, _ = _keyring_for(args)
    ufrag, password = demo.mint_session(keyring, args.transceiver, time.time(), args.lifetime)
    if args.json:
        print(json.dumps({"ufrag": ufrag, "password": password, "transceiver": args.transceiver}))
    else:
        print(f"ufrag {ufrag}\npassword {password}")
    return EXIT_OK


def cmd_version(args):
    print(f"edge-relay {__version__} (python {sys.version.split()[0]})")
    return EXIT_OK


def _hostport(text):
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: port must be a number") from None


def cmd_demo_transceiver(args):
    from . import demo
    keyring, cfg = _keyring_for(args)
    host, port = args.listen
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    tx = demo.DemoTransceiver(keyring, args.id, sock)
    print(f"demo transceiver {args.id} on {host}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    try:
        tx.serve(stop_after=args.duration)
    except KeyboardInterrupt:
        pass
    print(json.dumps({"checks_answered": tx.checks_answered, "media_echoed": tx.media_echoed,
                      "probes_answered": tx.probes_answered, "drops": tx.drops}))
    return EXIT_OK


def cmd_demo_client(args):
    from . import demo
    if args.ufrag and args.password:
        ufrag, password = args.ufrag, args.password
    else:
        keyring, _ = _keyring_for(args)
        ufrag, password = demo.mint_session(keyring, args.transceiver, time.time())
    clients = [demo.VoiceClient(args.relay, ufrag, password) for _ in range(args.clients)]
    try:
        demo.run_clients(clients, args.duration)
    except KeyboardInterrupt:
        pass
    report = demo.client_report(clients)
    print(json.dumps(report))
    return EXIT_OK if report["connected"] == len(clients) else EXIT_ERROR


def cmd_stats(args):
    """Fetch the relay's /metrics and print it for a person (or as JSON)."""
    import urllib.error
    import urllib.request
    from . import metrics
    url = args.url
    if url is None:
        cfg = config_mod.load(args.config)
        m = cfg.management
        if not m.enabled:
            print(f"edge-relay stats: {args.config}: management.port is 0 (metrics disabled)", file=sys.stderr)
            return EXIT_ERROR
        host = "127.0.0.1" if m.address == "0.0.0.0" else "::1" if m.address == "::" else m.address
        url = f"http://[{host}]:{m.port}/metrics" if ":" in host else f"http://{host}:{m.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            samples = metrics.parse(r.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        print(f"edge-relay stats: {url}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        out = {}
        for (name, labels), value in samples.items():
            key = name + ("{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else "")
            out[key] = int(value) if value == int(value) else value
        print(json.dumps(out, indent=1, sort_keys=True))
        return EXIT_OK
    get = lambda name, **lab: int(samples.get((name, tuple(lab.items())), 0))  # noqa: E731
    print(f"workers      {get('edge_relay_workers_up')}/{get('edge_relay_workers')} up, "
          f"{get('edge_relay_worker_restarts_total')} restarts, ready {get('edge_relay_ready')}")
    print(f"config       generation {get('edge_relay_config_generation')}, "
          f"{get('edge_relay_reloads_total')} reloads, {get('edge_relay_reload_failures_total')} refused")
    print(f"flows        {get('edge_relay_flows', state='confirmed')} confirmed, "
          f"{get('edge_relay_flows', state='pending')} pending")
    for d in ("client_in", "to_transceiver", "transceiver_in", "to_client"):
        print(f"{d:<14} {get('edge_relay_packets_total', direction=d):>12} packets "
              f"{get('edge_relay_bytes_total', direction=d):>14} bytes")
    drops = sorted(((int(v), dict(lab)["reason"]) for (name, lab), v in samples.items()
                    if name == "edge_relay_drops_total" and v), reverse=True)
    print("drops        " + (", ".join(f"{r} {n}" for n, r in drops) if drops else "none"))
    return EXIT_OK


def cmd_demo(args):
    from . import demo_run
    return demo_run.main(duration=args.duration, clients=args.clients, workers=args.workers)


def cmd_render_nft(args):
    from . import nft
    if args.remove:
        sys.stdout.write(nft.render_remove(nft.TRANSCEIVER_TABLE if args.transceiver_side else nft.TABLE))
        return EXIT_OK
    cfg = config_mod.load(args.config)
    try:
        text = (nft.render_transceiver(cfg, args.relay_address) if args.transceiver_side
                else nft.render_relay(cfg))
    except ValueError as exc:
        print(f"edge-relay render-nft: {exc}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(text)
    return EXIT_OK


def cmd_adapter(args):
    from . import adapter_run
    keyring, _ = _keyring_for(args)
    return adapter_run.main(keyring, args.id, args.listen, args.hook, args.public, server_bind=args.server_bind,
                            health=args.health_tcp, idle_timeout=args.idle_timeout,
                            session_ttl=args.session_ttl, duration=args.duration)


def build_parser():
    p = argparse.ArgumentParser(
        prog="edge-relay",
        description="Edge UDP relay for real-time voice AI over WebRTC.",
        epilog="Exit status: 0 success, 1 operator error (the message names the key or file), 2 usage error.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("run", help="run the relay (supervisor and workers)")
    s.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.add_argument("--workers", type=int, default=None, help="override relay.workers")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("check-config", help="validate a config file; one line per problem, exit 1 if any")
    s.add_argument("file")
    s.add_argument("--keys", action="store_true", help="also load the key directory it names")
    s.add_argument("--quiet", "-q", action="store_true")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("keygen", help="write a new 32-byte key file <id>.key with mode 0640")
    s.add_argument("--dir", default=DEFAULT_KEY_DIR, help=f"key directory (default {DEFAULT_KEY_DIR})")
    s.add_argument("--id", type=int, default=None, help="key id 0..255 (default: one above the highest)")
    s.add_argument("--group", default=None, help="group that may read the key (e.g. edge-relay)")
    s.set_defaults(func=cmd_keygen)

    def key_source(s):
        g = s.add_mutually_exclusive_group()
        g.add_argument("--config", "-c", default=None, help="take the key directory from this config")
        g.add_argument("--keys", default=DEFAULT_KEY_DIR, help=f"key directory (default {DEFAULT_KEY_DIR})")

    s = sub.add_parser("mint-ufrag", help="print a routing-token ufrag and a demo ICE password")
    s.add_argument("--transceiver", "-t", type=int, required=True, help="transceiver id 0..65535")
    s.add_argument("--lifetime", type=float, default=4 * 3600, help="seconds the ufrag may open flows")
    s.add_argument("--json", action="store_true")
    key_source(s)
    s.set_defaults(func=cmd_mint_ufrag)

    s = sub.add_parser("version", help="print the version")
    s.set_defaults(func=cmd_version)

    s = sub.add_parser("demo-transceiver", help="run the demo transceiver (ICE-lite echo)")
    s.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT to listen on")
    s.add_argument("--id", type=int, required=True, help="its transceiver id")
    s.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    key_source(s)
    s.set_defaults(func=cmd_demo_transceiver)

    s = sub.add_parser("demo-client", help="run synthetic voice clients against a relay")
    s.add_argument("--relay", type=_hostport, required=True, help="the relay's public HOST:PORT")
    s.add_argument("--transceiver", "-t", type=int, default=1, help="transceiver id to mint a ufrag for")
    s.add_argument("--ufrag", default=None)
    s.add_argument("--password", default=None)
    s.add_argument("--clients", type=int, default=1)
    s.add_argument("--duration", type=float, default=5.0)
    key_source(s)
    s.set_defaults(func=cmd_demo_client)

    s = sub.add_parser("stats", help="print a running relay's counters (from its /metrics)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"take management.address/port from this config (default {DEFAULT_CONFIG})")
    g.add_argument("--url", default=None, help="the metrics URL, e.g. http://127.0.0.1:9477/metrics")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("render-nft", help="print the nftables ruleset for this config (load with nft -f)")
    s.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.add_argument("--transceiver-side", action="store_true",
                   help="the ruleset for a transceiver host: its port accepts only the relay")
    s.add_argument("--relay-address", action="append", default=[], metavar="ADDR",
                   help="with --transceiver-side: a relay source address or CIDR (repeatable; "
                        "default internal.address)")
    s.add_argument("--remove", action="store_true",
                   help="print a file that removes the table instead (nft -f, atomic)")
    s.set_defaults(func=cmd_render_nft)

    s = sub.add_parser("demo", help="relay + demo transceiver + voice clients on loopback, live status")
    s.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    s.add_argument("--clients", type=int, default=4)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("adapter", help="put a stock WebRTC server behind the relay (transceiver adapter)")
    s.add_argument("--listen", type=_hostport, required=True,
                   help="HOST:PORT the relays send to (this transceiver's configured address)")
    s.add_argument("--id", type=int, required=True, help="the transceiver id the tokens name")
    s.add_argument("--public", type=_hostport, action="append", required=True,
                   help="a relay public HOST:PORT for the answer's candidates (repeatable)")
    s.add_argument("--hook", type=_hostport, default=("127.0.0.1", 8479),
                   help="HOST:PORT of the signaling hook (HTTP; default 127.0.0.1:8479)")
    s.add_argument("--server-bind", default="0.0.0.0", help="address of the per-flow sockets toward the server")
    s.add_argument("--health-tcp", type=_hostport, default=None,
                   help="answer relay probes only while a TCP connect to HOST:PORT works")
    s.add_argument("--idle-timeout", type=float, default=30.0, help="forget a flow after this many idle seconds")
    s.add_argument("--session-ttl", type=float, default=300.0,
                   help="forget a session after this many seconds without a check")
    s.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    key_source(s)
    s.set_defaults(func=cmd_adapter)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgeRelayError as exc:
        for line in str(exc).splitlines():
            print(f"edge-relay {args.command}: {line}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
