"""reexec.py without a relay: the preflight verdict, the state handed across execve, the fallbacks."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from edge_relay import reexec, sdnotify
from relayproc import ROOT


def test_a_preflight_passes_only_with_its_mark_and_a_readable_answer():
    ok, reason, doc = reexec.judge(b"warning: x\n" + reexec.PREFLIGHT_MARK.encode() +
                                   b'{"reads": [1], "structure": [], "version": "9"}\n')
    assert ok and reason == "" and doc["version"] == "9"
    # an ImportError's traceback: the last line is the reason
    ok, reason, doc = reexec.judge(b"Traceback (most recent call last):\n  ...\nImportError: broken on purpose\n")
    assert not ok and doc is None and reason.endswith("ImportError: broken on purpose")
    # an older version that knows no --preflight: argparse's usage error
    ok, reason, _ = reexec.judge(b"usage: edge-relay [-h]\n"
                                 b"edge-relay: error: unrecognized arguments: --preflight\n")
    assert not ok and "unrecognized arguments: --preflight" in reason
    assert reexec.judge(b"") == (False, "the new code's preflight exited without a word", None)
    ok, reason, _ = reexec.judge(reexec.PREFLIGHT_MARK.encode() + b"{not json\n")
    assert not ok and "unreadable" in reason


def test_the_new_code_must_read_this_state_and_keep_the_socket_layout():
    layout = ((("0.0.0.0", 3478),), "0.0.0.0", 4478, 2)
    doc = {"reads": [reexec.STATE_VERSION], "structure": reexec.structure_doc(layout), "version": "9"}
    assert reexec.accepts(doc, layout) == ""
    assert "cannot read this version's handover state" in reexec.accepts(dict(doc, reads=[99]), layout)
    other = ((("0.0.0.0", 3478),), "0.0.0.0", 4478, 3)
    assert "reload it first" in reexec.accepts(doc, other)


def test_exec_argv_is_this_interpreter_with_its_original_arguments():
    argv = reexec.exec_argv()
    assert argv[0] == sys.executable and os.path.isabs(argv[0])
    assert argv[1:] == sys.orig_argv[1:]


def test_take_without_a_handover_is_none_and_a_bad_one_is_a_handover_error():
    assert reexec.take({}) is None
    with pytest.raises(reexec.HandoverError, match="not an fd number"):
        reexec.take({reexec.ENV_STATE: "x"})
    fd = sdnotify.memfd_write("t", b"[1, 2]")
    env = {reexec.ENV_STATE: str(fd)}
    with pytest.raises(reexec.HandoverError, match="not a JSON object"):
        reexec.take(env)
    assert reexec.ENV_STATE not in env           # no child ever sees it
    with pytest.raises(OSError):
        os.fstat(fd)                             # consumed
    fd = sdnotify.memfd_write("t", json.dumps({"version": 999}).encode())
    with pytest.raises(reexec.HandoverError, match="state version 999"):
        reexec.take({reexec.ENV_STATE: str(fd)})


def test_claim_refuses_what_is_not_an_open_inherited_fd():
    with pytest.raises(reexec.HandoverError, match="not an inherited fd"):
        reexec.claim(1, "stdout")
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(reexec.HandoverError, match="not open"):
        reexec.claim(w, "gone")
    os.set_inheritable(r, True)
    assert reexec.claim(r, "pipe") == r and not os.get_inheritable(r)
    os.close(r)


EXEC_TARGET = """
import json, os, signal, socket, sys
from edge_relay import reexec
state = reexec.take(os.environ)
blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
sock = reexec.claim_socket(state["sock"], "sock")
print(json.dumps({"state": state, "blocked": blocked, "addr": list(sock.getsockname()),
                  "env": reexec.ENV_STATE in os.environ, "stray": reexec.stray_fds()}))
"""


def test_execute_hands_the_state_and_the_named_fds_to_the_new_image_with_signals_held():
    """The same process (pid) runs the new program; it reads the state, owns the socket, and the
    signals the supervisor handles stay blocked until it unblocks them (none may kill it meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    foreign = reexec.stray_fds()     # whatever the test runner itself inherited
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(w, 1)
            os.environ["PYTHONPATH"] = ROOT
            state = {"version": 1, "sock": sock.fileno(), "pid": os.getpid()}
            reexec.execute([sys.executable, "-c", EXEC_TARGET], state, [sock.fileno()], os.environ)
        finally:
            os._exit(70)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    doc = json.loads(out)
    assert doc["state"]["pid"] == pid            # the same process, a new image
    assert doc["addr"] == list(sock.getsockname())
    assert not doc["env"]
    assert doc["stray"] == foreign               # the socket is claimed (close-on-exec again); nothing else leaked
    assert set(doc["blocked"]) >= {int(s) for s in reexec.HANDLED}
    sock.close()


def test_a_failed_execve_undoes_everything():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    foreign = reexec.stray_fds()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(OSError):
        reexec.execute(["/nonexistent/python3"], {"version": 1}, [sock.fileno()], {})
    assert not os.get_inheritable(sock.fileno())
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert reexec.stray_fds() == foreign
    sock.close()


def test_preflight_of_this_tree_reports_its_version_and_layout(tmp_path):
    from relayproc import Setup
    setup = Setup(tmp_path, workers=2)
    try:
        out = subprocess.run([sys.executable, "-m", "edge_relay", "run", "--config", setup.path, "--preflight"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT))
        ok, reason, doc = reexec.judge((out.stdout + out.stderr).encode())
        assert ok, reason
        import edge_relay
        assert doc["version"] == edge_relay.__version__ and reexec.STATE_VERSION in doc["reads"]
        assert doc["structure"] == [[["127.0.0.1", setup.ports["public_port"]]], "127.0.0.1",
                                    setup.ports["internal_port"], 2]
        # a key the config names but that is missing: refused with the loader's reason
        setup.write(signing_key_id=7)
        out = subprocess.run([sys.executable, "-m", "edge_relay", "run", "--config", setup.path, "--preflight"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT))
        ok, reason, _ = reexec.judge((out.stdout + out.stderr).encode())
        assert out.returncode == 78 and not ok and "7" in reason, reason
    finally:
        setup.tx_sock.close()
