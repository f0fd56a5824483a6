# Sourced by tests/e2e/run in a subshell (uses IN, APT, ROOT, REPO, WORK, CT,
# CT_IP, HOST_IP, DEB, DEB_NEXT, CACHE, BASE, RUN_ID, boot, running,
# status_at, nft_table, voice, json_get, teardown): the Ansible role rolled out
# from the host over SSH, as an operator rolls out a PoP. Writes a one-line
# summary to $WORK/ansible.detail.
#
#   relay-0  the container the other steps used (installed, serving traffic)
#   relay-1  fresh containers booted from a cached rootfs (python3, sshd,
#   relay-2  nftables; $CACHE/bookworm-target, built once) through an overlay
#
# site.yml runs serial: 1 with any_errors_fatal, so:
#   run 1  under voice traffic to relay-0: its config changes (log level
#          notice), so it reloads without loss; relay-1 and relay-2 install
#          the package; every host's gate passes (its relay runs the file the
#          role wrote, on every worker, and is ready)
#   run 2  changes nothing
#   run 3  the issue's reproduction, signing key 7 (no such key): the role's
#          check-config --keys refuses it on relay-0, the run stops there and
#          no host's config file changes
#   run 4  a config relay-0's relay refuses although check-config --keys
#          passes it (a listener on UDP 3479, which another process holds
#          there): `systemctl reload` fails, so the run stops on relay-0;
#          relay-0 keeps its generation and nftables table, and relay-1 and
#          relay-2 are untouched (their config file and generation as before)

# Our own containers go when this subshell ends; the parent's are its own.
NSPAWN_PIDS=() LEADERS=() LINKS=() NETNSES=() MOUNTS=() BG_PIDS=()
trap 'set +e; for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done; teardown' EXIT
trap 'exit 130' INT TERM

# --- the rollout hosts' rootfs, built once ---------------------------------------
TARGET=$CACHE/bookworm-target
TARGET_PACKAGES="python3 python3-apt openssh-server nftables procps"
if [[ ! -e $TARGET/.e2e-complete ]]; then
    echo "building $TARGET: minbase + $TARGET_PACKAGES (first run only)"
    tmp=$TARGET.tmp.$RUN_ID
    rm -rf "$tmp"
    cp -a --reflink=auto "$BASE" "$tmp"
    systemd-nspawn -q --register=no --keep-unit -D "$tmp" --resolv-conf=copy-host \
        --bind="$CACHE/apt-archives:/var/cache/apt/archives" --bind="$CACHE/apt-lists:/var/lib/apt/lists" \
        sh -c "apt-get -q update && DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends $TARGET_PACKAGES" \
        > "$WORK/target-rootfs.log" 2>&1 || { tail -n 20 "$WORK/target-rootfs.log"; rm -rf "$tmp"; exit 1; }
    touch "$tmp/.e2e-complete"
    rm -rf "$TARGET" && mv -T "$tmp" "$TARGET"
fi

# --- an SSH key for this run, sshd on relay-0 --------------------------------------
mkdir -p "$WORK/ssh" "$WORK/home"
ssh-keygen -q -t ed25519 -N "" -C "edge-relay-e2e-$RUN_ID" -f "$WORK/ssh/id_ed25519"
authorize() {  # authorize ROOTFS
    install -d -m 0700 "$1/root/.ssh"
    install -m 0600 "$WORK/ssh/id_ed25519.pub" "$1/root/.ssh/authorized_keys"
}
APT apt-get -q -y install --no-install-recommends openssh-server python3-apt > "$WORK/ssh-install.log" 2>&1 \
    || { tail -n 20 "$WORK/ssh-install.log"; exit 1; }
authorize "$ROOT"
IN systemctl start ssh.service

# --- relay-1 and relay-2: booted from the target rootfs, each in its own netns ---------
RNET=10.$((200 + RUN_ID % 50)).$((RUN_ID / 50 % 250))
declare -A ADDR=([relay-0]=$CT_IP) PID1=([relay-0]=$CT)
for k in 1 2; do
    name=relay-$k dir=$WORK/h$k ns=edge-relay-e2e-$RUN_ID-h$k
    hip=$RNET.$((4 * k + 1)) cip=$RNET.$((4 * k + 2))
    mkdir -p "$dir/upper" "$dir/work" "$dir/root"
    if mount -t overlay overlay -o "lowerdir=$TARGET,upperdir=$dir/upper,workdir=$dir/work" "$dir/root" 2>/dev/null; then
        MOUNTS+=("$dir/root")
    else
        cp -a --reflink=auto "$TARGET/." "$dir/root/"
    fi
    rm -f "$dir/root/.e2e-complete"
    echo "$name" > "$dir/root/etc/hostname"
    authorize "$dir/root"
    ip netns add "$ns"; NETNSES+=("$ns")
    ip link add "erh${RUN_ID}h$k" type veth peer name "erc${RUN_ID}h$k"; LINKS+=("erh${RUN_ID}h$k")
    ip link set "erc${RUN_ID}h$k" netns "$ns"
    ip addr add "$hip/30" dev "erh${RUN_ID}h$k"
    ip link set "erh${RUN_ID}h$k" up
    ip -n "$ns" addr add "$cip/30" dev "erc${RUN_ID}h$k"
    ip -n "$ns" link set "erc${RUN_ID}h$k" up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$hip"       # the demo transceiver is at $HOST_IP
    boot "edge-relay-e2e-$RUN_ID-h$k" "$dir/root" "$ns" "$WORK/console-$name.log"
    ADDR[$name]=$cip PID1[$name]=$BOOTED
done
for k in 1 2; do
    state=$(running "${PID1[relay-$k]}")
    [[ $state == running || $state == degraded ]] || { echo "relay-$k: systemd $state"; exit 1; }
done

# --- inventory and variables on the controller (this host) ---------------------------
A=$WORK/ansible
rm -rf "$A"
cp -a "$REPO/packaging/ansible" "$A"
{
    echo "[edge_relays]"
    for name in relay-0 relay-1 relay-2; do
        echo "$name ansible_host=${ADDR[$name]} edge_relay_internal_address=${ADDR[$name]}"
    done
    echo
    echo "[edge_relays:vars]"
    echo "ansible_user=root"
    echo "ansible_python_interpreter=/usr/bin/python3"
    echo "ansible_ssh_private_key_file=$WORK/ssh/id_ed25519"
    echo "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR'"
} > "$A/e2e-inventory.ini"
keys_yaml=$(for f in "$ROOT"/etc/edge-relay/keys/*.key; do
    printf '  - {id: %s, secret: "%s"}\n' "$(basename "$f" .key)" "$(tr -d '\n' < "$f")"; done)
cat > "$A/e2e-vars.yml" <<VARS
edge_relay_deb: ${DEB_NEXT:-$DEB}
edge_relay_keys:
$keys_yaml
edge_relay_signing_key_id: 1
edge_relay_workers: 2
edge_relay_drain_seconds: 3.0
edge_relay_transceivers:
  - {id: 1, address: "$HOST_IP", port: 5000}
edge_relay_log_level: notice
VARS
chmod 0600 "$A/e2e-vars.yml"
# run 3: a second listener port; on relay-0 another process holds it
printf 'edge_relay_listeners:\n  - {address: "0.0.0.0", port: 3479}\n' > "$A/e2e-refused.yml"

playbook() {  # playbook [EXTRA ARGS]
    (cd "$A" && env HOME="$WORK/home" ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_PIPELINING=1 \
        ANSIBLE_HOST_KEY_CHECKING=0 ANSIBLE_LOCAL_TEMP="$WORK/home/tmp" \
        ansible-playbook -i e2e-inventory.ini -e @e2e-vars.yml "$@" site.yml)
}
recap() { sed -n "s/^$2 *: \(.*\)/\1/p" "$1" | tr -s ' '; }
gate() {  # gate NAME: what the role's gate checks, asked again from here
    status_at "${PID1[$1]}" 'd["config"]["sha256"] == disk and d["workers_generation"] == d["generation"] and d["ready"] and d["last_reload"]["state"] in ("none", "ok")'
}

# --- run 1: under traffic; run 2: idempotent ---------------------------------------------
voice 25 2 "$WORK/ansible-traffic.json"
traffic_pid=${BG_PIDS[-1]}
sleep 2
playbook > "$WORK/ansible-run1.log" 2>&1 || { cat "$WORK/ansible-run1.log"; exit 1; }
cat "$WORK/ansible-run1.log"
wait "$traffic_pid" || true
for name in relay-0 relay-1 relay-2; do
    [[ $(gate "$name") == True ]] || { echo "run 1: $name does not run the config the role wrote"; exit 1; }
done
playbook > "$WORK/ansible-run2.log" 2>&1 || { cat "$WORK/ansible-run2.log"; exit 1; }
cat "$WORK/ansible-run2.log"
run1=$(recap "$WORK/ansible-run1.log" relay-1) run2=$(recap "$WORK/ansible-run2.log" relay-0)
sent=$(json_get "$WORK/ansible-traffic.json" sent) received=$(json_get "$WORK/ansible-traffic.json" received)
level=$(IN sed -n 's/^level = //p' /etc/edge-relay/edge-relay.toml)
[[ $(recap "$WORK/ansible-run1.log" relay-0) == *"failed=0"* && $(recap "$WORK/ansible-run1.log" relay-0) != *"changed=0"* ]] \
    || { echo "run 1 changed nothing on relay-0 or failed"; exit 1; }
for name in relay-0 relay-1 relay-2; do
    [[ $(recap "$WORK/ansible-run1.log" $name) == *"failed=0"* ]] || { echo "run 1 failed on $name"; exit 1; }
    [[ $(recap "$WORK/ansible-run2.log" $name) == *"changed=0"*"failed=0"* ]] || { echo "run 2 was not idempotent on $name"; exit 1; }
done
[[ $level == '"notice"' ]] || { echo "config not applied"; exit 1; }
((sent > 0 && sent == received)) || { echo "lost $((sent - received)) of $sent during the Ansible run"; exit 1; }

untouched() {  # untouched NAME...: config file digest and generation as in BEFORE
    local name
    for name in "$@"; do
        [[ $(status_at "${PID1[$name]}" 'disk[:16] + " generation " + str(d["generation"])') == "${BEFORE[$name]}" ]] \
            || problems+=("$name was touched")
    done
}
declare -A BEFORE=()
for name in relay-0 relay-1 relay-2; do
    BEFORE[$name]=$(status_at "${PID1[$name]}" 'disk[:16] + " generation " + str(d["generation"])')
done

# --- run 3: signing key 7, refused by the role's validation on relay-0 -----------------------
problems=()
run3_rc=0
playbook -e edge_relay_signing_key_id=7 > "$WORK/ansible-run3.log" 2>&1 || run3_rc=$?
cat "$WORK/ansible-run3.log"
((run3_rc != 0)) || problems+=("run 3 succeeded")
[[ $(recap "$WORK/ansible-run3.log" relay-0) == *"failed=1"* ]] || problems+=("run 3: relay-0 did not fail")
grep -q 'failed to validate' "$WORK/ansible-run3.log" || problems+=("run 3: not refused by the validation")
untouched relay-0 relay-1 relay-2
((${#problems[@]} == 0)) || { echo "run 3: ${problems[*]}"; exit 1; }

# --- run 4: relay-0 refuses; the run stops there ---------------------------------------------
IN systemd-run --quiet --unit=e2e-hold-3479 python3 -c 'import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 3479)); time.sleep(3600)'
for _ in $(seq 50); do   # held once we cannot bind it ourselves
    IN python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("0.0.0.0", 3479))' \
        2>/dev/null || break
    sleep 0.1
done
table_before=$(nft_table "$CT")
cp "$ROOT/etc/edge-relay/edge-relay.toml" "$WORK/relay-0-good.toml"
run4_rc=0
playbook -e @e2e-refused.yml > "$WORK/ansible-run4.log" 2>&1 || run4_rc=$?
cat "$WORK/ansible-run4.log"
((run4_rc != 0)) || problems+=("run 4 succeeded")
grep -q 'RUNNING HANDLER \[edge_relay : Reload edge-relay\]' "$WORK/ansible-run4.log" || problems+=("no reload handler ran")
[[ $(recap "$WORK/ansible-run4.log" relay-0) == *"failed=1"* ]] || problems+=("relay-0 did not fail")
reason=$(IN journalctl --no-pager -o cat -u edge-relay.service -n 40 | grep -m 1 'edge-relay reload: refused' || true)
[[ $reason == *3479* ]] || problems+=("no refusal naming port 3479 in relay-0's journal: $reason")
[[ $(status_at "$CT" 'str(d["generation"])') == "${BEFORE[relay-0]##* }" ]] || problems+=("relay-0 changed generation")
[[ $(status_at "$CT" 'd["last_reload"]["state"]') == refused ]] || problems+=("relay-0's verdict is not refused")
[[ $(nft_table "$CT") == "$table_before" ]] || problems+=("relay-0's nft table changed")
! IN nft list table inet edge_relay | grep -q 'dport 3479' || problems+=("relay-0 meters 3479")
untouched relay-1 relay-2
for name in relay-1 relay-2; do
    ! grep -q "^$name *:" <<< "$(sed -n '/PLAY RECAP/,$p' "$WORK/ansible-run4.log")" || problems+=("$name is in the recap")
done
IN systemctl stop e2e-hold-3479.service
cp "$WORK/relay-0-good.toml" "$ROOT/etc/edge-relay/edge-relay.toml"
IN systemctl reload edge-relay.service || problems+=("relay-0: reload of the good config back failed")

echo "run 1: relay-1 $run1; run 2: relay-0 $run2; log level now $level; traffic during run 1: sent $sent, received $received; run 3 (signing key 7): rc=$run3_rc, refused by check-config --keys on relay-0, no host touched; run 4 (relay-0 refuses port 3479): rc=$run4_rc, ${problems[*]:-stopped on relay-0 (\"${reason#edge-relay reload: }\"), its generation and nft table kept, relay-1 and relay-2 untouched}" \
    | tee "$WORK/ansible.detail"
((${#problems[@]} == 0)) || exit 1
