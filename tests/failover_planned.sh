#!/usr/bin/env bash
# Planned failover and failback of a VM with ext4 and files on its disk, with hooks:
#  - east runs vm1 (two disks, ext4 with files on d0) and replicates it to west;
#  - `failover --planned` at east runs east's pre_failover hook, ships everything, and
#    west takes over at a new epoch: its disks equal east's byte for byte, the files are
#    readable there, its post_failover hook ran, and east became the replica (reverse
#    replication running by itself);
#  - west writes more; `failback` at west brings vm1 home: east is primary again, west
#    its replica, and the disks equal again;
#  - commands on the wrong site or in the wrong state are refused with the reason.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"
command -v mkfs.ext4 >/dev/null || skip "mkfs.ext4 is not installed"

two_sites
WEST_MNT=$T/west/mnt
HOOKS=$T/hooks.log
add_vm "$EAST_CONF" vm1 'frequency = "continuous"' \
  "pre_failover = \"echo pre_failover \$SITEREP_SITE \$SITEREP_VM >> $HOOKS\"" \
  "post_failover = \"echo post_failover \$SITEREP_SITE \$SITEREP_VM >> $HOOKS\""
truncate -s 128M "$T/d0.img"
mkfs.ext4 -q -F "$T/d0.img"
add_disk "$EAST_CONF" d0 "$T/d0.img"
truncate -s 64M "$T/d1.img"
fill_random "$T/d1.img" 0 8
add_disk "$EAST_CONF" d1 "$T/d1.img"
cat >>"$WEST_CONF" <<EOT

[[hooks]]
vm = "vm1"
pre_failover = "echo pre_failover \$SITEREP_SITE \$SITEREP_VM >> $HOOKS"
post_failover = "echo post_failover \$SITEREP_SITE \$SITEREP_VM >> $HOOKS"
EOT

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID

step "enable replication and write files through ext4 at east"
timeout 120 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait >/dev/null ||
  fail "enable --wait failed"
attach_loop "$EAST_MNT/vm1/d0"
mount_dev "$LOOP" "$T/east-fs"
mkdir -p "$T/east-fs/data"
for i in 1 2 3; do head -c 3M /dev/urandom >"$T/east-fs/data/file$i"; done
(cd "$T/east-fs/data" && sha256sum file1 file2 file3 >"$T/files.sha256")
umount "$T/east-fs"
detach_loop "$LOOP"
dd if=/dev/urandom of="$EAST_MNT/vm1/d1" bs=1M count=4 seek=20 conv=notrunc status=none

step "wrong site and wrong state"
expect_exit1 "planned failover at the replica" "$SITEREP" -c "$WEST_CONF" failover vm1 --planned
expect_output_has "replica at west"
expect_exit1 "commit with nothing failed over" "$SITEREP" -c "$EAST_CONF" commit vm1
expect_output_has "no uncommitted failover"
expect_exit1 "reverse at the replica" "$SITEREP" -c "$WEST_CONF" reverse vm1
expect_exit1 "unplanned failover while the primary is healthy" \
  "$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned
expect_output_has "answers and runs VM vm1 as primary"

step "planned failover east -> west"
sha_d0=$(sha256sum <"$EAST_MNT/vm1/d0" | cut -d' ' -f1)
sha_d1=$(sha256sum <"$EAST_MNT/vm1/d1" | cut -d' ' -f1)
"$SITEREP" -c "$EAST_CONF" failover vm1 --planned || fail "planned failover failed"
[[ $(vm_field "$WEST_CONF" vm1 "v['role']") == primary ]] || fail "west is not primary"
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == replica ]] || fail "east is not the replica"
epoch=$(vm_field "$WEST_CONF" vm1 "v['epoch']")
[[ $epoch -eq 2 ]] || fail "west's epoch is $epoch (want 2)"
[[ $(sha256sum <"$WEST_MNT/vm1/d0" | cut -d' ' -f1) == "$sha_d0" ]] || fail "d0 differs at west"
[[ $(sha256sum <"$WEST_MNT/vm1/d1" | cut -d' ' -f1) == "$sha_d1" ]] || fail "d1 differs at west"
[[ ! -e $EAST_MNT/vm1/d0 ]] || fail "east still exposes vm1's disks"
grep -qx "pre_failover east vm1" "$HOOKS" || fail "east's pre_failover hook did not run"
grep -qx "post_failover west vm1" "$HOOKS" || fail "west's post_failover hook did not run"

step "the files are readable at west; reverse replication runs"
attach_loop "$WEST_MNT/vm1/d0"
mount_dev "$LOOP" "$T/west-fs"
(cd "$T/west-fs/data" && sha256sum -c --quiet "$T/files.sha256") || fail "files differ at west"
head -c 2M /dev/urandom >"$T/west-fs/data/written-at-west"
sha_west_file=$(sha256sum <"$T/west-fs/data/written-at-west" | cut -d' ' -f1)
umount "$T/west-fs"
detach_loop "$LOOP"
wait_state "$WEST_CONF" vm1 "reverse replicating"
wait_caught_up "$WEST_CONF" vm1
same_sha256 "$WEST_MNT/vm1/d0" "$T/d0.img" "east's copy after reverse replication"

step "failback: vm1 runs at east again, protected"
"$SITEREP" -c "$WEST_CONF" failback vm1 || fail "failback failed"
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == primary ]] || fail "east is not primary"
[[ $(vm_field "$WEST_CONF" vm1 "v['role']") == replica ]] || fail "west is not the replica"
epoch=$(vm_field "$EAST_CONF" vm1 "v['epoch']")
[[ $epoch -eq 3 ]] || fail "east's epoch is $epoch (want 3)"
wait_state "$EAST_CONF" vm1 replicating
wait_caught_up "$EAST_CONF" vm1
same_sha256 "$EAST_MNT/vm1/d0" "$WEST_STATE/replicas/vm1/d0.img" "d0 after failback"
same_sha256 "$EAST_MNT/vm1/d1" "$WEST_STATE/replicas/vm1/d1.img" "d1 after failback"
attach_loop "$EAST_MNT/vm1/d0"
mount_dev "$LOOP" "$T/east-fs"
[[ $(sha256sum <"$T/east-fs/data/written-at-west" | cut -d' ' -f1) == "$sha_west_file" ]] ||
  fail "the file written at west is not at east after failback"
umount "$T/east-fs"
detach_loop "$LOOP"
fsck.ext4 -n -f "$EAST_MNT/vm1/d0" >/dev/null 2>&1 || fail "fsck finds errors after failback"
diff <(printf '%s\n' "pre_failover east vm1" "post_failover west vm1" "pre_failover west vm1" \
  "post_failover east vm1") "$HOOKS" || fail "hooks ran out of order: $(cat "$HOOKS")"

step "a planned failover with the link down is refused"
stop_clean "$WEST_PID" "$WEST_CONF"
expect_exit1 "planned failover with west down" "$SITEREP" -c "$EAST_CONF" failover vm1 --planned
expect_output_has "not connected to west"
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == primary ]] || fail "east lost the VM"
stop_clean "$EAST_PID" "$EAST_CONF"
log "ok"
