#!/usr/bin/env python3
"""Write tests/vectors/adapter.json (the rewrite vectors of docs/ADAPTER.md) from fixed inputs.

Like generate.py: the only writer of the file, run by hand after a deliberate
change of a rewrite, with the code under test (edge_relay.adapter.resign,
strip_candidates, rewrite_answer). Nothing is random.

    python3 tests/vectors/generate_adapter.py           # rewrite the file
    python3 tests/vectors/generate_adapter.py --check   # exit 1 if it would change
    python3 tests/vectors/generate_adapter.py --markdown  # appendix A of docs/ADAPTER.md
"""

import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterkit import ANSWER, OFFER  # noqa: E402
from edge_relay import adapter, stun  # noqa: E402

OUT = Path(__file__).parent / "adapter.json"
TOKEN = "AQEAAWVTxoABAgMEBQYHCMHm3iJkM0WN"        # a routing-token-shaped ufrag (value fixed here)
ADAPTER_PWD = "adapterpassword012345678"
CLIENT_PWD = "clientpassword0123456789"
SERVER_PWD = "serverpassword0123456789"
TX1 = bytes(range(1, 13))
TX2 = bytes(range(101, 113))
TIE = bytes(range(8))


def check(user, key, controlling):
    attrs = [(stun.USERNAME, user), (stun.PRIORITY, struct.pack(">I", 1853817087)),
             (stun.ICE_CONTROLLING if controlling else stun.ICE_CONTROLLED, TIE)]
    if controlling:
        attrs.append((stun.USE_CANDIDATE, b""))
    return stun.encode(stun.BINDING_REQUEST, TX1 if controlling else TX2, attrs, integrity_key=key.encode())


def success(txid, mapped, key):
    return stun.encode(stun.BINDING_SUCCESS, txid,
                       [(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(mapped[0], mapped[1], txid))],
                       integrity_key=key.encode())


def stun_vector(name, raw, in_key, out_key, username=None, mapped=None, note=""):
    msg = stun.decode(raw)
    out = adapter.resign(raw, msg, out_key.encode(), username=username and username.encode(), mapped=mapped)
    return {"name": name, "note": note, "in": raw.hex(), "in_key": in_key, "out_key": out_key,
            "username": username, "mapped": list(mapped) if mapped else None, "out": out.hex()}


def build():
    stuns = [
        stun_vector("client_check", check(TOKEN.encode() + b":CLNT", ADAPTER_PWD, True), ADAPTER_PWD,
                    SERVER_PWD, username="SRVR:CLNT",
                    note="client -> server: token:cufrag becomes sufrag:cufrag, MI with the server's password"),
        stun_vector("server_success", success(TX1, ("10.0.0.1", 40001), SERVER_PWD), SERVER_PWD, ADAPTER_PWD,
                    mapped=("203.0.113.9", 50000),
                    note="server -> client: XOR-MAPPED-ADDRESS = the client's address from the header, "
                         "MI with the adapter's password"),
        stun_vector("server_check", check(b"CLNT:SRVR", CLIENT_PWD, False), CLIENT_PWD, CLIENT_PWD,
                    username="CLNT:" + TOKEN,
                    note="server -> client: cufrag:sufrag becomes cufrag:token, MI again with the client's password"),
        stun_vector("client_success", success(TX2, ("198.51.100.7", 3478), CLIENT_PWD), CLIENT_PWD, CLIENT_PWD,
                    mapped=("10.0.0.2", 41000),
                    note="client -> server: XOR-MAPPED-ADDRESS = the server's address as the adapter saw it"),
    ]
    sdps = [
        {"name": "offer_strip", "op": "strip", "in": OFFER, "out": adapter.strip_candidates(OFFER)},
        {"name": "answer_rewrite", "op": "answer", "in": ANSWER, "ufrag": TOKEN, "pwd": ADAPTER_PWD,
         "public": [["198.51.100.7", 3478]],
         "out": adapter.rewrite_answer(ANSWER, TOKEN, ADAPTER_PWD, [("198.51.100.7", 3478)])},
    ]
    return json.dumps({"stun": stuns, "sdp": sdps}, indent=1) + "\n"


def markdown(text):
    """Appendix A of docs/ADAPTER.md: each STUN vector's hex, 32 octets a line."""
    out = []
    for v in json.loads(text)["stun"]:
        out.append(f"vector: adapter/{v['name']}")
        out.append(f"note:   {v['note']}")
        out.append(f"keys:   in {v['in_key']}  out {v['out_key']}")
        if v["username"]:
            out.append(f"USERNAME becomes {v['username']}")
        if v["mapped"]:
            out.append(f"XOR-MAPPED-ADDRESS becomes {v['mapped'][0]} port {v['mapped'][1]}")
        for label in ("in", "out"):
            h = v[label]
            out.append(f"{label}:")
            out += ["  " + h[i:i + 64] for i in range(0, len(h), 64)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    text = build()
    if "--markdown" in sys.argv:
        print(markdown(text))
        sys.exit(0)
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else 1)
    OUT.write_text(text)
