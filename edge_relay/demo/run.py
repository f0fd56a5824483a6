"""`edge-relay demo` (and `make demo`): a relay, a demo transceiver and voice clients on loopback.

Everything lives in a fresh temporary folder (keys, config, logs) and is
removed at the end; child processes are stopped on Ctrl-C, at the end of
DURATION, and on any error, so nothing is left behind.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .. import demo, keys

CONFIG_TEMPLATE = """\
# throwaway config written by `edge-relay demo`
[relay]
workers = {workers}
drain_seconds = 1.0

[[listeners]]
address = "127.0.0.1"
port = {public_port}

[internal]
address = "127.0.0.1"
port = {internal_port}

[keys]
dir = "{key_dir}"

[[transceivers]]
id = 1
address = "127.0.0.1"
port = {transceiver_port}

[management]
address = "127.0.0.1"
port = {management_port}
"""


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_demo_setup(folder, workers=1):
    """Keys and config for a loopback relay in `folder`; returns (config path, ports dict)."""
    key_dir = os.path.join(folder, "keys")
    os.makedirs(key_dir, mode=0o700)
    keys.write_key_file(key_dir, 1)
    ports = {"public_port": free_udp_port(), "transceiver_port": free_udp_port(),
             "management_port": free_tcp_port()}
    # workers bind internal_port + i: find a run of free ports
    ports["internal_port"] = free_udp_port()
    path = os.path.join(folder, "edge-relay.toml")
    with open(path, "w") as f:
        f.write(CONFIG_TEMPLATE.format(workers=workers, key_dir=key_dir, **ports))
    return path, ports


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(duration=None, clients=4, workers=1, out=sys.stdout):
    folder = tempfile.mkdtemp(prefix="edge-relay-demo-")
    procs = []
    try:
        config_path, ports = write_demo_setup(folder, workers)
        key_dir = os.path.join(folder, "keys")
        py = [sys.executable, "-m", "edge_relay"]
        relay_log = open(os.path.join(folder, "relay.log"), "w")
        tx_log = open(os.path.join(folder, "transceiver.log"), "w")
        procs.append(subprocess.Popen(py + ["run", "--config", config_path], stderr=relay_log))
        procs.append(subprocess.Popen(py + ["demo-transceiver", "--listen", f"127.0.0.1:{ports['transceiver_port']}",
                                            "--id", "1", "--keys", key_dir],
                                      stdout=tx_log, stderr=tx_log))
        print(f"demo: relay on udp 127.0.0.1:{ports['public_port']} (internal {ports['internal_port']}), "
              f"demo transceiver on udp 127.0.0.1:{ports['transceiver_port']}, "
              f"metrics on http://127.0.0.1:{ports['management_port']}/metrics; {clients} voice clients; "
              f"{'Ctrl-C to stop' if duration is None else f'{duration:g} s'}", file=out, flush=True)
        keyring = keys.load_dir(key_dir)
        voice = []
        for _ in range(clients):
            ufrag, password = demo.mint_session(keyring, 1, time.time())
            voice.append(demo.VoiceClient(("127.0.0.1", ports["public_port"]), ufrag, password))
        last = {"sent": 0, "received": 0}

        def on_second(elapsed):
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[3]} exited with status {p.returncode}; "
                                       f"see {folder}/relay.log")
            r = demo.client_report(voice)
            up, down = r["sent"] - last["sent"], r["received"] - last["received"]
            last.update(sent=r["sent"], received=r["received"])
            rtt = (f"rtt p50 {r['rtt_p50_ms']:.2f} ms p99 {r['rtt_p99_ms']:.2f} ms"
                   if r["rtt_p50_ms"] is not None else "rtt -")
            print(f"t={elapsed:4.0f}s flows {r['connected']}/{r['clients']} | up {up} pps down {down} pps | "
                  f"loss {r['loss'] * 100:.2f}% | {rtt} | jitter {r['jitter_ms']:.2f} ms", file=out, flush=True)

        try:
            demo.run_clients(voice, float("inf") if duration is None else duration, on_second)
        except KeyboardInterrupt:
            pass
        r = demo.client_report(voice)
        print(f"demo: {r['connected']}/{r['clients']} calls connected, sent {r['sent']}, "
              f"echoed {r['received']}, loss {r['loss'] * 100:.2f}%", file=out, flush=True)
        return 0 if r["connected"] == r["clients"] and r["received"] else 1
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)
