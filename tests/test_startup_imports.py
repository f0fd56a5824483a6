"""The start path's import diet: what `edge-relay run` does not load before its first forwarded packet.

A restart's callers wait for the new process to read its sockets, so the
modules only other subcommands, a mistake or a later event need are imported
where they are used (cli.py, config.py, workerproc.py, supervisor.py). These
tests pin that down as behaviour: a real `run` whose worker reports, as its
loop opens, which of them it holds; and the argument fast path of `run`
against argparse. How long the start takes is `make bench-startup`'s.
"""

import json
import os
import subprocess
import sys

import pytest

from edge_relay import cli
from relayproc import ROOT, Setup

# Modules nothing on the way from exec to the first forwarded packet needs.
DEFERRED = (
    "argparse",             # cli: the other subcommands' parser (run has _run_args)
    "traceback",            # cli, workerproc: only for a crash
    "difflib",              # config: "did you mean" for an unknown key
    "edge_relay.nft",       # supervisor: the ruleset file, written after the fork
    "edge_relay.resp",      # worker: the Redis client, only with [directory]
    "edge_relay.effective",  # cli: `config --effective`, `keys`
    "edge_relay.demo",      # cli: the demo subcommands
    "urllib.request",       # cli: the subcommands that ask a running relay
    "ctypes.util",          # batchio: libc through CDLL(None), no find_library (its imports, ldconfig)
    "subprocess",           # nothing on the way to the first packet runs a program
)

# Runs `edge-relay run` as the package does, until its worker's loop is open:
# there it prints the deferred modules it holds (fork inherits the supervisor's)
# and ends both processes (the supervisor would restart it).
PROBE = r"""
import json, os, signal, sys
from edge_relay import worker
opened = worker.Worker._open_loop
def report(self, *a, **k):
    opened(self, *a, **k)
    os.write(1, json.dumps(sorted(m for m in sys.argv[2].split(",") if m in sys.modules)).encode())
    os.kill(os.getppid(), signal.SIGKILL)
    os._exit(0)
worker.Worker._open_loop = report
from edge_relay import cli
sys.exit(cli.main(["run", "--config", sys.argv[1]]))
"""


def test_run_reaches_its_first_read_without_the_deferred_modules(tmp_path):
    setup = Setup(tmp_path, workers=1)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
        r = subprocess.run([sys.executable, "-c", PROBE, setup.path, ",".join(DEFERRED)], cwd=ROOT,
                           env=dict(env, PYTHONPATH=ROOT), capture_output=True, timeout=60)
    finally:
        setup.tx_sock.close()
    assert r.stdout, r.stderr.decode()
    assert json.loads(r.stdout) == []


# Every spelling _run_args takes, and what argparse makes of it.
SPELLINGS = [
    ["run"],
    ["run", "--config", "/etc/x.toml"],
    ["run", "-c", "x.toml"],
    ["run", "--config=/a=b.toml"],
    ["run", "--config="],
    ["run", "--workers", "3"],
    ["run", "--workers=2", "-c", "x"],
    ["run", "--preflight", "--config", "x"],
    ["run", "-c", "a", "--config", "b"],
    ["run", "--workers", " 4"],
]

# Spellings it leaves to argparse (usage errors, help, abbreviations, other forms).
LEFT_TO_ARGPARSE = [
    [],
    ["version"],
    ["check-config", "run"],
    ["run", "--help"],
    ["run", "-h"],
    ["run", "--conf", "x"],
    ["run", "--pre"],
    ["run", "-cx"],
    ["run", "-c=x"],
    ["run", "--config"],
    ["run", "--config", "-x"],
    ["run", "--workers", "-1"],
    ["run", "--workers", "two"],
    ["run", "--workers="],
    ["run", "--preflight=yes"],
    ["run", "extra"],
    ["run", "--", "x"],
]


@pytest.mark.parametrize("argv", SPELLINGS, ids=" ".join)
def test_run_fast_path_agrees_with_argparse(argv):
    fast = cli._run_args(argv)
    assert fast is not None
    assert vars(fast) == vars(cli.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", LEFT_TO_ARGPARSE, ids=lambda a: " ".join(a) or "(none)")
def test_run_fast_path_leaves_the_rest_to_argparse(argv):
    assert cli._run_args(argv) is None
