#!/usr/bin/env bash
# Bad requests from the guest side get a clear errno and change nothing: writes past the
# end (ENOSPC), resizing (truncate, fallocate past the end), creating or removing files in
# the mount. Reads past the end are short. SIGTERM with I/O in flight stops cleanly (exit 0,
# mount and socket gone), and the log still replays to the image.
source "$(dirname "$0")/lib.sh"

SIZE=$((64 << 20))
new_site east
add_vm "$CONF" vm1 'frequency = "continuous"'
add_disk "$CONF" d0 "$T/d0.img" 64M
fill_random "$T/d0.img" 0 64
cp "$T/d0.img" "$T/d0.pre"
start_ready "$CONF"
DISK=$MNT/vm1/d0

# must_fail WHAT ERRNO_TEXT CMD...: CMD fails and its message has ERRNO_TEXT (e.g.
# "No space left on device"); an empty ERRNO_TEXT accepts any error.
must_fail() {
  local what=$1 want=$2 out rc=0
  shift 2
  out=$("$@" 2>&1) || rc=$?
  [[ $rc -ne 0 ]] || fail "$what succeeded; it must be refused"
  if [[ -n $want ]] && ! grep -qi -- "$want" <<<"$out"; then
    fail "$what: want '$want', got: $out"
  fi
  log "$what: refused: $(tail -n 1 <<<"$out")"
}

step "writes past the end: ENOSPC"
must_fail "O_DIRECT write at the end" "No space left on device" \
  dd if=/dev/zero of="$DISK" bs=4k seek=$((SIZE / 4096)) count=1 oflag=direct conv=notrunc status=none
must_fail "buffered write at the end" "No space left on device" \
  dd if=/dev/zero of="$DISK" bs=4k seek=$((SIZE / 4096 + 100)) count=1 conv=notrunc,fsync status=none
# A write across the end: at most the part inside the disk is written.
python3 - "$DISK" "$SIZE" <<'PY' || fail "write across the end"
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
size = int(sys.argv[2])
try:
    n = os.pwrite(fd, b"\x01" * 8192, size - 4096)
    assert n <= 4096, f"wrote {n} bytes of which {n - 4096} past the end"
except OSError as e:
    assert e.errno == 28, f"want ENOSPC, got {e}"
PY
[[ $(stat -c %s "$DISK") -eq $SIZE ]] || fail "the disk changed size"

step "reads past the end are empty"
[[ $(dd if="$DISK" bs=4k skip=$((SIZE / 4096)) count=4 status=none | wc -c) -eq 0 ]] ||
  fail "a read past the end returned data"

step "resizing is refused"
must_fail "truncate to grow" "" truncate -s $((SIZE + (1 << 20))) "$DISK"
must_fail "truncate to shrink" "" truncate -s $((1 << 20)) "$DISK"
must_fail "truncate to zero" "" truncate -s 0 "$DISK"
must_fail "fallocate past the end" "" fallocate -o $((SIZE - 4096)) -l $((1 << 20)) "$DISK"
[[ $(stat -c %s "$DISK") -eq $SIZE ]] || fail "the disk changed size"
[[ $(stat -c %s "$T/d0.img") -eq $SIZE ]] || fail "the image changed size"

step "the tree of disks is fixed"
must_fail "creating a file" "" touch "$MNT/vm1/new"
must_fail "creating a folder" "" mkdir "$MNT/vm2"
must_fail "removing a disk" "" rm -f "$DISK"
must_fail "renaming a disk" "" mv "$DISK" "$MNT/vm1/other"
[[ -f $DISK ]] || fail "the disk is gone"

# Everything above was refused, except the in-disk part of the write across the end.
head -c $((SIZE - 4096)) "$T/d0.img" | md5sum | grep -q "$(head -c $((SIZE - 4096)) "$T/d0.pre" | md5sum | cut -d' ' -f1)" ||
  fail "the image changed below the last 4 KiB"

step "SIGTERM with I/O in flight: clean stop"
fio --name=inflight --filename="$DISK" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
  --iodepth=32 --size=32M --time_based --runtime=60 --output="$T/fio.out" >/dev/null 2>&1 &
FIO=$!
_PIDS+=("$FIO")
sleep 2
stop_clean "$DAEMON_PID" "$CONF"
wait "$FIO" || true
_forget_pid "$FIO"
"$SITEREP" -c "$CONF" status >/dev/null 2>&1 && fail "status answers after the stop"

step "the log replays onto the pre-image"
"$SITEREP_LOG" check "$T/d0.img.srlog" >/dev/null || fail "log check failed"
"$SITEREP_LOG" replay "$T/d0.img.srlog" "$T/d0.pre"
cmp "$T/d0.pre" "$T/d0.img" || fail "pre-image + replay differs from the image"
