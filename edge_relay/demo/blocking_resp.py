"""A blocking call-and-wait RESP client over resp.py's codec, for the demo transceiver's state.

Demo only: each call blocks until its reply or the socket timeout, so the
relay's loop never uses it (it has resp.Client). Errors are resp's:
`resp.Disconnected` for a connection that failed or closed, an error reply as
a `resp.ReplyError` value from `pipeline` and raised by `call`.
"""

import collections
import socket

from .. import resp


class BlockingClient:
    """call-and-wait RESP over a blocking socket with a timeout."""

    def __init__(self, address, timeout=2.0):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 \
            if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except OSError as e:
            self.sock.close()
            raise resp.Disconnected(f"connect {address}: {e}") from None
        self._parser = resp.Parser()
        self._replies = collections.deque()

    def pipeline(self, commands):
        """Send several commands at once; return their replies (ReplyError values included)."""
        try:
            self.sock.sendall(b"".join(resp.encode_command(*c) for c in commands))
            while len(self._replies) < len(commands):
                data = self.sock.recv(65536)
                if not data:
                    raise resp.Disconnected("connection closed by server")
                self._replies.extend(self._parser.feed(data))
        except OSError as e:
            raise resp.Disconnected(str(e)) from None
        return [self._replies.popleft() for _ in commands]

    def call(self, *args):
        """One command; its reply, or raises ReplyError for an error reply."""
        reply, = self.pipeline([args])
        if isinstance(reply, resp.ReplyError):
            raise reply
        return reply

    def close(self):
        self.sock.close()
