"""Creating the relay's sockets: one-line StartupErrors, and buffer sizes read back (issue 13)."""

import errno
import socket

import pytest

from edge_relay import sockets
from edge_relay.errors import StartupError
from relayproc import Relay, Setup, Transceiver, carries_a_call, metrics


def test_buffer_shortfalls_read_back_what_the_kernel_granted():
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            rmem_max = int(f.read())
    except OSError:
        pytest.skip("no /proc/sys/net/core/rmem_max")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert sockets.buffer_shortfalls(s, 65536, 0) == []
        asked = min(2 * rmem_max, 2**31 - 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, asked)
        [(key, got_asked, granted, sysctl)] = sockets.buffer_shortfalls(s, asked, 0)
        assert (key, got_asked, sysctl) == ("relay.recv_buffer_bytes", asked, "net.core.rmem_max")
        assert granted == rmem_max


def test_a_socket_that_cannot_be_created_is_one_line_naming_it(monkeypatch):
    def no_more(*a, **kw):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(socket, "socket", no_more)
    with pytest.raises(StartupError) as err:
        sockets.udp_socket("127.0.0.1", 4478, what="internal")
    assert str(err.value) == "internal 127.0.0.1:4478: cannot create a socket: Too many open files"


def test_dual_stack_only_for_the_internal_ipv6_wildcard():
    assert sockets.internal_dual_stack("::") and not sockets.internal_dual_stack("::1")
    assert not sockets.internal_dual_stack("0.0.0.0")
    with sockets.udp_socket("::", 0, dual_stack=True) as s:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    with sockets.udp_socket("::", 0) as s:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


@pytest.mark.slow
def test_internal_ipv6_wildcard_reaches_an_ipv4_transceiver(tmp_path):
    """The example and check-config say "::" reaches IPv4 transceivers: before, every send
    from the IPv6-only socket failed (ENETUNREACH, counted as send_failed) and no call connected."""
    setup = Setup(tmp_path / "r", workers=1)
    text = open(setup.path).read()
    assert '[internal]\naddress = "127.0.0.1"' in text
    with open(setup.path, "w") as f:
        f.write(text.replace('[internal]\naddress = "127.0.0.1"', '[internal]\naddress = "::"'))
    relay = Relay(setup)
    try:
        relay.wait_serving()
        assert carries_a_call(setup, Transceiver(setup.keyring, setup.tx_sock))
        drops = metrics(setup)["edge_relay_drops_total"]["samples"]
        assert drops.get((("reason", "send_failed"),), 0) == 0
    finally:
        relay.kill()
        setup.tx_sock.close()
