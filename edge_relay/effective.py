"""What `edge-relay config --effective` and `edge-relay keys` print: the config and keys as the relay sees them.

Contract
  - `render_config(cfg)` is TOML that `config.parse` reads back into an equal
    Config: every section and key of config.py in declaration order, defaults
    filled in. A key whose value is "not set" (None: keys.signing_key_id,
    transceivers[].backup) is a comment, since TOML has no null.
  - `key_report(directory, signing_key_id)` loads the key ring exactly as the
    relay does (same errors) and describes each key by id, file and
    fingerprint: the first 8 bytes of SHA-256 of the 32-byte key, in hex. The
    key itself is never returned. Two hosts with the same fingerprint for an
    id hold the same key.
"""

import dataclasses
import hashlib
import json
import math
import pathlib

from . import keys as keys_mod

FINGERPRINT_BYTES = 8


def fingerprint(master):
    """Hex of the first FINGERPRINT_BYTES of SHA-256(master)."""
    return hashlib.sha256(master).digest()[:FINGERPRINT_BYTES].hex()


def _value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v) if isinstance(v, pathlib.PurePath) else v)


def _keys(obj):
    lines = []
    for f in dataclasses.fields(obj):
        if "check" not in f.metadata:
            continue
        v = getattr(obj, f.name)
        lines.append(f"# {f.name} = (not set)" if v is None else f"{f.name} = {_value(v)}")
    return lines


def render_config(cfg, source=None):
    """The TOML text of `cfg` with every default filled in (see the contract)."""
    out = [f"# effective configuration{f' of {source}' if source else ''}: every key, defaults filled in"]
    for f in dataclasses.fields(cfg):
        if "section" not in f.metadata:
            continue
        value = getattr(cfg, f.name)
        if f.metadata.get("many"):
            for item in value:
                out += ["", f"[[{f.name}]]"] + _keys(item)
        else:
            out += ["", f"[{f.name}]"] + _keys(value)
    return "\n".join(out) + "\n"


def key_report(directory, signing_key_id=None):
    """[{"id", "signing", "fingerprint", "file"}] for the key ring in `directory` (KeyFileError if unusable)."""
    ring = keys_mod.load_dir(directory, signing_key_id)
    directory = pathlib.Path(directory)
    rows = []
    for key_id in ring.ids:
        path = directory / f"{key_id}{keys_mod.KEY_SUFFIX}"
        rows.append({"id": key_id, "signing": key_id == ring.signing.key_id,
                     "fingerprint": fingerprint(keys_mod.read_key_file(path)), "file": str(path)})
    return rows
