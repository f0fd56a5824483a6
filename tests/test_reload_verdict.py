"""Issue 13 (part B) against a real relay: reload verdicts, readiness vs liveness, the accepted ruleset.

  - `edge-relay reload` (systemd's ExecReload=) exits non-zero with the relay's
    own reason when it refuses a config, and 0 only once every worker runs
    the new generation; /status and /metrics say the same.
  - /readyz (and edge_relay_ready) is 503 when every transceiver is down,
    while /livez and /healthz stay 200; 200 again once one answers.
  - `render-nft` refuses what `check-config --keys` refuses, and the ruleset
    the relay writes to $RUNTIME_DIRECTORY only ever comes from a config it
    accepted.
"""

import json
import os
import subprocess
import sys

import pytest

from edge_relay import cli, keys
from relayproc import ROOT, Setup, Traffic, Transceiver, clients_for, http_get, metrics, value
from waiting import wait_for

pytestmark = pytest.mark.slow


def edge_relay(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "edge_relay", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def status(setup):
    code, body = http_get(setup.url + "/status")
    assert code == 200, (code, body)
    return json.loads(body)


@pytest.fixture
def relay(start_relay, tmp_path):
    """start(sections=..) -> (setup, relay, run): start_relay's, with $RUNTIME_DIRECTORY = run."""
    runs = []

    def start(sections=None, workers=2):
        run = tmp_path / f"run{len(runs)}"
        run.mkdir()
        runs.append(run)
        setup, r = start_relay(workers=workers, sections=sections, env=dict(os.environ, RUNTIME_DIRECTORY=str(run)))
        return setup, r, run
    return start


def test_a_refused_reload_fails_the_command_and_the_old_generation_keeps_serving(relay):
    setup, r, run = relay()
    tx = Transceiver(setup.keyring, setup.tx_sock)
    # the reproduction: signing key 7 with only key 1 present passes a check without keys
    # (check-config itself now loads them and refuses); the running relay must refuse it too
    setup.write(signing_key_id=7)
    assert edge_relay("check-config", "--no-keys", setup.path).returncode == 0
    assert edge_relay("check-config", setup.path).returncode == 78
    out = edge_relay("reload", "--config", setup.path)
    assert out.returncode == 1, out
    assert "refused" in out.stderr and "7" in out.stderr, out.stderr
    assert "generation 1 keeps serving" in out.stderr
    st = status(setup)
    assert st["generation"] == 1 and st["workers_generation"] == 1
    assert st["last_reload"]["state"] == "refused" and "7" in st["last_reload"]["reason"]
    m = metrics(setup)
    assert value(m, "edge_relay_reload_failures_total") == 1
    assert value(m, "edge_relay_last_reload_successful") == 0
    assert value(m, "edge_relay_config_generation") == 1
    # the old generation still routes new calls
    clients = clients_for(setup, 2)
    traffic = Traffic(clients, tx)
    try:
        assert traffic.run(10, until=lambda: all(c.connected for c in clients))
    finally:
        traffic.close()
    # a good config: 0 only once every worker publishes generation 2
    keys.write_key_file(setup.key_dir, 7)
    before = status(setup)["config"]["sha256"]
    out = edge_relay("reload", "--url", setup.url + "/status")
    assert out.returncode == 0, out
    assert "generation 2 accepted" in out.stdout
    st = status(setup)
    assert st["generation"] == 2 and st["workers_generation"] == 2 and st["last_reload"]["state"] == "ok"
    assert st["config"]["sha256"] != before
    import hashlib
    with open(setup.path, "rb") as f:
        assert st["config"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    m = metrics(setup)
    assert value(m, "edge_relay_last_reload_successful") == 1
    assert value(m, "edge_relay_workers_config_generation") == 2
    assert value(m, "edge_relay_reloads_total") == 1


def test_a_syntax_error_is_refused_with_the_relays_reason(relay):
    setup, r, run = relay(workers=1)
    with open(setup.path, "a") as f:
        f.write("\n[[[ not toml\n")
    out = edge_relay("reload", "--url", setup.url + "/status", "--pid", str(r.pid))
    assert out.returncode == 1 and "TOML syntax error" in out.stderr, out


def test_readyz_is_503_with_every_transceiver_down_and_200_once_one_answers(relay):
    probes = {"probes": {"enabled": True, "interval": 0.05, "timeout": 0.05, "down_after": 2, "up_after": 1}}
    setup, r, run = relay(sections=probes)
    # nobody answers the probes: every transceiver goes down
    assert wait_for(lambda: http_get(setup.url + "/readyz")[0] == 503, 20, what="/readyz 503")
    assert "every transceiver is down" in http_get(setup.url + "/readyz")[1]
    assert http_get(setup.url + "/livez") == (200, "alive\n")
    assert http_get(setup.url + "/healthz") == (200, "ok\n")
    assert value(metrics(setup), "edge_relay_ready") == 0
    assert status(setup)["ready"] is False
    # the transceiver comes up and answers: ready again
    tx = Transceiver(setup.keyring, setup.tx_sock)
    traffic = Traffic([], tx)
    try:
        assert traffic.run(20, until=lambda: http_get(setup.url + "/readyz")[0] == 200)
    finally:
        traffic.close()
    assert value(metrics(setup), "edge_relay_ready") == 1


def test_render_nft_refuses_what_check_config_keys_refuses(tmp_path, capsys):
    setup = Setup(tmp_path, workers=1)
    try:
        assert cli.main(["render-nft", setup.path]) == 0
        setup.write(signing_key_id=7)
        capsys.readouterr()
        assert cli.main(["check-config", "--keys", setup.path]) != 0
        assert cli.main(["render-nft", setup.path]) != 0
        out = capsys.readouterr()
        assert "table inet" not in out.out
        assert "7" in out.err
    finally:
        setup.tx_sock.close()


def test_the_ruleset_written_is_only_ever_an_accepted_configs(relay):
    setup, r, run = relay(workers=1)
    ruleset = run / "edge-relay.nft"
    first = wait_for(lambda: ruleset.exists() and ruleset.read_text(), 10, what="ruleset at start")
    assert "table inet edge_relay" in first and "500/second" in first
    # a refused config with other meters: the file does not change
    setup.sections["nftables"] = {"source_pps": 321}
    setup.write(signing_key_id=7)
    assert edge_relay("reload", "--url", setup.url + "/status").returncode == 1
    assert ruleset.read_text() == first
    assert edge_relay("render-nft", setup.path).returncode == 78
    # accepted: now it follows
    setup.write()
    assert edge_relay("reload", "--url", setup.url + "/status").returncode == 0
    assert "321/second" in ruleset.read_text()


def test_a_reload_that_changes_the_workers_is_ok_once_the_new_workers_run_it(relay):
    setup, r, run = relay(workers=2)
    setup.workers = 1
    setup.write()
    out = edge_relay("reload", "--url", setup.url + "/status")
    assert out.returncode == 0, out
    st = status(setup)
    assert st["workers"] == 1 and st["workers_up"] == 1
    assert st["generation"] == 2 == st["workers_generation"] and st["last_reload"]["state"] == "ok"


def test_reload_without_a_management_endpoint_says_so_and_signals_nothing(tmp_path):
    setup = Setup(tmp_path, workers=1)
    try:
        with open(setup.path) as f:
            text = f.read()
        with open(setup.path, "w") as f:
            f.write(text.replace(f"port = {setup.ports['management_port']}", "port = 0"))
        out = edge_relay("reload", "--config", setup.path, "--pid", str(os.getpid()))
        assert out.returncode == 1 and "management.port is 0" in out.stderr, out
    finally:
        setup.tx_sock.close()


def test_reload_refuses_to_signal_a_pid_that_is_not_the_one_answering(relay):
    setup, r, run = relay(workers=1)
    out = edge_relay("reload", "--url", setup.url + "/status", "--pid", str(os.getpid()))
    assert out.returncode == 1 and f"served by pid {r.pid}" in out.stderr, out
    assert status(setup)["last_reload"]["state"] == "none"
