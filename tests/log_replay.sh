#!/usr/bin/env bash
# Image and log agree: a copy of each image taken before the daemon first started (the
# pre-image), plus every record of the disk's change log replayed in order, equals the
# image after a clean stop. Load: fio random writes with fsyncs (O_DIRECT and buffered),
# large sequential writes, and discards (punch hole), on two disks of one VM at once.
source "$(dirname "$0")/lib.sh"

command -v fio >/dev/null || skip "fio is not installed"

new_site east
# A budget far above what the test writes: the whole log must stay for the replay.
add_vm "$CONF" vm1 'frequency = "continuous"'
for d in d0 d1; do
  add_disk "$CONF" "$d" "$T/$d.img" 128M
  fill_random "$T/$d.img" 0 48   # not all zeros, so a missed write shows
  cp --sparse=always "$T/$d.img" "$T/$d.pre"
done
start_ready "$CONF"

step "load on both disks: random writes with fsync, sequential writes, discards"
fio --name=rand --filename="$MNT/vm1/d0" --ioengine=io_uring --direct=1 --rw=randwrite \
  --bsrange=4k-64k --iodepth=16 --size=96M --time_based --runtime=4 --fsync=16 \
  --output="$T/fio-d0.out" &
FIO0=$!
_PIDS+=("$FIO0")
fio --name=buffered --filename="$MNT/vm1/d1" --ioengine=io_uring --direct=0 --rw=randwrite \
  --bs=16k --iodepth=4 --size=96M --time_based --runtime=4 --fdatasync=8 \
  --output="$T/fio-d1.out" &
FIO1=$!
_PIDS+=("$FIO1")
dd if=/dev/urandom of="$MNT/vm1/d1" bs=1M seek=100 count=20 oflag=direct conv=notrunc,fsync status=none
for i in 1 2 3 4; do
  fallocate -p -o $((i * 8 << 20)) -l $((1 << 20)) "$MNT/vm1/d0"
  sleep 0.5
done
wait "$FIO0" || fail "fio on d0 failed: $(tail "$T/fio-d0.out")"
wait "$FIO1" || fail "fio on d1 failed: $(tail "$T/fio-d1.out")"
_forget_pid "$FIO0"
_forget_pid "$FIO1"
# A discard (once nothing else writes there) must read back as zeros.
fallocate -p -o $((40 << 20)) -l $((1 << 20)) "$MNT/vm1/d0"
cmp -n $((1 << 20)) <(dd if="$MNT/vm1/d0" bs=1M skip=40 count=1 iflag=direct status=none) /dev/zero ||
  fail "a punched hole does not read as zeros"

step "stop (SIGTERM)"
stop_clean "$DAEMON_PID" "$CONF"

step "replay each log onto its pre-image and compare"
for d in d0 d1; do
  "$SITEREP_LOG" check "$T/$d.img.srlog" >"$T/check-$d.out" || fail "siterep-log check $d: $(cat "$T/check-$d.out")"
  "$SITEREP_LOG" dump "$T/$d.img.srlog" >"$T/dump-$d.out"
  log "$d: $(grep -ci write "$T/dump-$d.out") write lines, $(grep -ci discard "$T/dump-$d.out") discard lines, $(grep -ci cut "$T/dump-$d.out") cut lines in the dump"
  "$SITEREP_LOG" replay "$T/$d.img.srlog" "$T/$d.pre"
  cmp "$T/$d.pre" "$T/$d.img" || fail "$d: pre-image + log replay differs from the image"
done
grep -qi discard "$T/dump-d0.out" || fail "the punch-holes left no discard record in d0's log"
