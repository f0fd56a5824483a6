"""The journal logger: priority prefixes, level filter, per-kind rate limit, never raising."""

import io
import sys

import pytest

from edge_relay import log as logmod
from edge_relay.log import LEVELS, Log


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def make(**kw):
    out = io.StringIO()
    kw.setdefault("clock", Clock())
    return Log(stream=out, **kw), out


def lines(out):
    return out.getvalue().splitlines()


def test_levels_match_sd_daemon():
    assert LEVELS == {"err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


def test_prefix_per_level():
    log, out = make(level="debug")
    log.err("a", "disk on fire")
    log.warning("b", "key %s expires in %d days", "k1", 3)
    log.notice("c", "reloaded")
    log.info("d", "%d workers", 8)
    log.debug("e", "tick")
    assert out.getvalue() == (
        "<3>edge-relay: disk on fire\n"
        "<4>edge-relay: key k1 expires in 3 days\n"
        "<5>edge-relay: reloaded\n"
        "<6>edge-relay: 8 workers\n"
        "<7>edge-relay: tick\n"
    )


def test_name_is_the_line_tag():
    log, out = make(name="worker 3")
    log.info("k", "up")
    log2, out2 = make(name="")
    log2.info("k", "up")
    assert lines(out) == ["<6>worker 3: up"]
    assert lines(out2) == ["<6>up"]


def test_default_level_is_info():
    log, out = make()
    log.debug("k", "hidden")
    log.info("k", "shown")
    assert lines(out) == ["<6>edge-relay: shown"]


def test_level_filter_and_set_level():
    log, out = make(level="warning")
    log.err("k", "e")
    log.warning("k", "w")
    log.notice("k", "n")
    log.info("k", "i")
    log.debug("k", "d")
    assert [line[:3] for line in lines(out)] == ["<3>", "<4>"]
    log.set_level("debug")
    log.debug("k", "d")
    log.set_level(3)
    log.warning("k", "w")
    assert [line[:3] for line in lines(out)] == ["<3>", "<4>", "<7>"]


@pytest.mark.parametrize("bad", ["verbose", "ERR", "warn", 2, 8, None, True])
def test_bad_level_is_rejected(bad):
    with pytest.raises(ValueError):
        Log(level=bad)
    with pytest.raises(ValueError):
        Log().set_level(bad)


def test_filtered_messages_do_not_use_the_burst():
    log, out = make(level="info", burst=2)
    for _ in range(10):
        log.debug("k", "noise")
    log.info("k", "one")
    log.info("k", "two")
    assert lines(out) == ["<6>edge-relay: one", "<6>edge-relay: two"]


def test_rate_limit_burst_then_summary_when_window_reopens():
    clock = Clock()
    log, out = make(clock=clock, burst=3, interval=10.0)
    for i in range(10):
        log.warning("drop.bad-mac", "bad mac from %s", i)
    assert lines(out) == [f"<4>edge-relay: bad mac from {i}" for i in range(3)]
    clock.now += 9.999
    log.warning("drop.bad-mac", "still inside the window")
    assert len(lines(out)) == 3
    clock.now += 0.001
    log.warning("drop.bad-mac", "window reopened")
    assert lines(out)[3:] == [
        "<4>edge-relay: drop.bad-mac: 8 similar messages suppressed",
        "<4>edge-relay: window reopened",
    ]
    # The new window has its own burst, counted from the reopening message.
    for i in range(5):
        log.warning("drop.bad-mac", "again %d", i)
    assert lines(out)[5:] == ["<4>edge-relay: again 0", "<4>edge-relay: again 1"]


def test_no_summary_when_nothing_was_suppressed():
    clock = Clock()
    log, out = make(clock=clock, burst=3, interval=10.0)
    log.info("k", "a")
    clock.now += 60
    log.info("k", "b")
    assert lines(out) == ["<6>edge-relay: a", "<6>edge-relay: b"]


def test_flood_is_bounded_per_interval():
    clock = Clock()
    log, out = make(clock=clock, burst=5, interval=10.0)
    for step in range(1000):          # 100 s of one message every 0.1 s
        clock.now = 1000.0 + step / 10
        log.err("flood", "x")
    # burst lines per 10 s window, plus one summary per reopened window.
    assert len(lines(out)) <= 10 * 5 + 9
    assert sum("similar messages suppressed" in line for line in lines(out)) == 9


def test_kinds_are_independent():
    log, out = make(burst=2)
    for _ in range(50):
        log.warning("flood", "f")
    log.info("other", "still heard")
    log.err("third", "also heard")
    assert lines(out) == [
        "<4>edge-relay: f", "<4>edge-relay: f",
        "<6>edge-relay: still heard", "<3>edge-relay: also heard",
    ]


def test_summary_uses_the_most_severe_suppressed_priority():
    clock = Clock()
    log, out = make(clock=clock, burst=1, interval=1.0)
    log.info("k", "first")
    log.info("k", "x")
    log.err("k", "y")
    log.warning("k", "z")
    clock.now += 1
    log.info("k", "next")
    assert lines(out)[1:] == ["<3>edge-relay: k: 3 similar messages suppressed", "<6>edge-relay: next"]


def test_flush_reports_a_flood_that_stopped():
    clock = Clock()
    log, out = make(clock=clock, burst=1, interval=10.0)
    log.warning("k", "a")
    log.warning("k", "b")
    log.flush()
    assert len(lines(out)) == 1       # window still open: nothing to report yet
    clock.now += 10
    log.flush()
    log.flush()
    assert lines(out)[1:] == ["<4>edge-relay: k: 1 similar messages suppressed"]


def test_table_of_kinds_is_bounded(monkeypatch):
    monkeypatch.setattr(logmod, "MAX_KINDS", 4)
    clock = Clock()
    log, out = make(clock=clock, burst=1, interval=10.0)
    for i in range(20):
        log.info(f"kind-{i}", "m%d", i)
    assert len(log._windows) <= 5
    # The four first kinds got their line; the rest share one overflow kind.
    assert lines(out) == [f"<6>edge-relay: m{i}" for i in range(5)]
    clock.now += 10
    log.info("late", "after the windows closed")
    assert "log.too-many-kinds: 15 similar messages suppressed" in out.getvalue()
    assert lines(out)[-1] == "<6>edge-relay: after the windows closed"
    assert len(log._windows) <= 4


def test_newlines_and_controls_are_flattened():
    log, out = make()
    log.info("k", "first\nsecond\r\nthird %s", "in\narg")
    log.info("k", "esc \x1b[31mred\x00 nel\x85 ls\u2028 tab\tok")
    assert lines(out) == [
        "<6>edge-relay: first\\nsecond\\r\\nthird in\\narg",
        "<6>edge-relay: esc \\x1b[31mred\\x00 nel\\x85 ls\\u2028 tab\tok",
    ]
    assert out.getvalue().count("\n") == 2


def test_long_message_is_truncated_to_one_line():
    log, out = make()
    log.info("k", "x" * 100_000)
    (line,) = lines(out)
    assert len(line) < logmod.MAX_TEXT + 100
    assert line.endswith("...[truncated]")


def test_percent_without_args_is_literal():
    log, out = make()
    log.info("k", "100% sure")
    assert lines(out) == ["<6>edge-relay: 100% sure"]


def test_bad_format_does_not_raise():
    class Evil:
        def __str__(self):
            raise RuntimeError("boom")

    log, out = make()
    log.info("k", "%d", "not a number")
    log.info("k", "%s %s", "one")
    log.info("k", "%s", Evil())
    assert len(lines(out)) == 3
    assert all("bad log call" in line for line in lines(out))


class Broken:
    def __init__(self, exc):
        self.exc = exc
        self.calls = 0

    def write(self, s):
        self.calls += 1
        raise self.exc

    def flush(self):
        raise self.exc


@pytest.mark.parametrize("exc", [OSError(5, "EIO"), BrokenPipeError(), ValueError("closed file")])
def test_broken_stream_never_raises(exc):
    stream = Broken(exc)
    log = Log(stream=stream, clock=Clock(), level="debug")
    log.err("k", "e")
    log.debug("k", "d")
    assert stream.calls == 2


def test_closed_stream_never_raises():
    stream = io.StringIO()
    stream.close()
    Log(stream=stream, clock=Clock()).err("k", "into the void")


def test_stderr_is_looked_up_at_call_time(monkeypatch):
    log = Log(clock=Clock())
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log.info("k", "one")
    monkeypatch.setattr(sys, "stderr", second)
    log.info("k", "two")
    monkeypatch.setattr(sys, "stderr", None)
    log.info("k", "three")
    assert first.getvalue() == "<6>edge-relay: one\n"
    assert second.getvalue() == "<6>edge-relay: two\n"


@pytest.mark.parametrize("kw", [{"burst": 0}, {"burst": 1.5}, {"interval": 0}, {"interval": -1}])
def test_bad_rate_limit_settings(kw):
    with pytest.raises(ValueError):
        Log(**kw)


# -- what the relay logs (issue 13, item 6) ----------------------------------------------

def test_verdicts_are_never_suppressed_but_still_filtered():
    log, out = make(burst=2)
    for i in range(6):
        log.err("reload", "same kind %d", i)
    for i in range(6):
        log.verdict("err", "reload refused, keeping the running config: reason %d", i)
    got = lines(out)
    assert [line for line in got if "reason" in line] == [
        f"<3>edge-relay: reload refused, keeping the running config: reason {i}" for i in range(6)]
    assert sum("same kind" in line for line in got) == 2
    log.set_level("err")
    log.verdict("notice", "config generation 2")
    assert "generation" not in out.getvalue()
    with pytest.raises(ValueError):
        log.verdict("loud", "x")


@pytest.mark.slow
def test_relay_logs_each_event_once_and_says_what_it_cannot_do(tmp_path):
    """Transceiver down: one line for 2 workers; capped socket buffers: one warning naming the key;
    an unreachable Redis directory: a warning."""
    import socket

    from relayproc import Relay, Setup, free_port
    from waiting import wait_for
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            rmem_max = int(f.read())
    except OSError:
        pytest.skip("no /proc/sys/net/core/rmem_max")
    closed = free_port(socket.SOCK_STREAM)           # nothing listens: the directory is unreachable
    asked = min(2 * rmem_max, 2**31 - 1)
    setup = Setup(tmp_path / "r", workers=2,
                  sections={"relay": {"recv_buffer_bytes": asked},
                            "probes": {"enabled": True, "interval": 0.05, "down_after": 2},
                            "directory": {"address": f"127.0.0.1:{closed}"}})
    relay = Relay(setup)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # the in-test transceiver never answers: both workers' probes find it down
        wait_for(lambda: relay.proc.poll() is not None or _transitions(setup) >= 2, 20,
                 what="both workers see tx1 down")
        assert relay.proc.poll() is None, relay.log()
        down = [line for line in relay.log().splitlines() if "transceiver tx1 is down" in line]
        assert len(down) == 1, down

        def lookup_and_check():
            client.sendto(b"\x80" + bytes(40), setup.public)     # RTP from a client with no flow: a lookup
            return "flow directory 127.0.0.1:%d unreachable" % closed in relay.log()
        wait_for(lookup_and_check, 20, interval=0.1, what="the directory warning")
        capped = [line for line in relay.log().splitlines() if "relay.recv_buffer_bytes" in line]
        assert len(capped) == 1 and f"= {asked}, but the kernel granted" in capped[0], capped
        assert "net.core.rmem_max" in capped[0] and capped[0].startswith("<4>edge-relay: ")
    finally:
        client.close()
        relay.kill()
        setup.tx_sock.close()


def _transitions(setup):
    """tx1's up/down changes summed over the workers; 0 until the relay publishes them."""
    from relayproc import http_get, parse_prometheus
    status, body = http_get(setup.url + "/metrics")
    if status != 200:
        return 0
    family = parse_prometheus(body).get("edge_relay_transceiver_transitions_total")
    return family["samples"].get((("transceiver", "tx1"),), 0) if family else 0


def test_a_send_the_kernel_refuses_is_said_not_only_counted(tmp_path):
    """Before, a refused send (EINVAL from a loopback source, ENETUNREACH) was only a send_failed
    count, and the operator saw nothing but 'transceiver down'."""
    from edge_relay import sockaddr
    from relayharness import Harness
    h = Harness(tmp_path, transceivers={1: "sink"})
    out = io.StringIO()
    h.worker.log = Log(stream=out, clock=Clock())
    try:
        # an IPv6 destination for the IPv4 internal socket: the kernel refuses every send to it
        h.router.transceivers[1] = sockaddr.from_tuple(("::1", h.tx_socks[1].getsockname()[1]))
        vc = h.voice_client()
        assert not h.connect(vc)
        assert h.drops().get("SEND_FAILED", 0) >= 1
        [line] = [line for line in lines(out) if "could not be sent" in line]
        assert line.startswith("<4>edge-relay: ") and "internal socket" in line
        h.worker._publish()                 # nothing new failed: nothing more said
        assert sum("could not be sent" in line for line in lines(out)) == 1
    finally:
        h.close()
