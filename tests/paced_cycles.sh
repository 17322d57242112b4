#!/usr/bin/env bash
# Pacing, end to end: a protected VM whose cycles nobody ships (no peer here) keeps one
# cut cycle and tracks everything after it in the changed-block map. Writing far more
# than fits in any budget never makes the log grow past that cycle, never leaves the
# changed-block tracking and never asks for a resync; overwrites coalesce. The map
# survives a restart, so the pending blocks are still pending afterwards.
source "$(dirname "$0")/lib.sh"

new_site east
add_vm "$CONF" vm1 'frequency = "continuous"'
add_disk "$CONF" d0 "$T/d0.img" 64M
add_disk "$CONF" d1 "$T/d1.img" 64M
start_ready "$CONF"
DISK=$MNT/vm1/d0

[[ $(disk_field "$CONF" vm1 d0 tracking) == log ]] || fail "d0 does not start on its log"

step "write 8 MiB to d0 and a little to d1; the first cycle is cut and waits"
head -c $((8 << 20)) /dev/urandom >"$T/data"
dd if="$T/data" of="$DISK" bs=256k oflag=direct conv=notrunc,fsync status=none ||
  fail "the guest saw an error"
dd if=/dev/urandom of="$MNT/vm1/d1" bs=64k count=2 oflag=direct conv=notrunc,fsync status=none
for _ in $(seq 1 50); do
  ls "$T/d0.img.srlog/"*.cut >/dev/null 2>&1 && break
  sleep 0.1
done
sleep 2  # more cycle periods: paced, no further cut
segs_before=$(ls "$T/d0.img.srlog/" | grep -c '\.cut$' || true)
log "d0 has $segs_before cut(s)"
[[ $segs_before -eq 1 ]] || fail "d0 has $segs_before cuts; pacing allows one unshipped cycle"

step "write 8 MiB more, twice over the same range: the log does not grow"
bytes_before=$(du -s -B1 "$T/d0.img.srlog" | cut -f1)  # allocated: the copy-on-write is sparse
for _ in 1 2; do
  dd if=/dev/urandom of="$DISK" bs=256k count=32 seek=64 oflag=direct conv=notrunc,fsync \
    status=none || fail "the guest saw an error"
done
sleep 2
status_json "$CONF" >"$T/status.json"
jq_py "d['vms'][0]['disks'][0]" <"$T/status.json" | sed 's/^/    /'
for d in 0 1; do
  [[ $(jq_py "d['vms'][0]['disks'][$d]['tracking']" <"$T/status.json") == log ]] || fail "d$d left changed-block tracking"
  [[ $(jq_py "d['vms'][0]['disks'][$d]['resync_required']" <"$T/status.json") == false ]] || fail "d$d is marked resync required"
done
pending=$(jq_py "d['vms'][0]['disks'][0]['pending_bytes']" <"$T/status.json")
[[ $pending -ge $((8 << 20)) ]] || fail "d0 reports $pending pending bytes, less than the 8 MiB not shipped"
[[ $pending -le $((17 << 20)) ]] || fail "d0 reports $pending pending bytes: overwrites did not coalesce"
bytes_after=$(du -s -B1 "$T/d0.img.srlog" | cut -f1)
log "d0's log folder: $bytes_before bytes before, $bytes_after after"
[[ $bytes_after -le $((bytes_before + (1 << 20))) ]] || fail "d0's log folder grew from $bytes_before to $bytes_after bytes"
cmp <(dd if="$DISK" bs=1M count=8 iflag=direct status=none) "$T/data" || fail "d0 lost the first 8 MiB"

step "restart: the pending blocks are still pending, nothing asks for a resync"
stop_clean "$DAEMON_PID" "$CONF"
start_ready "$CONF"
[[ $(disk_field "$CONF" vm1 d0 tracking) == log ]] || fail "d0 left its log in the restart"
[[ $(disk_field "$CONF" vm1 d0 resync_required) == false ]] || fail "d0 asks for a resync after the restart"
pending_after=$(disk_field "$CONF" vm1 d0 pending_bytes)
[[ $pending_after -ge $((8 << 20)) ]] || fail "the restart lost pending blocks ($pending_after bytes left)"
cmp <(dd if="$DISK" bs=1M count=8 iflag=direct status=none) "$T/data" || fail "d0 lost data across the restart"
stop_clean "$DAEMON_PID" "$CONF"
