#!/usr/bin/env bash
# Unplanned failover, split brain and reverse replication:
#  - east runs vm1 (ext4 on d0) replicated to west; fio writes files in the file system;
#  - east's siterepd is killed with SIGKILL under that load;
#  - `failover --unplanned` at west brings vm1 up at the latest recovery point: the file
#    system mounts (journal replay) and fsck finds it clean; west writes more;
#  - east's siterepd starts again, still believing it is primary: it learns from west that
#    a newer epoch took over, is fenced (guest writes EROFS), ships nothing, and west's
#    data stays as it was (split brain refused);
#  - `reverse` at west commits the failover and makes east the replica: only the blocks
#    that differ are sent (far below the disk size), and the disks end up equal.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"
command -v mkfs.ext4 >/dev/null || skip "mkfs.ext4 is not installed"
command -v fio >/dev/null || skip "fio is not installed"

two_sites
WEST_MNT=$T/west/mnt
add_vm "$EAST_CONF" vm1 'frequency = "continuous"'
truncate -s 256M "$T/d0.img"
mkfs.ext4 -q -F "$T/d0.img"
add_disk "$EAST_CONF" d0 "$T/d0.img"
size=$(stat -c %s "$T/d0.img")

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
timeout 120 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait >/dev/null ||
  fail "enable --wait failed"

step "fio writes files in ext4 at east; east's siterepd is killed under the load"
attach_loop "$EAST_MNT/vm1/d0"
EAST_LOOP=$LOOP
mount_dev "$EAST_LOOP" "$T/east-fs"
mkdir -p "$T/east-fs/load"
head -c 4M /dev/urandom >"$T/east-fs/before"
sync -f "$T/east-fs/before"
fio --name=load --directory="$T/east-fs/load" --rw=randwrite --bs=16k --size=24M --nrfiles=4 \
  --fsync=16 --time_based --runtime=60 --ioengine=psync >"$T/fio.out" 2>&1 &
FIO_PID=$!
_PIDS+=("$FIO_PID")
sleep 4
before_kill=$(vm_field "$WEST_CONF" vm1 "v['applied_cycle']")
kill -KILL "$EAST_PID"
wait "$EAST_PID" 2>/dev/null || true
_forget_pid "$EAST_PID"
log "east's siterepd killed; west applied cycle $before_kill"
# The file system on the dead disk: detach what this test stacked on it.
kill -KILL "$FIO_PID" 2>/dev/null || true
wait "$FIO_PID" 2>/dev/null || true
_forget_pid "$FIO_PID"
umount -l "$T/east-fs" || true
losetup -d "$EAST_LOOP" 2>/dev/null || true
fusermount3 -uz "$EAST_MNT" 2>/dev/null || true

step "unplanned failover at west, to the latest point"
for ((i = 0; i < 100; i++)); do
  [[ $(vm_field "$WEST_CONF" vm1 "v['link']['state']") != connected ]] && break
  sleep 0.1
done
expect_exit1 "unknown point" "$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned --point 999999
expect_output_has "no recovery point 999999"
"$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned --point latest || fail "unplanned failover failed"
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == "failed over" ]] || fail "west is not failed over"
[[ $(vm_field "$WEST_CONF" vm1 "v['epoch']") -eq 2 ]] || fail "west's epoch is not 2"
attach_loop "$WEST_MNT/vm1/d0"
mount_dev "$LOOP" "$T/west-fs"
cmp -s "$T/west-fs/before" <(head -c 4M "$T/west-fs/before") || fail "before is unreadable"
head -c 8M /dev/urandom >"$T/west-fs/written-at-west"
umount "$T/west-fs"
fsck.ext4 -n -f "$LOOP" >"$T/fsck.out" 2>&1 || { cat "$T/fsck.out" >&2; fail "fsck finds errors at west"; }
log "fsck: clean after the journal replay"
detach_loop "$LOOP"
west_sha=$(sha256sum <"$WEST_MNT/vm1/d0" | cut -d' ' -f1)

expect_exit1 "reverse with east down" "$SITEREP" -c "$WEST_CONF" reverse vm1
expect_output_has "cannot reach east"
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == "failed over" ]] || fail "the refused reverse committed"

step "east comes back believing it is primary: it is fenced"
start_daemon "$EAST_CONF"
EAST_PID=$DAEMON_PID
wait_ready "$EAST_CONF" "$EAST_PID"
wait_state "$EAST_CONF" vm1 fenced
expect_erofs "$EAST_MNT/vm1/d0"
[[ $(sha256sum <"$WEST_MNT/vm1/d0" | cut -d' ' -f1) == "$west_sha" ]] ||
  fail "west's data changed while east was fenced"
expect_exit1 "planned failover at fenced east" "$SITEREP" -c "$EAST_CONF" failover vm1 --planned
expect_output_has "fenced"

step "reverse at west: commit, east becomes the replica, only differing blocks go"
"$SITEREP" -c "$WEST_CONF" reverse vm1 --wait >"$T/reverse.out" 2>&1 ||
  { cat "$T/reverse.out" >&2; fail "reverse --wait failed"; }
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == replica ]] || fail "east is not the replica"
wait_caught_up "$WEST_CONF" vm1
sent=$(vm_field "$WEST_CONF" vm1 "v['last_sync']['bytes_sent']")
compared=$(vm_field "$WEST_CONF" vm1 "v['last_sync']['bytes_total']")
log "reverse replication compared $compared bytes and sent $sent bytes of data for a disk of $size bytes"
# Only the blocks either site changed since the fork are compared, not the whole disk.
[[ $compared -lt $((size / 2)) ]] || fail "reverse replication compared $compared bytes (disk $size)"
[[ $sent -lt $((size / 4)) ]] || fail "reverse replication sent $sent bytes (disk $size)"
same_sha256 "$WEST_MNT/vm1/d0" "$T/d0.img" "east's image after reverse replication"
stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
log "ok"
