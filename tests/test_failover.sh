#!/usr/bin/env bash
# Test failover while the primary is under load:
#  - east runs vm1 (1 s cycles, recovery points every 2 s, three kept) replicated to west,
#    with its shipped log archived; verified fio writes on east's disk all along;
#  - `test-failover start` at west: a writable copy of the latest recovery point appears at
#    <west mnt>/vm1-test/d0 and reads as the primary's disk at that point's cut (the
#    archived log replayed onto the pre-image); status shows it; a second start is refused;
#  - writes to the test copy read back; meanwhile west keeps applying east's cycles, and the
#    rest of the test copy does not move;
#  - `test-failover stop`: the copy is gone; one of an older kept point (--point) reads as
#    the primary at that point's cut too; after fio ends (its verify passed) and the lag
#    drains, the replica equals east's disk byte for byte: nothing written to the test
#    copy reached it.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"
command -v fio >/dev/null || skip "fio is not installed"

two_sites
WEST_MNT=$T/west/mnt
add_vm "$EAST_CONF" vm1 'frequency = "continuous"' 'recovery_points = 3' \
  'recovery_point_interval = "2s"'
truncate -s 128M "$T/d0.img"
fill_random "$T/d0.img" 0 16
cp --sparse=always "$T/d0.img" "$T/d0.pre"
add_disk "$EAST_CONF" d0 "$T/d0.img"
MARK_MIB=100   # a marker outside fio's range, written before the test copy
TEST_DISK=$WEST_MNT/vm1-test/d0

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF" --archive-logs "$T/archive"
EAST_PID=$DAEMON_PID
timeout 60 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait >/dev/null ||
  fail "enable --wait failed"

step "a marker at east; then verified fio load on east's disk"
head -c 1M /dev/urandom >"$T/mark.bin"
dd if="$T/mark.bin" of="$EAST_MNT/vm1/d0" bs=1M seek=$MARK_MIB conv=notrunc oflag=direct status=none
wait_caught_up "$EAST_CONF" vm1 30
expect_exit1 "stop with no test failover" "$SITEREP" -c "$WEST_CONF" test-failover vm1 stop
expect_output_has "no test failover"
expect_exit1 "test failover at the primary" "$SITEREP" -c "$EAST_CONF" test-failover vm1 start
expect_output_has "not a replica"
FIO_ARGS=(--ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-64k --iodepth=8
  --verify=crc32c --verify_fatal=1 --size=64M --offset=0 --rate=4m)
fio --name=d0 --filename="$EAST_MNT/vm1/d0" "${FIO_ARGS[@]}" >"$T/fio.out" 2>&1 &
FIO_PID=$!
_PIDS=("$FIO_PID" "${_PIDS[@]}")   # on failure, stopped before the daemons it writes through
sleep 2

step "test failover at west, of the latest point"
"$SITEREP" -c "$WEST_CONF" test-failover vm1 start --json >"$T/start.json" 2>&1 ||
  { cat "$T/start.json" >&2; fail "test-failover start failed"; }
POINT=$(jq_py "d['point']['id']" <"$T/start.json")
log "test copy of point $POINT at $(jq_py "d['path']" <"$T/start.json")"
[[ $(jq_py "d['path']" <"$T/start.json") == "$WEST_MNT/vm1-test" ]] || fail "path: $(cat "$T/start.json")"
[[ -f $TEST_DISK ]] || fail "$TEST_DISK does not exist"
[[ $(stat -c %s "$TEST_DISK") -eq $((128 << 20)) ]] || fail "$TEST_DISK has size $(stat -c %s "$TEST_DISK")"
[[ $(vm_field "$WEST_CONF" vm1 "v['test_failover']['point']") == "$POINT" ]] ||
  fail "status does not show the test failover: $(vm_field "$WEST_CONF" vm1 "v.get('test_failover')")"
[[ $(vm_field "$WEST_CONF" vm1 "v['test_failover']['path']") == "$WEST_MNT/vm1-test" ]] ||
  fail "status shows the test copy at $(vm_field "$WEST_CONF" vm1 "v['test_failover']['path']")"
"$SITEREP" -c "$WEST_CONF" status vm1 | grep -q "test failover of point $POINT" ||
  fail "status (text) does not show the test failover"
[[ $(vm_field "$WEST_CONF" vm1 "v['role']") == replica ]] || fail "west is not the replica any more"
cp "$TEST_DISK" "$T/copy1.img"
dd if="$T/copy1.img" of="$T/read.bin" bs=1M skip=$MARK_MIB count=1 status=none
cmp -s "$T/read.bin" "$T/mark.bin" || fail "the test copy does not hold the marker written before it"
expect_exit1 "a second test failover" "$SITEREP" -c "$WEST_CONF" test-failover vm1 start
expect_output_has "runs already"
expect_exit1 "unplanned failover during a test failover" \
  "$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned --force
expect_output_has "test failover"

step "the test copy is writable; west keeps applying east's cycles"
applied0=$(vm_field "$WEST_CONF" vm1 "v['applied_cycle']")
head -c 1M /dev/urandom >"$T/w1.bin"
head -c 64K /dev/urandom >"$T/w2.bin"
dd if="$T/w1.bin" of="$TEST_DISK" bs=1M seek=$MARK_MIB conv=notrunc oflag=direct status=none
dd if="$T/w2.bin" of="$TEST_DISK" bs=64K seek=$((8 << 4)) conv=notrunc status=none   # 8 MiB, in fio's range
sync "$TEST_DISK"
cp "$T/copy1.img" "$T/expected-copy.img"
dd if="$T/w1.bin" of="$T/expected-copy.img" bs=1M seek=$MARK_MIB conv=notrunc status=none
dd if="$T/w2.bin" of="$T/expected-copy.img" bs=64K seek=$((8 << 4)) conv=notrunc status=none
dd if="$TEST_DISK" of="$T/read.bin" bs=1M skip=$MARK_MIB count=1 iflag=direct status=none
cmp -s "$T/read.bin" "$T/w1.bin" || fail "the test copy does not read back what was written (direct)"
written=$(vm_field "$WEST_CONF" vm1 "v['test_failover']['written_bytes']")
((written >= (1 << 20) + (64 << 10))) || fail "status shows $written bytes written to the test copy"
for ((i = 0; i < 100; i++)); do
  applied=$(vm_field "$WEST_CONF" vm1 "v['applied_cycle']")
  ((applied >= applied0 + 3)) && break
  sleep 0.2
done
((applied >= applied0 + 3)) || fail "west applied cycles $applied0..$applied in 20 s during the test failover"
_alive "$FIO_PID" || fail "fio ended before the test copy was checked (raise its size)"
log "west applied cycles $applied0..$applied during the test failover"
cp "$TEST_DISK" "$T/copy2.img"
cmp "$T/copy2.img" "$T/expected-copy.img" ||
  fail "the test copy changed while west applied (or lost what was written to it)"

step "stop the test failover: the copy is gone, its writes discarded"
"$SITEREP" -c "$WEST_CONF" test-failover vm1 stop || fail "test-failover stop failed"
[[ ! -e $TEST_DISK && ! -e $WEST_MNT/vm1-test ]] || fail "the test copy is still there"
[[ $(vm_field "$WEST_CONF" vm1 "'test_failover' in v") == false ]] ||
  fail "status still shows a test failover"
[[ ! -e $WEST_STATE/vms/vm1/test ]] || fail "the test copy's overlays are still in $WEST_STATE/vms/vm1/test"

step "a test copy of a retained older point (--point), while fio goes on"
OLDER=$("$SITEREP" -c "$WEST_CONF" points vm1 --json |
  jq_py "max([p['id'] for p in d['points'] if not p['latest']] or [0])")
((OLDER > 0)) || fail "west keeps no recovery point but the latest: $("$SITEREP" -c "$WEST_CONF" points vm1)"
"$SITEREP" -c "$WEST_CONF" test-failover vm1 start --point "$OLDER" --json >"$T/start2.json" 2>&1 ||
  { cat "$T/start2.json" >&2; fail "test-failover start --point $OLDER failed"; }
[[ $(jq_py "d['point']['id']" <"$T/start2.json") == "$OLDER" ]] || fail "asked for point $OLDER: $(cat "$T/start2.json")"
cp "$TEST_DISK" "$T/copy3.img"
"$SITEREP" -c "$WEST_CONF" test-failover vm1 stop >/dev/null || fail "test-failover stop failed"
[[ ! -e $TEST_DISK ]] || fail "the second test copy is still there"
log "test copy of point $OLDER read and stopped"

step "fio ends with its verify passed; the replica equals east"
wait "$FIO_PID" || { cat "$T/fio.out" >&2; fail "fio failed"; }
_forget_pid "$FIO_PID"
grep -E '^\s+write:' "$T/fio.out" | sed 's/^/    /' || true
wait_caught_up "$EAST_CONF" vm1 60
same_sha256 "$T/d0.img" "$WEST_STATE/replicas/vm1/d0.img" "the replica after the test failover"
dd if="$WEST_STATE/replicas/vm1/d0.img" of="$T/read.bin" bs=1M skip=$MARK_MIB count=1 status=none
cmp -s "$T/read.bin" "$T/mark.bin" || fail "the replica's marker changed"

step "the test copies read as east's disk at the cuts of points $POINT and $OLDER"
for pc in "$POINT:copy1" "$OLDER:copy3"; do
  cp --sparse=always "$T/d0.pre" "$T/expected.img"
  "$SITEREP_LOG" replay "$T/archive/vm1/d0" "$T/expected.img" --through-cycle "${pc%%:*}" >/dev/null ||
    fail "siterep-log replay failed"
  cmp "$T/${pc#*:}.img" "$T/expected.img" || fail "the test copy differs from east's disk at cycle ${pc%%:*}"
  rm -f "$T/expected.img"
done
stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
log "ok"
