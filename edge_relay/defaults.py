"""Defaults of the [limits] keys that sans-IO code also takes as keyword arguments.

One table for three readers: config.Limits (what an omitted key means),
router.Policy and ratelimit.RateLimiters (what code that builds them without
a config gets: tests, bench). A default changed here changes all three; a
literal in one of them would let them drift apart. What each key means, and
its allowed range, is config.py's and edge-relay.toml(5)'s business.
"""

# router.Policy
HEADER_WINDOW = 2.0
TOKEN_MAX_LIFETIME = 86400.0
CLOCK_SKEW = 5.0

# ratelimit.RateLimiters (ratelimit.CONFIG_KEYS)
NEW_FLOWS_PER_SOURCE_RATE = 20.0
NEW_FLOWS_PER_SOURCE_BURST = 40
NEW_FLOWS_RATE = 20000.0
NEW_FLOWS_BURST = 40000
FLOW_PACKETS_RATE = 1000.0
FLOW_PACKETS_BURST = 2000
