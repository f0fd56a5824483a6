# Debian package, its lint and the booted-container install test.
#
#   make deb                 build/edge-relay_<version>_all.deb, version from
#                            edge_relay/__init__.py (__version__)
#   make deb VERSION=0.1.1   the same package as version 0.1.1 (a changelog
#                            entry and __version__ are set in the build copy
#                            only), e.g. for the upgrade test
#   make lint-pkg            lintian (no error, no warning), the unit's
#                            exposure <= 1.5, ansible-playbook --syntax-check
#                            and ansible-lint, tests/test_packaging.py
#                            (systemd-analyze verify needs the installed
#                            package: make e2e runs it in the container)
#   make e2e                 tests/e2e/run: install, run, reload, a refused
#                            reload, restart, upgrade, a killed worker and
#                            purge in a booted container, and an Ansible
#                            rollout over SSH to it and two more (root; a few
#                            minutes once the rootfs is cached); what the
#                            callers heard under each action, beside issue
#                            12's targets, in build/e2e/figures.json
#
# The package is built from a copy of the working tree in build/deb/ (the
# debian/ directory lives in packaging/debian), never in the tree itself.

DEB_SRC_VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' edge_relay/__init__.py)
VERSION  ?= $(DEB_SRC_VERSION)
DEB      := build/edge-relay_$(VERSION)_all.deb
# The upgrade target of make e2e: the last number of VERSION plus one.
NEXT_VERSION = $(shell echo $(VERSION) | awk -F. '{ $$NF += 1; print }' OFS=.)
DEB_BUILD_DEPS := debhelper dh-python lintian
# Ansible runs on the host and reaches the containers over SSH (tests/e2e/ansible.sh).
E2E_DEPS := systemd-container debootstrap iproute2 ansible-core openssh-client

CLEAN += build/deb build/e2e

.PHONY: deb lint-pkg e2e

deb: ## build the Debian package build/edge-relay_<version>_all.deb (VERSION=x.y.z to override)
	scripts/bootstrap --apt $(DEB_BUILD_DEPS)
	packaging/build-deb $(VERSION)

lint-pkg: deb ## lintian, unit sandbox score, Ansible syntax/lint and tests/test_packaging.py
	scripts/bootstrap --apt $(DEB_BUILD_DEPS) ansible-core ansible-lint
	lintian --fail-on error,warning --info --display-info $(DEB)
	set -o pipefail; systemd-analyze security --offline=true --threshold=15 systemd/edge-relay.service | tail -n 1
	cd packaging/ansible && ansible-playbook -i inventory.example.ini --syntax-check site.yml
	cd packaging/ansible && ansible-lint --offline site.yml roles/edge_relay
	$(PYTHON) -m pytest -q tests/test_packaging.py

e2e: ## install, reload (and a refused one), restart, upgrade, a killed worker (what callers heard), a 3-host Ansible rollout over SSH, purge in booted bookworm containers (root, ~3 min)
	scripts/bootstrap --apt $(DEB_BUILD_DEPS) $(E2E_DEPS)
	packaging/build-deb $(VERSION)
	packaging/build-deb $(NEXT_VERSION)
	tests/e2e/run $(DEB) build/edge-relay_$(NEXT_VERSION)_all.deb
