#!/usr/bin/env bash
# Recovery plans are checked before anything runs, and every problem is reported at once:
#  - a malformed plan file: each mistake named by its key, nothing sent to the daemon;
#  - at the replica site (west) and at the primary site (east): a VM unknown there, a VM
#    not replicated, a VM whose replica is still being copied, all listed together;
#  - a good plan validates at both sites and lists its VMs with their roles and health.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"

two_sites
add_vm "$EAST_CONF" db1 'frequency = "continuous"'
add_disk "$EAST_CONF" os "$T/db1-os.img" 16M
add_disk "$EAST_CONF" data "$T/db1-data.img" 16M
for vm in web01 web02; do
  add_vm "$EAST_CONF" "$vm" 'frequency = "continuous"'
  add_disk "$EAST_CONF" os "$T/$vm-os.img" 16M
done

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
for vm in db1 web01; do
  timeout 60 "$SITEREP" -c "$EAST_CONF" enable "$vm" --to west --wait >/dev/null ||
    fail "enable $vm failed"
done

step "a malformed plan: every mistake named, nothing sent"
cat >"$T/bad.toml" <<'EOT'
name = "east-outage"
from = "east"
to = "east"
[[groups]]
name = "databases"
vms = ["db1"]
  [[groups.pre]]
  site = "west"
  run = "true"
  timeout = "0s"
[[groups]]
name = "web"
vms = ["web01", "db1"]
EOT
expect_exit1 "a malformed plan" "$SITEREP" -c "$WEST_CONF" plan validate "$T/bad.toml"
expect_output_has "bad.toml: to:"
expect_output_has "groups[0].pre[0].timeout: must be positive"
expect_output_has "groups[1].vms[1]: VM 'db1' is in group 'databases' and in group 'web'"

cat >"$T/plan.toml" <<'EOT'
name = "east-outage"
from = "east"
to = "west"
[[groups]]
name = "databases"
vms = ["db1"]
  [[groups.post]]
  site = "west"
  run = "echo db1 is up"
[[groups]]
name = "web"
vms = ["web01", "web02", "ghost"]
EOT

step "at west: unknown and unreplicated VMs are all reported"
expect_exit1 "validate at west" "$SITEREP" -c "$WEST_CONF" plan validate "$T/plan.toml"
expect_output_has "group web: VM web02: unknown at west"
expect_output_has "group web: VM ghost: unknown at west"
step "at east: the same plan, seen from the primary"
expect_exit1 "validate at east" "$SITEREP" -c "$EAST_CONF" plan validate "$T/plan.toml"
expect_output_has "group web: VM web02: not replicated to west"
expect_output_has "group web: VM ghost: unknown at east"

step "a good plan validates at both sites"
sed -i 's/vms = \["web01", "web02", "ghost"\]/vms = ["web01"]/' "$T/plan.toml"
"$SITEREP" -c "$WEST_CONF" plan validate "$T/plan.toml" >"$T/ok.out" ||
  fail "a good plan is refused at west: $(cat "$T/ok.out")"
grep -q "plan east-outage: valid at west (2 groups)" "$T/ok.out" || fail "unexpected: $(cat "$T/ok.out")"
grep -q "web01.*replica" "$T/ok.out" || fail "web01 is not listed: $(cat "$T/ok.out")"
"$SITEREP" -c "$EAST_CONF" plan validate "$T/plan.toml" --json >"$T/ok.json" ||
  fail "a good plan is refused at east"
[[ $(jq_py "len(d['vms'])" <"$T/ok.json") -eq 2 ]] || fail "east lists $(cat "$T/ok.json")"

step "a VM whose replication is critical needs --force"
"$SITEREP" -c "$EAST_CONF" pause web01 >/dev/null
expect_exit1 "validate with web01 paused" "$SITEREP" -c "$EAST_CONF" plan validate "$T/plan.toml"
expect_output_has "group web: VM web01: replication is critical"
"$SITEREP" -c "$EAST_CONF" plan validate "$T/plan.toml" --force >/dev/null ||
  fail "--force does not accept a critical VM"
"$SITEREP" -c "$EAST_CONF" resume web01 >/dev/null

stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
log "ok"
