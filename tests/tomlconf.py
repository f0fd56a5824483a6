"""Relay config files for tests, written from dicts: `dumps(data)` and `merged(base, extra)`.

Tests build a config as the dict config.parse takes (section -> keys, arrays
of tables as lists of dicts) and write it with dumps(); the TOML text is then
what tomllib reads back as that dict. Only what relay configs use is
supported: tables, arrays of tables, and str, bool, int, float or lists of
them as values; anything else raises TypeError rather than write a wrong file.
"""

from __future__ import annotations

import math


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise TypeError(f"not a finite float: {v!r}")
        return repr(v)
    if isinstance(v, str):
        out = v.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in out) + '"'
    if hasattr(v, "__fspath__"):
        return _value(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}: {v!r}")


def _is_table_array(v) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(name: str, table: dict, out: list[str]) -> None:
    subtables = []
    for key, v in table.items():
        if isinstance(v, dict) or _is_table_array(v):
            subtables.append((key, v))
        else:
            out.append(f"{key} = {_value(v)}")
    for key, v in subtables:
        full = f"{name}.{key}" if name else key
        if isinstance(v, dict):
            out += ["", f"[{full}]"]
            _table(full, v, out)
        else:
            for item in v:
                out += ["", f"[[{full}]]"]
                _table(full, item, out)


def dumps(data: dict) -> str:
    """TOML text for `data` (top-level scalars first, then one [section] per dict)."""
    out: list[str] = []
    _table("", data, out)
    return "\n".join(out).lstrip("\n") + "\n"


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it: tables merge key by key, arrays of tables
    get extra's entries appended (another listener, another transceiver), any
    other value is replaced. Neither argument is changed."""
    out = dict(base)
    for key, v in extra.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(v, dict):
            out[key] = merged(old, v)
        elif _is_table_array(old) and _is_table_array(v):
            out[key] = [*old, *v]
        else:
            out[key] = v
    return out
