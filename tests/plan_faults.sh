#!/usr/bin/env bash
# Recovery plan runs under faults: two VMs (vm1, vm2) at east, replicated to west.
#  - malformed plans (a TOML syntax error, an unknown VM, a VM in two groups): `plan run`
#    exits 1 naming the file and line or the VM, and no run is started;
#  - a hanging action (pre `sleep 30`, timeout 1s): the run fails within seconds, the
#    action timed out, nothing moved; `plan cancel` ends it and a new run is accepted;
#  - the CLI killed while the run is in a 4 s pre action: the daemon goes on, `plan status`
#    shows where it stands, the run ends done with vm1 at west (then a reversed plan);
#  - west's siterepd stopped: the planned run fails naming vm1 and why, vm1 stays
#    writable at east; west back, `plan continue` finishes it (then a reversed plan);
#  - east's siterepd restarted while a run is paused at a manual step: still paused, same
#    cursor; `plan continue` finishes it (then a reversed plan for both VMs);
#  - east's siterepd stopped during a 3 s pre action: the step finishes, the run is
#    "interrupted" after the restart, `plan continue` finishes it without running the
#    action again.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"

two_sites
WEST_MNT=$T/west/mnt
EAST_STATE=$T/east/state
allow_plan_actions_both

for vm in vm1 vm2; do
  add_vm "$EAST_CONF" "$vm" 'frequency = "continuous"'
  add_disk "$EAST_CONF" os "$T/$vm-os.img" 32M
done

# --- helpers -----------------------------------------------------------------------------

# wait_run_ends CONF NAME [TIMEOUT_S]: waits while the run's state is running; sets
# RUN_STATE to the state it ended in.
wait_run_ends() {
  local conf=$1 name=$2 timeout=${3:-60} i
  for ((i = 0; i < timeout * 5; i++)); do
    RUN_STATE=$(plan_doc "$conf" "$name" "d['state']")
    [[ $RUN_STATE != running ]] && return 0
    sleep 0.2
  done
  fail "plan $name still running after ${timeout}s: $(show_run "$conf" "$name")"
}

# The run document's cursor as [group, stage, index].
CURSOR="[d['cursor'][k] for k in ('group', 'stage', 'index')]"

# expect_run CONF NAME EXPR WANT WHAT: the run document's EXPR is WANT.
expect_run() {
  local got
  got=$(plan_doc "$1" "$2" "$3")
  [[ $got == "$4" ]] || fail "$5: $3 is '$got' (want '$4'); run document: $(show_run "$1" "$2")"
}

# wait_link CONF VM [TIMEOUT_S]: the VM's outbound link (at its primary) is connected.
wait_link() {
  local conf=$1 vm=$2 timeout=${3:-30} i
  for ((i = 0; i < timeout * 5; i++)); do
    [[ $(vm_field "$conf" "$vm" "v.get('link', {}).get('state', '')") == connected ]] && return 0
    sleep 0.2
  done
  fail "VM $vm: the link is not connected after ${timeout}s: $(vm_field "$conf" "$vm" "v.get('link')")"
}

# expect_roles VM ROLE_AT_EAST ROLE_AT_WEST
expect_roles() {
  local e w
  e=$(vm_field "$EAST_CONF" "$1" "v['role']")
  w=$(vm_field "$WEST_CONF" "$1" "v['role']")
  [[ $e == "$2" && $w == "$3" ]] ||
    fail "VM $1 is $e at east and $w at west (want $2 and $3)"
}

# expect_writable FILE: a direct 4 KiB write to a disk file succeeds.
expect_writable() {
  dd if=/dev/urandom of="$1" bs=4k count=1 seek=200 conv=notrunc oflag=direct status=none \
    2>"$T/dd.err" || fail "a write to $1 failed: $(cat "$T/dd.err")"
}

# run_names CONF: the plan names of every run the site knows, sorted, one line.
run_names() {
  "$SITEREP" -c "$1" plan status --json | jq_py "' '.join(sorted(r['plan']['name'] for r in d['runs']))"
}

# fail_back NAME VM...: the reversed plan NAME (west -> east) brings the VMs home once
# west replicates them to east; then east replicates them to west again.
fail_back() {
  local name=$1 vm
  shift
  for vm in "$@"; do
    wait_state "$WEST_CONF" "$vm" "reverse replicating" 60
    wait_link "$WEST_CONF" "$vm" 30
  done
  run_plan 0 "$T/$name.out" "$WEST_CONF" plan run "$T/$name.toml" --planned --yes
  expect_run "$WEST_CONF" "$name" "d['state']" "done" "failback $name"
  for vm in "$@"; do
    expect_roles "$vm" primary replica
    wait_state "$EAST_CONF" "$vm" replicating 60
    wait_link "$EAST_CONF" "$vm" 30
  done
}

# --- plans -------------------------------------------------------------------------------

cat >"$T/hang.toml" <<'EOT'
name = "hang"
from = "east"
to = "west"

[[groups]]
name = "first"
vms = ["vm1"]
  [[groups.pre]]
  site = "east"
  run = "sleep 30"
  timeout = "1s"
EOT

cat >"$T/move.toml" <<EOT
name = "move"
from = "east"
to = "west"

[[groups]]
name = "first"
vms = ["vm1"]
  [[groups.pre]]
  site = "east"
  run = "echo pre >> $T/move.log; sleep 4"
  timeout = "30s"
  [[groups.post]]
  site = "west"
  run = "echo post >> $T/move.log"
  timeout = "30s"
EOT

cat >"$T/lost.toml" <<'EOT'
name = "lost"
from = "east"
to = "west"

[[groups]]
name = "first"
vms = ["vm1"]
EOT

cat >"$T/stepwise.toml" <<'EOT'
name = "stepwise"
from = "east"
to = "west"

[[groups]]
name = "first"
vms = ["vm1"]
  [[groups.manual]]
  message = "Confirm that vm1 runs at west"

[[groups]]
name = "second"
vms = ["vm2"]
EOT

cat >"$T/slowpre.toml" <<EOT
name = "slowpre"
from = "east"
to = "west"

[[groups]]
name = "first"
vms = ["vm1"]
  [[groups.pre]]
  site = "east"
  run = "echo pre >> $T/slowpre.log; sleep 3"
  timeout = "30s"
EOT

cat >"$T/back1.toml" <<'EOT'
name = "back1"
from = "west"
to = "east"

[[groups]]
name = "home"
vms = ["vm1"]
EOT

cat >"$T/back2.toml" <<'EOT'
name = "back2"
from = "west"
to = "east"

[[groups]]
name = "home"
vms = ["vm1", "vm2"]
EOT

# Malformed: an unclosed array on line 7; an unknown VM; vm1 in two groups.
cat >"$T/bad-syntax.toml" <<'EOT'
name = "bad-syntax"
from = "east"
to = "west"

[[groups]]
name = "first"
vms = ["vm1", "vm2"
EOT

cat >"$T/ghost.toml" <<'EOT'
name = "ghost"
from = "east"
to = "west"

[[groups]]
name = "first"
vms = ["vm1", "ghost9"]
EOT

cat >"$T/twice.toml" <<'EOT'
name = "twice"
from = "east"
to = "west"

[[groups]]
name = "first"
vms = ["vm1"]

[[groups]]
name = "second"
vms = ["vm2", "vm1"]
EOT

# --- set-up ------------------------------------------------------------------------------

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID

step "enable replication of vm1 and vm2"
for vm in vm1 vm2; do
  timeout 120 "$SITEREP" -c "$EAST_CONF" enable "$vm" --to west --wait >/dev/null ||
    fail "enable $vm --wait failed"
  dd if=/dev/urandom of="$EAST_MNT/$vm/os" bs=1M seek=2 count=2 conv=notrunc,fsync status=none
done
for vm in vm1 vm2; do wait_caught_up "$EAST_CONF" "$vm" 60; done

# --- 5. malformed plans ----------------------------------------------------------------------

step "malformed plans: refused with the file and line or the VM, nothing started"
[[ -z $(run_names "$EAST_CONF") ]] || fail "east lists runs before any: $(run_names "$EAST_CONF")"
expect_exit1 "a plan with a TOML syntax error" \
  "$SITEREP" -c "$EAST_CONF" plan run "$T/bad-syntax.toml" --planned --yes
expect_output_has "bad-syntax.toml:"
grep -qE 'bad-syntax\.toml:7:[0-9]+: ' <<<"$FAIL_OUTPUT" ||
  fail "the syntax error does not name the file, line 7 and a column: $FAIL_OUTPUT"
expect_exit1 "a plan with an unknown VM" \
  "$SITEREP" -c "$EAST_CONF" plan run "$T/ghost.toml" --planned --yes
expect_output_has "ghost9"
expect_output_has "unknown at east"
expect_exit1 "a plan with a VM in two groups" \
  "$SITEREP" -c "$EAST_CONF" plan run "$T/twice.toml" --planned --yes
expect_output_has "twice.toml"
expect_output_has "'vm1'"
expect_output_has "in group 'first' and in group 'second'"
[[ -z $(run_names "$EAST_CONF") ]] || fail "a refused plan left a run: $(run_names "$EAST_CONF")"
for name in bad-syntax ghost twice; do
  ! "$SITEREP" -c "$EAST_CONF" plan status "$name" >/dev/null 2>&1 ||
    fail "plan status knows a run of refused plan $name"
  [[ ! -e $EAST_STATE/plans/$name ]] || fail "a refused plan $name left $EAST_STATE/plans/$name"
done
expect_roles vm1 primary replica
expect_roles vm2 primary replica

# --- 1. a hanging action -------------------------------------------------------------------

step "a pre action that hangs (sleep 30, timeout 1s): the run fails in seconds, nothing moves"
t0=$(date +%s%N)
run_plan 1 "$T/hang1.out" "$EAST_CONF" plan run "$T/hang.toml" --planned --yes
took_ms=$((($(date +%s%N) - t0) / 1000000))
log "the hanging run failed after $took_ms ms"
((took_ms < 10000)) || fail "the run with a 1s action timeout took $took_ms ms"
"$SITEREP" -c "$EAST_CONF" plan status hang --json >"$T/hang1.json"
h() { jq_py "$1" <"$T/hang1.json"; }
[[ $(h "d['state']") == failed ]] || fail "hang: state: $(cat "$T/hang1.json")"
[[ $(h "d['groups'][0]['pre'][0]['state']") == failed ]] || fail "hang: pre: $(h "d['groups'][0]['pre']")"
[[ $(h "d['groups'][0]['pre'][0]['timed_out']") == true ]] ||
  fail "hang: the action is not marked timed_out: $(h "d['groups'][0]['pre']")"
secs=$(h "d['groups'][0]['pre'][0]['seconds']")
python3 -c "import sys; sys.exit(0 if float('$secs') < 8 else 1)" ||
  fail "hang: the action ran $secs s with a 1s timeout"
[[ $(h "d['message']") == *"timed out"* && $(h "d['message']") == *first* ]] ||
  fail "hang: the message does not say the action timed out: $(h "d['message']")"
grep -q "timed out" "$T/hang1.out" || fail "hang: the CLI's output does not say the action timed out"
[[ $(h "d['groups'][0]['vms'][0]['state']") == pending ]] || fail "hang: vm1 moved: $(h "d['groups'][0]")"
expect_roles vm1 primary replica
[[ $(vm_field "$EAST_CONF" vm1 "v['state']") == replicating ]] ||
  fail "hang: vm1 is $(vm_field "$EAST_CONF" vm1 "v['state']") at east"
expect_writable "$EAST_MNT/vm1/os"
expect_exit1 "a new run while the failed one stands" \
  "$SITEREP" -c "$EAST_CONF" plan run "$T/hang.toml" --planned --yes
expect_output_has "plan continue"

step "plan cancel ends the failed run; a new run of the plan is accepted"
run_plan 0 "$T/hang-cancel.out" "$EAST_CONF" plan cancel hang
expect_run "$EAST_CONF" hang "d['state']" cancelled "after plan cancel"
[[ $(plan_doc "$EAST_CONF" hang "d['ended']") != None ]] || fail "the cancelled run has no end: $(show_run "$EAST_CONF" hang)"
expect_exit1 "plan continue of a cancelled run" "$SITEREP" -c "$EAST_CONF" plan continue hang
first_started=$(plan_doc "$EAST_CONF" hang "d['started_unix_nanos']")
run_plan 0 "$T/hang2.out" "$EAST_CONF" plan run "$T/hang.toml" --planned --yes --detach
[[ $(plan_doc "$EAST_CONF" hang "d['started_unix_nanos']") != "$first_started" ]] ||
  fail "the second run of hang is the first one: $(show_run "$EAST_CONF" hang)"
wait_run_ends "$EAST_CONF" hang 20
[[ $RUN_STATE == failed ]] || fail "the second run of hang: $(show_run "$EAST_CONF" hang)"
[[ $(find "$EAST_STATE/plans/hang/history" -type f | wc -l) -eq 1 ]] ||
  fail "the first run of hang is not in history/: $(ls -R "$EAST_STATE/plans/hang")"
run_plan 0 "$T/hang-cancel2.out" "$EAST_CONF" plan cancel hang
expect_roles vm1 primary replica

# --- 2. the CLI killed mid-run -------------------------------------------------------------

step "the CLI is killed while the run is in a 4 s pre action: the daemon carries on"
"$SITEREP" -c "$EAST_CONF" plan run "$T/move.toml" --planned --yes >"$T/move.out" 2>&1 &
CLI_PID=$!
_PIDS+=("$CLI_PID")
sleep 1
_alive "$CLI_PID" || fail "the CLI ended within 1 s: $(cat "$T/move.out")"
kill -TERM "$CLI_PID"
wait "$CLI_PID" 2>/dev/null || true
_forget_pid "$CLI_PID"
log "killed the CLI (pid $CLI_PID); it had printed:"
sed 's/^/    | /' "$T/move.out"
"$SITEREP" -c "$EAST_CONF" plan status move --json >"$T/move1.json"
m() { jq_py "$1" <"$T/move1.json"; }
[[ $(m "d['state']") == running ]] || fail "move after the CLI died: $(cat "$T/move1.json")"
[[ $(m "$CURSOR") == '[0, "pre", 0]' ]] ||
  fail "move: the cursor: $(m "d['cursor']")"
[[ $(m "d['groups'][0]['state']") == running && $(m "d['groups'][0]['pre'][0]['state']") == running ]] ||
  fail "move: group first: $(m "d['groups'][0]")"
m "[e['text'] for e in d['events']]" | grep -q "planned run started at east" ||
  fail "move: the events do not show the start: $(m "d['events']")"
m "[e['text'] for e in d['events']]" | grep -q "group first: started" ||
  fail "move: the events do not show group first: $(m "d['events']")"
wait_run_ends "$EAST_CONF" move 60
[[ $RUN_STATE == "done" ]] || fail "move ended $RUN_STATE: $(show_run "$EAST_CONF" move)"
expect_run "$EAST_CONF" move "[d['groups'][0]['pre'][0]['state'], d['groups'][0]['post'][0]['state']]" \
  '["done", "done"]' "move's actions"
expect_run "$EAST_CONF" move "d['groups'][0]['vms'][0]['state']" "done" "move's vm1"
[[ $(cat "$T/move.log") == $'pre\npost' ]] || fail "move's actions ran otherwise: $(cat "$T/move.log")"
expect_roles vm1 replica primary
expect_writable "$WEST_MNT/vm1/os"
fail_back back1 vm1

# --- 3. the secondary site lost --------------------------------------------------------------

step "west's siterepd is stopped: the planned run fails, vm1 stays writable at east"
stop_daemon "$WEST_PID"
for ((i = 0; i < 150; i++)); do
  [[ $(vm_field "$EAST_CONF" vm1 "v['link']['state']") != connected ]] && break
  sleep 0.2
done
[[ $(vm_field "$EAST_CONF" vm1 "v['link']['state']") != connected ]] ||
  fail "east still shows vm1's link connected 30 s after west stopped"
log "east's link of vm1: $(vm_field "$EAST_CONF" vm1 "v['link']")"
t0=$(date +%s%N)
run_plan 1 "$T/lost1.out" "$EAST_CONF" plan run "$T/lost.toml" --planned --yes
log "the run failed after $((($(date +%s%N) - t0) / 1000000)) ms"
"$SITEREP" -c "$EAST_CONF" plan status lost --json >"$T/lost1.json"
l() { jq_py "$1" <"$T/lost1.json"; }
[[ $(l "d['state']") == failed ]] || fail "lost: $(cat "$T/lost1.json")"
msg=$(l "d['message']")
[[ $msg == *"VM vm1"* && $msg == *west* && $msg == *"not connected"* ]] ||
  fail "lost: the message does not name vm1 and why: $msg"
log "lost: $msg"
[[ $(l "d['groups'][0]['vms'][0]['state']") == failed ]] || fail "lost: vm1: $(l "d['groups'][0]['vms']")"
[[ $(vm_field "$EAST_CONF" vm1 "v['role']") == primary ]] || fail "vm1 is not primary at east"
access=$(vm_field "$EAST_CONF" vm1 "v.get('access', 'read-write')")
[[ $access == read-write ]] || fail "vm1 at east after the failed handover: access $access, state $(vm_field "$EAST_CONF" vm1 "v['state']")"
expect_writable "$EAST_MNT/vm1/os"

step "west is back: plan continue finishes the run"
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
wait_link "$EAST_CONF" vm1 60
run_plan 0 "$T/lost2.out" "$EAST_CONF" plan continue lost
expect_run "$EAST_CONF" lost "d['state']" "done" "lost after continue"
expect_run "$EAST_CONF" lost "d['groups'][0]['vms'][0]['state']" "done" "lost's vm1 after continue"
expect_roles vm1 replica primary
expect_writable "$WEST_MNT/vm1/os"
fail_back back1 vm1

# --- 4. the daemon restarted mid-run -------------------------------------------------------

step "a run paused at a manual step survives a restart of east's siterepd"
run_plan 3 "$T/stepwise1.out" "$EAST_CONF" plan run "$T/stepwise.toml" --planned
paused_at='[0, "manual", 0]'
expect_run "$EAST_CONF" stepwise "d['state']" paused "stepwise"
expect_run "$EAST_CONF" stepwise "$CURSOR" "$paused_at" "stepwise"
expect_run "$EAST_CONF" stepwise "d['groups'][0]['manual'][0]['state']" waiting "stepwise"
expect_roles vm1 replica primary
expect_roles vm2 primary replica
stop_clean "$EAST_PID" "$EAST_CONF"
[[ $(jq_py "d['state']" <"$EAST_STATE/plans/stepwise/run.json") == paused ]] ||
  fail "run.json of stepwise after the stop: $(cat "$EAST_STATE/plans/stepwise/run.json")"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
expect_run "$EAST_CONF" stepwise "d['state']" paused "stepwise after the restart"
expect_run "$EAST_CONF" stepwise "$CURSOR" "$paused_at" "stepwise after the restart"
expect_run "$EAST_CONF" stepwise "d['groups'][0]['manual'][0]['state']" waiting "stepwise after the restart"
wait_link "$EAST_CONF" vm2 60
run_plan 0 "$T/stepwise2.out" "$EAST_CONF" plan continue stepwise
expect_run "$EAST_CONF" stepwise "d['state']" "done" "stepwise after continue"
expect_run "$EAST_CONF" stepwise "d['groups'][0]['manual'][0]['state']" confirmed "stepwise after continue"
expect_run "$EAST_CONF" stepwise "[g['state'] for g in d['groups']]" '["done", "done"]' "stepwise after continue"
expect_roles vm1 replica primary
expect_roles vm2 replica primary
fail_back back2 vm1 vm2

step "east's siterepd stops during a 3 s pre action: interrupted, then continued"
run_plan 0 "$T/slowpre1.out" "$EAST_CONF" plan run "$T/slowpre.toml" --planned --yes --detach
for ((i = 0; i < 50; i++)); do
  [[ $(plan_doc "$EAST_CONF" slowpre "d['groups'][0]['pre'][0]['state']") == running ]] && break
  sleep 0.1
done
expect_run "$EAST_CONF" slowpre "d['groups'][0]['pre'][0]['state']" running "slowpre before the stop"
sleep 0.5
t0=$(date +%s%N)
stop_clean "$EAST_PID" "$EAST_CONF"
log "east stopped in $((($(date +%s%N) - t0) / 1000000)) ms (the action had ~2.5 s to go)"
jq_py "d['state']" <"$EAST_STATE/plans/slowpre/run.json" >"$T/slowpre.state"
log "run.json of slowpre after the stop: state $(cat "$T/slowpre.state"), cursor $(jq_py "d['cursor']" <"$EAST_STATE/plans/slowpre/run.json")"
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
"$SITEREP" -c "$EAST_CONF" plan status slowpre --json >"$T/slowpre1.json"
s() { jq_py "$1" <"$T/slowpre1.json"; }
[[ $(s "d['state']") == interrupted ]] || fail "slowpre after the restart: $(cat "$T/slowpre1.json")"
[[ $(s "d['message']") == *"plan continue slowpre"* ]] || fail "slowpre's message: $(s "d['message']")"
[[ $(s "d['groups'][0]['pre'][0]['state']") == "done" ]] ||
  fail "the action under way at the stop did not finish: $(s "d['groups'][0]['pre']")"
[[ $(s "d['groups'][0]['vms'][0]['state']") == pending ]] || fail "slowpre's vm1: $(s "d['groups'][0]['vms']")"
log "slowpre after the restart: cursor $(s "d['cursor']"), message: $(s "d['message']")"
expect_roles vm1 primary replica
wait_link "$EAST_CONF" vm1 60
run_plan 0 "$T/slowpre2.out" "$EAST_CONF" plan continue slowpre
expect_run "$EAST_CONF" slowpre "d['state']" "done" "slowpre after continue"
[[ $(cat "$T/slowpre.log") == pre ]] || fail "slowpre's action ran $(wc -l <"$T/slowpre.log") times"
expect_roles vm1 replica primary
expect_roles vm2 primary replica

step "plan status lists every run"
"$SITEREP" -c "$EAST_CONF" plan status | sed 's/^/    | /'
[[ $(run_names "$EAST_CONF") == "hang lost move slowpre stepwise" ]] ||
  fail "east's runs: $(run_names "$EAST_CONF")"
[[ $(run_names "$WEST_CONF") == "back1 back2" ]] || fail "west's runs: $(run_names "$WEST_CONF")"

stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
log "ok"
