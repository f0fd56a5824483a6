# Sourced by tests/e2e/run in a subshell (uses IN, APT, ROOT, REPO, WORK,
# CT_IP, HOST_IP, DEB, DEB_NEXT, voice, json_get): the Ansible role applied to
# the container. Writes a one-line summary to $WORK/ansible.detail.
#
# ansible-core is installed inside the container and the playbook runs there
# with connection local, entered through nsenter (all namespaces, so /healthz
# on the container's loopback is reachable): the same role and site.yml an
# operator runs over ssh. Run 1 under voice traffic rewrites the config (log
# level notice) and the key files as the role owns them, so it must reload
# without loss; run 2 must change nothing.


# python3-apt: what the apt module needs on a target (it would fetch it itself).
APT apt-get -q -y install --no-install-recommends ansible-core python3-apt
rm -rf "$ROOT/root/ansible"
cp -a "$REPO/packaging/ansible" "$ROOT/root/ansible"
deb_in_ct=/root/$(basename "${DEB_NEXT:-$DEB}")

keys_yaml=$(for f in "$ROOT"/etc/edge-relay/keys/*.key; do
    printf '  - {id: %s, secret: "%s"}\n' "$(basename "$f" .key)" "$(tr -d '\n' < "$f")"; done)
cat > "$ROOT/root/ansible/e2e-vars.yml" <<VARS
edge_relay_deb: $deb_in_ct
edge_relay_keys:
$keys_yaml
edge_relay_signing_key_id: 1
edge_relay_workers: 2
edge_relay_drain_seconds: 3.0
edge_relay_internal_address: "$CT_IP"
edge_relay_transceivers:
  - {id: 1, address: "$HOST_IP", port: 5000}
edge_relay_log_level: notice
VARS
chmod 0600 "$ROOT/root/ansible/e2e-vars.yml"
printf '[edge_relays]\nlocalhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n' \
    > "$ROOT/root/ansible/e2e-inventory.ini"

playbook() {
    IN env ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 HOME=/root sh -c \
        'cd /root/ansible && ansible-playbook -i e2e-inventory.ini -e @e2e-vars.yml site.yml'
}
recap() { sed -n 's/.*localhost *: \(.*\)/\1/p' "$1" | tr -s ' '; }

voice 30 2 "$WORK/ansible-traffic.json"
traffic_pid=${BG_PIDS[-1]}
sleep 2
playbook > "$WORK/ansible-run1.log" 2>&1 || { cat "$WORK/ansible-run1.log"; exit 1; }
cat "$WORK/ansible-run1.log"
wait "$traffic_pid" || true
playbook > "$WORK/ansible-run2.log" 2>&1 || { cat "$WORK/ansible-run2.log"; exit 1; }
cat "$WORK/ansible-run2.log"

run1=$(recap "$WORK/ansible-run1.log") run2=$(recap "$WORK/ansible-run2.log")
sent=$(json_get "$WORK/ansible-traffic.json" sent) received=$(json_get "$WORK/ansible-traffic.json" received)
level=$(IN sed -n 's/^level = //p' /etc/edge-relay/edge-relay.toml)
echo "run 1: $run1; run 2: $run2; log level now $level; traffic during run 1: sent $sent, received $received" \
    | tee "$WORK/ansible.detail"
[[ $run1 == *"failed=0"* && $run1 != *"changed=0"* ]] || { echo "run 1 changed nothing or failed"; exit 1; }
[[ $run2 == *"changed=0"* && $run2 == *"failed=0"* ]] || { echo "run 2 was not idempotent"; exit 1; }
[[ $level == '"notice"' ]] || { echo "config not applied"; exit 1; }
((sent > 0 && sent == received)) || { echo "lost $((sent - received)) of $sent during the Ansible run"; exit 1; }
