#!/usr/bin/env bash
# `siterep status` and `--json` (DESIGN.md section 4): every disk with its size, tracking
# mode, pending (unshipped) log bytes, last sequence number and last cut; the VM filter,
# --socket, and a refusal for an unknown VM. Sequence numbers keep growing across a restart.
source "$(dirname "$0")/lib.sh"

new_site east
add_vm "$CONF" web01 'frequency = "continuous"' 'cow_limit = "8MiB"'
add_disk "$CONF" os "$T/os.img" 64M
add_disk "$CONF" data "$T/data.img" 32M
add_vm "$CONF" bench 'frequency = "5m"' 'tracking = "off"'
add_disk "$CONF" scratch "$T/scratch.img" 16M
start_ready "$CONF"

step "JSON shape before any write"
status_json "$CONF" >"$T/s0.json"
python3 - "$T/s0.json" "$MNT" <<'PY' || fail "status --json is not as specified"
import json, sys
s = json.load(open(sys.argv[1]))
mnt = sys.argv[2]
assert s["site"] == "east", s["site"]
vms = {v["name"]: v for v in s["vms"]}
assert set(vms) == {"web01", "bench"}, list(vms)
want = {"web01": {"os": (64 << 20, "log"), "data": (32 << 20, "log")},
        "bench": {"scratch": (16 << 20, "off")}}
for name, vm in vms.items():
    for key in ("role", "state", "health", "health_reason", "epoch", "disks"):
        assert key in vm, f"{name}: no {key}"
    assert vm["role"] == "primary", vm["role"]
    assert vm["health"] in ("normal", "warning", "critical"), vm["health"]
    disks = {d["name"]: d for d in vm["disks"]}
    assert set(disks) == set(want[name]), (name, list(disks))
    for dname, d in disks.items():
        for key in ("size", "tracking", "pending_bytes", "last_seq", "last_cut", "resync_required", "path"):
            assert key in d, f"{name}/{dname}: no {key}"
        size, tracking = want[name][dname]
        assert d["size"] == size, (dname, d["size"])
        assert d["tracking"] == tracking, (dname, d["tracking"])
        assert d["path"] == f"{mnt}/{name}/{dname}", d["path"]
        assert isinstance(d["pending_bytes"], int) and isinstance(d["last_seq"], int)
        assert d["resync_required"] is False
        assert d["cow_limit"] == (8 << 20 if name == "web01" else 0), (dname, d["cow_limit"])
print("    shape ok:", ", ".join(f"{v['name']}({len(v['disks'])} disks)" for v in s["vms"]))
PY

step "after writes: pending bytes, sequence numbers and a cut"
dd if=/dev/urandom of="$MNT/web01/os" bs=64k count=16 oflag=direct conv=notrunc,fsync status=none
dd if=/dev/urandom of="$MNT/bench/scratch" bs=64k count=16 oflag=direct conv=notrunc,fsync status=none
sleep 2.5   # "continuous" cuts about once a second
status_json "$CONF" >"$T/s1.json"
python3 - "$T/s1.json" <<'PY' || fail "status after writes is wrong"
import json, sys
s = json.load(open(sys.argv[1]))
vms = {v["name"]: v for v in s["vms"]}
os_ = {d["name"]: d for d in vms["web01"]["disks"]}["os"]
data = {d["name"]: d for d in vms["web01"]["disks"]}["data"]
scratch = vms["bench"]["disks"][0]
# 16 adjacent writes of one cycle coalesce: one write record (or two, split by a cut), a cut.
assert os_["last_seq"] >= 2, f"os last_seq {os_['last_seq']} after 16 writes and a cut"
assert os_["pending_bytes"] >= 1 << 20, f"os pending {os_['pending_bytes']} after 1 MiB of writes"
assert os_["last_cut"], "no cut on os after 2.5 s of 'continuous'"
assert vms["web01"]["last_cycle"] >= 1, vms["web01"].get("last_cycle")
assert data["pending_bytes"] < 1 << 20, data["pending_bytes"]
assert scratch["pending_bytes"] == 0 and scratch["last_seq"] == 0, scratch
print(f"    os: last_seq {os_['last_seq']}, pending {os_['pending_bytes']}, last cut {os_['last_cut']}")
PY
seq1=$(disk_field "$CONF" web01 os last_seq)

step "human output"
"$SITEREP" -c "$CONF" status >"$T/human.out"
sed 's/^/    /' "$T/human.out"
for word in web01 bench os data scratch log off "$MNT/web01/os"; do
  grep -qw -- "$word" "$T/human.out" || fail "human status does not show '$word'"
done

step "one VM, --socket, unknown VM"
status_json "$CONF" bench | jq_py "[v['name'] for v in d['vms']]" | grep -qx '\["bench"\]' ||
  fail "status bench --json shows other VMs"
"$SITEREP" --socket "$SOCK" status --json | jq_py "d['site']" | grep -qx east || fail "--socket does not work"
expect_exit1 "status of an unknown VM" "$SITEREP" -c "$CONF" status nosuchvm
expect_output_has "nosuchvm"

step "sequence numbers continue after a restart"
stop_clean "$DAEMON_PID" "$CONF"
start_ready "$CONF"
seq_after=$(disk_field "$CONF" web01 os last_seq)
[[ $seq_after -ge $seq1 ]] || fail "last_seq went back from $seq1 to $seq_after across a restart"
pending_after=$(disk_field "$CONF" web01 os pending_bytes)
dd if=/dev/urandom of="$MNT/web01/os" bs=4k count=1 seek=1000 oflag=direct conv=notrunc status=none
pending2=$(disk_field "$CONF" web01 os pending_bytes)
[[ $pending2 -gt $pending_after ]] || fail "pending_bytes did not grow after a write ($pending_after -> $pending2)"
# Nothing ships here, so the cycle timer waits (pacing); an explicit cut builds a cycle.
"$SITEREP" -c "$CONF" cut web01 >/dev/null || fail "siterep cut web01 failed"
seq2=$(disk_field "$CONF" web01 os last_seq)
[[ $seq2 -gt $seq_after ]] || fail "last_seq did not grow after a write and a cut ($seq_after -> $seq2)"
stop_clean "$DAEMON_PID" "$CONF"
