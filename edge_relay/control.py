"""The control channel between the supervisor and a worker: every message, encoded and decoded here.

Theory of operation
  Each worker has one AF_UNIX SOCK_SEQPACKET pair to the supervisor: one
  message per datagram, at most CTL_MAX bytes, a verb and an optional
  argument separated by one space (or, for REPORT_FLOWS, the JSON filters
  directly after the verb). Messages that carry a file (FLOWS, FLOW_REPORT)
  pass a memfd with SCM_RIGHTS beside the verb. Both sides build messages
  with the encode_* functions and read them with decode(); no other module
  spells a verb.

    supervisor -> worker
      RELOAD <generation>   re-read config and keys (already validated); on
                            success run and publish that generation
      DRAIN <usec>          the operator's drain: refuse new flows from that
                            CLOCK_MONOTONIC microsecond on (the supervisor and
                            its workers share the clock), forward the rest,
                            keep running
      UNDRAIN               the drain is cancelled: accept new flows again
      STOP                  exit now, sending the flow table (FLOWS) first
      REPORT_FLOWS<json>    answer FLOW_REPORT with the flows matching the
                            filters {"limit", "transceiver", "state", "client"}
    worker -> supervisor
      RELOADED              the reload took
      RELOAD_FAILED <why>   the worker kept its old config, and why
      FLOWS + memfd         the flow table snapshot, sent as the worker exits
      FLOW_REPORT + memfd   the JSON answer to REPORT_FLOWS

  A worker started to take over a running one (an upgrade, upgrade.py) is
  built but does not read its sockets until its turn:
    worker -> supervisor   READY         config and keys loaded, loop built
    supervisor -> worker   TAKE [+ memfd] the old worker has stopped: restore
                                         the flow snapshot (if any) and serve

  During an upgrade the supervisor runs the new code and the workers it
  took over still run the old one: STOP and FLOWS (what it asks of them)
  and the rest of this protocol must keep their meaning from one version to
  the next. A new verb is safe (the old side ignores it); a changed one is
  not.

  An unknown or malformed message decodes to (None, None) and is ignored.
"""

import json

CTL_MAX = 256           # bytes in one control message (a SEQPACKET datagram)

RELOAD = b"reload"
DRAIN = b"drain"
UNDRAIN = b"undrain"
STOP = b"stop"
REPORT_FLOWS = b"report-flows"
RELOADED = b"reloaded"
RELOAD_FAILED = b"reload-failed"
FLOWS = b"flows"
FLOW_REPORT = b"flow-report"
READY = b"ready"
TAKE = b"take"

_PLAIN = (UNDRAIN, STOP, RELOADED, FLOWS, FLOW_REPORT, READY, TAKE)
_WITH_NUMBER = (RELOAD, DRAIN)


def encode_reload(generation):
    return RELOAD + b" %d" % generation


def encode_drain(refuse_at):
    """DRAIN from `refuse_at` (time.monotonic() seconds) on."""
    return DRAIN + b" %d" % max(0, int(refuse_at * 1_000_000))


def encode_reload_failed(why):
    head = RELOAD_FAILED + b" "
    return head + (why or "").encode("utf-8", "replace")[:CTL_MAX - len(head)]


def encode_report_flows(limit, transceiver=None, state=None, client=None):
    """The GET /flows question; ValueError when the filters do not fit one message."""
    msg = REPORT_FLOWS + json.dumps({"limit": limit, "transceiver": transceiver, "state": state,
                                     "client": client}).encode()
    if len(msg) > CTL_MAX:
        raise ValueError("filters too long for one control message")
    return msg


def decode(msg):
    """(verb, argument) of one message; (None, None) when it is none of the verbs above.

    The argument is the generation (int) for RELOAD, the time to refuse from
    (time.monotonic() seconds, float) for DRAIN, the reason (str) for
    RELOAD_FAILED, the filters (dict) for REPORT_FLOWS, else None.
    """
    if msg in _PLAIN:
        return msg, None
    if msg.startswith(REPORT_FLOWS):
        try:
            filters = json.loads(msg[len(REPORT_FLOWS):])
        except (ValueError, UnicodeDecodeError):
            return None, None
        return (REPORT_FLOWS, filters) if isinstance(filters, dict) else (None, None)
    verb, _, arg = msg.partition(b" ")
    if verb in _WITH_NUMBER:
        if not arg.isdigit():
            return None, None
        return (RELOAD, int(arg)) if verb == RELOAD else (DRAIN, int(arg) / 1_000_000)
    if verb == RELOAD_FAILED:
        return RELOAD_FAILED, arg.decode("utf-8", "replace")
    return None, None
