#!/usr/bin/env bash
# Crashes in the middle of role changes. Each daemon is made to abort (as kill -9 would) at
# one step of a failover through a failpoint, restarted, and the same command (or status
# and the obvious next one) must finish the change: never two primaries, never a replica
# that claims a point it does not hold, and the disks equal at the end.
#  1. planned failover east -> west, east dies after the drain, before asking west;
#  2. planned failover west -> east, east dies right after it recorded its promotion;
#  3. unplanned failover at west, west dies right after it recorded the failover;
#  4. commit at west, west dies right after it recorded the commit; at its restart it
#     finishes the commit and dies again there, after the images became the point, before
#     the overlay (armed by SITEREP_FAILPOINTS at the start);
#  5. reverse at west, east dies right after it recorded its demotion;
#  6. two role changes of one VM at once: the second is refused.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"

two_sites
WEST_MNT=$T/west/mnt
add_vm "$EAST_CONF" vm1 'frequency = "continuous"' 'recovery_points = 2' \
  'recovery_point_interval = "1s"' 'pre_failover = "sleep 1"'
truncate -s 64M "$T/d0.img"
fill_random "$T/d0.img" 0 16
add_disk "$EAST_CONF" d0 "$T/d0.img"
REPLICA=$WEST_STATE/replicas/vm1/d0.img

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
timeout 120 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait >/dev/null ||
  fail "enable --wait failed"

# crashed PID CONF: waits for a daemon that aborted at a failpoint and removes its stale
# mount.
crashed() {
  local pid=$1 conf=$2 mnt i
  for ((i = 0; i < 100; i++)); do
    _alive "$pid" || break
    sleep 0.1
  done
  _alive "$pid" && fail "siterepd pid $pid did not crash at the failpoint"
  wait "$pid" 2>/dev/null || true
  _forget_pid "$pid"
  mnt=$(config_value "$conf" mountpoint)
  if is_mounted "$mnt"; then fusermount3 -u "$mnt" || fusermount3 -uz "$mnt"; fi
  log "siterepd pid $pid crashed at the failpoint"
}

# roles EXPECT_EAST EXPECT_WEST: the role each site reports for vm1.
roles() {
  local e w
  e=$(vm_field "$EAST_CONF" vm1 "v['role'] + '/' + v['state']")
  w=$(vm_field "$WEST_CONF" vm1 "v['role'] + '/' + v['state']")
  log "east: $e, west: $w"
  [[ ${e%%/*} == "$1" && ${w%%/*} == "$2" ]] || fail "roles east=$e west=$w (want $1, $2)"
}

write_at() {  # write_at MNT: 1 MiB of random data at a random MiB of vm1/d0
  dd if=/dev/urandom of="$1/vm1/d0" bs=1M count=1 seek=$((RANDOM % 60)) conv=notrunc \
    oflag=direct status=none
}

step "1. planned failover east -> west; east dies after the drain"
write_at "$EAST_MNT"
"$SITEREP" -c "$EAST_CONF" failpoint control.planned_after_drain=abort*1 >/dev/null
expect_exit1 "failover with east crashing" "$SITEREP" -c "$EAST_CONF" failover vm1 --planned
crashed "$EAST_PID" "$EAST_CONF"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
[[ $(vm_field "$EAST_CONF" vm1 "v['state']") == "failing over" ]] || fail "east forgot the failover"
dd if=/dev/zero of="$EAST_MNT/vm1/d0" bs=4k count=1 conv=notrunc oflag=direct status=none 2>/dev/null &&
  fail "east accepted a write in the middle of a planned failover"
roles primary replica
"$SITEREP" -c "$EAST_CONF" failover vm1 --planned || fail "the failover did not finish"
roles replica primary
same_sha256 "$WEST_MNT/vm1/d0" "$T/d0.img" "disks after failover 1"

step "2. planned failover west -> east; east dies when it recorded its promotion"
cat >>"$WEST_CONF" <<EOT

[[hooks]]
vm = "vm1"
pre_failover = "sleep 1"
EOT
stop_clean "$WEST_PID" "$WEST_CONF"
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
for ((i = 0; i < 150; i++)); do
  [[ $(vm_field "$WEST_CONF" vm1 "v['link']['state']") == connected ]] && break
  sleep 0.2
done
write_at "$WEST_MNT"
wait_caught_up "$WEST_CONF" vm1
"$SITEREP" -c "$EAST_CONF" failpoint control.promote_after_persist=abort*1 >/dev/null
expect_exit1 "failover with east crashing" "$SITEREP" -c "$WEST_CONF" failover vm1 --planned
expect_output_has "stays read-only"
crashed "$EAST_PID" "$EAST_CONF"
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == "failing over" ]] || fail "west is not failing over"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == primary ]] || fail "east did not finish its promotion"
"$SITEREP" -c "$WEST_CONF" failover vm1 --planned || fail "the failover did not finish at west"
roles primary replica
[[ $(vm_field "$EAST_CONF" vm1 "v['epoch']") -eq 3 ]] || fail "east is not at epoch 3"
wait_caught_up "$EAST_CONF" vm1
same_sha256 "$EAST_MNT/vm1/d0" "$REPLICA" "disks after failover 2"

step "3. unplanned failover at west; west dies when it recorded it"
write_at "$EAST_MNT"
wait_caught_up "$EAST_CONF" vm1
sleep 1.2
write_at "$EAST_MNT"
wait_caught_up "$EAST_CONF" vm1
crash_daemon "$EAST_PID" "$EAST_CONF"
"$SITEREP" -c "$WEST_CONF" failpoint control.unplanned_after_persist=abort*1 >/dev/null
expect_exit1 "unplanned failover with west crashing" \
  "$SITEREP" -c "$WEST_CONF" failover vm1 --unplanned
crashed "$WEST_PID" "$WEST_CONF"
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == "failed over" ]] || fail "west is not failed over"
[[ -e $WEST_MNT/vm1/d0 ]] || fail "west does not expose the failed-over disk"
write_at "$WEST_MNT"

step "4. commit at west; west dies when it recorded it, and again in the middle at its restart"
sha_before=$(sha256sum <"$WEST_MNT/vm1/d0" | cut -d' ' -f1)
"$SITEREP" -c "$WEST_CONF" failpoint control.commit_after_persist=abort*1 >/dev/null
expect_exit1 "commit with west crashing" "$SITEREP" -c "$WEST_CONF" commit vm1
crashed "$WEST_PID" "$WEST_CONF"
SITEREP_FAILPOINTS=control.commit_mid=abort*1 start_daemon "$WEST_CONF"
crashed "$DAEMON_PID" "$WEST_CONF"
grep -q "failpoint control.commit_mid" "$DAEMON_LOG" ||
  fail "west did not die finishing the commit at its start: $(tail -n 3 "$DAEMON_LOG")"
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == committed ]] || fail "the commit did not finish"
[[ $(sha256sum <"$WEST_MNT/vm1/d0" | cut -d' ' -f1) == "$sha_before" ]] ||
  fail "the committed disk differs from the failed-over one"
write_at "$WEST_MNT"

step "5. reverse at west; east dies when it recorded its demotion"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
wait_state "$EAST_CONF" vm1 fenced
roles none primary
"$SITEREP" -c "$EAST_CONF" failpoint control.demote_after_persist=abort*1 >/dev/null
expect_exit1 "reverse with east crashing" "$SITEREP" -c "$WEST_CONF" reverse vm1
crashed "$EAST_PID" "$EAST_CONF"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
roles replica primary
timeout 120 "$SITEREP" -c "$WEST_CONF" reverse vm1 --wait >/dev/null || fail "reverse did not finish"
wait_caught_up "$WEST_CONF" vm1
same_sha256 "$WEST_MNT/vm1/d0" "$T/d0.img" "disks after reverse"

step "6. two role changes of one VM at once"
"$SITEREP" -c "$WEST_CONF" failover vm1 --planned >"$T/first.out" 2>&1 &
FIRST=$!
sleep 0.3
expect_exit1 "a second failover meanwhile" "$SITEREP" -c "$WEST_CONF" failover vm1 --planned
expect_output_has "cannot start: planned failover of it runs"
wait "$FIRST" || fail "the first failover failed: $(cat "$T/first.out")"
roles primary replica
stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
log "ok"
