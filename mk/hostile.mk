# The hostile bench and the nftables rulesets (docs/SECURITY.md).
#
#   make hostile    tests/test_hostile.py, test_nft.py, test_ratelimit.py, verbose,
#                   with the bench's table of attack classes and counters printed;
#                   root (namespaces, nftables) for the bench, skipped otherwise
#   make nft-check  render the shipped example rulesets and `nft -c` them

.PHONY: hostile nft-check

hostile: bootstrap ## attack bench: every attack class counted, legit call under flood (root)
	scripts/bootstrap --apt nftables
	$(PYTHON) -m pytest -s -v tests/test_hostile.py tests/test_nft.py tests/test_ratelimit.py $(PYTEST_ARGS)

nft-check: bootstrap ## render nftables/example.toml and check it with nft -c (root)
	scripts/bootstrap --apt nftables
	$(PYTHON) -m edge_relay render-nft nftables/example.toml | nft -c -f -
	$(PYTHON) -m edge_relay render-nft --transceiver-side nftables/example.toml | nft -c -f -
