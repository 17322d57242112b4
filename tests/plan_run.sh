#!/usr/bin/env bash
# Running recovery plans: four VMs in three groups, hooks at both sites, a consistency group:
#  - east runs db1 (two disks), app1, web1, web2, replicated to west; db1 and app1 are in
#    consistency group "core"; each site runs plan actions for the other
#    (allow_plan_actions); plan east-outage: databases [db1] (pre and post at west, a
#    manual step), apps [app1] (pre at east that fails until $T/go exists, post at east),
#    web [web1 web2] (post at west); every action appends a line with its environment
#    to one order file;
#  - a test run at west (--yes): a test copy of every VM at <west mnt>/<vm>-test/<disk>,
#    equal to east's disks, while the replicas stay replicas and replication goes on;
#    the actions ran in order at the right sites; `plan cleanup` removes the copies;
#  - a planned run at east: apps' pre action fails ("not yet", exit 7): the run is failed,
#    says why, db1 already runs at west and nothing else moved; after touching $T/go,
#    `plan continue` finishes: every VM primary at west (its disks equal to east's before
#    the run), east its replica, reverse replication catching up; no action ran twice;
#  - the reversed plan (west -> east) run --planned at west pauses at its manual step
#    (exit 3), `plan continue` brings every VM home;
#  - east writes to every VM, and numbered markers to db1 then app1 in turn, and its
#    siterepd is killed under that load; `plan run --unplanned` at west (the plan's second
#    run there, after the test run) fails every VM over, db1 and app1 to one common
#    instant of group core (the run document's consistency.core; their markers agree),
#    east's actions skipped, each VM with its RTO and data loss window.
source "$(dirname "$0")/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"

two_sites
WEST_MNT=$T/west/mnt
allow_plan_actions_both

VMS=(db1 app1 web1 web2)
DISKS=(db1/os db1/data app1/os web1/os web2/os)   # VM/DISK
add_vm "$EAST_CONF" db1 'frequency = "continuous"' 'consistency_group = "core"'
add_disk "$EAST_CONF" os "$T/db1-os.img" 32M
add_disk "$EAST_CONF" data "$T/db1-data.img" 64M
add_vm "$EAST_CONF" app1 'frequency = "continuous"' 'consistency_group = "core"'
add_disk "$EAST_CONF" os "$T/app1-os.img" 32M
for vm in web1 web2; do
  add_vm "$EAST_CONF" "$vm" 'frequency = "continuous"'
  add_disk "$EAST_CONF" os "$T/$vm-os.img" 32M
done

# --- helpers -----------------------------------------------------------------------------

ORDER=$T/order.log
GO=$T/go

sha() { sha256sum <"$1" | cut -d' ' -f1; }

# write_random FILE OFFSET_MIB COUNT_MIB: random data, synced (through the FUSE disk).
write_random() {
  dd if=/dev/urandom of="$1" bs=1M seek="$2" count="$3" conv=notrunc,fsync status=none
}

# expect_order LINE...: the order file holds exactly these lines; then it is emptied.
expect_order() {
  diff <(printf '%s\n' "$@") "$ORDER" >&2 ||
    fail "the plan actions ran otherwise than expected (diff above: < expected, > ran)"
  : >"$ORDER"
}

# A plan action's command: one line with its environment, appended to the order file.
ACTION='echo "$SITEREP_EVENT $SITEREP_GROUP [$SITEREP_VMS] $SITEREP_SITE $SITEREP_RUN_KIND $SITEREP_PLAN" >> @ORDER@'

# write_plan FILE: the plan from stdin with @ACTION@, @ORDER@, @GO@ filled in.
write_plan() {
  sed -e "s|@ACTION@|$ACTION|g" -e "s|@ORDER@|$ORDER|g" -e "s|@GO@|$GO|g" >"$1"
}

write_plan "$T/east-outage.toml" <<'EOT'
name = "east-outage"
from = "east"
to = "west"

[[groups]]
name = "databases"
vms = ["db1"]
  [[groups.pre]]
  site = "west"
  run = '@ACTION@'
  timeout = "30s"
  [[groups.post]]
  site = "west"
  run = '@ACTION@'
  timeout = "30s"
  [[groups.manual]]
  message = "Confirm that db1 accepts connections"

[[groups]]
name = "apps"
vms = ["app1"]
  [[groups.pre]]
  site = "east"
  run = 'test -e @GO@ || { echo not yet; exit 7; }; @ACTION@'
  timeout = "30s"
  [[groups.post]]
  site = "east"
  run = '@ACTION@'
  timeout = "30s"

[[groups]]
name = "web"
vms = ["web1", "web2"]
  [[groups.post]]
  site = "west"
  run = '@ACTION@'
  timeout = "30s"
EOT

write_plan "$T/failback.toml" <<'EOT'
name = "failback"
from = "west"
to = "east"

[[groups]]
name = "databases"
vms = ["db1"]
  [[groups.pre]]
  site = "east"
  run = '@ACTION@'
  timeout = "30s"
  [[groups.post]]
  site = "east"
  run = '@ACTION@'
  timeout = "30s"
  [[groups.manual]]
  message = "Confirm that db1 is back at east"

[[groups]]
name = "apps"
vms = ["app1"]
  [[groups.post]]
  site = "west"
  run = '@ACTION@'
  timeout = "30s"

[[groups]]
name = "web"
vms = ["web1", "web2"]
EOT

# --- set-up ------------------------------------------------------------------------------

start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID

step "enable replication of the four VMs; random data on every disk"
for vm in "${VMS[@]}"; do
  timeout 120 "$SITEREP" -c "$EAST_CONF" enable "$vm" --to west --wait >/dev/null ||
    fail "enable $vm --wait failed"
done
for vd in "${DISKS[@]}"; do
  write_random "$EAST_MNT/$vd" 2 4
  write_random "$EAST_MNT/$vd" 20 2
done
for vm in "${VMS[@]}"; do wait_caught_up "$EAST_CONF" "$vm" 60; done
declare -A SHA
for vd in "${DISKS[@]}"; do SHA[$vd]=$(sha "$EAST_MNT/$vd"); done
"$SITEREP" -c "$WEST_CONF" plan validate "$T/east-outage.toml" >/dev/null ||
  fail "the plan does not validate at west: $("$SITEREP" -c "$WEST_CONF" plan validate "$T/east-outage.toml" 2>&1)"

# --- test run ----------------------------------------------------------------------------

step "test run at west: a test copy of every VM, equal to east's disks"
expect_exit1 "a test run at east (the from site)" \
  "$SITEREP" -c "$EAST_CONF" plan run "$T/east-outage.toml" --test --yes
expect_output_has "runs at west"
touch "$GO"
run_plan 0 "$T/test.out" "$WEST_CONF" plan run "$T/east-outage.toml" --test --yes
"$SITEREP" -c "$WEST_CONF" plan status east-outage --json >"$T/test.json"
[[ $(jq_py "d['state']" <"$T/test.json") == done ]] || fail "test run: $(cat "$T/test.json")"
[[ $(jq_py "d['kind']" <"$T/test.json") == test ]] || fail "test run kind: $(cat "$T/test.json")"
for vd in "${DISKS[@]}"; do
  vm=${vd%/*} disk=${vd#*/}
  copy=$WEST_MNT/$vm-test/$disk
  [[ -f $copy ]] || fail "no test copy $copy: $(ls -R "$WEST_MNT" 2>&1 | head -20)"
  [[ $(sha "$copy") == "${SHA[$vd]}" ]] || fail "test copy $copy differs from east's $vd"
done
for vm in "${VMS[@]}"; do
  [[ $(jq_py "[v for g in d['groups'] for v in g['vms'] if v['vm'] == '$vm'][0]['path']" \
    <"$T/test.json") == "$WEST_MNT/$vm-test" ]] || fail "VM $vm: path in the run document: $(cat "$T/test.json")"
  [[ $(vm_field "$WEST_CONF" "$vm" "v['role']") == replica ]] ||
    fail "VM $vm is not a replica at west during the test run"
  [[ $(vm_field "$EAST_CONF" "$vm" "v['role']") == primary ]] ||
    fail "VM $vm is not primary at east during the test run"
done
[[ $(jq_py "d['groups'][0]['manual'][0]['state']" <"$T/test.json") == confirmed ]] ||
  fail "the manual step was not confirmed by --yes: $(cat "$T/test.json")"
expect_order \
  "plan_pre databases [db1] west test east-outage" \
  "plan_post databases [db1] west test east-outage" \
  "plan_pre apps [app1] east test east-outage" \
  "plan_post apps [app1] east test east-outage" \
  "plan_post web [web1 web2] west test east-outage"
# Replication goes on while the copies exist; the copies do not move.
write_random "$EAST_MNT/web1/os" 8 1
wait_caught_up "$EAST_CONF" web1 30
[[ $(sha "$WEST_MNT/web1-test/os") == "${SHA[web1/os]}" ]] || fail "web1's test copy changed"
SHA[web1/os]=$(sha "$EAST_MNT/web1/os")
same_sha256 "$EAST_MNT/web1/os" "$WEST_STATE/replicas/web1/os.img" "web1's replica during the test run"
expect_exit1 "a second run while the test copies exist" \
  "$SITEREP" -c "$WEST_CONF" plan run "$T/east-outage.toml" --test --yes
expect_output_has "plan cleanup"

step "plan cleanup removes the test copies"
run_plan 0 "$T/cleanup.out" "$WEST_CONF" plan cleanup east-outage
for vm in "${VMS[@]}"; do
  [[ ! -e $WEST_MNT/$vm-test ]] || fail "$WEST_MNT/$vm-test is still there after cleanup"
  [[ $(vm_field "$WEST_CONF" "$vm" "'test_failover' in v") == false ]] ||
    fail "VM $vm: status still shows a test failover"
done
[[ $(plan_doc "$WEST_CONF" east-outage "d['state']") == cleaned ]] ||
  fail "after cleanup: $(show_run "$WEST_CONF" east-outage)"
"$SITEREP" -c "$WEST_CONF" plan status | grep -q "plan east-outage: test run" ||
  fail "plan status does not list the run: $("$SITEREP" -c "$WEST_CONF" plan status 2>&1)"

# --- planned run, a failing action, continue -----------------------------------------------

step "planned run at east: apps' pre action fails"
rm -f "$GO"
expect_exit1 "a planned run at west (the to site)" \
  "$SITEREP" -c "$WEST_CONF" plan run "$T/east-outage.toml" --planned --yes
expect_output_has "runs at east"
run_plan 1 "$T/planned1.out" "$EAST_CONF" plan run "$T/east-outage.toml" --planned --yes
grep -q "not yet" "$T/planned1.out" || fail "the run's output does not say why it failed"
"$SITEREP" -c "$EAST_CONF" plan status east-outage --json >"$T/planned1.json"
d1() { jq_py "$1" <"$T/planned1.json"; }
[[ $(d1 "d['state']") == failed ]] || fail "state after the failing action: $(cat "$T/planned1.json")"
[[ $(d1 "d['message']") == *"not yet"* && $(d1 "d['message']") == *apps* ]] ||
  fail "the message does not name the step and its output: $(d1 "d['message']")"
[[ $(d1 "d['groups'][0]['state']") == done ]] || fail "group databases: $(d1 "d['groups'][0]")"
[[ $(d1 "d['groups'][1]['state']") == failed ]] || fail "group apps: $(d1 "d['groups'][1]")"
[[ $(d1 "d['groups'][1]['pre'][0]['state']") == failed ]] || fail "apps pre: $(d1 "d['groups'][1]['pre']")"
[[ $(d1 "d['groups'][1]['pre'][0]['exit_code']") == 7 ]] || fail "apps pre exit code: $(d1 "d['groups'][1]['pre']")"
[[ $(d1 "d['groups'][1]['pre'][0]['output']") == *"not yet"* ]] || fail "apps pre output: $(d1 "d['groups'][1]['pre']")"
[[ $(d1 "d['groups'][1]['vms'][0]['state']") == pending ]] || fail "app1 moved: $(d1 "d['groups'][1]")"
[[ $(vm_field "$WEST_CONF" db1 "v['role']") == primary ]] || fail "db1 does not run at west"
[[ $(vm_field "$EAST_CONF" db1 "v['role']") == replica ]] || fail "db1 is not east's replica"
for vd in db1/os db1/data; do
  [[ $(sha "$WEST_MNT/$vd") == "${SHA[$vd]}" ]] || fail "$vd at west differs from east's before the run"
done
for vm in app1 web1 web2; do
  [[ $(vm_field "$EAST_CONF" "$vm" "v['role']") == primary ]] || fail "$vm moved although its group did not run"
done
expect_exit1 "a new run while the failed one stands" \
  "$SITEREP" -c "$EAST_CONF" plan run "$T/east-outage.toml" --planned --yes
expect_output_has "plan continue"

step "the action can pass now: plan continue finishes the run"
touch "$GO"
run_plan 0 "$T/planned2.out" "$EAST_CONF" plan continue east-outage
"$SITEREP" -c "$EAST_CONF" plan status east-outage --json >"$T/planned2.json"
[[ $(jq_py "d['state']" <"$T/planned2.json") == done ]] || fail "after continue: $(cat "$T/planned2.json")"
[[ $(jq_py "[g['state'] for g in d['groups']]" <"$T/planned2.json") == '["done", "done", "done"]' ]] ||
  fail "groups after continue: $(cat "$T/planned2.json")"
[[ $(jq_py "d['groups'][1]['pre'][0]['state']" <"$T/planned2.json") == done ]] ||
  fail "apps pre after continue: $(jq_py "d['groups'][1]['pre']" <"$T/planned2.json")"
for vm in "${VMS[@]}"; do
  [[ $(vm_field "$WEST_CONF" "$vm" "v['role']") == primary ]] || fail "$vm is not primary at west"
  [[ $(vm_field "$EAST_CONF" "$vm" "v['role']") == replica ]] || fail "$vm is not the replica at east"
  jq_py "[v for g in d['groups'] for v in g['vms'] if v['vm'] == '$vm'][0]" <"$T/planned2.json" |
    python3 -c 'import json,sys; v=json.load(sys.stdin); assert v["state"]=="done" and isinstance(v.get("rto_seconds"),(int,float)), v' ||
    fail "VM $vm's report in the planned run"
done
for vd in "${DISKS[@]}"; do
  [[ $(sha "$WEST_MNT/$vd") == "${SHA[$vd]}" ]] || fail "$vd at west differs from east's before the run"
done
expect_order \
  "plan_pre databases [db1] west planned east-outage" \
  "plan_post databases [db1] west planned east-outage" \
  "plan_pre apps [app1] east planned east-outage" \
  "plan_post apps [app1] east planned east-outage" \
  "plan_post web [web1 web2] west planned east-outage"

step "reverse replication west -> east catches up"
for vd in "${DISKS[@]}"; do write_random "$WEST_MNT/$vd" 12 2; done
for vm in "${VMS[@]}"; do
  wait_state "$WEST_CONF" "$vm" "reverse replicating" 60
  wait_caught_up "$WEST_CONF" "$vm" 60
done
for vd in "${DISKS[@]}"; do
  same_sha256 "$WEST_MNT/$vd" "$T/${vd%/*}-${vd#*/}.img" "east's copy of $vd after reverse replication"
done

# --- failback with the reversed plan -------------------------------------------------------

step "failback: the reversed plan at west pauses at its manual step, then brings every VM home"
for vd in "${DISKS[@]}"; do SHA[$vd]=$(sha "$WEST_MNT/$vd"); done
run_plan 3 "$T/failback1.out" "$WEST_CONF" plan run "$T/failback.toml" --planned
[[ $(plan_doc "$WEST_CONF" failback "d['state']") == paused ]] ||
  fail "failback did not pause: $(show_run "$WEST_CONF" failback)"
[[ $(plan_doc "$WEST_CONF" failback "d['groups'][0]['manual'][0]['state']") == waiting ]] ||
  fail "the manual step is not waiting: $(show_run "$WEST_CONF" failback)"
[[ $(vm_field "$EAST_CONF" db1 "v['role']") == primary ]] || fail "db1 is not back at east"
[[ $(vm_field "$WEST_CONF" app1 "v['role']") == primary ]] || fail "app1 left west before the manual step"
run_plan 0 "$T/failback2.out" "$WEST_CONF" plan continue failback
[[ $(plan_doc "$WEST_CONF" failback "d['state']") == done ]] ||
  fail "failback: $(show_run "$WEST_CONF" failback)"
[[ $(plan_doc "$WEST_CONF" failback "d['groups'][0]['manual'][0]['state']") == confirmed ]] ||
  fail "the manual step is not confirmed: $(show_run "$WEST_CONF" failback)"
for vm in "${VMS[@]}"; do
  [[ $(vm_field "$EAST_CONF" "$vm" "v['role']") == primary ]] || fail "$vm is not primary at east"
  [[ $(vm_field "$WEST_CONF" "$vm" "v['role']") == replica ]] || fail "$vm is not the replica at west"
done
for vd in "${DISKS[@]}"; do
  [[ $(sha "$EAST_MNT/$vd") == "${SHA[$vd]}" ]] || fail "$vd at east differs from west's before the failback"
done
expect_order \
  "plan_pre databases [db1] east planned failback" \
  "plan_post databases [db1] east planned failback" \
  "plan_post apps [app1] west planned failback"
for vm in "${VMS[@]}"; do
  wait_state "$EAST_CONF" "$vm" replicating 60
  wait_caught_up "$EAST_CONF" "$vm" 60
done

# --- unplanned run -------------------------------------------------------------------------

step "east writes to every VM, and ordered markers to db1 then app1; its siterepd is killed"
# The markers: counter k goes to a block of db1's data disk, then (once written and synced)
# to a block of app1's disk, k = 1, 2, ... At any instant app1 holds k and db1 k or k+1,
# so a failover of both to one common instant finds them so; cuts at different instants
# would not.
DB1_MARK=$EAST_MNT/db1/data DB1_MARK_AT=$((40 * 2048))   # 512-byte blocks
APP1_MARK=$EAST_MNT/app1/os APP1_MARK_AT=$((30 * 2048))
put_marker() { printf '%-511d\n' "$3" | dd of="$1" bs=512 seek="$2" count=1 iflag=fullblock conv=notrunc,fsync status=none 2>/dev/null; }
get_marker() { dd if="$1" bs=512 skip="$2" count=1 status=none | tr -d ' \n\0'; }
before=$(date +%s%N)
declare -A APPLIED WANT
for vm in "${VMS[@]}"; do APPLIED[$vm]=$(vm_field "$WEST_CONF" "$vm" "v.get('applied_cycle', 0)"); done
for vd in "${DISKS[@]}"; do write_random "$EAST_MNT/$vd" 24 3; done
(
  k=0
  while true; do
    k=$((k + 1))
    put_marker "$DB1_MARK" "$DB1_MARK_AT" "$k" || exit 0
    put_marker "$APP1_MARK" "$APP1_MARK_AT" "$k" || exit 0
    sleep 0.02
  done
) &
WRITER_PID=$!
_PIDS=("$WRITER_PID" "${_PIDS[@]}")   # on failure, stopped before the daemons it writes through
# West applies the cycle with the random data (web1, web2), and cycles cut well after the
# markers began (db1, app1).
for vm in "${VMS[@]}"; do
  WANT[$vm]=$((APPLIED[$vm] + 1))
  [[ $vm == db1 || $vm == app1 ]] && WANT[$vm]=$((APPLIED[$vm] + 4))
  for ((i = 0; i < 100; i++)); do
    (($(vm_field "$WEST_CONF" "$vm" "v.get('applied_cycle', 0)") >= WANT[$vm])) && break
    sleep 0.2
  done
  (($(vm_field "$WEST_CONF" "$vm" "v.get('applied_cycle', 0)") >= WANT[$vm])) ||
    fail "VM $vm: west did not apply cycle ${WANT[$vm]} in 20 s"
done
sleep 1
crash_daemon "$EAST_PID" "$EAST_CONF"
kill -KILL "$WRITER_PID" 2>/dev/null || true
wait "$WRITER_PID" 2>/dev/null || true
_forget_pid "$WRITER_PID"
for ((i = 0; i < 100; i++)); do
  [[ $(vm_field "$WEST_CONF" db1 "v['link']['state']") != connected ]] && break
  sleep 0.1
done
: >"$ORDER"

step "unplanned run at west: every VM fails over, core to one instant"
run_plan 0 "$T/unplanned.out" "$WEST_CONF" plan run "$T/east-outage.toml" --unplanned --yes --json
# The output is the run document (the CLI prints events only without --json).
python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$T/unplanned.out" ||
  fail "plan run --json did not print a JSON document"
"$SITEREP" -c "$WEST_CONF" plan status east-outage --json >"$T/unplanned.json"
ud() { jq_py "$1" <"$T/unplanned.json"; }
[[ $(ud "d['state']") == done && $(ud "d['kind']") == unplanned ]] ||
  fail "unplanned run: $(cat "$T/unplanned.json")"
for vm in "${VMS[@]}"; do
  [[ $(vm_field "$WEST_CONF" "$vm" "v['role']") == primary ]] || fail "$vm is not primary at west"
  [[ $(vm_field "$WEST_CONF" "$vm" "v['state']") == "failed over" ]] ||
    fail "$vm is $(vm_field "$WEST_CONF" "$vm" "v['state']") at west, not failed over"
  ud "[v for g in d['groups'] for v in g['vms'] if v['vm'] == '$vm'][0]" |
    python3 -c '
import json, sys
v = json.load(sys.stdin)
assert v["state"] == "done", v
assert isinstance(v.get("rto_seconds"), (int, float)) and v["rto_seconds"] >= 0, v
assert "data_loss_window_seconds" in v, v
dl = v["data_loss_window_seconds"]
assert dl is None or (isinstance(dl, (int, float)) and dl >= 0), v
assert isinstance(v.get("point"), dict) and "id" in v["point"] and "time" in v["point"], v
' || fail "VM $vm's report in the unplanned run"
done
instant=$(ud "d['consistency']['core']['instant']")
ctime=$(ud "d['consistency']['core']['time']")
[[ $instant =~ ^[0-9]+$ ]] || fail "no consistency.core.instant: $(ud "d['consistency']")"
[[ $(ud "sorted(d['consistency']['core']['members'])") == '["app1", "db1"]' ]] ||
  fail "consistency.core.members: $(ud "d['consistency']")"
((instant > before)) || fail "core's instant $ctime is older than east's last writes"
for vm in db1 app1; do
  t=$(ud "[v for g in d['groups'] for v in g['vms'] if v['vm'] == '$vm'][0]['point']['time']")
  [[ $t == "$ctime" ]] || fail "$vm failed over to $t, not to core's instant $ctime"
  n=$(ud "[v for g in d['groups'] for v in g['vms'] if v['vm'] == '$vm'][0]['point']['cut_unix_nanos']")
  [[ $n == "$instant" ]] || fail "$vm failed over to the cut of $n ns, not to core's instant $instant ns"
  t=$(vm_field "$WEST_CONF" "$vm" "v['failover_point']['time']")
  [[ $t == "$ctime" ]] || fail "status at west: $vm's failover point is at $t, not $ctime"
done
[[ $(ud "[d['groups'][1]['pre'][0]['state'], d['groups'][1]['post'][0]['state']]") == '["skipped", "skipped"]' ]] ||
  fail "east's actions were not skipped: $(ud "d['groups'][1]")"
expect_order \
  "plan_pre databases [db1] west unplanned east-outage" \
  "plan_post databases [db1] west unplanned east-outage" \
  "plan_post web [web1 web2] west unplanned east-outage"
for vd in "${DISKS[@]}"; do
  sha "$WEST_MNT/$vd" >/dev/null || fail "$vd is not readable at west"
done
m_db1=$(get_marker "$WEST_MNT/db1/data" "$DB1_MARK_AT")
m_app1=$(get_marker "$WEST_MNT/app1/os" "$APP1_MARK_AT")
log "markers at west after the failover: db1 ${m_db1:-none}, app1 ${m_app1:-none}"
[[ $m_db1 =~ ^[0-9]+$ && $m_db1 -ge 1 ]] || fail "db1's failover point holds no marker ('$m_db1')"
[[ $m_app1 =~ ^[0-9]*$ ]] || fail "app1's marker block reads '$m_app1'"
((${m_app1:-0} <= m_db1 && m_db1 <= ${m_app1:-0} + 1)) ||
  fail "db1 (marker $m_db1) and app1 (marker ${m_app1:-none}) are not at one instant"
for vm in "${VMS[@]}"; do
  log "VM $vm: $(ud "[(v['point'], v['rto_seconds'], v['data_loss_window_seconds']) for g in d['groups'] for v in g['vms'] if v['vm'] == '$vm'][0]") (point, RTO, data loss window)"
done

stop_clean "$WEST_PID" "$WEST_CONF"
log "ok"
