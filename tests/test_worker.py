"""Tests for edge_relay/worker.py's construction (the loop itself runs in test_relay.py and the e2e tests)."""

from edge_relay.flows import FlowTable
from edge_relay.worker import Worker
from relayharness import Harness


def test_an_empty_flow_table_handed_in_is_the_one_used(tmp_path):
    """A restart with no flows to restore still hands its table over: it is used, not replaced from the config.

    (FlowTable defines __len__, so an empty one is falsy: `flows or ...` replaced it.)
    """
    h = Harness(tmp_path)
    try:
        handed = FlowTable(n_listeners=1, max_flows=7)
        assert len(handed) == 0
        w = Worker(h.cfg, h.keyring, h.listen_socks, h.internal_sock, h.log, flows=handed)
        assert w.router.flows is handed and w.router.flows.max_flows == 7
        assert h.router.flows is not handed and h.router.flows.max_flows == h.cfg.limits.max_flows
    finally:
        h.close()
