# Debian package, its lint and the booted-container install test.
#
#   make deb                 build/edge-relay_<version>_all.deb, version from
#                            edge_relay/__init__.py (__version__)
#   make deb VERSION=0.1.1   the same package as version 0.1.1 (a changelog
#                            entry and __version__ are set in the build copy
#                            only), e.g. for the upgrade test
#   make lint-pkg            lintian, systemd-analyze verify/security, the
#                            Ansible syntax check, tests/test_packaging.py
#   make e2e                 tests/e2e/run: install, run, reload, restart,
#                            upgrade, Ansible and purge in a booted container
#
# The package is built from a copy of the working tree in build/deb/ (the
# debian/ directory lives in packaging/debian), never in the tree itself.

DEB_SRC_VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' edge_relay/__init__.py)
VERSION  ?= $(DEB_SRC_VERSION)
DEB      := build/edge-relay_$(VERSION)_all.deb
DEB_TREE := build/deb/edge-relay-$(VERSION)
DEB_BUILD_DEPS := debhelper dh-python python3-all lintian fakeroot
E2E_DEPS := systemd-container debootstrap iproute2 ansible-core

CLEAN += build/deb build/e2e

.PHONY: deb lint-pkg e2e

deb: ## build the Debian package build/edge-relay_<version>_all.deb (VERSION=x.y.z to override)
	scripts/bootstrap --apt $(DEB_BUILD_DEPS)
	packaging/build-deb $(VERSION)

lint-pkg: deb ## lintian, systemd-analyze verify/security and Ansible checks of the package
	scripts/bootstrap --apt $(DEB_BUILD_DEPS) ansible-core ansible-lint
	lintian --fail-on error,warning --info --display-info $(DEB)
	systemd-analyze security --offline=true --threshold=15 systemd/edge-relay.service | tail -n 1
	ansible-playbook -i localhost, --syntax-check packaging/ansible/site.yml
	$(PYTHON) -m pytest -q tests/test_packaging.py

e2e: ## install, run, reload, restart and upgrade the package in a booted bookworm container (root, ~5 min)
	scripts/bootstrap --apt $(DEB_BUILD_DEPS) $(E2E_DEPS)
	packaging/build-deb $(VERSION)
	packaging/build-deb $(shell echo $(VERSION) | awk -F. '{ $$NF += 1; print }' OFS=.)
	tests/e2e/run $(DEB) build/edge-relay_$(shell echo $(VERSION) | awk -F. '{ $$NF += 1; print }' OFS=.)_all.deb
