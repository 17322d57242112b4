#!/usr/bin/env bash
# Two sites on loopback, mutual TLS: east replicates VM vm1 (two disks, seeded with the
# same data at both sites) to west. Under verified fio load on the primary, west's daemon
# is killed with SIGKILL and restarted mid-stream. After the load stops and the lag drains,
# the replica images equal the primary's byte for byte, and every recovery point that
# west keeps, read through the point-in-time view (siterep export), equals the pre-image
# with the primary's log replayed up to that point's cut.
source "$(dirname "$0")/lib.sh"

command -v fio >/dev/null || skip "fio is not installed"
command -v openssl >/dev/null || skip "openssl is not installed"

two_sites
add_vm "$EAST_CONF" vm1 'frequency = "continuous"' 'recovery_points = 3' \
  'recovery_point_interval = "2s"'

step "seed: the same 8 MiB of random data at the start of each disk, at both sites"
mkdir -p "$WEST_STATE/replicas/vm1"
for d in d0 d1; do
  truncate -s 256M "$T/$d.img"
  dd if=/dev/urandom of="$T/$d.img" bs=1M count=8 conv=notrunc status=none
  cp --sparse=always "$T/$d.img" "$T/$d.pre"
  cp --sparse=always "$T/$d.img" "$WEST_STATE/replicas/vm1/$d.img"
  add_disk "$EAST_CONF" "$d" "$T/$d.img"
done

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF" --archive-logs "$T/archive"
EAST_PID=$DAEMON_PID

step "enable replication and wait for the replica"
timeout 60 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait ||
  fail "enable --wait did not finish"
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == primary ]] || fail "east is not the primary"
[[ $(vm_field "$EAST_CONF" vm1 "v['peer']") == west ]] || fail "east does not replicate to west"
[[ $(vm_field "$WEST_CONF" vm1 "v['role']") == replica ]] || fail "west has no replica of vm1"
[[ $(vm_field "$WEST_CONF" vm1 "v['peer']") == east ]] || fail "west's replica names the wrong primary"
expect_exit1 "enabling it twice" "$SITEREP" -c "$EAST_CONF" enable vm1 --to west
expect_output_has "already replicated"
expect_exit1 "enabling to an unknown site" "$SITEREP" -c "$EAST_CONF" enable vm1 --to north
expect_output_has "unknown site"

step "verified fio load on both disks; west is killed with SIGKILL mid-stream"
FIO_ARGS=(--ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-64k --iodepth=8
  --verify=crc32c --verify_fatal=1 --size=64M --offset=8M --rate=12m)
fio --name=d0 --filename="$EAST_MNT/vm1/d0" "${FIO_ARGS[@]}" >"$T/fio-d0.out" 2>&1 &
FIO0=$!
fio --name=d1 --filename="$EAST_MNT/vm1/d1" "${FIO_ARGS[@]}" >"$T/fio-d1.out" 2>&1 &
FIO1=$!
sleep 2
crash_daemon "$WEST_PID" "$WEST_CONF"
sleep 1
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
step "east pauses while fio goes on: west's replica is exactly one recovery point"
"$SITEREP" -c "$EAST_CONF" pause vm1 >/dev/null
for ((i = 0; i < 150; i++)); do
  [[ $(vm_field "$WEST_CONF" vm1 "v['received_cycle'] == v['applied_cycle'] and v['applied_cycle'] > 0") == true ]] && break
  sleep 0.2
done
((i < 150)) || fail "west did not apply what it received"
mkdir -p "$T/archive/vm1/d0" "$T/archive/vm1/d1"
check_replica() {
  "$BIN/siterep-check" --work-dir "$T" \
    "$T/d0.pre" "$T/archive/vm1/d0" "$WEST_STATE/replicas/vm1/d0.img" \
    "$T/d1.pre" "$T/archive/vm1/d1" "$WEST_STATE/replicas/vm1/d1.img" >"$T/check.out" ||
    { cat "$T/check.out" >&2; fail "siterep-check: the replica is not a consistent point"; }
  tail -n 1 "$T/check.out" | sed 's/^/    /'
}
check_replica
"$SITEREP" -c "$EAST_CONF" resume vm1 >/dev/null
wait "$FIO0" || { cat "$T/fio-d0.out" >&2; fail "fio on d0 failed"; }
wait "$FIO1" || { cat "$T/fio-d1.out" >&2; fail "fio on d1 failed"; }
log "fio done"

step "the lag drains; the replica equals the primary byte for byte"
wait_caught_up "$EAST_CONF" vm1 120
for d in d0 d1; do
  same_sha256 "$T/$d.img" "$WEST_STATE/replicas/vm1/$d.img" "replica of $d"
done
check_replica
grep -q "through cycle $(vm_field "$WEST_CONF" vm1 "v['applied_cycle']")\$" "$T/check.out" ||
  fail "siterep-check found another cycle than the applied one: $(tail -n 1 "$T/check.out")"
# Normal, or Warning only for the cycles missed while west was down (with 1 s cycles the
# outage can be more than a fifth of this short history); never Critical.
health=$(vm_field "$EAST_CONF" vm1 "v['health'] + ': ' + v['health_reason']")
[[ $health == "normal: " || $health == *"replication cycles in the last hour were missed"* ]] ||
  fail "east health: $health"
log "east health: $health"
rpo=$(vm_field "$EAST_CONF" vm1 "v['rpo_seconds']")
python3 -c "import sys; sys.exit(0 if float('$rpo') < 5 else 1)" || fail "RPO $rpo s after catching up"
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == replicating ]] || fail "west is not replicating"
log "RPO at east: $rpo s; west: $(vm_field "$WEST_CONF" vm1 "v['rpo_seconds']") s"

step "every recovery point reads as the primary at its cut"
"$SITEREP" -c "$WEST_CONF" points vm1
points=$("$SITEREP" -c "$WEST_CONF" points vm1 --json | jq_py "' '.join(str(p['id']) for p in d['points'])")
n=$(wc -w <<<"$points")
((n >= 2)) || fail "west keeps only $n recovery point(s): $points"
for id in $points; do
  for d in d0 d1; do
    "$SITEREP" -c "$WEST_CONF" export vm1 "$d" --point "$id" "$T/point.img" >/dev/null
    cp --sparse=always "$T/$d.pre" "$T/expected.img"
    "$SITEREP_LOG" replay "$T/archive/vm1/$d" "$T/expected.img" --through-cycle "$id" >/dev/null
    cmp "$T/point.img" "$T/expected.img" || fail "point $id of disk $d differs from the primary at cycle $id"
    rm -f "$T/point.img" "$T/expected.img"
  done
  log "point $id: both disks equal the primary at that cut"
done

step "the primary's data still verifies"
for d in d0 d1; do
  fio --name="$d" --filename="$EAST_MNT/vm1/$d" "${FIO_ARGS[@]}" --verify_only >"$T/fio-v-$d.out" 2>&1 ||
    { cat "$T/fio-v-$d.out" >&2; fail "verify of $d failed"; }
done
stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
