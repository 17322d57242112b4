#!/usr/bin/env bash
# kill -9 of siterepd under load, twice: after each crash the stale FUSE mount is removed
# and the daemon restarted; recovery deletes a cut file not yet renamed, reopens every
# unreleased cut with its copy-on-write, and rolls back a cycle not cut on every disk.
# The daemon runs with --discard-sealed (each cycle read as a shipper would, then released)
# and --archive-logs, so every cycle ever cut ends up in the archive as its segment file.
# Checks: data that an fsync (or O_DIRECT + fsync) acknowledged before the kill reads back
# after the restart; the archived segments pass `siterep-log check`; and pre-image +
# replay of every archived cycle equals the image, byte for byte.
source "$(dirname "$0")/lib.sh"

command -v fio >/dev/null || skip "fio is not installed"

new_site east
add_vm "$CONF" vm1 'frequency = "continuous"'
for d in d0 d1; do
  add_disk "$CONF" "$d" "$T/$d.img" 128M
  fill_random "$T/$d.img" 0 32
  cp --sparse=always "$T/$d.img" "$T/$d.pre"
done

# unfinished_cut LOG_DIR ROUND: leaves what a kill while a cut file is written leaves: the
# next cut file as "<n>.cut.tmp", cut short (round 1) or whole but not renamed (round 2).
unfinished_cut() {
  python3 - "$1" "$2" <<'PY'
import os, sys
log_dir, round_ = sys.argv[1], int(sys.argv[2])
numbers = [int(f[:20]) for f in os.listdir(log_dir) if f.endswith(".cut")]
tmp = "%020d.cut.tmp" % (max(numbers, default=0) + 1)
data = b"SRFZ" + b"\x02\x00\x00\x00" + os.urandom(60 if round_ == 1 else 4000)
with open(os.path.join(log_dir, tmp), "wb") as f:
    f.write(data)
print(f"    left {len(data)} bytes in {tmp}")
PY
}

ARGS=(--discard-sealed --archive-logs "$T/archive")
for round in 1 2; do
  step "round $round: load, then kill -9 in the middle of it"
  start_ready "$CONF" "${ARGS[@]}"
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

  # What a crash while a cut file is written leaves (never a cut: its blocks are still in
  # the map): recovery must delete it, and the replay below must still match.
  unfinished_cut "$T/d0.img.srlog" "$round"

  step "round $round: restart (recovery), acknowledged data is there"
  start_ready "$CONF" "${ARGS[@]}"
  grep -iE 'unfinished file|not on every disk' "$DAEMON_LOG" | sed 's/^/    /' || true
  grep -q 'deleted the unfinished file' "$DAEMON_LOG" || fail "recovery did not delete d0's unfinished cut file"
  ls "$T/d0.img.srlog/" | grep -q '\.tmp$' && fail "an unfinished cut file is still in d0's log folder"
  for r in $(seq 1 "$round"); do
    for d in d0 d1; do
      cmp <(dd if="$MNT/vm1/$d" bs=1M skip=$((100 + r * 4)) count=3 iflag=direct status=none) "$T/pattern-$r" ||
        fail "$d: data acknowledged by fsync before crash $r is not there after the restart"
    done
  done
  stop_clean "$DAEMON_PID" "$CONF"
done

step "the last cycle (cut at the stop) is read and archived by a last start"
start_ready "$CONF" "${ARGS[@]}"
for i in $(seq 1 100); do
  ls "$T"/d0.img.srlog/*.cut "$T"/d1.img.srlog/*.cut >/dev/null 2>&1 || break
  sleep 0.1
done
ls "$T"/d0.img.srlog/*.cut "$T"/d1.img.srlog/*.cut >/dev/null 2>&1 && fail "cuts still unreleased after 10 s"
stop_clean "$DAEMON_PID" "$CONF"

step "the archived segments check, and pre-image + replay equals the image"
for d in d0 d1; do
  "$SITEREP_LOG" check "$T/archive/vm1/$d" >"$T/check-$d.out" || fail "siterep-log check $d: $(cat "$T/check-$d.out")"
  "$SITEREP_LOG" replay "$T/archive/vm1/$d" "$T/$d.pre"
  cmp "$T/$d.pre" "$T/$d.img" || fail "$d: pre-image + log replay differs from the image after crashes"
  log "$d: replay equals the image"
done
