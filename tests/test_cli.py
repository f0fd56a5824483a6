"""The edge-relay command line, run as a person or Ansible would run it."""

import json
import os
import re
import stat
import subprocess
import sys

from edge_relay import cli, keys
from edge_relay.demo.run import write_demo_setup

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
    assert r.returncode == cli.EXIT_CONFIG
    lines = r.stderr.splitlines()
    assert len(lines) == 2
    assert any("relay.batch_size" in line for line in lines)
    assert any("relay.workres" in line and "unknown key" in line for line in lines)
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[relay\n")
    r = edge_relay("check-config", str(syntax))
    assert r.returncode == cli.EXIT_CONFIG and len(r.stderr.splitlines()) == 1
    assert r.stderr.count(str(syntax)) == 1


def test_check_config_keys_refuses_world_readable_key(tmp_path):
    path, _ = write_demo_setup(str(tmp_path / "d"))
    key = tmp_path / "d" / "keys" / "1.key"
    os.chmod(key, 0o644)
    r = edge_relay("check-config", "--keys", path)
    assert r.returncode == cli.EXIT_CONFIG and str(key) in r.stderr and len(r.stderr.splitlines()) == 1
    # the key directory exists, so a plain check-config (what Ansible's validate: runs) loads it too
    r = edge_relay("check-config", path)
    assert r.returncode == cli.EXIT_CONFIG and str(key) in r.stderr and len(r.stderr.splitlines()) == 1
    r = edge_relay("check-config", "--no-keys", path)
    assert r.returncode == 0 and "keys not checked: --no-keys" in r.stdout


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
    assert r.returncode == cli.EXIT_CONFIG
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


# -- exit codes, --version, defaults (issue 13, item 7) --------------------------------

def test_dash_dash_version():
    r = edge_relay("--version", check=True)
    assert r.stdout.strip() == edge_relay("version", check=True).stdout.strip()


def test_config_errors_exit_78_and_the_unit_does_not_restart_into_them(tmp_path):
    assert cli.EXIT_CONFIG == 78 and cli.EXIT_SOFTWARE == 70
    path, _ = write_demo_setup(str(tmp_path / "d"))
    with open(path, "a") as f:
        f.write("\n[limits]\nidle_timeout = -1\n")
    r = edge_relay("run", "--config", path, timeout=30)
    assert r.returncode == 78 and len(r.stderr.splitlines()) == 1 and "limits.idle_timeout" in r.stderr
    unit = open(os.path.join(ROOT, "systemd", "edge-relay.service")).read()
    assert re.search(r"(?m)^RestartPreventExitStatus=78$", unit)


def test_a_crash_exits_70_with_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(cli, "cmd_version", boom)
    assert cli.main(["version"]) == cli.EXIT_SOFTWARE
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: boom" in err and "internal error" in err


def test_check_config_defaults_to_the_installed_path():
    r = edge_relay("check-config")
    assert cli.DEFAULT_CONFIG == "/etc/edge-relay/edge-relay.toml"
    if not os.path.exists(cli.DEFAULT_CONFIG):
        assert r.returncode == cli.EXIT_CONFIG
        assert r.stderr.startswith(f"{cli.DEFAULT_CONFIG}: cannot read")
    else:
        assert cli.DEFAULT_CONFIG in r.stdout + r.stderr


def test_check_config_warns_about_management_on_every_address(tmp_path):
    path, _ = write_demo_setup(str(tmp_path / "d"))
    text = open(path).read()
    assert "[management]" in text
    with open(path, "w") as f:
        f.write(re.sub(r"(\[management\]\naddress = )\"[^\"]*\"", r'\1"0.0.0.0"', text))
    r = edge_relay("check-config", path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"{path}: management.address: warning: 0.0.0.0 serves /metrics and "
                                     "/healthz on every address of this host; bind a management network "
                                     "address or 127.0.0.1 unless a firewall guards it"]


def test_keygen_defaults_to_the_service_group(tmp_path, monkeypatch, capsys):
    import grp
    gid = 4242 if os.geteuid() == 0 else os.getgid()
    monkeypatch.setattr(grp, "getgrnam", lambda name: grp.struct_group((name, "x", gid, []))
                        if name == "edge-relay" else (_ for _ in ()).throw(KeyError(name)))
    assert cli.main(["keygen", "--dir", str(tmp_path / "k")]) == 0
    path = capsys.readouterr().out.strip()
    assert os.stat(path).st_gid == gid and stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert cli.main(["keygen", "--dir", str(tmp_path / "k"), "--group", ""]) == 0   # '' = no group
    assert os.stat(capsys.readouterr().out.strip()).st_gid == os.getegid()


def test_keygen_without_the_service_group_says_so(tmp_path, monkeypatch, capsys):
    import grp
    monkeypatch.setattr(grp, "getgrnam", lambda name: (_ for _ in ()).throw(KeyError(name)))
    assert cli.main(["keygen", "--dir", str(tmp_path / "k")]) == 0
    err = capsys.readouterr().err
    assert "no group 'edge-relay'" in err and "--group" in err and len(err.splitlines()) == 1


def test_check_config_by_a_user_who_cannot_read_the_keys_says_so(tmp_path, monkeypatch, capsys):
    path, _ = write_demo_setup(str(tmp_path / "d"))
    key_dir = str(tmp_path / "d" / "keys")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == key_dir else real_access(p, mode))
    assert cli.main(["check-config", path]) == 0
    assert f"keys not checked: cannot read {key_dir}" in capsys.readouterr().out
    assert cli.main(["check-config", "--keys", path]) == 0     # root can read them after all
    assert "keys ok" in capsys.readouterr().out
