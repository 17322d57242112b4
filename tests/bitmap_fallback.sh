#!/usr/bin/env bash
# Log budget, end to end: a VM with log_budget = "1MiB"; writing more than that to one disk
# switches that disk to the dirty bitmap ("tracking": "bitmap", "resync_required": true in
# `siterep status --json`) and drops its log, while the guest's writes keep succeeding and
# keep their data. The other disk of the VM stays on its log. The state survives a restart.
source "$(dirname "$0")/lib.sh"

new_site east
add_vm "$CONF" vm1 'frequency = "continuous"' 'log_budget = "1MiB"'
add_disk "$CONF" d0 "$T/d0.img" 64M
add_disk "$CONF" d1 "$T/d1.img" 64M
start_ready "$CONF"
DISK=$MNT/vm1/d0

[[ $(disk_field "$CONF" vm1 d0 tracking) == log ]] || fail "d0 does not start on its log"

step "write 8 MiB to d0 (budget 1 MiB), and a little to d1"
head -c $((8 << 20)) /dev/urandom >"$T/data"
dd if="$T/data" of="$DISK" bs=256k oflag=direct conv=notrunc,fsync status=none ||
  fail "the guest saw an error while the log went over budget"
dd if=/dev/urandom of="$MNT/vm1/d1" bs=64k count=2 oflag=direct conv=notrunc,fsync status=none

step "d0 falls back to the bitmap and needs a resync"
for _ in $(seq 1 100); do
  [[ $(disk_field "$CONF" vm1 d0 tracking) == bitmap ]] && break
  sleep 0.1
done
status_json "$CONF" >"$T/status.json"
jq_py "d['vms'][0]['disks'][0]" <"$T/status.json" | sed 's/^/    /'
[[ $(jq_py "d['vms'][0]['disks'][0]['tracking']" <"$T/status.json") == bitmap ]] || fail "d0 is not on the bitmap"
[[ $(jq_py "d['vms'][0]['disks'][0]['resync_required']" <"$T/status.json") == true ]] || fail "d0 is not marked resync required"
[[ $(jq_py "d['vms'][0]['disks'][1]['tracking']" <"$T/status.json") == log ]] || fail "d1 left its log too"
[[ $(jq_py "d['vms'][0]['disks'][1]['resync_required']" <"$T/status.json") == false ]] || fail "d1 is marked resync required"
pending=$(jq_py "d['vms'][0]['disks'][0]['pending_bytes']" <"$T/status.json")
[[ $pending -le $((2 << 20)) ]] || fail "d0 still holds $pending log bytes after the fallback"
"$SITEREP" -c "$CONF" status | grep -qi resync || fail "the human status does not mention the resync"

step "the guest keeps writing on the bitmap, and the data is right"
fio --name=after --filename="$DISK" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
  --iodepth=8 --offset=16M --size=16M --verify=crc32c --verify_fatal=1 >"$T/fio.out" 2>&1 ||
  { cat "$T/fio.out" >&2; fail "fio on the bitmap-tracked disk failed"; }
cmp <(dd if="$DISK" bs=1M count=8 iflag=direct status=none) "$T/data" || fail "d0 lost the first 8 MiB"
log_bytes=$(du -sb "$T/d0.img.srlog" | cut -f1)
log "d0's log folder holds $log_bytes bytes"
[[ $log_bytes -le $((4 << 20)) ]] || fail "d0's log folder still holds $log_bytes bytes"

step "restart: still bitmap, still resync required"
stop_clean "$DAEMON_PID" "$CONF"
start_ready "$CONF"
[[ $(disk_field "$CONF" vm1 d0 tracking) == bitmap ]] || fail "d0 is back on a log after the restart"
[[ $(disk_field "$CONF" vm1 d0 resync_required) == true ]] || fail "the resync mark was lost in the restart"
dd if=/dev/urandom of="$DISK" bs=4k count=16 seek=$((40 << 8)) oflag=direct conv=notrunc status=none || fail "write after restart failed"
cmp <(dd if="$DISK" bs=1M count=8 iflag=direct status=none) "$T/data" || fail "d0 lost data across the restart"
stop_clean "$DAEMON_PID" "$CONF"
