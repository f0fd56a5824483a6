"""Tests for edge_relay/resp.py: codec vectors, split/fuzz invariants, a real redis-server."""

import random
import time

import pytest

from edge_relay import resp
from edge_relay.demo.blocking_resp import BlockingClient
from edge_relay.resp import Client, Disconnected, Parser, ProtocolError, ReplyError, RespError, Timeout, encode_command
from redisserver import drive, redis_server

# (wire bytes, expected value); errors compared by message.
VECTORS = [
    (b"+OK\r\n", "OK"),
    (b"+\r\n", ""),
    (b"-ERR unknown command 'FOO'\r\n", ReplyError("ERR unknown command 'FOO'")),
    (b":0\r\n", 0),
    (b":-42\r\n", -42),
    (b":1000000000000\r\n", 1000000000000),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (b"*3\r\n:1\r\n$3\r\nfoo\r\n$-1\r\n", [1, b"foo", None]),
    (b"*2\r\n*2\r\n+a\r\n-E b\r\n*0\r\n", [["a", ReplyError("E b")], []]),
]


def norm(v):
    if isinstance(v, ReplyError):
        return ("error", str(v))
    if isinstance(v, list):
        return [norm(x) for x in v]
    return v


def test_encode_command():
    assert encode_command("SET", b"k", 5, "é") == \
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(ValueError):
        encode_command()
    with pytest.raises(TypeError):
        encode_command("GET", 1.5)


@pytest.mark.parametrize("wire,value", VECTORS)
def test_vectors_whole_and_byte_by_byte(wire, value):
    assert norm(Parser().feed(wire)) == [norm(value)]
    p = Parser()
    got = []
    for i in range(len(wire)):
        got += p.feed(wire[i:i + 1])
        if i < len(wire) - 1:
            assert got == []
    assert norm(got) == [norm(value)]


def test_every_split_of_a_pipelined_stream():
    stream = b"".join(w for w, _ in VECTORS)
    want = [norm(v) for _, v in VECTORS]
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1, 7):
            p = Parser()
            got = p.feed(stream[:i]) + p.feed(stream[i:j]) + p.feed(stream[j:])
            assert norm(got) == want


@pytest.mark.parametrize("bad", [
    b"?x\r\n", b":12a\r\n", b":\r\n", b"$-2\r\n", b"$3\r\nabcd\r\n", b"*-5\r\n",
    b"$99999999999\r\n", b"*2\r\n" * 20, b"+\xff\r\n", b":+1\r\n", b":1 \r\n",
])
def test_malformed_raises_protocol_error_and_stays_broken(bad):
    p = Parser()
    with pytest.raises(ProtocolError):
        p.feed(bad + b"+OK\r\n" * 0 + b"\r\n" * 3)
    with pytest.raises(ProtocolError):
        p.feed(b"+OK\r\n")


def test_line_too_long():
    p = Parser()
    with pytest.raises(ProtocolError):
        p.feed(b"+" + b"a" * (resp.MAX_LINE + 10))


def test_fuzz_mutations_raise_only_resp_errors():
    rng = random.Random(1234)
    stream = b"".join(w for w, _ in VECTORS)
    for _ in range(3000):
        data = bytearray(stream)
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(3)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                del data[pos:pos + rng.randint(1, 4)]
        p = Parser()
        cut = rng.randrange(len(data) + 1)
        try:
            p.feed(bytes(data[:cut]))
            p.feed(bytes(data[cut:]))
        except RespError:
            pass


# -- a real redis-server ------------------------------------------------------------

@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_client_against_redis(tmp_path, tcp):
    with redis_server(tmp_path, tcp=tcp) as server:
        c = Client(server.address, timeout=1.0, dead_after=3.0)
        got = []
        cmds = [("SET", "k", "v", "EX", 30), ("GET", "k"), ("GET", "missing"), ("INCR", "n"),
                ("INCRBY", "n", 5), ("NOSUCHCMD",), ("MGET", "k", "missing"), ("TTL", "k")]
        for cmd in cmds:
            assert c.call(cmd, got.append, time.monotonic())
        drive(c, lambda: len(got) == len(cmds))
        assert got[:5] == ["OK", b"v", None, 1, 6]
        assert isinstance(got[5], ReplyError) and "unknown command" in str(got[5])
        assert got[6] == [b"v", None] and 0 < got[7] <= 30

        # many pipelined commands in one go
        got.clear()
        for i in range(500):
            assert c.call(("SET", f"key{i}", i), lambda r: None, time.monotonic())
        for i in range(500):
            assert c.call(("GET", f"key{i}"), got.append, time.monotonic())
        drive(c, lambda: len(got) == 500)
        assert got == [str(i).encode() for i in range(500)]

        # server dies: callbacks get Disconnected, the client backs off, then reconnects
        got.clear()
        server.stop()
        c.call(("PING",), got.append, time.monotonic())
        drive(c, lambda: len(got) == 1)
        assert isinstance(got[0], Disconnected)
        server.start()
        got.clear()
        drive(c, lambda: c.call(("PING",), got.append, time.monotonic()), timeout=10.0)
        drive(c, lambda: got == ["PONG"])
        c.close()


def test_bounded_queue_and_timeout(tmp_path):
    with redis_server(tmp_path) as server:
        c = Client(server.address, max_pending=3, timeout=0.2, dead_after=0.5)
        got = []
        now = time.monotonic()
        # BLPOP on an empty list holds this connection: the requests time out,
        # then the connection is declared dead, and the client reconnects afterwards.
        assert c.call(("BLPOP", "empty", "0.8"), got.append, now)
        assert c.call(("PING",), got.append, now)
        assert c.call(("PING",), got.append, now)
        assert not c.call(("PING",), got.append, now)        # full
        assert c.stats["refused_full"] == 1
        drive(c, lambda: len(got) == 3)
        assert all(isinstance(g, Timeout) for g in got), got
        drive(c, lambda: c.state == "disconnected", timeout=5.0)
        assert c.stats["failures"] == 1
        got.clear()
        drive(c, lambda: c.call(("PING",), got.append, time.monotonic()), timeout=10.0)
        drive(c, lambda: got and got[-1] == "PONG", timeout=5.0)
        c.close()


def test_connect_refused_backs_off(tmp_path):
    c = Client(str(tmp_path / "nothing.sock"), backoff_min=0.1, backoff_max=0.4)
    got = []
    assert not c.call(("PING",), got.append, 0.0)     # connect fails at once: refused
    assert c.state == "disconnected" and c.next_deadline() == pytest.approx(0.1)
    assert not c.call(("PING",), got.append, 0.05)    # backing off
    assert c.stats["refused_down"] == 2
    for t in (0.1, 0.3, 0.7, 1.2):
        c.call(("PING",), got.append, t)
    assert c.next_deadline() - 1.2 == pytest.approx(0.4)    # capped


def test_blocking_client(tmp_path):
    with redis_server(tmp_path) as server:
        b = BlockingClient(server.address)
        assert b.call("SET", "a", "1") == "OK"
        assert b.pipeline([("GET", "a"), ("INCR", "a"), ("HGETALL", "h")]) == [b"1", 2, []]
        with pytest.raises(ReplyError):
            b.call("NOSUCHCMD")
        b.close()
    with pytest.raises(Disconnected):
        BlockingClient(str(tmp_path / "gone.sock"))
