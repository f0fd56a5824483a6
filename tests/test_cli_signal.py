"""The operator commands that signal a running relay (reload, upgrade, drain): what they do before any signal.

A fake /status server stands in for the relay, and a sleeping child process
for its pid, so each refusal is shown to send nothing: the child is still
running (SIGHUP and SIGUSR2 would end it, SIGTTOU and SIGTTIN stop it).
"""

import http.server
import json
import subprocess
import sys
import threading

import pytest

from edge_relay import cli


@pytest.fixture
def target():
    """A child process that stands for the relay: signals it receives are visible in its state."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def status_server():
    """A /status endpoint serving whatever document the test puts in `docs[0]`."""
    docs = [{}]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(docs[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/status", docs
    server.shutdown()
    server.server_close()


def untouched(proc):
    """The child got no signal: still running, not stopped."""
    with open(f"/proc/{proc.pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    return proc.poll() is None and state in ("S", "R")


@pytest.mark.parametrize("command", [["reload"], ["upgrade"], ["drain"], ["drain", "--cancel"]])
def test_a_pid_other_than_the_one_serving_status_is_refused_and_nothing_is_sent(
        command, target, status_server, capsys):
    url, docs = status_server
    docs[0] = {"pid": target.pid + 1000000, "last_reload": {}, "last_upgrade": {}}
    code = cli.main(command + ["--url", url, "--pid", str(target.pid), "--timeout", "0.2"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and f"is served by pid {target.pid + 1000000}, not {target.pid}" in err, err
    assert err.startswith("edge-relay " + " ".join(command) + ":"), err
    assert untouched(target)


def test_upgrade_of_a_relay_that_predates_it_exits_3_and_sends_nothing(target, status_server, capsys):
    url, docs = status_server
    docs[0] = {"pid": target.pid, "version": "0.1.0"}          # no last_upgrade: it cannot re-exec
    code = cli.main(["upgrade", "--url", url, "--timeout", "0.2"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_UNSUPPORTED and "runs edge-relay 0.1.0" in err and "nothing was sent" in err, err
    assert untouched(target)


@pytest.mark.parametrize("command, hint, code", [
    (["reload"], "systemctl kill -s HUP edge-relay", cli.EXIT_ERROR),
    (["upgrade"], "systemctl kill -s USR2 edge-relay", cli.EXIT_UNSUPPORTED),
    (["drain"], "-s SIGTTOU edge-relay", cli.EXIT_ERROR),
    (["drain", "--cancel"], "-s SIGTTIN edge-relay", cli.EXIT_ERROR),
])
def test_without_a_management_endpoint_each_command_names_the_signal_to_send_instead(
        command, hint, code, tmp_path, capsys):
    path = tmp_path / "relay.toml"
    path.write_text("[management]\nport = 0\n")
    assert cli.main(command + ["--config", str(path)]) == code
    err = capsys.readouterr().err
    assert "management.port is 0" in err and hint in err, err


def test_a_signal_the_kernel_refuses_is_one_line_naming_the_pid(status_server, capsys):
    url, docs = status_server
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                   # a pid nobody has (for now): os.kill fails with ESRCH
    docs[0] = {"pid": dead.pid, "drain": {}}
    assert cli.main(["drain", "--url", url, "--timeout", "0.2"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"edge-relay drain: pid {dead.pid}: ") and err.count("\n") == 1, err
