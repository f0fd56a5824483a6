# Restart latency (bench/startup.py): a relay restarted the way `systemctl
# restart` does it, with live flows and a probe caller; prints where the time
# from exec to the first forwarded packet goes and writes bench/startup.json.
#   make bench-startup                        5 restarts, 200 flows
#   make bench-startup STARTUP_ARGS='--runs 10 --relay-path /tmp/main'   e.g. against another tree

STARTUP_ARGS ?=

.PHONY: bench-startup

bench-startup: ## restart latency: exec -> first forwarded packet, step by step (~30 s); writes bench/startup.json
	@py=$(VENV)/bin/python; [ -x "$$py" ] || py=/usr/bin/python3; \
	echo "$$py -m bench.startup $(STARTUP_ARGS)"; \
	"$$py" -m bench.startup $(STARTUP_ARGS)
