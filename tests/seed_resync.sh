#!/usr/bin/env bash
# Seeded enable and resynchronisation, with the bytes on the wire asserted.
#  - west already holds an older copy of vm1's disk, with five 64 KiB blocks changed:
#    `enable --seed` compares block hashes and sends only those blocks (the two that are
#    zero at the primary as zero extents, no data).
#  - shipping paused while the guest writes: cycles wait (no resync); then saving a block
#    of the unshipped cycle to its copy-on-write fails (failpoint tracker.cow_save, as a full
#    or failing disk would), so the disk falls back to the dirty bitmap ("resync required",
#    critical);
#    `siterep resync --wait` compares every block and sends only the
#    dirty blocks, and the replica equals the primary again.
#  - with resync = "auto", the same fall back heals by itself.
#  - a replica site whose state folder has no room for a copy refuses it, and east says why.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"

two_sites
add_vm "$EAST_CONF" vm1 'frequency = "continuous"' 'resync = "manual"'
truncate -s 256M "$T/d0.img"
fill_random "$T/d0.img" 0 64
add_disk "$EAST_CONF" d0 "$T/d0.img"

step "seed: west holds a copy with five 64 KiB blocks changed"
mkdir -p "$WEST_STATE/replicas/vm1"
cp --sparse=always "$T/d0.img" "$WEST_STATE/replicas/vm1/d0.img"
for off in 1 5 20 100 200; do
  dd if=/dev/urandom of="$WEST_STATE/replicas/vm1/d0.img" bs=64K count=1 seek=$((off * 16)) \
    conv=notrunc status=none
done
cmp -s "$T/d0.img" "$WEST_STATE/replicas/vm1/d0.img" && fail "the seed does not differ"

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID

timeout 120 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --seed --wait >"$T/enable.out" 2>&1 ||
  { cat "$T/enable.out" >&2; fail "enable --seed --wait failed"; }
same_sha256 "$T/d0.img" "$WEST_STATE/replicas/vm1/d0.img" "seeded replica"
sent=$(vm_field "$EAST_CONF" vm1 "v['last_sync']['bytes_sent']")
wire=$(vm_field "$EAST_CONF" vm1 "v['last_sync']['bytes_wire']")
kind=$(vm_field "$EAST_CONF" vm1 "v['last_sync']['kind']")
log "seeded enable ($kind): $sent bytes of data, $wire bytes on the wire (hashes included)"
[[ $kind == seeded ]] || fail "the sync was not a seeded one: $kind"
((sent == 3 * 65536)) || fail "seeded enable sent $sent bytes of data; the 3 changed data blocks are 196608"
((wire < 4 * 65536 + 131072)) || fail "seeded enable put $wire bytes on the wire"

# fail_copy_on_write SIZE_MIB OFFSET_MIB...: the next save to a cut's copy-on-write fails;
# then the guest writes the regions again, which hits the blocks of the unshipped cycle.
fail_copy_on_write() {
  local size=$1 off
  shift
  "$SITEREP" -c "$EAST_CONF" failpoint tracker.cow_save=error*1 >/dev/null ||
    fail "cannot arm tracker.cow_save"
  for off in "$@"; do
    dd if=/dev/urandom of="$EAST_MNT/vm1/d0" bs=1M count="$size" seek="$off" oflag=direct \
      conv=notrunc status=none || fail "the guest saw an error"
  done
}

step "shipping paused while the guest writes: the cycles wait, no resync"
"$SITEREP" -c "$EAST_CONF" pause vm1 >/dev/null
for off in 10 90 150; do
  dd if=/dev/urandom of="$EAST_MNT/vm1/d0" bs=1M count=2 seek=$off oflag=direct conv=notrunc status=none
done
sleep 2
[[ $(vm_field "$EAST_CONF" vm1 "v['disks'][0]['tracking']") == log ]] || fail "d0 left its log while paused"
[[ $(vm_field "$EAST_CONF" vm1 "v['disks'][0]['resync_required']") == false ]] || fail "a pause asked for a resync"
pending=$(vm_field "$EAST_CONF" vm1 "v['pending_bytes']")
((pending >= 6 << 20)) || fail "only $pending bytes pending after 6 MiB written while paused"

step "a save to the unshipped cycle's copy-on-write fails: resync required"
fail_copy_on_write 2 10 90 150
"$SITEREP" -c "$EAST_CONF" resume vm1 >/dev/null
for ((i = 0; i < 50; i++)); do
  [[ $(vm_field "$EAST_CONF" vm1 "v['disks'][0]['tracking']") == bitmap ]] && break
  sleep 0.2
done
((i < 50)) || fail "d0 did not fall back to the bitmap"
[[ $(vm_field "$EAST_CONF" vm1 "v['health']") == critical ]] || fail "resync required is not critical"
written=$((6 << 20))
log "state: $(vm_field "$EAST_CONF" vm1 "v['state']")"
sleep 2
[[ $(vm_field "$EAST_CONF" vm1 "v['disks'][0]['tracking']") == bitmap ]] ||
  fail "resync = manual, but the disk resynchronised by itself"

step "siterep resync --wait sends only the dirty blocks"
timeout 120 "$SITEREP" -c "$EAST_CONF" resync vm1 --wait >"$T/resync.out" 2>&1 ||
  { cat "$T/resync.out" >&2; fail "resync --wait failed"; }
wait_caught_up "$EAST_CONF" vm1 60
same_sha256 "$T/d0.img" "$WEST_STATE/replicas/vm1/d0.img" "resynchronised replica"
sent=$(vm_field "$EAST_CONF" vm1 "v['last_sync']['bytes_sent']")
log "resync: $sent bytes of data sent for $written bytes written while paused"
((sent > 0 && sent <= written + 131072)) || fail "resync sent $sent bytes for $written bytes written"
[[ $(vm_field "$EAST_CONF" vm1 "v['disks'][0]['tracking']") == log ]] || fail "d0 does not log again"
[[ $(vm_field "$EAST_CONF" vm1 "v['health']") != critical ]] || fail "still critical after the resync"
expect_exit1 "resync of a VM that is not replicated" "$SITEREP" -c "$WEST_CONF" resync vm1
stop_clean "$EAST_PID" "$EAST_CONF"

step "with resync = auto, the fall back heals by itself"
sed -i 's/^resync = "manual"/resync = "auto"/' "$EAST_CONF"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
wait_caught_up "$EAST_CONF" vm1 60
"$SITEREP" -c "$EAST_CONF" pause vm1 >/dev/null
for off in 30 120; do
  dd if=/dev/urandom of="$EAST_MNT/vm1/d0" bs=1M count=3 seek=$off oflag=direct conv=notrunc status=none
done
sleep 2
fail_copy_on_write 3 30 120
"$SITEREP" -c "$EAST_CONF" resume vm1 >/dev/null
for ((i = 0; i < 50; i++)); do
  [[ $(vm_field "$EAST_CONF" vm1 "v['disks'][0]['resync_required']") == true ]] && break
  sleep 0.2
done
((i < 50)) || fail "d0 did not need a resync"
for ((i = 0; i < 150; i++)); do
  [[ $(vm_field "$EAST_CONF" vm1 "v['disks'][0]['resync_required']") == false ]] && break
  sleep 0.2
done
((i < 150)) || fail "the automatic resync did not run: $(vm_field "$EAST_CONF" vm1 "v['state']")"
wait_caught_up "$EAST_CONF" vm1 60
same_sha256 "$T/d0.img" "$WEST_STATE/replicas/vm1/d0.img" "replica after the automatic resync"
log "automatic resync sent $(vm_field "$EAST_CONF" vm1 "v['last_sync']['bytes_sent']") bytes"
stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"

step "a replica site without room for the copy refuses it"
mkdir -p "$T/small"
mount -t tmpfs -o size=32m tmpfs "$T/small" || skip "cannot mount a tmpfs"
_MOUNTS+=("$T/small")
sed -i "s#^state_dir = .*#state_dir = \"$T/small/state\"#" "$WEST_CONF"
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
add_vm "$EAST_CONF" vm2 'frequency = "continuous"'
truncate -s 128M "$T/v2.img"
fill_random "$T/v2.img" 0 64
add_disk "$EAST_CONF" v2 "$T/v2.img"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
"$SITEREP" -c "$EAST_CONF" enable vm2 --to west >/dev/null
for ((i = 0; i < 100; i++)); do
  [[ $(vm_field "$EAST_CONF" vm2 "v['link']['state']") == refused ]] && break
  sleep 0.2
done
((i < 100)) || fail "west did not refuse a copy it has no room for: $(vm_field "$EAST_CONF" vm2 "v['link']")"
reason=$(vm_field "$EAST_CONF" vm2 "v['health_reason']")
log "east says: $reason"
[[ $reason == *no_space* || $reason == *"free"* ]] || fail "the refusal does not say why: $reason"
[[ $(vm_field "$EAST_CONF" vm2 "v['health']") == critical ]] || fail "a refused copy is not critical"
stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
