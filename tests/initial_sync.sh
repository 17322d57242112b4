#!/usr/bin/env bash
# Initial replication of VMs whose disks already hold data, while the guest writes on.
#  vm1 (two disks): enable --wait with verified fio load overwriting the data being copied.
#    The snapshot file exists during the copy and is gone after; west is killed with
#    SIGKILL mid-copy and the copy resumes where it was (bytes sent stay near the data
#    size); after the lag drains the replica equals the primary (sha256) and siterep-check
#    finds it is exactly the pre-image plus the primary's log through one cycle.
#  vm2: east is killed with SIGKILL mid-copy; the restarted daemon takes a new snapshot and
#    the replica's blocks that are already there are compared, not sent again.
#  Bad input: enabling twice, to an unknown site.
source "$(dirname "$0")/lib.sh"

command -v fio >/dev/null || skip "fio is not installed"
command -v openssl >/dev/null || skip "openssl is not installed"

two_sites
# A slow link, so that the copy lasts long enough to be interrupted.
sed -i "/^address = \"127.0.0.1:$WEST_PORT\"/a bandwidth_limit = \"16MiB\"" "$EAST_CONF"
add_vm "$EAST_CONF" vm1 'frequency = "continuous"'
mib() { echo $(($1 * 1024 * 1024)); }
truncate -s 512M "$T/d0.img"
truncate -s 256M "$T/d1.img"
fill_random "$T/d0.img" 0 48
fill_random "$T/d0.img" 300 32
fill_random "$T/d1.img" 16 40
DATA1=$(mib 120)
for d in d0 d1; do
  cp --sparse=always "$T/$d.img" "$T/$d.pre"
  add_disk "$EAST_CONF" "$d" "$T/$d.img"
done
add_vm "$EAST_CONF" vm2 'frequency = "continuous"'
truncate -s 256M "$T/v2.img"
fill_random "$T/v2.img" 8 96
DATA2=$(mib 96)
add_disk "$EAST_CONF" v2 "$T/v2.img"

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF" --archive-logs "$T/archive"
EAST_PID=$DAEMON_PID

# wait_progress VM PERCENT: waits until the VM's sync at east has reached PERCENT.
wait_progress() {
  local i p
  for ((i = 0; i < 200; i++)); do
    p=$(vm_field "$EAST_CONF" "$1" "v['progress']['percent'] >= $2")
    [[ $p == true ]] && break
    sleep 0.1
  done
  ((i < 200)) || fail "the copy of $1 did not reach $2%"
  log "$1: progress $(vm_field "$EAST_CONF" "$1" "v['progress']['percent']")% before the kill"
}

step "fio with verify overwrites the data while vm1's initial copy runs"
FIO_ARGS=(--ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-64k --iodepth=4
  --verify=crc32c --verify_fatal=1 --rate=2m)
fio --name=d0 --filename="$EAST_MNT/vm1/d0" "${FIO_ARGS[@]}" --offset=0 --size=48M \
  >"$T/fio-d0.out" 2>&1 &
FIO0=$!
fio --name=d1 --filename="$EAST_MNT/vm1/d1" "${FIO_ARGS[@]}" --offset=16M --size=40M \
  >"$T/fio-d1.out" 2>&1 &
FIO1=$!
sleep 1
"$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait >"$T/enable.out" 2>&1 &
ENABLE=$!
_PIDS+=("$ENABLE")

for ((i = 0; i < 100; i++)); do
  [[ $(vm_field "$EAST_CONF" vm1 "v['state']") == "initial replication" ]] && break
  sleep 0.1
done
((i < 100)) || fail "vm1 never showed the state 'initial replication'"
[[ -f $T/d0.img.srsnap ]] || fail "no snapshot file next to d0 during the copy"
log "snapshot files: $(ls "$T" | grep -c srsnap); progress: $(vm_field "$EAST_CONF" vm1 "v['progress']")"

step "west is killed with SIGKILL mid-copy and restarted"
wait_progress vm1 25
crash_daemon "$WEST_PID" "$WEST_CONF"
[[ $(vm_field "$EAST_CONF" vm1 "v['state']") == "initial replication" ]] ||
  fail "vm1 left the initial replication while its replica was down"
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == "initial replication" ]] ||
  fail "west's replica does not say it is being copied: $(vm_field "$WEST_CONF" vm1 "v['state']")"
[[ $(vm_field "$WEST_CONF" vm1 "v['last_recovery_point']") == null ]] ||
  fail "west claims a recovery point in the middle of the initial copy"

wait "$ENABLE" || { cat "$T/enable.out" >&2; fail "enable --wait failed"; }
grep -q "initial replication .*%" "$T/enable.out" || { cat "$T/enable.out" >&2; fail "enable --wait showed no progress"; }
log "enable --wait said: $(grep -c '%' "$T/enable.out") progress lines, then: $(tail -n 1 "$T/enable.out")"
[[ ! -e $T/d0.img.srsnap && ! -e $T/d1.img.srsnap ]] || fail "the snapshot files are still there after the copy"
sent=$(vm_field "$EAST_CONF" vm1 "v['last_sync']['bytes_sent']")
log "vm1: $sent bytes of data sent for $DATA1 bytes of data on the disks"
((sent <= DATA1 * 13 / 10)) || fail "the copy started over after west's crash: $sent bytes sent"

wait "$FIO0" || { cat "$T/fio-d0.out" >&2; fail "fio on d0 failed"; }
wait "$FIO1" || { cat "$T/fio-d1.out" >&2; fail "fio on d1 failed"; }

step "after the lag drains, vm1's replica equals the primary"
wait_caught_up "$EAST_CONF" vm1 120
for d in d0 d1; do
  same_sha256 "$T/$d.img" "$WEST_STATE/replicas/vm1/$d.img" "replica of $d"
done
mkdir -p "$T/archive/vm1/d0" "$T/archive/vm1/d1"
"$BIN/siterep-check" --work-dir "$T" \
  "$T/d0.pre" "$T/archive/vm1/d0" "$WEST_STATE/replicas/vm1/d0.img" \
  "$T/d1.pre" "$T/archive/vm1/d1" "$WEST_STATE/replicas/vm1/d1.img" >"$T/check.out" ||
  { cat "$T/check.out" >&2; fail "siterep-check: the replica is not a consistent point"; }
log "$(tail -n 1 "$T/check.out")"
[[ $(vm_field "$EAST_CONF" vm1 "v['state']") == replicating ]] || fail "vm1 is not replicating"
[[ $(vm_field "$EAST_CONF" vm1 "v['progress']['percent']") == 100.0 ]] || fail "progress is not 100% after the copy"

step "bad input"
expect_exit1 "enabling vm1 twice" "$SITEREP" -c "$EAST_CONF" enable vm1 --to west
expect_output_has "already replicated"
expect_exit1 "enabling vm2 to an unknown site" "$SITEREP" -c "$EAST_CONF" enable vm2 --to north
expect_output_has "unknown site"

step "east is killed with SIGKILL in the middle of vm2's copy"
"$SITEREP" -c "$EAST_CONF" enable vm2 --to west >/dev/null
wait_progress vm2 12
crash_daemon "$EAST_PID" "$EAST_CONF"
[[ $(vm_field "$WEST_CONF" vm2 "v['last_recovery_point']") == null ]] ||
  fail "west claims a recovery point of a half copied vm2"
start_ready "$EAST_CONF" --archive-logs "$T/archive"
EAST_PID=$DAEMON_PID
[[ $(vm_field "$EAST_CONF" vm2 "v['state']") == "initial replication" ]] ||
  fail "the restarted east does not go on with vm2's initial copy"
wait_caught_up "$EAST_CONF" vm2 120
same_sha256 "$T/v2.img" "$WEST_STATE/replicas/vm2/v2.img" "replica of v2"
sent=$(vm_field "$EAST_CONF" vm2 "v['last_sync']['bytes_sent']")
log "vm2 after the restart: $sent bytes of data sent for $DATA2 bytes on the disk"
((sent < DATA2 * 8 / 10)) || fail "vm2's copy started over after east's crash: $sent bytes sent"
[[ ! -e $T/v2.img.srsnap ]] || fail "vm2's snapshot file is still there"

stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"

