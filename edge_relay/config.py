"""The relay's one TOML config file: read, validate, and freeze into dataclasses.

Contract:
  * `load(path)` reads and parses a file; `parse(data, base_dir)` validates an
    already-decoded TOML table; `problems(data, base_dir)` lists what is wrong
    without raising.
  * Every mistake is reported, not just the first: `ConfigError.problems` is a
    list of `(key, problem)` pairs, where `key` is the full dotted path
    (`limits.idle_timeout`, `transceivers[1].id`, `internal.allow[0]`) and
    `problem` is one line that says what was expected and shows the value
    found. Unknown keys and sections are errors, so a typo never silently
    falls back to a default.
  * A returned `Config` is a tree of frozen dataclasses that passed every
    check; nothing downstream re-validates it. Relative paths are already
    resolved against the config file's folder. Nothing here touches the
    network or the key files (keys.py checks those).
  * Any exception other than ConfigError escaping `parse` is a bug; the
    property test in tests/test_config.py throws random values at it to
    check exactly that.

Theory of operation: each section is a dataclass whose fields carry their
validator in `metadata["check"]`, so a key's name, type, default and rule are
declared on one line; a default that a sans-IO class also takes as a keyword
argument is named from defaults.py (`defaults.HEADER_WINDOW`), so that the
two cannot disagree. `Config`'s own fields declare the sections in the same
way. Adding a section is one dataclass plus one line in `Config`; rules that
span several keys live in the `_CROSS_CHECKS` functions at the end.
"""

import dataclasses
import ipaddress
import math
import os
import pathlib
import re
import stat
import tomllib
from dataclasses import dataclass, field

from . import defaults, keys as keys_mod
from .errors import ConfigError

DEFAULT_PATH = "/etc/edge-relay/edge-relay.toml"
# The shipped example, every key commented, is ~20 KiB; anything beyond 1 MiB
# is not a config someone wrote, and reading it whole could exhaust memory.
MAX_CONFIG_BYTES = 1 << 20

# setsockopt(SO_RCVBUF/SO_SNDBUF) takes a C int; larger values would escape
# as OverflowError at startup instead of a config error now.
_C_INT_MAX = 2**31 - 1
_SHOW_MAX = 60  # longest string echoed back in a message
# Ceiling for every float key (seconds, rates). Far beyond any sane setting,
# but it keeps derived values finite: the router turns header_window into
# milliseconds, and 1e306 * 1000 is inf, an OverflowError at worker start.
_NUMBER_MAX = 1e9
# Floors below which a timer cannot work, with the reason the message gives.
# A flow may be silent between two consent checks, which RFC 7675 section 5.1
# spaces 4..6 s apart (5 s randomised by +-20 %): an idle timeout shorter than
# one full interval drops flows that are alive.
IDLE_TIMEOUT_FLOOR = (6.0, "RFC 7675 consent checks may come 6 s apart; a shorter idle "
                           "timeout expires live flows between two of them")
# A pending flow waits for the transceiver's answer to the first check; ICE
# retransmits an unanswered check after RTO = 500 ms (RFC 8445 section 14.3),
# so a pending flow must outlive at least one retransmission.
PENDING_TTL_FLOOR = (1.0, "a pending flow must outlive an ICE check's 500 ms retransmission "
                          "(RFC 8445 section 14.3) and the transceiver's answer")


# --------------------------------------------------------------------------
# Showing values and keys in one-line messages
# --------------------------------------------------------------------------

def _escape(text):
    """`text` with every non-printable character escaped, so it stays one line."""
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def _show(value):
    """A value as the operator wrote it (TOML spelling), always one short line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # str() of a huge int raises ValueError (PEP 651 digit limit) and would
        # make a long line anyway; TOML itself stops at 64 bits.
        if value.bit_length() > 100:
            return f"an integer of {value.bit_length()} bits"
        return str(value)
    if isinstance(value, float):
        return repr(value)  # nan, inf, -3.0, 1e+300: the TOML spellings
    if isinstance(value, str):
        if len(value) > _SHOW_MAX:
            value = value[:_SHOW_MAX - 3] + "..."
        return '"' + _escape(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if value is None:
        return "nothing"
    if hasattr(value, "isoformat"):  # TOML dates, times and datetimes
        return value.isoformat()
    return f"a value of type {type(value).__name__}"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_part(name):
    """A TOML key as it would be written: bare if possible, quoted otherwise."""
    name = name if isinstance(name, str) else str(name)
    return name if _BARE_KEY.fullmatch(name) else _show(name)


class _Invalid(Exception):
    """Raised by a validator: `items` is a list of (key suffix, problem)."""

    def __init__(self, problem, suffix=""):
        super().__init__(problem)
        self.items = [(suffix, problem)]


def _got(expected, value):
    return _Invalid(f"{expected}, got {_show(value)}")


# --------------------------------------------------------------------------
# Validators: (value, base_dir) -> normalised value, or raise _Invalid
# --------------------------------------------------------------------------

def _is_int(value):
    # bool is an int subclass; `true` for a worker count is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(lo, hi=None, *, what="an integer", note=""):
    expected = (f"must be {what} in {lo}..{hi}" if hi is not None
                else f"must be {what} >= {lo}") + note

    def check(value, base_dir):
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            raise _got(expected, value)
        return int(value)
    return check


def _port(lo, note=""):
    return _integer(lo, 65535, what="a port", note=note)


def _number(lo, *, inclusive, floor=None):
    """A finite float; ints are accepted because `idle_timeout = 30` is natural.

    `floor` is (least sensible value, why): a value that is valid as a number
    but below it cannot work, and the message says why.
    """
    expected = f"must be a number {'>=' if inclusive else '>'} {lo}"

    def check(value, base_dir):
        if not (_is_int(value) or isinstance(value, float)):
            raise _got(expected, value)
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range (parse() given a dict)
            raise _got(expected, value) from None
        if not math.isfinite(number) or number < lo or (number == lo and not inclusive):
            raise _got(expected, value)
        if number > _NUMBER_MAX:
            raise _got(f"must be a number <= {_NUMBER_MAX:g}", value)
        if floor is not None and number < floor[0]:
            raise _got(f"must be at least {floor[0]:g} ({floor[1]})", value)
        return number
    return check


def _choice(*options):
    expected = f"must be one of {', '.join(options)}"

    def check(value, base_dir):
        if not isinstance(value, str) or value not in options:
            raise _got(expected, value)
        return value
    return check


def _ip_address(*, wildcard):
    """An IP literal, normalised (so "::0" and "::" compare equal).

    Zone indexes ("fe80::1%eth0") and IPv4-mapped IPv6 are refused: the raw
    sockaddr helpers carry neither, and both would silently fail to match a
    peer's source address. `wildcard` allows "0.0.0.0"/"::" (bind addresses);
    destinations must be unicast.
    """
    expected = ("must be an IPv4 or IPv6 address" if wildcard
                else "must be a unicast IPv4 or IPv6 address")

    def check(value, base_dir):
        if not isinstance(value, str):
            raise _got(expected, value)
        if "%" in value:
            raise _got(expected + " without a zone index (%...)", value)
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            raise _got(expected, value) from None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            raise _got(f"{expected}; write the IPv4 address {ip.ipv4_mapped} instead", value)
        if ip.is_multicast or (not wildcard and (
                ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"))):
            raise _got(expected, value)
        return str(ip)
    return check


def _cidr_list(value, base_dir):
    """An array of CIDRs; every bad element is reported under its index."""
    expected = 'must be a CIDR such as "10.0.0.0/8" or "2001:db8::/32"'
    if not isinstance(value, (list, tuple)):
        raise _got('must be an array of CIDR strings, such as ["10.0.0.0/8"]', value)
    nets, bad = [], []
    for i, item in enumerate(value):
        try:
            if not isinstance(item, str) or "%" in item:
                raise ValueError
            nets.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError:
            problem = f"{expected}, got {_show(item)}"
            if isinstance(item, str):
                try:  # the common slip: host bits set, e.g. "10.0.0.1/8"
                    loose = ipaddress.ip_network(item, strict=False)
                    problem += f" (host bits set; did you mean \"{loose}\"?)"
                except ValueError:
                    pass
            bad.append((f"[{i}]", problem))
    if bad:
        err = _Invalid(bad[0][1], bad[0][0])
        err.items = bad
        raise err
    return tuple(nets)


def _path(value, base_dir):
    """A filesystem path; relative paths hang off the config file's folder,
    because the daemon's working directory is not something to rely on."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise _got("must be a non-empty path", value)
    path = pathlib.Path(value)
    return path if path.is_absolute() else pathlib.Path(base_dir) / path


_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _label(value, base_dir):
    # Names end up in log lines and Prometheus label values: keep them plain.
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise _got("must be 1..64 characters of A-Z a-z 0-9 . _ -", value)
    return value


# --------------------------------------------------------------------------
# Declaring keys and sections
# --------------------------------------------------------------------------

def _key(check, default=dataclasses.MISSING):
    """A config key: its validator, and its default (none = required)."""
    return field(default=default, metadata={"check": check})


def _section(cls):
    """A `[table]` section; every key in it has a default, so it is optional."""
    return field(default_factory=cls, metadata={"section": cls})


def _array(cls, what):
    """An `[[array of tables]]` section that needs at least one entry."""
    return field(default=(), metadata={"section": cls, "many": True, "what": what})


@dataclass(frozen=True, slots=True, kw_only=True)
class Relay:
    workers: int = _key(_integer(0, 1024), 0)            # 0 = one per online CPU
    batch_size: int = _key(_integer(1, 1024), 32)        # datagrams per recvmmsg/sendmmsg
    io: str = _key(_choice("auto", "mmsg", "plain"), "auto")
    drain_seconds: float = _key(_number(0, inclusive=True), 10.0)
    recv_buffer_bytes: int = _key(_integer(65536, _C_INT_MAX), 4194304)   # SO_RCVBUF
    send_buffer_bytes: int = _key(_integer(65536, _C_INT_MAX), 4194304)   # SO_SNDBUF
    coalesce_us: int = _key(_integer(0, 1000), 0)        # wait after a busy wake-up; 0 = off


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    address: str = _key(_ip_address(wildcard=True))      # public UDP bind address
    port: int = _key(_port(1), 3478)


@dataclass(frozen=True, slots=True, kw_only=True)
class Internal:
    address: str = _key(_ip_address(wildcard=True), "127.0.0.1")
    port: int = _key(_port(0, note=" (0 = ephemeral)"), 4478)   # worker i binds port + i
    allow: tuple[str, ...] = _key(_cidr_list, ())        # extra nftables sources


@dataclass(frozen=True, slots=True, kw_only=True)
class Keys:
    dir: pathlib.Path = _key(_path, pathlib.Path("/etc/edge-relay/keys"))
    signing_key_id: int | None = _key(_integer(0, 255), None)   # None = lowest (oldest) found


@dataclass(frozen=True, slots=True, kw_only=True)
class Transceiver:
    id: int = _key(_integer(0, 65535))
    address: str = _key(_ip_address(wildcard=False))
    port: int = _key(_port(1))
    backup: int | None = _key(_integer(0, 65535), None)  # id of the failover target
    name: str = _key(_label, "")                          # "" = "tx<id>"

    def __post_init__(self):
        # The default depends on `id`, so it is filled in here rather than in
        # the field table; explicit `name = ""` is refused by _label.
        if not self.name:
            object.__setattr__(self, "name", f"tx{self.id}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    max_flows: int = _key(_integer(1), 200000)
    max_pending_per_source: int = _key(_integer(1), 16)
    pending_ttl: float = _key(_number(0, inclusive=False, floor=PENDING_TTL_FLOOR), 5.0)
    idle_timeout: float = _key(_number(0, inclusive=False, floor=IDLE_TIMEOUT_FLOOR), 30.0)
    max_flows_per_session: int = _key(_integer(0), 16)          # flows per routing token, 0 = no cap
    max_flows_per_transceiver: int = _key(_integer(0), 0)       # 0 = no cap beyond max_flows
    header_window: float = _key(_number(0, inclusive=False), defaults.HEADER_WINDOW)
    token_max_lifetime: float = _key(_number(0, inclusive=False), defaults.TOKEN_MAX_LIFETIME)
    clock_skew: float = _key(_number(0, inclusive=True), defaults.CLOCK_SKEW)
    new_flows_per_source_rate: float = _key(_number(0, inclusive=False), defaults.NEW_FLOWS_PER_SOURCE_RATE)
    new_flows_per_source_burst: int = _key(_integer(1), defaults.NEW_FLOWS_PER_SOURCE_BURST)
    new_flows_rate: float = _key(_number(0, inclusive=False), defaults.NEW_FLOWS_RATE)
    new_flows_burst: int = _key(_integer(1), defaults.NEW_FLOWS_BURST)
    flow_packets_rate: float = _key(_number(0, inclusive=False), defaults.FLOW_PACKETS_RATE)
    flow_packets_burst: int = _key(_integer(1), defaults.FLOW_PACKETS_BURST)


@dataclass(frozen=True, slots=True, kw_only=True)
class Nftables:
    source_pps: int = _key(_integer(1), 500)
    source_pps_burst: int = _key(_integer(1), 1000)
    source_bytes_per_second: int = _key(_integer(1), 500000)
    source_bytes_burst: int = _key(_integer(1), 1000000)
    total_pps: int = _key(_integer(0), 0)                # 0 = no global cap


@dataclass(frozen=True, slots=True, kw_only=True)
class Management:
    address: str = _key(_ip_address(wildcard=True), "127.0.0.1")
    port: int = _key(_port(0, note=" (0 = disabled)"), 9477)

    @property
    def enabled(self):
        return self.port != 0


def _bool(value, base_dir):
    if not isinstance(value, bool):
        raise _got("must be true or false", value)
    return value


def _redis_address(value, base_dir):
    """"" (off), an absolute Unix socket path, or "IP:port" / "[IPv6]:port"."""
    expected = 'must be "" (off), "/path/to/redis.sock" or "IP:port" such as "127.0.0.1:6379"'
    if not isinstance(value, str):
        raise _got(expected, value)
    if value == "" or (value.startswith("/") and "\0" not in value):
        return value
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _got(expected, value) from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def redis_target(address):
    """A [directory] address as resp.Client wants it: a path, or (host, port)."""
    if address.startswith("/"):
        return address
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), int(port))


def _probe_timeout(value, base_dir):
    # probes.Prober remembers a probe for at most 1 s (max_timeout)
    number = _number(0, inclusive=True)(value, base_dir)
    if number > 1.0:
        raise _got("must be a number in 0..1 (0 = adaptive)", value)
    return number


@dataclass(frozen=True, slots=True, kw_only=True)
class Probes:
    enabled: bool = _key(_bool, True)
    interval: float = _key(_number(0.01, inclusive=True), defaults.PROBE_INTERVAL)  # seconds per transceiver
    timeout: float = _key(_probe_timeout, 0.0)                          # 0 = adaptive (RFC 6298)
    down_after: int = _key(_integer(1, 100), defaults.PROBE_DOWN_AFTER)  # consecutive misses
    up_after: int = _key(_integer(1, 100), defaults.PROBE_UP_AFTER)      # consecutive answers


@dataclass(frozen=True, slots=True, kw_only=True)
class Quality:
    sample_every: int = _key(_integer(0, 1000000), defaults.QUALITY_SAMPLE_EVERY)   # 0 = off
    max_sampled: int = _key(_integer(0, 1000000), defaults.QUALITY_MAX_SAMPLED)
    report_interval: float = _key(_number(0.1, inclusive=True), defaults.QUALITY_REPORT_INTERVAL)


@dataclass(frozen=True, slots=True, kw_only=True)
class Directory:
    address: str = _key(_redis_address, "")                          # "" = off
    ttl: int = _key(_integer(1, 86400), defaults.DIRECTORY_TTL)
    timeout: float = _key(_number(0.001, inclusive=True), defaults.DIRECTORY_TIMEOUT)
    max_held_per_flow: int = _key(_integer(1, 1024), defaults.DIRECTORY_MAX_HELD_PER_FLOW)
    max_held_total: int = _key(_integer(1, 1000000), defaults.DIRECTORY_MAX_HELD_TOTAL)
    max_lookups: int = _key(_integer(1, 100000), defaults.DIRECTORY_MAX_LOOKUPS)
    negative_ttl: float = _key(_number(0, inclusive=True), defaults.DIRECTORY_NEGATIVE_TTL)

    @property
    def enabled(self):
        return self.address != ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Log:
    level: str = _key(_choice("debug", "info", "notice", "warning", "err"), "info")


def _online_cpus():
    """CPUs this process may run on (the affinity mask, not the machine total)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated config. Build it with `load` or `parse`."""

    relay: Relay = _section(Relay)
    listeners: tuple[Listener, ...] = _array(Listener, "listener")
    internal: Internal = _section(Internal)
    keys: Keys = _section(Keys)
    transceivers: tuple[Transceiver, ...] = _array(Transceiver, "transceiver")
    limits: Limits = _section(Limits)
    nftables: Nftables = _section(Nftables)
    management: Management = _section(Management)
    log: Log = _section(Log)
    probes: Probes = _section(Probes)
    quality: Quality = _section(Quality)
    directory: Directory = _section(Directory)
    # Derived: id -> Transceiver, for the per-packet token lookup. A plain dict
    # (picklable); treat it as read-only like the rest of the tree.
    transceiver_by_id: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "transceiver_by_id",
                           {t.id: t for t in self.transceivers})

    def effective_workers(self):
        """Worker count: `relay.workers`, or one per CPU we may run on if 0."""
        return self.relay.workers or _online_cpus()

    def internal_port_for(self, worker_index):
        """The internal UDP port worker `worker_index` binds (0 = ephemeral)."""
        port = self.internal.port
        if worker_index < 0 or (port and port + worker_index > 65535):
            raise ValueError(f"no internal port for worker {worker_index}")
        return port + worker_index if port else 0


# --------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------

def _section_fields():
    return [f for f in dataclasses.fields(Config) if "section" in f.metadata]


def _unknown(key, value, known):
    """One line for a key nobody declared, with a hint when it looks like a typo."""
    kind = "unknown section" if isinstance(value, dict) or (
        isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
    ) else "unknown key"
    name = key if isinstance(key, str) else str(key)
    import difflib  # only for a config that has a mistake: not on every start
    close = difflib.get_close_matches(name, known, n=1)
    return kind + (f" (did you mean {close[0]}?)" if close else "")


def _check_table(cls, table, prefix, base_dir, report):
    """Validate one table against `cls`'s key declarations.

    Returns {name: value} holding every key that is valid, defaults included,
    and leaving out the invalid ones so cross-checks can skip them; or None if
    `table` is not a table at all.
    """
    if not isinstance(table, dict):
        report(prefix, f"must be a table, got {_show(table)}")
        return None
    declared = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name, value in table.items():
        if name not in declared:
            report(f"{prefix}.{_key_part(name)}", _unknown(name, value, declared))
    values = {}
    for name, f in declared.items():
        key = f"{prefix}.{name}"
        if name not in table:
            if f.default is dataclasses.MISSING:
                report(key, "required key is missing")
            else:
                values[name] = f.default
            continue
        try:
            values[name] = f.metadata["check"](table[name], base_dir)
        except _Invalid as err:
            for suffix, problem in err.items:
                report(key + suffix, problem)
    return values


def _check_sections(data, base_dir, report):
    """Per-key validation of every section: {section: values or [values]}."""
    sections = {}
    if not isinstance(data, dict):
        report("(top level)", f"must be a table, got {_show(data)}")
        return sections
    fields = _section_fields()
    known = [f.name for f in fields]
    for name, value in data.items():
        if name not in known:
            report(_key_part(name), _unknown(name, value, known))
    for f in fields:
        cls, name = f.metadata["section"], f.name
        if not f.metadata.get("many"):
            values = _check_table(cls, data.get(name, {}), name, base_dir, report)
            if values is not None:
                sections[name] = values
            continue
        rows = data.get(name, [])
        if not isinstance(rows, list):
            report(name, f"must be an array of tables ([[{name}]]), got {_show(rows)}")
            continue
        if not rows:
            report(name, f"at least one {f.metadata['what']} is required")
        sections[name] = [_check_table(cls, row, f"{name}[{i}]", base_dir, report)
                          for i, row in enumerate(rows)]
    return sections


def _hostport(address, port):
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _duplicates(rows, key_of):
    """Yield (index, first index, key) for rows whose key repeats an earlier row's."""
    first = {}
    for i, row in enumerate(rows):
        if row is None:
            continue
        k = key_of(row)
        if k is None:
            continue
        if k in first:
            yield i, first[k], k
        else:
            first[k] = i


def _has(row, *names):
    return row is not None and all(n in row for n in names)


def _check_listeners(s, report):
    rows = s.get("listeners", [])
    for i, j, (address, port) in _duplicates(
            rows, lambda r: (r["address"], r["port"]) if _has(r, "address", "port") else None):
        report(f"listeners[{i}]",
               f"duplicate listener {_hostport(address, port)} (also listeners[{j}])")


def _check_transceivers(s, report):
    rows = s.get("transceivers", [])
    for i, j, tid in _duplicates(rows, lambda r: r["id"] if _has(r, "id") else None):
        report(f"transceivers[{i}].id", f"duplicate id {tid} (also transceivers[{j}])")
    # The relay knows which transceiver sent a packet only by its source
    # address, so two ids behind one address:port would be indistinguishable.
    for i, j, (address, port) in _duplicates(
            rows, lambda r: (r["address"], r["port"]) if _has(r, "address", "port") else None):
        report(f"transceivers[{i}]",
               f"same address {_hostport(address, port)} as transceivers[{j}]; "
               "the relay tells transceivers apart by source address")
    # Names label metrics; two equal names would merge two transceivers' series.
    # Two default names clash only when the ids do, which is reported above.
    for i, j, name in _duplicates(
            rows, lambda r: (r["name"] or f"tx{r['id']}") if _has(r, "name", "id") else None):
        if rows[i]["name"] or rows[j]["name"]:
            report(f"transceivers[{i}].name",
                   f"duplicate name {_show(name)} (also transceivers[{j}])")
    ids = {r["id"] for r in rows if _has(r, "id")}
    all_ids_known = all(_has(r, "id") for r in rows)
    for i, row in enumerate(rows):
        if not _has(row, "backup") or row["backup"] is None:
            continue
        backup = row["backup"]
        if _has(row, "id") and backup == row["id"]:
            report(f"transceivers[{i}].backup",
                   f"names its own id {backup}; a backup must be another transceiver")
        elif backup not in ids and all_ids_known:
            report(f"transceivers[{i}].backup", f"no transceiver has id {backup}")


def _check_internal(s, report):
    relay, internal = s.get("relay"), s.get("internal")
    # Worker i binds internal.port + i: the last worker's port must exist.
    if _has(relay, "workers") and _has(internal, "port") and internal["port"]:
        workers = relay["workers"] or _online_cpus()
        last = internal["port"] + workers - 1
        if last > 65535:
            why = (" (relay.workers = 0: one per online CPU here)"
                   if relay["workers"] == 0 else "")
            report("internal.port",
                   f"{internal['port']} + {workers} workers{why} - 1 = {last} exceeds 65535; "
                   "lower internal.port or relay.workers")
    # A socket bound to an IPv4 address cannot send to IPv6 and vice versa;
    # only the IPv6 wildcard "::" reaches both (a dual-stack socket, see
    # sockets.internal_dual_stack, sending to IPv4-mapped addresses).
    if not _has(internal, "address"):
        return
    bind = ipaddress.ip_address(internal["address"])
    for i, row in enumerate(s.get("transceivers", [])):
        if not _has(row, "address"):
            continue
        dest = ipaddress.ip_address(row["address"])
        if dest.version != bind.version and not (bind.version == 6 and bind.is_unspecified):
            report(f"transceivers[{i}].address",
                   f"IPv{dest.version} address {dest} cannot be reached from "
                   f"internal.address {bind} (IPv{bind.version})")
        elif bind.is_loopback and not dest.is_loopback:
            # Linux refuses a datagram from a loopback source to another host (EINVAL).
            report(f"transceivers[{i}].address",
                   f"{dest} is not on this host, and internal.address {bind} is loopback: "
                   "every send would fail (EINVAL); set internal.address to this host's "
                   f"address on the transceiver network, or {'::' if bind.version == 6 else '0.0.0.0'}")


def _internal_ports(s):
    """(address, first port, last port) of the internal sockets, or None (unknown or ephemeral)."""
    relay, internal = s.get("relay"), s.get("internal")
    if not (_has(relay, "workers") and _has(internal, "port", "address")) or not internal["port"]:
        return None
    first = internal["port"]
    return internal["address"], first, min(65535, first + (relay["workers"] or _online_cpus()) - 1)


def _overlaps(listener, internal):
    """True when a listener on `listener` and the internal sockets on `internal` share a port space.

    Listeners are IPV6_V6ONLY; the internal "::" is dual-stack, so it clashes with IPv4 ones too.
    """
    a, b = ipaddress.ip_address(listener), ipaddress.ip_address(internal)
    return (a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified)) or \
        (b.version == 6 and b.is_unspecified)


def _check_own_sockets(s, report):
    """No listener on an internal port; no transceiver at one of the relay's own sockets."""
    internal = _internal_ports(s)
    own = []        # (address, first port, last port, what)
    for i, row in enumerate(s.get("listeners", [])):
        if _has(row, "address", "port"):
            own.append((row["address"], row["port"], row["port"], f"listeners[{i}]"))
            if internal and _overlaps(row["address"], internal[0]) and \
                    internal[1] <= row["port"] <= internal[2]:
                report(f"listeners[{i}].port",
                       f"{row['port']} is the internal port of worker {row['port'] - internal[1]} "
                       f"(internal.port {internal[1]}..{internal[2]} on {internal[0]}): "
                       "the two sockets cannot both bind it")
    if internal:
        own.append((*internal, "the internal sockets"))
    for i, row in enumerate(s.get("transceivers", [])):
        if not _has(row, "address", "port"):
            continue
        dest = ipaddress.ip_address(row["address"])
        for address, first, last, what in own:
            bound = ipaddress.ip_address(address)
            dual = what == "the internal sockets"
            # a wildcard receives what is sent to loopback; the internal "::" in both families
            local = dest == bound or (dest.is_loopback and bound.is_unspecified and (
                dest.version == bound.version or (dual and bound.version == 6)))
            if local and first <= row["port"] <= last:
                report(f"transceivers[{i}]",
                       f"{_hostport(row['address'], row['port'])} is the relay's own socket "
                       f"({what}): it would forward to itself")
                break


# Rules spanning several keys: each gets the per-key results (valid values
# only) and reports through `report(key, problem)`.
_CROSS_CHECKS = (_check_listeners, _check_transceivers, _check_internal, _check_own_sockets)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

def _collect(data, base_dir):
    found = []

    def report(key, problem):
        found.append((key, problem))

    sections = _check_sections(data, base_dir, report)
    for check in _CROSS_CHECKS:
        check(sections, report)
    return found, sections


def problems(data, base_dir):
    """Every (key, problem) pair for decoded TOML `data`; [] if it is valid."""
    return _collect(data, base_dir)[0]


def parse(data, base_dir):
    """Validate decoded TOML `data` and return a Config.

    Relative paths resolve against `base_dir` (the config file's folder).
    Raises ConfigError listing every problem found.
    """
    found, sections = _collect(data, base_dir)
    if found:
        raise ConfigError(found)
    built = {}
    for f in _section_fields():
        cls, values = f.metadata["section"], sections[f.name]
        built[f.name] = (tuple(cls(**v) for v in values) if f.metadata.get("many")
                         else cls(**values))
    return Config(**built)


def read_bounded(path, where):
    """The bytes of the config file at `path`, or ConfigError keyed by `where`.

    Only a regular file of at most MAX_CONFIG_BYTES is read. It is opened
    non-blocking and checked with fstat before any read, so a FIFO (which
    would block until a writer came), /dev/zero (endless), a directory or a
    socket is refused by name instead of hanging or exhausting memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise ConfigError([(where, f"cannot read: {err.strerror or err}")]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([(where, f"cannot read: not a regular file ({_file_kind(st.st_mode)})")])
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([(where, f"cannot read: {st.st_size} bytes, larger than the "
                                       f"{MAX_CONFIG_BYTES} bytes a config file may have")])
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES:      # the file may grow after fstat
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError([(where, f"cannot read: larger than the {MAX_CONFIG_BYTES} bytes "
                                       "a config file may have")])
        return b"".join(chunks)
    except OSError as err:
        raise ConfigError([(where, f"cannot read: {err.strerror or err}")]) from None
    finally:
        os.close(fd)


def _file_kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def _decode(raw, where):
    """Decoded TOML of the bytes `raw`, or ConfigError keyed by `where` (one line).

    Whatever the bytes, the outcome is a dict or ConfigError: tomllib
    recurses once per nested array or inline table (5,000 brackets is a
    RecursionError), and int() refuses more than 4,300 digits (ValueError).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([(where, f"not UTF-8 text (bad byte at offset {err.start})")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = " ".join(str(err).split())  # one line, whatever tomllib says
        raise ConfigError([(where, f"TOML syntax error: {_escape(message)}")]) from None
    except RecursionError:
        raise ConfigError([(where, "TOML nested too deeply (arrays or inline tables "
                                   "inside each other hundreds of levels deep)")]) from None
    except MemoryError:
        raise ConfigError([(where, "TOML too large to decode in memory")]) from None
    except ValueError as err:         # e.g. an integer literal of more than 4300 digits
        message = " ".join(str(err).split())[:_SHOW_MAX * 2]
        raise ConfigError([(where, f"TOML value refused: {_escape(message)}")]) from None


def load(path=DEFAULT_PATH):
    """Read, decode and validate the config file at `path`.

    An unreadable file, one that is not a regular file of at most
    MAX_CONFIG_BYTES, undecodable bytes or a TOML syntax error is one problem
    keyed by the file name; otherwise as `parse`, with relative paths resolved
    against the file's own folder (made absolute, so a later chdir changes
    nothing). ConfigError is the only exception it raises for any content.
    """
    path = pathlib.Path(path)
    where = _escape(str(path))  # the key of file-level problems, kept on one line
    data = _decode(read_bounded(path, where), where)
    try:
        return parse(data, path.absolute().parent)
    except (RecursionError, MemoryError) as err:   # parse itself does not recurse; belt and braces
        raise ConfigError([(where, f"cannot check: {type(err).__name__}")]) from None


def warnings(cfg):
    """(key, text) pairs for a valid `cfg` that works but is probably not what was meant."""
    out = []
    m = cfg.management
    if m.enabled and ipaddress.ip_address(m.address).is_unspecified:
        out.append(("management.address",
                    f"{m.address} serves /metrics and /healthz on every address of this host; "
                    "bind a management network address or 127.0.0.1 unless a firewall guards it"))
    return out


def load_keys(cfg):
    """The key ring `cfg` names (keys.dir, keys.signing_key_id); KeyFileError naming the file."""
    return keys_mod.load_dir(cfg.keys.dir, cfg.keys.signing_key_id)


def load_with_keys(path=DEFAULT_PATH):
    """(Config, KeyRing) for the config file at `path`: what start-up and every reload validate.

    Raises ConfigError or KeyFileError (both EdgeRelayError), one line per problem.
    """
    cfg = load(path)
    return cfg, load_keys(cfg)
