"""The Debian package, the systemd units, the man page and the Ansible role.

What these check without installing anything: the units say what issue 6
asks (notify, watchdog, fd store, drain timing, sandbox, no capability for
the default port) and nothing twice or obsolete; the sandbox still rates
<= 1.5 on `systemd-analyze security --offline`; the man page names every
subcommand and option the CLI has; debian/changelog follows __version__.
The slow test builds the .deb and looks inside. The package itself, booted
and driven, is tests/e2e/run (`make e2e`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edge_relay
from edge_relay import cli, config, supervisor

REPO = Path(__file__).resolve().parent.parent
SERVICE = REPO / "systemd" / "edge-relay.service"
NFT_SERVICE = REPO / "systemd" / "edge-relay-nftables.service"
DEBIAN = REPO / "packaging" / "debian"
MANPAGE = REPO / "packaging" / "edge-relay.8"
ANSIBLE = REPO / "packaging" / "ansible"

# Keys systemd accepts more than once with a meaning (lists that add up).
REPEATABLE = {"SystemCallFilter", "ExecStartPre", "ExecStartPost", "ExecStop", "ExecStopPost", "ExecReload",
              "Environment", "ConditionPathExists", "ConditionPathExistsGlob", "After", "Before",
              "Wants", "Requires", "Documentation", "RestrictAddressFamilies"}
# Keys systemd 252 calls obsolete or deprecated (systemd.unit(5), systemd.resource-control(5)).
OBSOLETE = {"PermissionsStartOnly", "MemoryLimit", "CPUShares", "StartupCPUShares", "BlockIOWeight",
            "BlockIOAccounting", "BlockIODeviceWeight", "BlockIOReadBandwidth", "BlockIOWriteBandwidth",
            "StartupBlockIOWeight", "SysVStartPriority", "OnFailureIsolate", "RequiresOverridable",
            "RequisiteOverridable", "IgnoreOnSnapshot", "StartLimitInterval", "Capabilities",
            "ReadWriteDirectories", "ReadOnlyDirectories", "InaccessibleDirectories", "SyslogFacility"}


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} in file order, duplicates kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} before any section"
        current.append((key.strip(), value.strip()))
    return sections


def one(unit, section, key):
    values = [v for k, v in unit[section] if k == key]
    assert len(values) == 1, f"[{section}] {key}: expected once, found {values}"
    return values[0]


@pytest.mark.parametrize("path", [SERVICE, NFT_SERVICE], ids=lambda p: p.name)
def test_unit_has_no_duplicated_or_obsolete_keys(path):
    for section, items in parse_unit(path).items():
        keys = [k for k, _ in items]
        dupes = {k for k in keys if keys.count(k) > 1} - REPEATABLE
        assert not dupes, f"{path.name} [{section}] repeats {sorted(dupes)}"
        assert not set(keys) & OBSOLETE, f"{path.name} [{section}] uses obsolete {sorted(set(keys) & OBSOLETE)}"


def test_relay_unit_is_notify_with_watchdog_fd_store_and_reload():
    unit = parse_unit(SERVICE)
    expected = {
        "Type": "notify", "NotifyAccess": "main",
        "ExecStart": "/usr/bin/edge-relay run --config /etc/edge-relay/edge-relay.toml",
        "WatchdogSec": "10", "Restart": "on-failure",
        "FileDescriptorStoreMax": "512", "KillMode": "mixed", "LimitNOFILE": "65536",
        "User": "edge-relay", "Group": "edge-relay",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, key
    assert one(unit, "Unit", "ConditionPathExistsGlob") == "/etc/edge-relay/keys/*.key"


def test_reload_reports_the_relays_verdict_and_the_ruleset_follows_only_an_accepted_config():
    """Issue 13: `systemctl reload` fails when the relay refuses; the nft table follows only a success."""
    unit = parse_unit(SERVICE)
    reload = [v for k, v in unit["Service"] if k == "ExecReload"]
    # first the verdict (a non-zero exit stops the job there), then the firewall
    assert reload[0] == "/usr/bin/edge-relay reload --config /etc/edge-relay/edge-relay.toml --pid $MAINPID"
    assert reload[1:] == ["-+/bin/systemctl --no-block try-reload-or-restart edge-relay-nftables.service"]
    assert not [k for k, _ in unit["Unit"] if k == "PropagatesReloadTo"]
    assert one(unit, "Service", "RuntimeDirectory") == "edge-relay"
    assert "reload" in subcommands()
    nft_unit = parse_unit(NFT_SERVICE)
    for key in ("ExecStart", "ExecReload"):
        assert "nft -f \"$$f\"" in one(nft_unit, "Service", key)
        assert f"/run/edge-relay/{supervisor.RULESET_FILE}" in one(nft_unit, "Service", key)
    # nothing metered before the operator made a key (the relay's own condition)
    assert "/etc/edge-relay/keys/*.key" in [v for k, v in nft_unit["Unit"] if k == "ConditionPathExistsGlob"]


def test_stop_timeout_covers_the_drain():
    """SIGKILL must not cut the drain short: drain_seconds + the supervisor's grace < TimeoutStopSec."""
    drain = config.load(REPO / "packaging" / "edge-relay.toml").relay.drain_seconds
    timeout = float(one(parse_unit(SERVICE), "Service", "TimeoutStopSec"))
    assert drain + supervisor.KILL_GRACE < timeout <= drain + supervisor.KILL_GRACE + 15


def test_no_capability_for_the_default_port_and_only_the_needed_families():
    unit = parse_unit(SERVICE)
    ports = [lst.port for lst in config.load(REPO / "packaging" / "edge-relay.toml").listeners]
    assert min(ports) >= 1024
    assert one(unit, "Service", "CapabilityBoundingSet") == ""
    assert one(unit, "Service", "AmbientCapabilities") == ""
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    filters = [v for k, v in unit["Service"] if k == "SystemCallFilter"]
    # memfd_create is in @system-service; sched_setaffinity (CPU pinning) is in
    # @resources, which is denied except for it, and must come after the denial
    assert filters[0] == "@system-service"
    assert "sched_setaffinity" in filters[-1].split()


def test_nftables_unit_touches_only_our_table():
    unit = parse_unit(NFT_SERVICE)
    assert one(unit, "Service", "Type") == "oneshot"
    assert one(unit, "Service", "RemainAfterExit") == "yes"
    assert "edge-relay.service" in one(unit, "Unit", "Before").split()
    assert "edge-relay render-nft /etc/edge-relay/edge-relay.toml" in one(unit, "Service", "ExecStart")
    assert one(unit, "Service", "ExecStop").lstrip("-") == "/usr/sbin/nft delete table inet edge_relay"
    assert "edge-relay-nftables.service" in one(parse_unit(SERVICE), "Unit", "Wants")


def test_security_exposure_is_at_most_1_5_and_the_comment_says_so():
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze")
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(SERVICE)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edge-relay.service: ([0-9.]+)", out.stdout)
    if m is None:
        pytest.skip(f"systemd-analyze security --offline not supported here: {out.stderr.strip()[:200]}")
    exposure = float(m.group(1))
    assert exposure <= 1.5
    assert f"rates this unit {m.group(1)} " in SERVICE.read_text(), "update the figure in the unit's comment"


def subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_manpage_documents_every_subcommand_and_option():
    text = MANPAGE.read_text().replace("\\-", "-")
    for name, sub in subcommands().items():
        assert re.search(rf"^\.B {re.escape(name)}$", text, re.M), f"no .B {name} in COMMANDS"
        for action in sub._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in text, f"edge-relay {name} {opt} is not in the man page"
    for section in ("SIGNALS", "EXIT STATUS", "FILES", "CONFIGURATION"):
        assert f".SH {section}" in text
    for word in ("SIGHUP", "SIGTERM", "drain_seconds", "/etc/edge-relay/edge-relay.toml", "/etc/edge-relay/keys"):
        assert word in text


def test_manpage_renders_without_warnings():
    if not shutil.which("man"):
        pytest.skip("no man")
    out = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(MANPAGE)],
                         capture_output=True, text=True, timeout=60,
                         env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_changelog_follows_version():
    top = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert re.match(rf"edge-relay \({re.escape(edge_relay.__version__)}\) ", top), \
        f"debian/changelog starts {top!r}; add an entry for {edge_relay.__version__}"


def test_control_fields():
    control = (DEBIAN / "control").read_text()
    for needle in ("debhelper-compat (= 13)", "Architecture: all", "Section: net", "Priority: optional",
                   "${misc:Depends}", "python3 (>= 3.11)", "Recommends: nftables"):
        assert needle in control


def test_ansible_playbook_syntax():
    if not shutil.which("ansible-playbook"):
        pytest.skip("no ansible-playbook (apt install ansible-core)")
    out = subprocess.run(["ansible-playbook", "-i", "inventory.example.ini", "--syntax-check", "site.yml"],
                         cwd=ANSIBLE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stderr, out.stderr


def test_ansible_template_passes_check_config(tmp_path):
    """The role's template, rendered by Ansible with its defaults plus the required inputs, is valid."""
    if not shutil.which("ansible-playbook"):
        pytest.skip("no ansible-playbook (apt install ansible-core)")
    play = tmp_path / "render.yml"
    dest = tmp_path / "edge-relay.toml"
    play.write_text(f"""
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [{ANSIBLE}/roles/edge_relay/defaults/main.yml]
  tasks:
    - ansible.builtin.template:
        src: {ANSIBLE}/roles/edge_relay/templates/edge-relay.toml.j2
        dest: {dest}
        mode: "0644"
        validate: {sys.executable} -m edge_relay check-config %s
""")
    # extra vars: they win over the defaults file, as inventory vars do over role defaults
    inputs = {"edge_relay_transceivers": [{"id": 1, "address": "192.0.2.10", "port": 5000, "name": "tx1"},
                                          {"id": 2, "address": "192.0.2.11", "port": 5000, "backup": 1}],
              "edge_relay_limits": {"max_flows": 1000, "idle_timeout": 20.0},
              "edge_relay_signing_key_id": 3,
              # remote transceivers: the default 127.0.0.1 cannot reach them (check-config refuses it)
              "edge_relay_internal_address": "0.0.0.0"}
    out = subprocess.run(["ansible-playbook", "-i", "localhost,", "-e", json.dumps(inputs), str(play)], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
                              "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "0"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    cfg = config.load(dest)
    assert [t.id for t in cfg.transceivers] == [1, 2] and cfg.limits.max_flows == 1000


def load_yaml(path):
    """YAML through PyYAML here, or the one Ansible's python has (the test venv may lack it)."""
    try:
        import yaml
        return yaml.safe_load(path.read_text())
    except ImportError:
        pass
    out = subprocess.run(["/usr/bin/python3", "-c", "import json, sys, yaml; "
                          "print(json.dumps(yaml.safe_load(open(sys.argv[1]))))", str(path)],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.skip("no PyYAML (apt install ansible-core brings python3-yaml)")
    return json.loads(out.stdout)


def test_ansible_role_uses_the_strongest_check_and_the_relays_own_verdict():
    """Issue 13: check-config --keys, systemctl reload (which fails truthfully), a gate on /status."""
    role = ANSIBLE / "roles" / "edge_relay"
    tasks = {t["name"]: t for t in load_yaml(role / "tasks" / "main.yml")}
    template = next(t for t in tasks.values() if "ansible.builtin.template" in t)
    assert template["ansible.builtin.template"]["validate"] == "edge-relay check-config --keys %s"
    handlers = load_yaml(role / "handlers" / "main.yml")
    reload = next(h for h in handlers if h["listen"] == "edge-relay config changed")
    assert reload["ansible.builtin.systemd"]["state"] == "reloaded"
    gate = next(t for t in tasks.values() if "ansible.builtin.uri" in t)
    assert "edge_relay_status_url" in gate["ansible.builtin.uri"]["url"]
    for needle in ("json.config.sha256 == edge_relay_config_file.stat.checksum",
                   "json.workers_generation == edge_relay_status.json.generation",
                   "json.last_reload.state in ['none', 'ok']", "json.ready"):
        assert needle in gate["until"], needle
    # a new package upgrades the relay in place (postinst): no restart, and the gate waits for its code
    assert not any(h.get("listen") == "edge-relay package changed" for h in handlers)
    assert not any("state" in h.get("ansible.builtin.systemd", {}) and h["ansible.builtin.systemd"]["state"]
                   == "restarted" for h in handlers)
    for needle in ("json.version == edge_relay_installed.stdout", "json.last_upgrade.state in ['none', 'ok']"):
        assert needle in gate["until"], needle
    installed = next(t for t in tasks.values() if "ansible.builtin.command" in t)
    assert "dpkg-query" in installed["ansible.builtin.command"] and installed["changed_when"] is False
    digest = next(t for t in tasks.values() if "ansible.builtin.stat" in t)
    assert digest["ansible.builtin.stat"]["checksum_algorithm"] == "sha256"
    defaults = load_yaml(role / "defaults" / "main.yml")
    assert defaults["edge_relay_status_url"].endswith("/status")
    play = load_yaml(ANSIBLE / "site.yml")[0]
    assert play["serial"] == 1 and play["any_errors_fatal"] is True and play["max_fail_percentage"] == 0


def test_a_package_upgrade_asks_the_running_relay_to_upgrade_in_place_and_fails_with_it():
    """Issue 12: dpkg neither stops nor restarts the unit around an upgrade; postinst runs
    `edge-relay upgrade` (same pid) and fails when the relay refuses; exit 3 (a relay that cannot) restarts."""
    rules = (DEBIAN / "rules").read_text()
    assert re.search(r"^override_dh_installsystemd:\n\tdh_installsystemd --no-stop-on-upgrade$", rules, re.M)
    postinst = (DEBIAN / "postinst").read_text()
    block = postinst[postinst.index('if [ "$1" = configure ] && [ -n "$2" ]'):]
    assert "systemctl is-active --quiet edge-relay.service" in block
    assert 'edge-relay upgrade --config /etc/edge-relay/edge-relay.toml --pid "$pid"' in block
    assert "3)\n            deb-systemd-invoke restart edge-relay.service" in block
    assert re.search(r"\*\)\n(?:.*\n)*?\s+exit 1 ;;", block)
    assert "policy-rc.d" in postinst
    # what the CLI promises postinst
    assert cli.EXIT_UNSUPPORTED == 3
    out = subprocess.run([sys.executable, "-m", "edge_relay", "upgrade", "--help"], capture_output=True,
                         text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "--pid" in out.stdout


@pytest.mark.slow
def test_built_package_contents(tmp_path):
    if not shutil.which("dpkg-buildpackage") or not shutil.which("dh"):
        pytest.skip("no dpkg-buildpackage/debhelper (make deb installs them)")
    version = "0.0.0+test"
    out = subprocess.run([str(REPO / "packaging" / "build-deb"), version], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    deb = REPO / "build" / f"edge-relay_{version}_all.deb"
    try:
        listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                                 check=True).stdout
        info = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True,
                              check=True).stdout
        control = tmp_path / "control"
        subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    finally:
        deb.unlink(missing_ok=True)
        shutil.rmtree(REPO / "build" / "deb" / f"edge-relay-{version}", ignore_errors=True)
    paths = {line.split()[-1] for line in listing.splitlines()}
    for path in ("./usr/bin/edge-relay", "./etc/edge-relay/edge-relay.toml",
                 "./lib/systemd/system/edge-relay.service", "./lib/systemd/system/edge-relay-nftables.service",
                 "./usr/share/man/man8/edge-relay.8.gz", "./usr/lib/sysusers.d/edge-relay.conf",
                 "./usr/lib/tmpfiles.d/edge-relay.conf", "./usr/share/edge-relay/edge_relay/cli.py"):
        assert path in paths, path
    # The whole package tree ships (subpackages too), and no bytecode with it.
    package = REPO / "edge_relay"
    sources = {f"./usr/share/edge-relay/edge_relay/{p.relative_to(package)}" for p in package.rglob("*.py")}
    assert "./usr/share/edge-relay/edge_relay/demo/__init__.py" in sources
    assert not sources - paths, sorted(sources - paths)
    assert not [p for p in paths if "__pycache__" in p or p.endswith((".pyc", ".pyo"))]
    assert "Architecture: all" in info and "python3 (>= 3.11)" in info
    assert (control / "conffiles").read_text().split() == ["/etc/edge-relay/edge-relay.toml"]
    postinst = (control / "postinst").read_text()
    assert "edge-relay keygen --group edge-relay" in postinst
    # --no-stop-on-upgrade: a plain start (a no-op for a running unit), no stop before the upgrade,
    # a stop only on remove; the only restart is postinst's own for a relay that cannot upgrade in place
    assert "deb-systemd-invoke start 'edge-relay-nftables.service' 'edge-relay.service'" in postinst
    assert "_dh_action=restart" not in postinst and "try-restart" not in postinst
    assert not (control / "preinst").exists() or "stop" not in (control / "preinst").read_text()
    assert '[ "$1" = remove ]' in (control / "prerm").read_text()
    if (REPO / "docs" / "PROTOCOL.md").exists():
        # uncompressed: the unit's Documentation= links to it
        assert "./usr/share/doc/edge-relay/PROTOCOL.md" in paths
