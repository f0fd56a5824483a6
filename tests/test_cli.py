"""The edge-relay command line, run as a person or Ansible would run it."""

import json
import os
import stat
import subprocess
import sys

import pytest

from edge_relay import cli, keys
from edge_relay.demo_run import write_demo_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def edge_relay(*args, timeout=60, check=False):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "edge_relay", *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_version():
    r = edge_relay("version", check=True)
    assert r.stdout.startswith("edge-relay 0.")


def test_help_lists_every_subcommand_and_exit_codes():
    r = edge_relay("--help", check=True)
    for name in ("run", "check-config", "keygen", "mint-ufrag", "version", "demo-transceiver", "demo-client"):
        assert name in r.stdout
    assert "Exit status" in r.stdout


def test_unknown_subcommand_is_usage_error():
    assert edge_relay("frobnicate").returncode == cli.EXIT_USAGE


def test_keygen_writes_private_key_and_never_overwrites(tmp_path):
    d = tmp_path / "keys"
    r = edge_relay("keygen", "--dir", str(d), check=True)
    path = r.stdout.strip()
    assert path.endswith("/1.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert len(keys.read_key_file(path)) == 32
    assert edge_relay("keygen", "--dir", str(d), check=True).stdout.strip().endswith("/2.key")
    r = edge_relay("keygen", "--dir", str(d), "--id", "1")
    assert r.returncode == cli.EXIT_ERROR and "already exists" in r.stderr and len(r.stderr.splitlines()) == 1


def test_check_config_valid_and_invalid(tmp_path):
    path, _ = write_demo_setup(str(tmp_path / "d"))
    os.makedirs(tmp_path / "d", exist_ok=True)
    assert edge_relay("check-config", path, check=True).stdout.startswith(path)
    assert edge_relay("check-config", "--keys", path).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(open(path).read().replace("[relay]", "[relay]\nbatch_size = 0\nworkres = 2"))
    r = edge_relay("check-config", str(bad))
    assert r.returncode == cli.EXIT_ERROR
    lines = r.stderr.splitlines()
    assert len(lines) == 2
    assert any("relay.batch_size" in line for line in lines)
    assert any("relay.workres" in line and "unknown key" in line for line in lines)
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[relay\n")
    r = edge_relay("check-config", str(syntax))
    assert r.returncode == cli.EXIT_ERROR and len(r.stderr.splitlines()) == 1
    assert r.stderr.count(str(syntax)) == 1


def test_check_config_keys_refuses_world_readable_key(tmp_path):
    path, _ = write_demo_setup(str(tmp_path / "d"))
    key = tmp_path / "d" / "keys" / "1.key"
    os.chmod(key, 0o644)
    r = edge_relay("check-config", "--keys", path)
    assert r.returncode == cli.EXIT_ERROR and str(key) in r.stderr and len(r.stderr.splitlines()) == 1


def test_mint_ufrag_json(tmp_path):
    d = tmp_path / "keys"
    edge_relay("keygen", "--dir", str(d), check=True)
    out = json.loads(edge_relay("mint-ufrag", "-t", "7", "--keys", str(d), "--json", check=True).stdout)
    from edge_relay import token
    ring = keys.load_dir(d)
    import time
    tok = token.verify(out["ufrag"], ring, time.time(), 86400, 5)
    assert tok.transceiver == 7 and len(out["password"]) >= 22


def test_run_with_missing_keys_is_one_line_error(tmp_path):
    path, _ = write_demo_setup(str(tmp_path / "d"))
    for f in (tmp_path / "d" / "keys").iterdir():
        f.unlink()
    r = edge_relay("run", "--config", path, timeout=30)
    assert r.returncode == cli.EXIT_ERROR
    assert "keygen" in r.stderr


def test_real_processes_carry_a_call(tmp_path):
    """`edge-relay run` + `demo-transceiver` as processes; `demo-client` completes checks and media."""
    path, ports = write_demo_setup(str(tmp_path / "d"))
    key_dir = str(tmp_path / "d" / "keys")
    env = dict(os.environ, PYTHONPATH=ROOT)
    py = [sys.executable, "-m", "edge_relay"]
    procs = [
        subprocess.Popen(py + ["run", "--config", path], env=env, cwd=ROOT,
                         stderr=subprocess.PIPE, text=True),
        subprocess.Popen(py + ["demo-transceiver", "--listen", f"127.0.0.1:{ports['transceiver_port']}",
                               "--id", "1", "--keys", key_dir], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    try:
        r = edge_relay("demo-client", "--relay", f"127.0.0.1:{ports['public_port']}", "--keys", key_dir,
                       "--clients", "3", "--duration", "2")
        report = json.loads(r.stdout)
        assert r.returncode == 0, (r.stderr, report)
        assert report["connected"] == 3
        assert report["check_failures"] == 0
        assert report["received"] > 0 and report["sent"] > 0
        assert report["received"] <= report["sent"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert procs[0].returncode == 0, procs[0].stderr.read()
