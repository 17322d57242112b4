#!/usr/bin/env bash
# Configuration errors: siterepd exits 1 (not a crash) with one message naming the key and
# why, and mounts nothing. Also the CLI: usage errors exit 2, a missing daemon exits 1.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/d0.img"

# bad_config NAME KEY_IN_MESSAGE: writes $T/NAME.toml from stdin, starts siterepd on it and
# checks the refusal.
bad_config() {
  local name=$1 want=$2
  cat >"$T/$name.toml"
  expect_exit1 "$name" "$SITEREPD" -c "$T/$name.toml"
  expect_output_has "$want"
  [[ $(wc -l <<<"$FAIL_OUTPUT") -le 3 ]] || fail "$name: want a short message, got: $FAIL_OUTPUT"
  ! is_mounted "$T/mnt" || fail "$name: something was mounted"
}

site() {
  cat <<EOF2
[site]
name = "east"
state_dir = "$T/state"
mountpoint = "$T/mnt"
EOF2
}
vm() {
  cat <<EOF2

[[vms]]
name = "vm1"
$1
  [[vms.disks]]
  name = "d0"
  image = "$T/d0.img"
EOF2
}

step "a config that is right starts (control for the cases below)"
{ site; vm 'frequency = "30s"'; } >"$T/good.toml"
start_ready "$T/good.toml"
stop_clean "$DAEMON_PID" "$T/good.toml"

step "unknown keys"
{ site; echo 'colour = "blue"'; vm ''; } | bad_config unknown-site-key "site.colour"
{ site; vm 'speed = 3'; } | bad_config unknown-vm-key "vms[0].speed"
{ site; vm ''; echo '  size = "1G"'; } | bad_config unknown-disk-key "vms[0].disks[0].size"
{ site; vm ''; echo '[extra]'; echo 'a = 1'; } | bad_config unknown-table "extra"

step "wrong types"
{ site; vm 'recovery_points = "four"'; } | bad_config type-recovery-points "vms[0].recovery_points"
{ site; vm 'frequency = 30'; } | bad_config type-frequency "vms[0].frequency"
{ site | sed 's/^mountpoint = .*/mountpoint = 42/'; vm ''; } | bad_config type-mountpoint "site.mountpoint"

step "bad values"
{ site; vm 'frequency = "10m"'; } | bad_config bad-frequency "vms[0].frequency"
{ site; vm 'tracking = "sometimes"'; } | bad_config bad-tracking "vms[0].tracking"
{ site; vm 'log_budget = "1GiB"'; } | bad_config gone-budget "vms[0].log_budget: no longer used"
{ site | sed 's/^name = .*/name = "bad name"/'; vm ''; } | bad_config bad-site-name "site.name"

step "missing keys and duplicates"
{ site | grep -v '^mountpoint'; vm ''; } | bad_config missing-mountpoint "site.mountpoint"
{ vm ''; } | bad_config missing-site "site"
{ site; printf '\n[[vms]]\nname = "vm1"\n'; } | bad_config vm-without-disks "vms[0].disks"
{ site; printf '\n[[vms]]\nname = "vm1"\n  [[vms.disks]]\n  name = "d0"\n'; } | bad_config disk-without-image "vms[0].disks[0].image"
{ site; vm ''; vm ''; } | bad_config duplicate-vm "vms[1].name"

step "TOML syntax error names the line"
{ site; echo 'frequency = "5m'; vm ''; } | bad_config syntax "syntax.toml:5"

step "a config file that does not exist"
expect_exit1 "missing config" "$SITEREPD" -c "$T/nope.toml"
expect_output_has "$T/nope.toml"

step "the CLI"
rc=0
"$SITEREP" -c "$T/good.toml" status >"$T/cli.out" 2>&1 || rc=$?
[[ $rc -eq 1 ]] || fail "siterep status with no daemon: exit $rc (want 1): $(cat "$T/cli.out")"
[[ -s $T/cli.out ]] || fail "siterep status with no daemon printed no reason"
log "no daemon: $(cat "$T/cli.out")"
rc=0
"$SITEREP" -c "$T/good.toml" frobnicate >/dev/null 2>&1 || rc=$?
[[ $rc -eq 2 ]] || fail "siterep with an unknown command: exit $rc (want 2)"
rc=0
"$SITEREPD" --no-such-flag >/dev/null 2>&1 || rc=$?
[[ $rc -eq 2 ]] || fail "siterepd with an unknown flag: exit $rc (want 2)"
expect_exit1 "CLI with a bad config" "$SITEREP" -c "$T/bad-frequency.toml" status
expect_output_has "vms[0].frequency"
