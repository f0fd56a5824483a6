"""Voice quality at the edge: a call with induced loss and reordering shows in the metrics.

The client drops every 10th RTP packet it would send (the sequence number
still advances: loss) and swaps every 7th with the one after it
(reordering); the relay, which only reads the clear RTP header, must count
both in `edge_relay_rtp_*_total` and the per-flow histograms. First with the
harness (exact numbers), then through `edge-relay run` and /metrics.
"""

import time

from edge_relay import demo, metrics
from edge_relay.quality import CLIENT, TRANSCEIVER
from relayharness import Harness
from relayproc import CountingClient, Relay, Setup, Traffic, Transceiver, http_get, parse_prometheus
from waiting import wait_for


class LossyClient(demo.VoiceClient):
    """Skips every 10th packet and swaps every 7th with its successor."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.n = 0
        self.held = None
        self.skipped = 0
        self.swapped = 0

    def _send(self, data):
        if not data or not 128 <= data[0] <= 191:
            return super()._send(data)
        self.n += 1
        if self.n % 10 == 0:
            self.skipped += 1
            return None
        if self.held is not None:
            super()._send(data)
            super()._send(self.held)
            self.held = None
            self.swapped += 1
            return None
        if self.n % 7 == 0:
            self.held = data
            return None
        return super()._send(data)


def test_harness_counts_loss_and_reordering_exactly(tmp_path):
    h = Harness(tmp_path, sections={"quality": {"sample_every": 1, "report_interval": 0.1}})
    try:
        ufrag, password = h.session(1)
        vc = LossyClient(h.public, ufrag, password, sock=h.client())
        now = time.monotonic()
        assert h.connect(vc, now)
        for i in range(300):
            vc.send_media(now + i * 0.02)
            h.settle()
        vc.pump(now)
        q = h.router.quality
        assert len(q.flows) == 1
        h.router.report(time.monotonic() + 10)
        d = q.dirs[CLIENT]
        # 300 sent by the app, 30 never left; the last in-order one bounds "expected"
        assert d.lost >= vc.skipped - 1 and d.lost <= vc.skipped + 1
        assert d.reordered == vc.swapped
        assert q.dirs[TRANSCEIVER].reordered == vc.swapped      # the echo preserves the order it got
        assert d.ttfm.count == 1
        text = "\n".join(metrics.render_extra([metrics.extra_of(h.worker)]))
        assert 'edge_relay_rtp_lost_total{direction="client"}' in text
        print(f"\nquality (harness): client->transceiver expected {d.expected} lost {d.lost} "
              f"reordered {d.reordered}; jitter histogram count {d.jitter.count}")
    finally:
        h.close()


QUALITY = {"probes": {"enabled": False}, "quality": {"sample_every": 1, "report_interval": 0.5}}


def test_relay_process_exports_quality_histograms(tmp_path):
    setup = Setup(tmp_path, workers=1, sections=QUALITY)
    tx = Transceiver(setup.keyring, setup.tx_sock)
    relay = Relay(setup)
    try:
        relay.wait_serving()
        ufrag, password = demo.mint_session(setup.keyring, 1, time.time())

        class Client(LossyClient, CountingClient):
            pass
        vc = Client(setup.public, ufrag, password)
        traffic = Traffic([vc], tx)
        assert traffic.run(10, until=lambda: vc.connected)
        traffic.run(3.0)

        def lost():
            fams = parse_prometheus(http_get(setup.url + "/metrics")[1])
            fam = fams.get("edge_relay_rtp_lost_total")
            if fam and fam["samples"].get((("direction", "client"),), 0) > 0:
                return fams
            return None
        fams = wait_for(lost, 5, what="loss to show in /metrics")
        lost_n = fams["edge_relay_rtp_lost_total"]["samples"][(("direction", "client"),)]
        reordered = fams["edge_relay_rtp_reordered_total"]["samples"][(("direction", "client"),)]
        assert reordered > 0
        loss = fams["edge_relay_flow_loss_ratio"]["samples"]
        assert loss[(("suffix", "_count"), ("direction", "client"))] >= 1
        # ~10 % loss per interval: not in the 0..2 % buckets
        assert loss[(("suffix", "_bucket"), ("direction", "client"), ("le", "0.02"))] == 0
        assert fams["edge_relay_flow_time_to_media_seconds"]["samples"][
            (("suffix", "_count"), ("direction", "client"))] == 1
        print(f"\nquality (relay process): lost {lost_n:.0f} (client skipped {vc.skipped}), "
              f"reordered {reordered:.0f} (client swapped {vc.swapped})")
    finally:
        relay.kill()
