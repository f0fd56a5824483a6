"""Config files that cannot kill the relay (issue 13, item 1).

Thousands of files made in-test from the shipped example by mutation (deep
nesting, huge strings, a wrong type at every key, binary junk, truncations,
byte flips) plus the pathological non-files (a FIFO, /dev/zero, a directory,
a huge sparse file) go through `config.load`, the loader `check-config`,
`run` and every reload use. The only outcomes allowed are a Config or the
project's ConfigError: one "key: problem" line per problem, printable, short.
A smaller corpus of files the loader refuses then goes through a running
relay's SIGHUP path: afterwards it still forwards a call, and its metrics
show the first config generation and one refused reload per file.
"""

import os
import pathlib
import random
import re
import signal
import subprocess
import sys

import pytest

from edge_relay import cli, config
from edge_relay.errors import ConfigError
from relayproc import ROOT, Relay, Setup, Transceiver, carries_a_call, http_get, metrics, value
from waiting import wait_for

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "packaging" / "edge-relay.toml"
SEED = 20261202

# A value of every TOML type, and the spellings that are near a type's edge.
WRONG = ["true", "false", '"text"', '""', "0", "-1", "1.5", "-0.0", "nan", "inf", "-inf",
         "9223372036854775807", "-9223372036854775808", "1e308", "[]", "[1, 2]", '["a", 1]', "{}",
         '{ a = 1 }', "1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", '"' + "x" * 5000 + '"',
         '"\\u0000\\n\\u2028"', "'''multi\nline'''", "[[[[]]]]"]
KEY_LINE = re.compile(r"(?m)^#?(\w+) = (.*)$")
PROBLEM = re.compile(r"^\S.*?: \S")


def _nested(depth, rng):
    if rng.random() < 0.5:
        return "[" * depth + "1" + "]" * depth
    return "{a=" * depth + "1" + "}" * depth


def corpus(base, rng, random_cases=2000):
    """[(name, content)] where content is bytes, or one of "fifo", "devzero", "directory", "sparse"."""
    out = [("fifo", "fifo"), ("devzero", "devzero"), ("directory", "directory"), ("sparse", "sparse"),
           ("empty", b""), ("bom", b"\xef\xbb\xbf" + base.encode()), ("utf16", base.encode("utf-16")),
           ("one-mib-plus-one", b"#" * config.MAX_CONFIG_BYTES + b"\n"),
           ("digits", f"[relay]\nworkers = {'9' * 5000}\n".encode())]
    lines = list(KEY_LINE.finditer(base))
    # a wrong type at every key (commented defaults uncommented), in place
    for m in lines:
        for wrong in WRONG:
            text = base[:m.start()] + f"{m[1]} = {wrong}" + base[m.end():]
            out.append((f"wrong:{m[1]}={wrong[:20]}", text.encode()))
    # deep nesting at every key, at depths around Python's recursion limit
    for i, m in enumerate(lines):
        depth = (10, 200, 990, 1000, 3000, 5000, 20000)[i % 7]
        text = base[:m.start()] + f"{m[1]} = {_nested(depth, rng)}" + base[m.end():]
        out.append((f"nested:{m[1]}:{depth}", text.encode()))
    raw = base.encode()
    for case in range(random_cases):
        kind = case % 6
        if kind == 0:                                   # truncation
            data = raw[:rng.randrange(len(raw))]
        elif kind == 1:                                 # binary junk inserted
            at = rng.randrange(len(raw))
            data = raw[:at] + rng.randbytes(rng.randrange(1, 64)) + raw[at:]
        elif kind == 2:                                 # byte flips
            data = bytearray(raw)
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        elif kind == 3:                                 # huge string at a random key
            m = rng.choice(lines)
            size = rng.choice((1000, 100_000, 900_000, config.MAX_CONFIG_BYTES + 10))
            data = (base[:m.start()] + f'{m[1]} = "{"y" * size}"' + base[m.end():]).encode()
        elif kind == 4:                                 # pure junk
            data = rng.randbytes(rng.randrange(1, 4096))
        else:                                           # several lines swapped for wrong values
            text = base
            for _ in range(rng.randrange(1, 6)):
                found = list(KEY_LINE.finditer(text))
                m = rng.choice(found)
                text = text[:m.start()] + f"{m[1]} = {rng.choice(WRONG + [_nested(rng.randrange(1, 3000), rng)])}" \
                    + text[m.end():]
            data = text.encode()
        out.append((f"random:{case}", data))
    return out


def place(path, content):
    """Put `content` at `path`, replacing whatever is there (file, FIFO, symlink, directory)."""
    path = pathlib.Path(path)
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    if content == "fifo":
        os.mkfifo(path)
    elif content == "devzero":
        path.symlink_to("/dev/zero")
    elif content == "directory":
        path.mkdir()
    elif content == "sparse":
        with open(path, "wb") as f:
            f.truncate(64 * 1024 * 1024)
    else:
        path.write_bytes(content)


def assert_one_line_problems(err, where):
    lines = str(err).splitlines()     # splits on \u2028 and friends too: none may hide inside
    assert lines and len(lines) == len(err.problems), (where, str(err)[:500])
    for line, (key, problem) in zip(lines, err.problems):
        assert line == f"{key}: {problem}", where
        assert key.isprintable() and problem.isprintable(), (where, line[:300])
        assert PROBLEM.match(line) and len(line) < 600, (where, line[:300])


def test_every_mutated_or_pathological_file_is_a_config_or_one_line_errors(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "edge-relay.toml"
    outcomes = {"config": 0, "error": 0}
    kinds = {"nested": 0, "file": 0}
    for name, content in corpus(EXAMPLE.read_text(), rng):
        place(path, content)
        try:
            cfg = config.load(path)
        except ConfigError as err:
            outcomes["error"] += 1
            assert_one_line_problems(err, name)
            if "nested too deeply" in str(err):
                kinds["nested"] += 1
            if err.problems[0][0] == str(path):
                kinds["file"] += 1
        else:
            outcomes["config"] += 1
            assert isinstance(cfg, config.Config) and cfg.listeners and cfg.transceivers, name
    # every shape was met: valid results, refusals, nesting past the recursion limit, file-level ones
    assert outcomes["config"] > 50 and outcomes["error"] > 2000, outcomes
    assert kinds["nested"] > 20 and kinds["file"] > 500, kinds


@pytest.mark.parametrize("content,fragment", [
    ("fifo", "not a regular file (a FIFO)"),
    ("devzero", "not a regular file (a character device)"),
    ("directory", "not a regular file (a directory)"),
    ("sparse", "larger than the 1048576 bytes"),
    (b"max_flows = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b"[relay]\nworkers = " + b"9" * 5000, "TOML value refused"),
    (b"\xff\xfe junk", "not UTF-8"),
], ids=["fifo", "devzero", "directory", "huge", "nested", "digits", "binary"])
def test_check_config_names_the_file_in_one_line_and_exits_78(tmp_path, content, fragment):
    """What `check-config` and `run` print, as processes: one line naming the file, EX_CONFIG, never a hang."""
    path = tmp_path / "edge-relay.toml"
    place(path, content)
    for args in (["check-config", str(path)], ["run", "--config", str(path)]):
        r = subprocess.run([sys.executable, "-m", "edge_relay", *args], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
        assert r.returncode == cli.EXIT_CONFIG, (args, r.stderr[-2000:])
        assert len(r.stderr.splitlines()) == 1 and str(path) in r.stderr and fragment in r.stderr, r.stderr


@pytest.mark.slow
def test_a_running_relay_survives_a_corpus_of_broken_reloads(tmp_path):
    """40 refused files through SIGHUP: the relay keeps generation 1 and still forwards a call."""
    rng = random.Random(SEED + 1)
    setup = Setup(tmp_path / "r", workers=2)
    base = pathlib.Path(setup.path).read_text()
    candidates = corpus(base, rng, random_cases=300)
    special = [c for c in candidates if not isinstance(c[1], bytes) or c[0] in ("digits", "utf16")]
    nested = [c for c in candidates if c[0].startswith("nested:") and c[0].endswith((":5000", ":20000"))]
    others = [c for c in candidates if c not in special and c not in nested]
    rng.shuffle(others)
    scratch = tmp_path / "probe.toml"
    chosen = special + nested[:6]
    for name, content in others:
        if len(chosen) >= 40:
            break
        place(scratch, content)
        try:
            config.load(scratch)
        except ConfigError:
            chosen.append((name, content))
    assert len(chosen) == 40
    good = pathlib.Path(setup.path).read_bytes()
    relay = Relay(setup)
    tx = Transceiver(setup.keyring, setup.tx_sock)
    try:
        relay.wait_serving()
        for n, (name, content) in enumerate(chosen, 1):
            place(setup.path, content)
            relay.signal(signal.SIGHUP)
            wait_for(lambda: relay.proc.poll() is not None
                     or value(metrics(setup), "edge_relay_reload_failures_total") >= n,
                     10, what=f"reload {n} ({name}) refused")
            assert relay.proc.poll() is None, (name, relay.log()[-3000:])
        place(setup.path, good)
        m = metrics(setup)
        assert value(m, "edge_relay_reload_failures_total") == len(chosen)
        assert value(m, "edge_relay_reloads_total") == 0
        assert value(m, "edge_relay_config_generation") == 1
        assert value(m, "edge_relay_workers_up") == 2
        assert carries_a_call(setup, tx)
        assert http_get(setup.url + "/healthz")[0] == 200
        refused = [line for line in relay.log().splitlines() if "reload refused" in line
                   and "[w" not in line.split(":")[0]]
        assert len(refused) == len(chosen), refused[-5:]
        assert "Traceback" not in relay.log()
    finally:
        relay.kill()
        setup.tx_sock.close()
