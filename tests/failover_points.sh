#!/usr/bin/env bash
# Unplanned failover to an older recovery point, then to another, then commit:
#  - east runs vm1 (two disks, 1 s cycles, recovery_points = 3) replicated to west; three
#    markers A, B, C are written at east one after the other, each made a recovery point
#    at west (one cycle each, written past recovery_point_interval, so west keeps exactly
#    the three); an unplanned failover while east answers is refused unless --force;
#  - east stops; `failover --unplanned --point <A>` at west: the disks read A; west writes
#    X; `failover --unplanned --point <B>` warns that X is discarded: the disks read B and
#    X is gone; `commit`: the disks still read B, west is primary, "committed", and keeps
#    no recovery points any more (`points` is refused); a write after the commit sticks;
#  - east starts again: it is fenced (writes EROFS); `reverse --wait` at west makes it the
#    replica, and its images end up equal to west's disks.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"

INTERVAL_S=2
two_sites
WEST_MNT=$T/west/mnt
add_vm "$EAST_CONF" vm1 'frequency = "continuous"' 'recovery_points = 3' \
  "recovery_point_interval = \"${INTERVAL_S}s\""
truncate -s 64M "$T/d0.img"
fill_random "$T/d0.img" 0 16
add_disk "$EAST_CONF" d0 "$T/d0.img"
truncate -s 32M "$T/d1.img"
fill_random "$T/d1.img" 0 8
add_disk "$EAST_CONF" d1 "$T/d1.img"

# Where the markers go (4 KiB blocks): d0 at 4 MiB, d1 at 2 MiB; two blocks each.
declare -A MARK_BLOCK=([d0]=1024 [d1]=512)
# X, written at west on point A: over d0's marker and 1 MiB at 10 MiB of d0.
X_MIB=10
dd if="$T/d0.img" of="$T/base-x.bin" bs=1M skip=$X_MIB count=1 status=none

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
timeout 60 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait >/dev/null ||
  fail "enable --wait failed"

step "an unplanned failover while east answers is refused without --force"
expect_exit1 "unplanned failover, east healthy" "$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned
expect_output_has "answers and runs VM vm1 as primary"
expect_output_has "--force"
expect_exit1 "unplanned failover to a point, east healthy" \
  "$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned --point latest
[[ $(vm_field "$WEST_CONF" vm1 "v['role']") == replica ]] || fail "west is not the replica any more"
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == primary ]] || fail "east is not primary any more"

# mark NAME: writes marker NAME at east (both disks) as one cycle of its own, and makes
# it a recovery point at west: cycles are cut only when something changed, and west keeps
# a cycle as a point when its cut is at least recovery_point_interval after the newest
# point it keeps, so the marker is written past the interval since the previous one. If
# the 1 s cycle timer happens to cut between the two disks' writes, the marker is written
# again (a point with half a marker is no use). Sets POINT[NAME] (the cycle).
declare -A POINT
mark() {
  local name=$1 d before cut try
  for ((try = 0; try < 3; try++)); do
    sleep "$INTERVAL_S.3"
    before=$(vm_field "$EAST_CONF" vm1 "v['last_cycle']")
    for d in d0 d1; do
      head -c 8192 /dev/urandom >"$T/mark-$name-$d.bin"
      dd if="$T/mark-$name-$d.bin" of="$EAST_MNT/vm1/$d" bs=4k seek="${MARK_BLOCK[$d]}" \
        conv=notrunc oflag=direct status=none
    done
    cut=$("$SITEREP" -c "$EAST_CONF" cut vm1 --json | jq_py "d['cycle']")
    wait_caught_up "$EAST_CONF" vm1 30
    if ((cut == before + 1)); then
      POINT[$name]=$cut
      log "marker $name: cycle $cut"
      return 0
    fi
    log "marker $name landed in cycles $((before + 1))..$cut; again"
  done
  fail "marker $name: could not write it as one cycle"
}

# reads_marker SITE_MNT NAME: the disks at SITE_MNT/vm1 hold marker NAME (buffered reads).
reads_marker() {
  local mnt=$1 name=$2 d
  for d in d0 d1; do
    dd if="$mnt/vm1/$d" of="$T/read.bin" bs=4k skip="${MARK_BLOCK[$d]}" count=2 status=none
    cmp -s "$T/read.bin" "$T/mark-$name-$d.bin" || return 1
  done
}

# x_region_is FILE: the 1 MiB at X_MIB of west's d0 equals FILE.
x_region_is() {
  dd if="$WEST_MNT/vm1/d0" of="$T/read-x.bin" bs=1M skip=$X_MIB count=1 status=none
  cmp -s "$T/read-x.bin" "$1"
}

step "markers A, B, C at east, each a recovery point at west"
mark A
mark B
mark C
reads_marker "$EAST_MNT" C || fail "east does not read marker C"
stop_clean "$EAST_PID" "$EAST_CONF"
for ((i = 0; i < 100; i++)); do
  [[ $(vm_field "$WEST_CONF" vm1 "v['link']['state']") != connected ]] && break
  sleep 0.1
done
points_json=$("$SITEREP" -c "$WEST_CONF" points vm1 --json)
"$SITEREP" -c "$WEST_CONF" points vm1
PA=${POINT[A]} PB=${POINT[B]} PC=${POINT[C]}
# recovery_points = 3: the points of A, B and C, the oldest (the initial sync's) pruned.
[[ $(jq_py "[(p['id'], p['latest']) for p in d['points']]" <<<"$points_json") == \
  "[[$PA, false], [$PB, false], [$PC, true]]" ]] ||
  fail "west should keep exactly points $PA, $PB, $PC (latest): $points_json"

step "unplanned failover to A's point"
"$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned --point "$PA" >"$T/failover-a.out" 2>&1 ||
  { cat "$T/failover-a.out" >&2; fail "failover to point $PA failed"; }
log "$(cat "$T/failover-a.out")"
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == "failed over" ]] || fail "west is not failed over"
[[ $(vm_field "$WEST_CONF" vm1 "v['role']") == primary ]] || fail "west is not primary"
[[ $(vm_field "$WEST_CONF" vm1 "v['failover_point']['id']") == "$PA" ]] ||
  fail "west runs point $(vm_field "$WEST_CONF" vm1 "v['failover_point']['id']"), want $PA"
reads_marker "$WEST_MNT" A || fail "west does not read marker A at point $PA"
x_region_is "$T/base-x.bin" || fail "west's d0 at point $PA differs from east's base at ${X_MIB} MiB"

step "west writes X on point A"
head -c 1M /dev/urandom >"$T/x.bin"
head -c 4096 /dev/urandom >"$T/x-mark.bin"
dd if="$T/x.bin" of="$WEST_MNT/vm1/d0" bs=1M seek=$X_MIB conv=notrunc oflag=direct status=none
dd if="$T/x-mark.bin" of="$WEST_MNT/vm1/d0" bs=4k seek="${MARK_BLOCK[d0]}" conv=notrunc \
  oflag=direct status=none
x_region_is "$T/x.bin" || fail "west does not read back X"
dd if="$WEST_MNT/vm1/d0" of="$T/read.bin" bs=4k skip="${MARK_BLOCK[d0]}" count=1 status=none
cmp -s "$T/read.bin" "$T/x-mark.bin" || fail "west does not read back X over the marker"
written=$(vm_field "$WEST_CONF" vm1 "v['written_since_failover']")
((written >= (1 << 20))) || fail "status shows $written bytes written since the failover"

step "unplanned failover to B's point: X is discarded"
"$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned --point "$PB" >"$T/failover-b.out" 2>&1 ||
  { cat "$T/failover-b.out" >&2; fail "failover to point $PB failed"; }
log "$(cat "$T/failover-b.out")"
grep -q "discarded" "$T/failover-b.out" || fail "no warning that writes were discarded"
grep -q "$PA" "$T/failover-b.out" || fail "the warning does not name point $PA"
[[ $(vm_field "$WEST_CONF" vm1 "v['failover_point']['id']") == "$PB" ]] ||
  fail "west runs point $(vm_field "$WEST_CONF" vm1 "v['failover_point']['id']"), want $PB"
reads_marker "$WEST_MNT" B || fail "west does not read marker B at point $PB"
x_region_is "$T/base-x.bin" || fail "X is still on west's d0 after moving to point $PB"
[[ $(vm_field "$WEST_CONF" vm1 "v['epoch']") -eq 2 ]] || fail "west's epoch is not 2"
"$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned --point "$PB" >"$T/failover-b2.out" 2>&1 ||
  { cat "$T/failover-b2.out" >&2; fail "failover to the same point failed"; }
grep -q "already" "$T/failover-b2.out" || fail "same point again: $(cat "$T/failover-b2.out")"

step "commit: B stays, the other points go"
"$SITEREP" -c "$WEST_CONF" commit vm1 >"$T/commit.out" 2>&1 ||
  { cat "$T/commit.out" >&2; fail "commit failed"; }
log "$(cat "$T/commit.out")"
reads_marker "$WEST_MNT" B || fail "west does not read marker B after the commit"
x_region_is "$T/base-x.bin" || fail "X reappeared after the commit"
[[ $(status_json "$WEST_CONF" vm1 | jq_py "d['vms'][0]['role'] + ' ' + d['vms'][0]['state']") == \
  "primary committed" ]] || fail "west after commit: $(status_json "$WEST_CONF" vm1)"
expect_exit1 "points after the commit" "$SITEREP" -c "$WEST_CONF" points vm1
expect_output_has "not a replica"
expect_exit1 "commit twice" "$SITEREP" -c "$WEST_CONF" commit vm1
expect_output_has "no uncommitted failover"
expect_exit1 "failover to another point after the commit" \
  "$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned --point "$PC"
head -c 2M /dev/urandom >"$T/y.bin"
dd if="$T/y.bin" of="$WEST_MNT/vm1/d1" bs=1M seek=20 conv=notrunc oflag=direct status=none

step "east starts again: fenced"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
wait_state "$EAST_CONF" vm1 fenced
expect_erofs "$EAST_MNT/vm1/d0"
reads_marker "$WEST_MNT" B || fail "west's data changed while east was fenced"

step "reverse at west: east becomes the replica and equals west"
"$SITEREP" -c "$WEST_CONF" reverse vm1 --wait >"$T/reverse.out" 2>&1 ||
  { cat "$T/reverse.out" >&2; fail "reverse --wait failed"; }
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == replica ]] || fail "east is not the replica"
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == "reverse replicating" ]] ||
  fail "west's state after reverse: $(vm_field "$WEST_CONF" vm1 "v['state']")"
wait_caught_up "$WEST_CONF" vm1 60
same_sha256 "$WEST_MNT/vm1/d0" "$T/d0.img" "east's d0 after reverse replication"
same_sha256 "$WEST_MNT/vm1/d1" "$T/d1.img" "east's d1 after reverse replication"
dd if="$T/d1.img" of="$T/read-y.bin" bs=1M skip=20 count=2 status=none
cmp -s "$T/read-y.bin" "$T/y.bin" || fail "the write made after the commit did not reach east"
stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
log "ok"
