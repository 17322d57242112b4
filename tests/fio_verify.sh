#!/usr/bin/env bash
# fio against a protected disk, with data verification (crc32c, fatal on the first bad
# block): io_uring with O_DIRECT at 4 KiB and 1 MiB, and buffered I/O of mixed sizes.
# Then the data must still verify after a daemon restart, the disk must read the same as
# its image, and the change log must pass `siterep-log check`.
source "$(dirname "$0")/lib.sh"

command -v fio >/dev/null || skip "fio is not installed"

new_site east
add_vm "$CONF" vm1 'frequency = "continuous"'
add_disk "$CONF" d0 "$T/d0.img" 256M
start_ready "$CONF"
DISK=$MNT/vm1/d0
[[ -f $DISK ]] || fail "$DISK does not exist"
[[ $(stat -c %s "$DISK") -eq $((256 << 20)) ]] || fail "$DISK has size $(stat -c %s "$DISK"), want 256 MiB"

# run_fio NAME ARGS...: one verified job on the disk.
run_fio() {
  local name=$1
  shift
  log "fio $name: $*"
  fio --name="$name" --filename="$DISK" --ioengine=io_uring --verify=crc32c --verify_fatal=1 \
    --exitall_on_error=1 --group_reporting=1 "$@" >"$T/fio-$name.out" 2>&1 ||
    { cat "$T/fio-$name.out" >&2; fail "fio $name failed"; }
  grep -E '^\s+(write|read):' "$T/fio-$name.out" | sed 's/^/    /' || true
}

step "io_uring, O_DIRECT, 4 KiB random writes, QD16, verified"
DIRECT4K=(--direct=1 --rw=randwrite --bs=4k --iodepth=16 --offset=0 --size=64M)
run_fio direct4k "${DIRECT4K[@]}"

step "io_uring, O_DIRECT, 1 MiB sequential writes, QD8, verified"
run_fio direct1m --direct=1 --rw=write --bs=1M --iodepth=8 --offset=64M --size=64M

step "io_uring, buffered, 4-256 KiB random writes, verified"
run_fio buffered --direct=0 --rw=randwrite --bsrange=4k-256k --iodepth=8 --offset=128M --size=64M \
  --fsync=32

step "io_uring, O_DIRECT, mixed random read/write with a verify backlog"
run_fio mixed --direct=1 --rw=randrw --bs=8k --iodepth=8 --offset=192M --size=32M \
  --verify_backlog=256

step "the disk reads the same as its image"
cmp "$DISK" "$T/d0.img" || fail "$DISK and its image differ"

step "restart: the first job's data still verifies"
stop_clean "$DAEMON_PID" "$CONF"
start_ready "$CONF"
run_fio direct4k-again "${DIRECT4K[@]}" --verify_only
stop_clean "$DAEMON_PID" "$CONF"

step "the change log is well formed"
"$SITEREP_LOG" check "$T/d0.img.srlog" || fail "siterep-log check found problems"
