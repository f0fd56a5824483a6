"""The bench's parts work at tiny scale: every forwarder moves datagrams both ways, the
relay's flows are confirmed through real ICE checks, latency is sampled, and the sans-IO
figures come out. Functional only: no timing thresholds (bench/run.py measures)."""

import os
import shutil

import pytest

from bench import micro, roles, run

pytestmark = pytest.mark.slow

TINY = dict(flows=4, duration=0.4, warm=0.1, pairs=1, lat_pairs=1, lat_duration=0.4,
            rates=(2000,), worker_pairs=1, window=64, micro=["--quick"])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing (make bench installs it: scripts/bootstrap --apt gcc libc6-dev)")
    tmp = tmp_path_factory.mktemp("bench")
    exe = run.build_cfwd(tmp / "build")
    (tmp / "run").mkdir()
    b = run.Bench(TINY, tmp / "run", exe, log=lambda msg: None)
    try:
        b.start_relay()
        b.start_null()
        b.start_naive()
        b.start_cfwd()
        yield b
    finally:
        b.close()


def test_relay_flows_are_confirmed_by_ice_checks(bench):
    setup = bench.setup("relay", timeout=5.0)
    assert setup["connected"] == setup["clients"] == TINY["flows"]
    assert setup["flows_seen_by_sink"] == TINY["flows"]
    assert setup["check_failures"] == 0


@pytest.mark.parametrize("name", ["relay", "null", "naive", "cfwd"])
@pytest.mark.parametrize("direction", ["c2t", "t2c"])
def test_every_forwarder_moves_datagrams_both_ways(bench, name, direction):
    if name == "relay" and "relay" not in bench.sink_flows_known:
        test_relay_flows_are_confirmed_by_ice_checks(bench)
    elif name != "relay":
        bench.learn(name)
    m = bench.measure(name, direction)
    # (pps may be 0 for the relay: 4 flows at full speed meet limits.flow_packets_rate)
    assert m["received"] > 0 and m["pps"] >= 0
    assert m["received"] <= m["sent"]
    assert set(m["cpu"]) == {"forwarder", "loadgen", "sink"}


@pytest.mark.parametrize("name", ["direct", "cfwd", "relay"])
def test_latency_is_sampled_at_a_fixed_rate(bench, name):
    if name == "relay" and "relay" not in bench.sink_flows_known:
        test_relay_flows_are_confirmed_by_ice_checks(bench)
    if name == "cfwd":
        bench.learn("cfwd")
    m = bench.measure(name, "c2t", rate=2000)
    lat = m["latency_us"]
    assert lat["n"] > 0 and 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"]


def test_summary_and_targets_from_a_tiny_result():
    fake = {"pps": 100.0, "cpu": {"forwarder": 0.5, "loadgen": 0.1, "sink": 0.1}, "cpu_per_packet_us": 5.0}
    lat = {"latency_us": {"p50": 20.0, "p99": 40.0, "p999": 80.0}}
    results = {
        "quick": True, "machine": run.machine(),
        "throughput_pairs": {"relay|cfwd:c2t": [(fake, dict(fake, pps=125.0))]},
        "latency_rounds": {"20000": [{"direct": lat, "cfwd": {"latency_us": {"p50": 30.0, "p99": 60.0, "p999": 90.0}},
                                      "relay": {"latency_us": {"p50": 31.0, "p99": 80.0, "p999": 99.0}}}]},
    }
    s = run.summarize(results)
    assert s["relay_vs_cfwd_pps_c2t"]["median"] == pytest.approx(0.8)
    assert s["latency_p50_added_vs_cfwd_20000"]["median"] == pytest.approx(1.1)
    v = run.verdicts(results, s)
    assert v["relay >= 0.7x cfwd, measured pps (c2t)"]["met"] is True
    assert v["memory per confirmed flow at 100k <= 300 B"]["met"] is None
    assert "Targets" in run.table(results, s, v)


def test_sans_io_figures_at_tiny_scale():
    import time
    wall_ms = int(time.time() * 1000)
    med, raw, ratios, drops = micro.cost_by_flows((1, 100), 1, 256, wall_ms)
    assert set(med) == {"c2t", "t2c"} and all(v > 0 for d in med.values() for v in d.values())
    assert drops == {1: 0, 100: 0}
    mem = micro.memory(2000, wall_ms)
    assert mem["flows"] == 2000 and mem["bytes_per_flow"] > 0
    nf = micro.new_flows(300, wall_ms)
    assert nf["opened"] == 300 and not nf["drops"]
    prof = micro.profile(640, n_clients=4)
    assert prof["c2t"]["top"] and prof["t2c"]["top"] and not prof["c2t"]["drops"]


def test_rtp_payload_is_voice_shaped():
    p = roles.rtp_payload(7)
    assert len(p) == 160 and p[0] == 0x80


@pytest.fixture(scope="module")
def side(bench, tmp_path_factory):
    from bench import turn, vs_coturn
    if not turn.available():
        pytest.skip("coturn is missing (make bench installs it: scripts/bootstrap --apt coturn)")
    if "relay" not in bench.sink_flows_known:
        bench.setup("relay", timeout=5.0)
    cp = dict(vs_coturn.params(True), duration=0.4, warm=0.1, lat_duration=0.4, window=64)
    s = vs_coturn.SideBySide(bench, cp, vs_coturn.build_cgen(tmp_path_factory.mktemp("cgen")), lambda m: None)
    try:
        setup = s.start_coturn()
        assert setup["allocations"] == TINY["flows"]
        yield s
    finally:
        s.close()
        bench.targets.pop("coturn", None)
    assert "enabled=enabled" not in turn.ensure_unit_off()    # the package's unit never left on


@pytest.mark.parametrize("name", ["relay", "coturn"])
@pytest.mark.parametrize("direction", ["c2t", "t2c"])
def test_c_generator_drives_both_relays_both_ways(side, name, direction):
    # paced first: a closed loop over 4 flows spends the relay's per-flow allowance
    # (limits.flow_packets_burst per 2 s window), after which it drops c2t by design
    p = side.measure(name, direction, rate=2000)
    lat = p["latency_us"]
    assert 0 < p["received"] <= p["sent"] and p["cpu"]["forwarder"] > 0
    assert lat["n"] > 0 and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    m = side.measure(name, direction)
    assert 0 < m["received"] <= m["sent"] and m["pps"] >= 0 and m["cpu"]["cgen"] > 0
    share = m["cpu"]["forwarder_kernel_share"]
    assert share is None or 0.0 <= share <= 1.0          # None: no clock tick fell in a short window


def test_kernel_share_is_system_over_user_plus_system_ticks():
    from bench import vs_coturn
    assert vs_coturn.kernel_share((10, 5), (13, 6)) == pytest.approx(0.25)
    assert vs_coturn.kernel_share((10, 5), (10, 5)) is None
    user, system = vs_coturn.user_sys_ticks(os.getpid())
    assert user >= 0 and system >= 0 and user + system > 0     # this process has run
    assert vs_coturn.user_sys_ticks(2 ** 22 + 1) == (0, 0)     # no such pid


def test_coturn_summary_and_targets_from_a_tiny_result():
    from bench import vs_coturn
    r = {"capacity_pps": 200.0, "cpu_per_packet_us": 5.0, "cpu": {"forwarder": 0.5, "cgen": 0.2},
         "latency_us": {"n": 10, "p50": 50.0}}
    c = dict(r, capacity_pps=100.0, cpu_per_packet_us=10.0, latency_us={"n": 10, "p50": 40.0})
    d = dict(r, latency_us={"n": 10, "p50": 5.0})
    results = {"coturn": {"capacity_pairs": {"c2t": [(r, c)]},
                          "fixed_rate_rounds": {"20000": {"c2t": [{"direct": d, "relay": r, "coturn": c}]}}}}
    s = vs_coturn.summarize(results)
    assert s["relay_vs_coturn_capacity_c2t"]["median"] == pytest.approx(2.0)
    assert s["relay_vs_coturn_cpu_per_packet_20000_c2t"]["median"] == pytest.approx(0.5)
    assert s["relay_minus_coturn_added_p50_us_20000_c2t"]["median"] == pytest.approx(10.0)
    v = {}
    vs_coturn.verdicts(s, lambda name, value, target, hib=True: v.__setitem__(name, (value, target, hib)))
    assert v["edge-relay >= 1.0x coturn, capacity pps/CPU-s (c2t)"][0] == pytest.approx(2.0)
    assert any("coturn" in line for line in vs_coturn.table(results))
    # results written before the kernel share existed still render
    r["cpu"] = dict(r["cpu"], forwarder_kernel_share=0.5)
    c["cpu"] = dict(c["cpu"], forwarder_kernel_share=None)
    lines = vs_coturn.table(results)
    assert any(" 0.50/-" in line for line in lines), lines
