"""The one exception family for operator errors.

Operator errors are mistakes a person can fix: a bad config key, an unreadable
or unsafe key file, a socket that cannot be bound. Each carries a one-line
message that names what is wrong and where.

Per-packet outcomes are never exceptions: decoders return a `Drop` reason
(see drops.py) and the relay counts it. Any other exception escaping a decoder
is a bug, and the fuzz tests check exactly that.
"""


class EdgeRelayError(Exception):
    """Base of every error meant for an operator; str() is one line."""


class ConfigError(EdgeRelayError):
    """One or more problems in a config file.

    `problems` is a list of (key, problem) pairs; str() joins them as
    "key: problem" lines, one per problem.
    """

    def __init__(self, problems):
        if isinstance(problems, tuple):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(f"{k}: {p}" for k, p in self.problems))


class KeyFileError(EdgeRelayError):
    """A key file is missing, unreadable, unsafe or malformed (names the file)."""


class StartupError(EdgeRelayError):
    """The relay cannot start: a socket cannot be bound, a worker cannot run."""


def reason(exc):
    """One line saying why `exc` happened, for a log line that must not span lines.

    An EdgeRelayError says it itself (its problems joined with "; "); any
    other exception is a bug in the relay, named as such with its type, so a
    reload that met one is still refused with a reason rather than a traceback.
    """
    text = "; ".join(str(exc).split("\n"))
    if isinstance(exc, EdgeRelayError):
        return text
    return f"internal error {type(exc).__name__}: {text[:200]} (a bug; please report it)"
