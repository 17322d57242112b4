#!/usr/bin/env bash
# kill -9 of siterepd under load, twice: after each crash the stale FUSE mount is removed
# and the daemon restarted; recovery deletes an unfinished cycle build and puts the blocks
# of every cycle not published back into the changed-block map.
# Checks: data that an fsync (or O_DIRECT + fsync) acknowledged before the kill reads back
# after the restart; the logs pass `siterep-log check`; and pre-image + replay of the whole
# log equals the image, byte for byte.
source "$(dirname "$0")/lib.sh"

command -v fio >/dev/null || skip "fio is not installed"

new_site east
add_vm "$CONF" vm1 'frequency = "continuous"'
for d in d0 d1; do
  add_disk "$CONF" "$d" "$T/$d.img" 128M
  fill_random "$T/$d.img" 0 32
  cp --sparse=always "$T/$d.img" "$T/$d.pre"
done

# unfinished_build LOG_DIR ROUND: leaves what a kill in the middle of a cycle's build
# leaves: the next segment as "<n>.seg.tmp", holding a copy of the log's first write
# record, cut short (round 1) or with one payload byte flipped (round 2).
unfinished_build() {
  python3 - "$1" "$2" <<'PY'
import os, struct, sys
log_dir, round_ = sys.argv[1], int(sys.argv[2])
segs = sorted(f for f in os.listdir(log_dir) if f.endswith(".seg"))
with open(os.path.join(log_dir, segs[0]), "rb") as f:
    data = f.read(64 << 20)
pos = 0
while True:  # the first write record (kind 1)
    kind = struct.unpack_from("<H", data, pos + 6)[0]
    length = struct.unpack_from("<Q", data, pos + 40)[0]
    size = 48 + (length if kind == 1 else 16 if kind == 3 else 0)
    if kind == 1:
        break
    pos += size
record = bytearray(data[pos:pos + size])
if round_ == 1:
    record = record[: 48 + 100]
else:
    record[48 + 7] ^= 0xFF
tmp = "%020d.seg.tmp" % (int(segs[-1][:20]) + 1)
with open(os.path.join(log_dir, tmp), "wb") as f:
    f.write(record)
print(f"    left {len(record)} bytes in {tmp}")
PY
}

for round in 1 2; do
  step "round $round: load, then kill -9 in the middle of it"
  start_ready "$CONF"
  fio --name=crash$round --filename="$MNT/vm1/d0" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bsrange=4k-128k --iodepth=32 --size=96M --time_based --runtime=60 --fsync=8 \
    --output="$T/fio-$round.out" >/dev/null 2>&1 &
  FIO=$!
  _PIDS+=("$FIO")
  fio --name=crashbuf$round --filename="$MNT/vm1/d1" --ioengine=io_uring --direct=0 --rw=randwrite \
    --bs=4k --iodepth=8 --size=96M --time_based --runtime=60 \
    --output="$T/fio-buf-$round.out" >/dev/null 2>&1 &
  FIOB=$!
  _PIDS+=("$FIOB")
  sleep 2
  # Data acknowledged by a flush just before the crash: one pattern per disk, outside the
  # range fio writes.
  head -c $((3 << 20)) /dev/urandom >"$T/pattern-$round"
  dd if="$T/pattern-$round" of="$MNT/vm1/d0" bs=1M seek=$((100 + round * 4)) oflag=direct conv=notrunc,fsync status=none
  dd if="$T/pattern-$round" of="$MNT/vm1/d1" bs=1M seek=$((100 + round * 4)) conv=notrunc,fsync status=none
  sleep 0.$((RANDOM % 9 + 1))
  crash_daemon "$DAEMON_PID" "$CONF"
  # With the FUSE connection gone, fio gets errors and stops.
  wait "$FIO" || true
  wait "$FIOB" || true
  _forget_pid "$FIO"
  _forget_pid "$FIOB"

  # What a crash in the middle of a build leaves (never published, never in the image's
  # history): recovery must delete it, and the replay below must still match.
  unfinished_build "$T/d0.img.srlog" "$round"

  step "round $round: restart (recovery), acknowledged data is there"
  start_ready "$CONF"
  grep -iE 'unfinished segment|not finished|not on every disk' "$DAEMON_LOG" | sed 's/^/    /' || true
  grep -q 'deleted the unfinished segment' "$DAEMON_LOG" || fail "recovery did not delete d0's unfinished build"
  ls "$T/d0.img.srlog/" | grep -q '\.tmp$' && fail "an unfinished build is still in d0's log folder"
  for r in $(seq 1 "$round"); do
    for d in d0 d1; do
      cmp <(dd if="$MNT/vm1/$d" bs=1M skip=$((100 + r * 4)) count=3 iflag=direct status=none) "$T/pattern-$r" ||
        fail "$d: data acknowledged by fsync before crash $r is not there after the restart"
    done
  done
  stop_clean "$DAEMON_PID" "$CONF"
done

step "the logs check, and pre-image + replay equals the image"
for d in d0 d1; do
  "$SITEREP_LOG" check "$T/$d.img.srlog" >"$T/check-$d.out" || fail "siterep-log check $d: $(cat "$T/check-$d.out")"
  "$SITEREP_LOG" replay "$T/$d.img.srlog" "$T/$d.pre"
  cmp "$T/$d.pre" "$T/$d.img" || fail "$d: pre-image + log replay differs from the image after crashes"
  log "$d: replay equals the image"
done
