#!/usr/bin/env bash
# siterep verify: the block hashes of every disk, compared between the primary and its
# replica at one cycle.
#  - east replicates vm1 (disks os, 96 MiB, and data, 64 MiB) to west. While dd writes to
#    both disks in a loop, verify says every block is equal (exit 0): it compares one cut,
#    the primary's snapshot against the replica's recovery point of the same cycle.
#  - west is stopped, two bytes of its os image are flipped (in two 64 KiB blocks, in the
#    first and the second 64 MiB request), west is started again: verify names exactly those
#    two blocks (exit 1), and data stays equal.
#  - refusals name the reason: at the replica site, a VM that is not replicated, a VM that
#    is not tracked, an unknown VM.
#  - siterep resync --full brings the replica in line again; verify says equal.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"

two_sites
add_vm "$EAST_CONF" vm1 'frequency = "continuous"'
truncate -s 96M "$T/os.img"
fill_random "$T/os.img" 0 8
fill_random "$T/os.img" 76 8
add_disk "$EAST_CONF" os "$T/os.img"
truncate -s 64M "$T/data.img"
fill_random "$T/data.img" 0 4
add_disk "$EAST_CONF" data "$T/data.img"
add_vm "$EAST_CONF" vm2 'frequency = "continuous"'
add_disk "$EAST_CONF" d0 "$T/vm2.img" 16M
add_vm "$EAST_CONF" vm3 'tracking = "off"'
add_disk "$EAST_CONF" d0 "$T/vm3.img" 16M

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
timeout 120 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait >"$T/enable.out" 2>&1 ||
  { cat "$T/enable.out" >&2; fail "enable --wait did not finish"; }

# verify_json OUT WANT_RC: siterep verify vm1 --json at east into OUT, which must exit WANT_RC.
verify_json() {
  local out=$1 want=$2 rc=0
  timeout 200 "$SITEREP" -c "$EAST_CONF" verify vm1 --json >"$out" 2>"$out.err" || rc=$?
  [[ $rc -eq $want ]] || fail "verify --json: exit code $rc (want $want): $(cat "$out" "$out.err")"
}
# field FILE EXPR: a Python expression over the JSON document in FILE (bound to d).
field() {
  jq_py "$2" <"$1"
}

step "verify while dd writes to both disks: every block equal"
writer() {
  local n=0
  while :; do
    dd if=/dev/urandom of="$EAST_MNT/vm1/os" bs=64K count=2 seek=$((RANDOM % 1534)) \
      oflag=direct conv=notrunc status=none
    dd if=/dev/urandom of="$EAST_MNT/vm1/data" bs=64K count=2 seek=$((RANDOM % 1022)) \
      oflag=direct conv=notrunc status=none
    n=$((n + 1))
    echo "$n" >"$T/writes.tmp"
    mv "$T/writes.tmp" "$T/writes"
  done
}
writer &
WRITER=$!
_PIDS+=("$WRITER")
sleep 2
writes_before=$(cat "$T/writes")
verify_json "$T/v1.json" 0
writes_after=$(cat "$T/writes")
log "verify: cycle $(field "$T/v1.json" "d['cycle']"), $(field "$T/v1.json" "d['seconds']") s," \
  "$(field "$T/v1.json" "d['attempts']") attempt(s); the writer made $((writes_after - writes_before)) rounds of writes meanwhile"
((writes_after > writes_before)) || fail "dd wrote nothing during verify"
[[ $(field "$T/v1.json" "d['equal']") == true ]] || fail "verify under writes: $(cat "$T/v1.json")"
[[ $(field "$T/v1.json" "[(x['name'], x['blocks'], x['differing_blocks'], x['ranges']) for x in d['disks']]") == \
  '[["os", 1536, 0, []], ["data", 1024, 0, []]]' ]] || fail "verify's disks: $(cat "$T/v1.json")"
[[ $(field "$T/v1.json" "d['peer']") == west ]] || fail "verify compared with $(field "$T/v1.json" "d['peer']")"
cycle_after=$(vm_field "$EAST_CONF" vm1 "v['last_cycle']")
((cycle_after > $(field "$T/v1.json" "d['cycle']"))) ||
  fail "no cycle was cut after the one verify compared (last cycle $cycle_after)"
timeout 200 "$SITEREP" -c "$EAST_CONF" verify vm1 >"$T/v2.out" 2>&1 ||
  { cat "$T/v2.out" >&2; fail "verify (text) under writes did not exit 0"; }
sed 's/^/    | /' "$T/v2.out"
grep -qx "os: 1536 blocks, equal" "$T/v2.out" || fail "no 'os: 1536 blocks, equal' line"
grep -qx "data: 1024 blocks, equal" "$T/v2.out" || fail "no 'data: 1024 blocks, equal' line"
kill "$WRITER"
wait "$WRITER" 2>/dev/null || true
_forget_pid "$WRITER"
wait_caught_up "$EAST_CONF" vm1 60

step "two bytes of the os replica flipped while west is stopped: verify names those blocks"
stop_clean "$WEST_PID" "$WEST_CONF"
OFF1=$((3 * 1048576 + 100))   # block 0x300000, in the first request
OFF2=$((80 * 1048576 + 7))    # block 0x5000000, in the second request
python3 - "$WEST_STATE/replicas/vm1/os.img" "$OFF1" "$OFF2" <<'EOF'
import sys
with open(sys.argv[1], "r+b") as f:
    for off in map(int, sys.argv[2:]):
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
EOF
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
for ((i = 0; i < 150; i++)); do
  [[ $(vm_field "$EAST_CONF" vm1 "v['link']['state']") == connected ]] && break
  sleep 0.2
done
((i < 150)) || fail "east did not reconnect to west"
verify_json "$T/v3.json" 1
[[ $(field "$T/v3.json" "d['equal']") == false ]] || fail "verify found no difference: $(cat "$T/v3.json")"
[[ $(field "$T/v3.json" "[(x['name'], x['differing_blocks'], x['range_count'],
    [(r['offset'], r['length']) for r in x['ranges']]) for x in d['disks']]") == \
  '[["os", 2, 2, [[3145728, 65536], [83886080, 65536]]], ["data", 0, 0, []]]' ]] ||
  fail "verify's differing ranges: $(cat "$T/v3.json")"
[[ $(field "$T/v3.json" "d['next']") == *"resync vm1 --full"* ]] || fail "no hint to resync --full"
rc=0
timeout 200 "$SITEREP" -c "$EAST_CONF" verify vm1 >"$T/v4.out" 2>"$T/v4.err" || rc=$?
((rc == 1)) || fail "verify (text) with differences: exit code $rc (want 1)"
sed 's/^/    | /' "$T/v4.out" "$T/v4.err"
grep -qx "os: 2 blocks differ: 0x300000+64KiB, 0x5000000+64KiB" "$T/v4.out" ||
  fail "no 'os: 2 blocks differ: 0x300000+64KiB, 0x5000000+64KiB' line"
grep -qx "data: 1024 blocks, equal" "$T/v4.out" || fail "no 'data: 1024 blocks, equal' line"
grep -q "2 blocks differ from the replica at west" "$T/v4.err" || fail "no one-line reason on stderr"

step "refusals name the reason"
expect_exit1 "verify at the replica site" "$SITEREP" -c "$WEST_CONF" verify vm1
expect_output_has "is a replica at west"
expect_output_has "siterep verify vm1 at east"
expect_exit1 "verify of a VM without replication" "$SITEREP" -c "$EAST_CONF" verify vm2
expect_output_has "vm2 is not replicated"
expect_exit1 "verify of a VM without tracking" "$SITEREP" -c "$EAST_CONF" verify vm3
expect_output_has 'tracking = "off"'
expect_exit1 "verify of an unknown VM" "$SITEREP" -c "$EAST_CONF" verify nosuchvm
expect_output_has "no VM named 'nosuchvm'"

step "resync --full sends the differing blocks; verify says equal again"
timeout 120 "$SITEREP" -c "$EAST_CONF" resync vm1 --full --wait >"$T/resync.out" 2>&1 ||
  { cat "$T/resync.out" >&2; fail "resync --full --wait failed"; }
sent=$(vm_field "$EAST_CONF" vm1 "v['last_sync']['bytes_sent']")
log "resync --full sent $sent bytes of data"
((sent == 2 * 65536)) || fail "resync --full sent $sent bytes; the two differing blocks are 131072"
verify_json "$T/v5.json" 0
[[ $(field "$T/v5.json" "d['differing_blocks']") == 0 ]] || fail "after resync: $(cat "$T/v5.json")"
same_sha256 "$T/os.img" "$WEST_STATE/replicas/vm1/os.img" "replica of os after resync --full"

stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
