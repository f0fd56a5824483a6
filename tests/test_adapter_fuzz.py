"""Fuzz and mutation tests of the adapter's sans-IO core (like tests/test_fuzz.py for the parsers).

The invariant: whatever bytes arrive from the relay side (inside a valid
header) or from the server side, `from_relay` / `from_server` never raise,
and each datagram is either forwarded (an Out) or counted as exactly one drop.
A mutation of a valid Binding message never gets re-signed (every octet is
under MESSAGE-INTEGRITY or FINGERPRINT). Seeds are fixed; EDGE_RELAY_FUZZ_SCALE=10
runs ten times as many random cases.
"""

import os
import random
import struct

import pytest

from adapterkit import SERVER, Call
from edge_relay import adapter, stun
from test_fuzz import mutations

SCALE = int(os.environ.get("EDGE_RELAY_FUZZ_SCALE", "1"))


def outcome(ad, fn):
    before = sum(ad.drops)
    out = fn()
    after = sum(ad.drops)
    if out is None:
        assert after == before + 1, "a datagram neither forwarded nor counted"
    else:
        assert isinstance(out, adapter.Out) and after == before
        assert isinstance(out.data, bytes)
    return out


def random_stun(rng, txids):
    """A structurally plausible STUN message: random type, known attribute types, random values."""
    mtype = rng.choice([stun.BINDING_REQUEST, stun.BINDING_SUCCESS, stun.BINDING_ERROR,
                        stun.BINDING_INDICATION, rng.randrange(0x4000)])
    attrs = []
    for _ in range(rng.randrange(6)):
        atype = rng.choice([stun.USERNAME, stun.XOR_MAPPED_ADDRESS, stun.PRIORITY, stun.USE_CANDIDATE,
                            stun.ICE_CONTROLLING, stun.MESSAGE_INTEGRITY_SHA256, 0xC057, rng.randrange(0x10000)])
        attrs.append((atype, os.urandom(rng.randrange(0, 40)) if atype != stun.USERNAME
                      else rng.choice([b"", b":", b"a:b", os.urandom(10)])))
    key = rng.choice([None, b"x", b"clientpassword0123456789", b"serverpassword0123456789"])
    txid = rng.choice(txids) if txids and rng.random() < 0.5 else os.urandom(12)
    return stun.encode(mtype, txid, attrs, integrity_key=key, fingerprint=rng.random() < 0.7)


def test_random_stun_from_both_sides():
    rng = random.Random(17)
    c = Call()
    flow = c.connect()
    txids = []
    for i in range(2000 * SCALE):
        if i % 7 == 0:          # keep real transactions pending on both sides
            txid = os.urandom(12)
            txids.append(txid)
            c.relay_in(c.client.check(txid))
            c.server_in(flow, c.server.check(txid))
        data = random_stun(rng, txids[-8:])
        if rng.random() < 0.5:
            outcome(c.ad, lambda: c.relay_in(data))
        else:
            outcome(c.ad, lambda: c.server_in(flow, data, src=SERVER))


def test_random_bytes_from_both_sides():
    rng = random.Random(1717)
    c = Call()
    flow = c.connect()
    for _ in range(3000 * SCALE):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        outcome(c.ad, lambda: c.relay_in(data))
        outcome(c.ad, lambda: c.server_in(flow, data))
        outcome(c.ad, lambda: c.ad.from_relay(data, ("192.0.2.1", 1), c.NOW, c.mono))


def valid_messages(c, flow):
    """(side, bytes) of every Binding message a call exchanges, each valid where it is fed."""
    txid = os.urandom(12)
    client_check = c.client.check(txid)
    out = c.relay_in(client_check)
    c.ad.flows[flow.key].pending.clear()
    server_success = c.server.answer(out.data, ("192.0.2.200", 1))
    txid2 = os.urandom(12)
    server_check = c.server.check(txid2)
    to_client = c.server_in(flow, server_check)
    client_success = c.client.answer(stun.decode(to_client.data[48:]) and to_client.data[48:], ("198.51.100.7", 3478))
    return [("relay", client_check, None), ("server", server_success, txid),
            ("server", server_check, None), ("relay", client_success, txid2)]


@pytest.mark.parametrize("which", range(4))
def test_mutated_binding_messages_are_never_resigned(which):
    """A mutation is dropped, passes unchanged (it became DTLS/RTP-shaped), or changed
    only what no integrity covers (an attribute after MESSAGE-INTEGRITY, ignored per
    RFC 8489 section 14.5): then the output is exactly the unmutated message's."""
    rng = random.Random(which)
    c = Call()
    flow = c.connect()
    side, raw, txid = valid_messages(c, flow)[which]
    direction = adapter.TO_SERVER if side == "server" else adapter.TO_RELAY

    def feed(data):
        if txid is not None:     # a response needs its request pending
            flow.pending[data[8:20] if len(data) >= 20 else txid] = (c.session, direction, SERVER)
        if side == "relay":
            return outcome(c.ad, lambda: c.relay_in(data))
        return outcome(c.ad, lambda: c.server_in(flow, data))

    def signed_part(data):
        """The STUN message up to the end of MESSAGE-INTEGRITY, without the length field."""
        msg = data[48:] if data[:2] == b"\xeeR" else data
        end = stun.decode(msg).integrity_offset + 24
        return msg[:2] + msg[4:end]

    expected = feed(raw).data
    resigned = 0
    for bad in mutations(raw, rng, 200 * SCALE):
        out = feed(bad)
        if out is None:
            continue
        if bad and stun.classify(bad[0]) != stun.STUN:
            assert out.data == bad or out.data[48:] == bad, bad.hex()
        else:
            assert signed_part(out.data) == signed_part(expected), bad.hex()
            resigned += 1
    assert resigned <= 8 + 24 * SCALE      # only the FINGERPRINT's type octets (and random hits on them)


def test_random_sdp_never_raises_anything_but_adapter_error():
    rng = random.Random(5)
    from adapterkit import ANSWER, OFFER
    c = Call()
    for _ in range(300 * SCALE):
        lines = (OFFER if rng.random() < 0.5 else ANSWER).split("\r\n")
        rng.shuffle(lines)
        lines = lines[:rng.randrange(len(lines) + 1)]
        if rng.random() < 0.5:
            i = rng.randrange(len(lines) + 1)
            lines.insert(i, "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(30))))
        sdp = ("v=0\r\n" if rng.random() < 0.8 else "") + "\r\n".join(lines)
        for fn in (lambda: c.ad.offer_for_server(sdp),
                   lambda: c.ad.answer_for_client(sdp, sdp, c.NOW / 1000, c.mono),
                   lambda: c.ad.answer_for_client(OFFER, sdp, c.NOW / 1000, c.mono)):
            try:
                fn()
            except adapter.AdapterError:
                pass


def test_priority_value_kept():
    c = Call()
    out = c.relay_in(c.client.check())
    assert struct.unpack(">I", bytes(stun.decode(out.data).get(stun.PRIORITY)))[0] == 1853817087
