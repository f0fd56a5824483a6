"""Defaults of the config keys that sans-IO code also takes as keyword arguments.

One table per key for two readers: config.py's field table (what an omitted
key means) and the class that uses the number (what code that builds it
without a config gets: tests, the bench). A literal in each would let the
two drift apart. What each key means, and its allowed range, is config.py's
and edge-relay.toml(5)'s business. (flows.FlowTable still spells its own
[limits] defaults: max_flows, max_pending_per_source, pending_ttl,
idle_timeout, max_flows_per_session, max_flows_per_transceiver.)
"""

# [limits], router.Policy
HEADER_WINDOW = 2.0
TOKEN_MAX_LIFETIME = 86400.0
CLOCK_SKEW = 5.0

# [limits], ratelimit.RateLimiters (ratelimit.CONFIG_KEYS)
NEW_FLOWS_PER_SOURCE_RATE = 20.0
NEW_FLOWS_PER_SOURCE_BURST = 40
NEW_FLOWS_RATE = 20000.0
NEW_FLOWS_BURST = 40000
FLOW_PACKETS_RATE = 1000.0
FLOW_PACKETS_BURST = 2000

# [probes], probes.Prober (its timeout is None for adaptive, the config's 0.0)
PROBE_INTERVAL = 0.25
PROBE_DOWN_AFTER = 3
PROBE_UP_AFTER = 2

# [quality], quality.QualityMonitor
QUALITY_SAMPLE_EVERY = 16
QUALITY_MAX_SAMPLED = 1024
QUALITY_REPORT_INTERVAL = 5.0

# [directory], directory.Directory
DIRECTORY_TTL = 30
DIRECTORY_TIMEOUT = 0.1
DIRECTORY_MAX_HELD_PER_FLOW = 8
DIRECTORY_MAX_HELD_TOTAL = 2048
DIRECTORY_MAX_LOOKUPS = 256
DIRECTORY_NEGATIVE_TTL = 1.0
