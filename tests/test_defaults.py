"""Classes built without a config (tests, the bench) get what an omitted config key gives (edge_relay/defaults.py)."""

from edge_relay import config, ratelimit
from edge_relay.directory import Directory
from edge_relay.probes import Prober
from edge_relay.quality import QualityMonitor
from edge_relay.router import Policy


def test_policy_and_rate_limiters():
    bare, configured = Policy(), Policy.from_limits(config.Limits())
    assert (bare.header_window_ms, bare.token_max_lifetime, bare.clock_skew) == \
        (configured.header_window_ms, configured.token_max_lifetime, configured.clock_skew)

    def numbers(lim):
        return (lim.per_source.rate, lim.per_source.burst, lim.total.rate, lim.total.burst,
                lim.per_flow.window, lim.per_flow.burst)
    assert numbers(ratelimit.RateLimiters()) == numbers(ratelimit.RateLimiters(**configured.rates))


def test_prober_quality_monitor_and_directory():
    p, q, d = config.Probes(), config.Quality(), config.Directory()
    prober = Prober([1])
    assert (prober.interval, prober.down_after, prober.up_after) == (p.interval, p.down_after, p.up_after)
    monitor = QualityMonitor()
    assert (monitor.sample_every, monitor.max_sampled, monitor.report_interval) == \
        (q.sample_every, q.max_sampled, q.report_interval)
    directory = Directory()
    assert (directory.ttl, directory.timeout, directory.max_held_per_flow, directory.max_held_total,
            directory.max_lookups, directory.negative_ttl) == \
        (d.ttl, d.timeout, d.max_held_per_flow, d.max_held_total, d.max_lookups, d.negative_ttl)
