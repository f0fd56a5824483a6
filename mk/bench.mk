# edge-relay benchmark (bench/): the relay against a null forwarder, a naive
# Python forwarder and a C forwarder (bench/cfwd.c, compiled here with gcc -O2)
# in the same run, then side by side with Debian's coturn (turnserver run
# directly, never its unit, which stays disabled; bench/turn.py) driven by a C
# generator (bench/cgen.c). Prints a table and writes bench/results.json.
#   make bench                 full run, about 10 minutes
#   make bench BENCH_QUICK=1   about two minutes, same figures with fewer samples

BENCH_QUICK ?=
# Extra arguments, e.g.  make bench BENCH_ARGS='--out /tmp/r.json --skip workers,coturn'
BENCH_ARGS ?=
# The bench needs only the standard library: the project's .venv when
# bootstrap made one (checked when the recipe runs, after bootstrap), else
# Debian's python3.

.PHONY: bench
CLEAN += bench/.build

bench: ## benchmark the relay vs null/naive/C forwarders and coturn (BENCH_QUICK=1: ~2 min); writes bench/results.json
	scripts/bootstrap --apt coturn gcc libc6-dev
	@# the package enables its unit on install: keep it off (the bench runs turnserver itself)
	-@systemctl disable --now coturn >/dev/null 2>&1; state=$$(systemctl is-enabled coturn 2>/dev/null); echo "coturn unit: $${state:-absent}"
	@py=$(VENV)/bin/python; [ -x "$$py" ] || py=/usr/bin/python3; \
	echo "BENCH_QUICK=$(BENCH_QUICK) $$py -m bench.run $(BENCH_ARGS)"; \
	BENCH_QUICK=$(BENCH_QUICK) "$$py" -m bench.run $(BENCH_ARGS)
