"""The `edge-relay` command line.

Exit codes (documented in --help and edge-relay(8)):
  0   success
  1   an operator error other than the config: a socket that cannot be bound, a
      relay that cannot be reached; the message names what
  2   usage error (unknown subcommand or option)
  3   `upgrade` only: the running relay cannot be upgraded in place (its
      version predates it, or it has no management endpoint to give a
      verdict on); nothing was sent: restart it instead
  70  internal error (EX_SOFTWARE, sysexits.h): a bug; the traceback follows
  78  configuration error (EX_CONFIG): invalid config or unusable key file, the
      message names the key or file. edge-relay.service has
      RestartPreventExitStatus=78: restarting into the same file cannot help.
"""

import json
import os
import socket
import sys
import time

from . import __version__, config as config_mod, keys
from .errors import ConfigError, EdgeRelayError, KeyFileError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_UNSUPPORTED = 3                     # `upgrade`: the running relay cannot upgrade in place; nothing sent
EXIT_SOFTWARE, EXIT_CONFIG = 70, 78      # sysexits.h EX_SOFTWARE, EX_CONFIG
DEFAULT_CONFIG = config_mod.DEFAULT_PATH
SERVICE_GROUP = "edge-relay"             # the group edge-relay.service runs as (debian/edge-relay.sysusers)
DEFAULT_KEY_DIR = "/etc/edge-relay/keys"


def cmd_run(args):
    if args.preflight:
        from . import reexec
        return reexec.preflight_main(args.config, args.workers)
    cfg = config_mod.load(args.config)
    from . import supervisor
    code = supervisor.run(args.config, cfg, workers=args.workers)
    # The supervisor has stopped: its sockets and flows are in the fd store and
    # its workers are gone. A restart waits for this exit, and the interpreter's
    # teardown (~20 ms of freeing what the kernel frees anyway) would come first.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):   # None, closed or broken: nothing to keep
            pass
    os._exit(code)


def cmd_check_config(args):
    """The strongest check there is before start: config, then the key files it names.

    Keys are loaded (as `run` and every reload load them) unless --no-keys,
    or unless --keys was not given and keys.dir does not exist (a config
    checked away from its host) or cannot be read by this user (not root
    nor in the service group); the "ok" line says which.
    """
    try:
        cfg = config_mod.load(args.file)
    except EdgeRelayError as exc:
        for line in str(exc).splitlines():
            # problems are "key: problem"; file-level ones already start with the path
            print(line if line.startswith(str(args.file)) else f"{args.file}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    readable = os.access(cfg.keys.dir, os.R_OK | os.X_OK)
    keys_checked = args.keys is True or (args.keys is None and readable)
    if keys_checked:
        try:
            config_mod.load_keys(cfg)
        except EdgeRelayError as exc:
            print(f"{args.file}: keys.dir: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    for key, text in config_mod.warnings(cfg):
        print(f"{args.file}: {key}: warning: {text}", file=sys.stderr)
    if not args.quiet:
        keys_note = "keys ok" if keys_checked else "keys not checked: " + (
            "--no-keys" if args.keys is False else f"cannot read {cfg.keys.dir}" if cfg.keys.dir.exists()
            else f"no {cfg.keys.dir}")
        print(f"{args.file}: ok ({len(cfg.listeners)} listeners, {len(cfg.transceivers)} transceivers, "
              f"{keys_note})")
    return EXIT_OK


def cmd_keygen(args):
    os.makedirs(args.dir, mode=0o750, exist_ok=True)
    import grp
    group, note = None, None
    if args.group:
        try:
            group = grp.getgrnam(args.group).gr_gid
        except KeyError:
            print(f"keygen: group {args.group!r} does not exist", file=sys.stderr)
            return EXIT_ERROR
    elif args.group is None:
        # The service reads its keys as group edge-relay: a key only root can
        # read would stop it from starting. Default to that group where it exists.
        try:
            group = grp.getgrnam(SERVICE_GROUP).gr_gid
        except KeyError:
            note = (f"keygen: no group {SERVICE_GROUP!r} on this host: the key is readable by its owner "
                    "only; pass --group GROUP for the user that runs the relay")
    try:
        path = keys.write_key_file(args.dir, args.id, group=group)
    except KeyFileError as exc:          # writing a key is not a config error: exit 1
        print(f"edge-relay keygen: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if note:
        print(note, file=sys.stderr)
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


def _version_text():
    return f"edge-relay {__version__} (python {sys.version.split()[0]})"


def cmd_version(args):
    print(_version_text())
    return EXIT_OK


def _hostport(text):
    import argparse  # already loaded: only argparse calls this
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


def _management_url(m, route):
    """http://host:port/route for config.Management `m` (a wildcard address asks loopback)."""
    host = "127.0.0.1" if m.address == "0.0.0.0" else "::1" if m.address == "::" else m.address
    return f"http://[{host}]:{m.port}{route}" if ":" in host else f"http://{host}:{m.port}{route}"


def cmd_flows(args):
    """Live flows from a running relay's GET /flows, as a table or JSON."""
    import urllib.error
    import urllib.parse
    import urllib.request
    base = args.url
    if base is None:
        m = config_mod.load(args.config).management
        if not m.enabled:
            print(f"edge-relay flows: {args.config}: management.port is 0 (management endpoint disabled)",
                  file=sys.stderr)
            return EXIT_ERROR
        base = _management_url(m, "/flows")
    query = {"limit": args.limit}
    for name in ("transceiver", "state", "client"):
        if getattr(args, name) is not None:
            query[name] = getattr(args, name)
    url = base + "?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        print(f"edge-relay flows: {exc.read().decode('utf-8', 'replace').strip() or exc}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as exc:
        print(f"edge-relay flows: {url}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(doc, indent=1))
        return EXIT_OK

    def show(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)
    print(f"{'CLIENT':<47} {'TRANSCEIVER':<16} {'STATE':<9} {'AGE':>8} {'IDLE':>7} {'PACKETS':>13} W")
    for f in doc["flows"]:
        packets = "-" if f["packets"] is None else f"{f['packets']['client']}/{f['packets']['transceiver']}"
        state = f["state"] + ("*" if f["failed_over"] else "")
        print(f"{f['client']:<47} {f['transceiver'] or f['transceiver_id']!s:<16} {state:<9} "
              f"{show(f['age']):>8} {show(f['idle']):>7} {packets:>13} {f['worker']}")
    more = f", {doc['missing']} workers did not answer" if doc["missing"] else ""
    print(f"{doc['shown']} of {doc['matched']} matching flows shown{more} "
          "(* failed over; packets client/transceiver, sampled flows only)")
    return EXIT_OK


def cmd_config(args):
    """The config file with every default filled in (TOML), like nginx -T."""
    from . import effective
    cfg = config_mod.load(args.config)
    sys.stdout.write(effective.render_config(cfg, args.config))
    return EXIT_OK


def cmd_keys(args):
    """Loaded key ids, which one signs, fingerprints; never the keys."""
    from . import effective
    if args.config:
        cfg = config_mod.load(args.config)
        rows = effective.key_report(cfg.keys.dir, cfg.keys.signing_key_id)
    else:
        rows = effective.key_report(args.keys)
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    print(f"{'ID':>3}  {'SIGNS':<5}  {'FINGERPRINT':<16}  FILE")
    for r in rows:
        print(f"{r['id']:>3}  {'yes' if r['signing'] else '':<5}  {r['fingerprint']:<16}  {r['file']}")
    return EXIT_OK


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
        url = _management_url(m, "/metrics")
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

    def get(name, **lab):
        return int(samples.get((name, tuple(lab.items())), 0))
    print(f"workers      {get('edge_relay_workers_up')}/{get('edge_relay_workers')} up, "
          f"{get('edge_relay_worker_restarts_total')} restarts, ready {get('edge_relay_ready')}")
    print(f"config       generation {get('edge_relay_config_generation')}, "
          f"{get('edge_relay_reloads_total')} reloads, {get('edge_relay_reload_failures_total')} refused")
    print(f"flows        {get('edge_relay_flows', state='confirmed')} confirmed, "
          f"{get('edge_relay_flows', state='pending')} pending")

    def total(name):
        return int(sum(v for (n, _), v in samples.items() if n == name))
    print(f"journal      {total('edge_relay_journal_records')} of {total('edge_relay_journal_capacity')} "
          f"records, {get('edge_relay_journal_unjournaled_total', reason='full')} not journaled (full); "
          f"restarts restored {get('edge_relay_journal_restore_records_total', result='restored')} flows, "
          f"{get('edge_relay_journal_restore_records_total', result='bad')} bad records")
    for d in ("client_in", "to_transceiver", "transceiver_in", "to_client"):
        print(f"{d:<14} {get('edge_relay_packets_total', direction=d):>12} packets "
              f"{get('edge_relay_bytes_total', direction=d):>14} bytes")
    drops = sorted(((int(v), dict(lab)["reason"]) for (name, lab), v in samples.items()
                    if name == "edge_relay_drops_total" and v), reverse=True)
    print("drops        " + (", ".join(f"{r} {n}" for n, r in drops) if drops else "none"))
    return EXIT_OK


def _running_management(path):
    """The management endpoint to ask for a verdict: from `path`, even when the relay will refuse it.

    A config that does not validate still names its [management] table (a reload
    never changes the running one anyway); one that does not even parse means
    the defaults.
    """
    try:
        return config_mod.load(path).management
    except EdgeRelayError:
        pass
    import stat
    import tomllib
    m = config_mod.Management()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return m
        with open(path, "rb") as f:
            table = tomllib.loads(f.read(1 << 20).decode("utf-8")).get("management", {})
        return config_mod.Management(address=str(table.get("address", m.address)),
                                     port=int(table.get("port", m.port)))
    except (OSError, ValueError, TypeError, RecursionError, MemoryError):
        return m


def _signal_relay(args, name, signum, no_endpoint, before_signal=None):
    """Reach the relay answering /status, check its pid, and send it `signum`.

    Returns (url, status, pid, asked) -- `status()` reads /status again,
    `asked` is the monotonic microsecond before the signal, which the
    relay's answer must postdate -- or an exit code when it cannot: the
    reason is printed here, prefixed with `name`. `no_endpoint` is (the
    hint, exit code) for a config with management.port 0; `before_signal`
    may look at the first /status and return an exit code to stop before
    anything is sent (it prints why).
    """
    import urllib.request

    from .metrics import monotonic_ns
    url = args.url
    if url is None:
        m = _running_management(args.config)
        if not m.enabled:
            hint, code = no_endpoint
            print(f"{name}: {args.config}: management.port is 0: {hint}", file=sys.stderr)
            return code
        url = _management_url(m, "/status")

    def status():
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read().decode("utf-8"))

    try:
        first = status()
        serving = first["pid"]     # reachable before we signal: else no answer could be read
    except (OSError, ValueError, KeyError) as exc:
        print(f"{name}: {url}: {exc} (is the relay running? --url)", file=sys.stderr)
        return EXIT_ERROR
    pid = args.pid or serving
    if pid != serving:
        print(f"{name}: {url} is served by pid {serving}, not {pid}", file=sys.stderr)
        return EXIT_ERROR
    if before_signal is not None:
        code = before_signal(first, pid)
        if code is not None:
            return code
    asked = monotonic_ns() // 1000
    try:
        os.kill(pid, signum)
    except OSError as exc:
        print(f"{name}: pid {pid}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    return url, status, pid, asked


def _signal_for_verdict(args, command, signum, key):
    """Send `signum` to the relay answering /status and wait for its verdict `key` on this very request.

    Returns (exit code, /status document or None, verdict or None); the
    failures that leave no verdict (no endpoint, nobody answering, another
    pid, no verdict in time) are printed here and give (EXIT_ERROR, None, None),
    or EXIT_UNSUPPORTED when the running relay has no such verdict at all
    (it predates it: nothing was sent).
    """
    def supported(first, pid):
        if key in first:
            return None
        print(f"edge-relay {command}: pid {pid} runs edge-relay {first.get('version', '< 0.1.1')}, which cannot "
              f"{command} in place (no {key} in its /status); nothing was sent: restart it instead",
              file=sys.stderr)
        return EXIT_UNSUPPORTED

    no_endpoint = (f"no endpoint to read the relay's verdict from (give --url, or send SIG{signal_name(signum)} "
                   f"yourself: systemctl kill -s {signal_name(signum)} edge-relay)",
                   EXIT_UNSUPPORTED if key == "last_upgrade" else EXIT_ERROR)
    reached = _signal_relay(args, f"edge-relay {command}", signum, no_endpoint, supported)
    if reached.__class__ is int:
        return reached, None, None
    url, status, pid, asked = reached
    deadline = time.monotonic() + args.timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            doc = status()
        except (OSError, ValueError) as exc:
            last_error = str(exc)
            continue
        if doc.get("pid") != pid:
            print(f"edge-relay {command}: {url} is now served by pid {doc.get('pid')}, not {pid}: the relay "
                  "restarted meanwhile", file=sys.stderr)
            return EXIT_ERROR, None, None
        v = doc.get(key, {})
        if v.get("requested_usec", 0) < asked or v.get("state") == "pending":
            continue
        return (EXIT_OK if v.get("state") == "ok" else EXIT_ERROR), doc, v
    print(f"edge-relay {command}: no verdict from pid {pid} within {args.timeout:g} s ({url}: {last_error})",
          file=sys.stderr)
    return EXIT_ERROR, None, None


def signal_name(signum):
    import signal
    return signal.Signals(signum).name[3:]


def cmd_reload(args):
    """SIGHUP the running relay and wait for its own verdict on this request (ExecReload=)."""
    import signal
    code, doc, v = _signal_for_verdict(args, "reload", signal.SIGHUP, "last_reload")
    if v is None:
        return EXIT_ERROR if code == EXIT_UNSUPPORTED else code
    if code == EXIT_OK:
        print(f"edge-relay reload: config generation {v['generation']} accepted; "
              f"all {doc['workers']} workers run it")
    else:
        print(f"edge-relay reload: {v.get('state')}: {v.get('reason')} "
              f"(generation {doc['generation']} keeps serving)", file=sys.stderr)
    return code


def cmd_upgrade(args):
    """SIGUSR2 the running relay: it re-executes the code on disk in place; wait for its verdict."""
    import signal
    code, doc, v = _signal_for_verdict(args, "upgrade", signal.SIGUSR2, "last_upgrade")
    if v is None:
        return code
    if code == EXIT_OK:
        print(f"edge-relay upgrade: pid {doc['pid']} runs edge-relay {v.get('to_version')} "
              f"(was {v.get('from_version')}) on all {doc['workers']} workers")
        if v.get("reason"):
            print(f"edge-relay upgrade: note: {v['reason']}")
    elif v.get("state") == "refused":
        print(f"edge-relay upgrade: refused: {v.get('reason')} (edge-relay {v.get('from_version')} keeps serving, "
              f"pid {doc['pid']})", file=sys.stderr)
    else:
        print(f"edge-relay upgrade: {v.get('state')}: {v.get('reason')} (pid {doc['pid']} serves "
              f"edge-relay {doc.get('version')})", file=sys.stderr)
    return code


def cmd_drain(args):
    """Take the running relay out of the pool (or back in with --cancel) and wait until it says so.

    Exit 0 once /status shows the drain (or its end) for this request; 1 when the relay cannot be
    reached, refused (it is stopping) or did not answer within --timeout. With --wait, also wait until
    no flow is left (then the host can be stopped without cutting a call).
    """
    from .workerproc import DRAIN_SIGNAL, UNDRAIN_SIGNAL
    name = "edge-relay drain" + (" --cancel" if args.cancel else "")
    signum = UNDRAIN_SIGNAL if args.cancel else DRAIN_SIGNAL
    no_endpoint = (f"no endpoint to read the relay's state from (give --url, or signal it yourself: "
                   f"systemctl kill --kill-whom=main -s {signum.name} edge-relay)", EXIT_ERROR)
    reached = _signal_relay(args, name, signum, no_endpoint)
    if reached.__class__ is int:
        return reached
    url, status, pid, asked = reached

    def took(doc):
        d = doc.get("drain") or {}
        if args.cancel:
            return not d.get("active", True) and d.get("cancelled_usec", 0) >= asked
        return d.get("active") and d.get("requested_usec", 0) >= asked

    deadline = time.monotonic() + args.timeout
    last_error, doc, entered = "no answer", None, False
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            doc = status()
        except (OSError, ValueError) as exc:
            last_error = str(exc)
            continue
        if doc.get("pid") != pid:
            last_error = f"now served by pid {doc.get('pid')}"
            continue
        if not entered:
            if not took(doc):
                last_error = f"phase {doc.get('phase')}, draining {doc.get('draining')}"
                continue
            entered = True
            d = doc["drain"]
            if args.cancel:
                print(f"{name}: pid {pid} accepts new flows again")
                return EXIT_OK
            left = max(0.0, (d["refuse_usec"] - d["requested_usec"]) / 1e6)
            print(f"{name}: pid {pid} is draining: /healthz 503, "
                  + ("refusing new flows" if d["refusing"] else f"new flows refused in {left:.1f} s")
                  + f", {d['flows']} flows left")
            if not args.wait:
                return EXIT_OK
        if not doc.get("draining"):
            print(f"{name}: the drain was cancelled while waiting", file=sys.stderr)
            return EXIT_ERROR
        if doc["drain"]["flows"] == 0:
            print(f"{name}: no flow left")
            return EXIT_OK
        last_error = f"{doc['drain']['flows']} flows left"
    what = "the flows to end" if entered else "the relay to take the request"
    print(f"{name}: gave up waiting for {what} after {args.timeout:g} s ({url}: {last_error})", file=sys.stderr)
    return EXIT_ERROR


def cmd_demo(args):
    from .demo import run
    return run.main(duration=args.duration, clients=args.clients, workers=args.workers)


def cmd_render_nft(args):
    from . import nft
    if args.remove:
        sys.stdout.write(nft.render_remove(nft.TRANSCEIVER_TABLE if args.transceiver_side else nft.TABLE))
        return EXIT_OK
    # The relay host's ruleset is validated as the relay validates a config
    # (keys included): a config the relay would refuse renders nothing.
    if args.transceiver_side or args.no_keys:
        cfg = config_mod.load(args.config)
    else:
        cfg = config_mod.load_with_keys(args.config)[0]
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
    import argparse  # ~15 ms with building the parser: `edge-relay run` skips both (_run_args)
    p = argparse.ArgumentParser(
        prog="edge-relay",
        description="Edge UDP relay for real-time voice AI over WebRTC.",
        epilog="Exit status: 0 success, 1 operator error (the message names what), 2 usage error, "
               "3 upgrade cannot be done in place (nothing sent), "
               "70 internal error (a bug), 78 configuration error (the message names the key or file).")
    p.add_argument("--version", action="version", version=_version_text())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("run", help="run the relay (supervisor and workers)")
    s.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.add_argument("--workers", type=int, default=None, help="override relay.workers")
    s.add_argument("--preflight", action="store_true",
                   help="only check that this code can take over a running relay (imports, config, keys), "
                        "print one line and exit; what `upgrade` runs before it re-executes")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("check-config", help="validate a config file and its keys; one line per problem, "
                                            "exit 78 if any")
    s.add_argument("file", nargs="?", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--keys", action="store_true", default=None,
                   help="require the key directory it names to load (default: load it if it exists)")
    g.add_argument("--no-keys", dest="keys", action="store_false", help="check the config file only")
    s.add_argument("--quiet", "-q", action="store_true")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("keygen", help="write a new 32-byte key file <id>.key with mode 0640")
    s.add_argument("--dir", default=DEFAULT_KEY_DIR, help=f"key directory (default {DEFAULT_KEY_DIR})")
    s.add_argument("--id", type=int, default=None, help="key id 0..255 (default: one above the highest)")
    s.add_argument("--group", default=None,
                   help=f"group that may read the key (default {SERVICE_GROUP} if that group exists; "
                        "'' for none)")
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
    g.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                   help=f"take management.address/port from this config (default {DEFAULT_CONFIG})")
    g.add_argument("--url", default=None, help="the metrics URL, e.g. http://127.0.0.1:9477/metrics")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("reload", help="reload the running relay and wait for its verdict; "
                                      "exit 1 with the reason if it refused (systemd ExecReload=)")
    s.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                   help=f"take management.address/port from this config (default {DEFAULT_CONFIG})")
    s.add_argument("--url", default=None, help="the status URL, e.g. http://127.0.0.1:9477/status")
    s.add_argument("--pid", type=int, default=None, help="the supervisor's pid (default: from /status)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the verdict (default 30)")
    s.set_defaults(func=cmd_reload)

    s = sub.add_parser("upgrade", help="make the running relay re-execute the code now installed, in place "
                                       "(same pid, sockets and flows) and wait for its verdict; exit 1 with "
                                       "the reason if it refused, 3 if it cannot")
    s.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                   help=f"take management.address/port from this config (default {DEFAULT_CONFIG})")
    s.add_argument("--url", default=None, help="the status URL, e.g. http://127.0.0.1:9477/status")
    s.add_argument("--pid", type=int, default=None, help="the supervisor's pid (default: from /status)")
    s.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the verdict (default 120)")
    s.set_defaults(func=cmd_upgrade)

    s = sub.add_parser("drain", help="take the running relay out of the pool: /healthz 503, new flows refused "
                                     "after relay.drain_seconds, existing ones kept; --cancel undoes it")
    s.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                   help=f"take management.address/port from this config (default {DEFAULT_CONFIG})")
    s.add_argument("--url", default=None, help="the status URL, e.g. http://127.0.0.1:9477/status")
    s.add_argument("--pid", type=int, default=None, help="the supervisor's pid (default: from /status)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--cancel", action="store_true", help="end the drain: accept new flows, /healthz as before")
    g.add_argument("--wait", action="store_true", help="then wait until no flow is left (bounded by --timeout)")
    s.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the relay (and with --wait for the flows) (default 30)")
    s.set_defaults(func=cmd_drain)

    s = sub.add_parser("flows", help="list a running relay's live flows (from its management endpoint)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                   help=f"take management.address/port from this config (default {DEFAULT_CONFIG})")
    g.add_argument("--url", default=None, help="the flows URL, e.g. http://127.0.0.1:9477/flows")
    s.add_argument("--limit", type=int, default=100, help="show at most this many flows, 1..10000 (default 100)")
    s.add_argument("--transceiver", "-t", default=None, help="only flows of this transceiver (name or id)")
    s.add_argument("--state", choices=("pending", "confirmed"), default=None, help="only flows in this state")
    s.add_argument("--client", default=None,
                   help="only this client: ADDRESS, ADDRESS:PORT ([ADDRESS]:PORT for IPv6) or a network in CIDR")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_flows)

    s = sub.add_parser("config", help="print the config with every default filled in (TOML)")
    s.add_argument("--effective", action="store_true", required=True,
                   help="every section and key, defaults included (the only mode)")
    s.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("keys", help="list the loaded key ids, which one signs, and their fingerprints")
    key_source(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser("render-nft", help="print the nftables ruleset for this config (load with nft -f)")
    s.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.add_argument("--transceiver-side", action="store_true",
                   help="the ruleset for a transceiver host: its port accepts only the relay")
    s.add_argument("--relay-address", action="append", default=[], metavar="ADDR",
                   help="with --transceiver-side: a relay source address or CIDR (repeatable; "
                        "default internal.address)")
    s.add_argument("--remove", action="store_true",
                   help="print a file that removes the table instead (nft -f, atomic)")
    s.add_argument("--no-keys", action="store_true",
                   help="skip loading the key directory (a config rendered away from its host); "
                        "by default a config whose keys the relay would refuse renders nothing")
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


# The options of `run`, as build_parser declares them: {option: (dest, takes a value)}.
_RUN_OPTIONS = {"--config": ("config", True), "-c": ("config", True), "--workers": ("workers", True),
                "--preflight": ("preflight", False)}


def _run_args(argv):
    """`run`'s arguments without argparse, for the plainest spellings only; None for anything else.

    A restart waits for this process to forward its first packet, and argparse
    (import and the parser of every subcommand) is the largest cost before the
    config. Whatever is not spelled exactly as below (help, abbreviations, a
    missing or bad value, any other option) returns None and goes through
    argparse, so usage errors and their messages stay argparse's;
    tests/test_startup_imports.py checks that both agree.
    """
    if not argv or argv[0] != "run":
        return None
    values = {"config": DEFAULT_CONFIG, "workers": None, "preflight": False}
    rest = argv[1:]
    i = 0
    while i < len(rest):
        option, eq, value = rest[i].partition("=")
        if option not in _RUN_OPTIONS or (eq and option == "-c"):
            return None
        dest, takes_value = _RUN_OPTIONS[option]
        if not takes_value:
            if eq:
                return None
            values[dest] = True
        else:
            if not eq:
                i += 1
                if i == len(rest) or rest[i].startswith("-"):
                    return None
                value = rest[i]
            if dest == "workers":
                try:
                    value = int(value)
                except ValueError:
                    return None
            values[dest] = value
        i += 1
    import types
    return types.SimpleNamespace(command="run", func=cmd_run, **values)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _run_args(argv) or build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeRelayError as exc:
        for line in str(exc).splitlines():
            print(f"edge-relay {args.command}: {line}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, (ConfigError, KeyFileError)) else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:  # noqa: BLE001 - a bug: say so with the traceback, and exit distinctly
        import traceback  # only for a bug: not on every start
        traceback.print_exc()
        print(f"edge-relay {args.command}: internal error (a bug); exit {EXIT_SOFTWARE}", file=sys.stderr)
        return EXIT_SOFTWARE
