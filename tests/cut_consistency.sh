#!/usr/bin/env bash
# Cuts are consistent across the disks of a VM (write-order fidelity, DESIGN.md
# invariant 1), checked from the outside. A writer stamps a counter i into disk a, waits
# for it to complete, then into disk b, then i+1 into a, and so on (O_DIRECT, one write in
# flight). So at any instant, max(a) is max(b) or max(b)+1, and each disk holds exactly the
# prefix of its writes. Replaying both logs through the same cycle N (siterep-log replay
# --through-cycle N) must give such a state for every N, and the full replay the final
# images. fio writes elsewhere on both disks at the same time, so cuts land under load.
source "$(dirname "$0")/lib.sh"

SLOTS=4096    # 4 KiB slots in the first 16 MiB of each disk
new_site east
# A budget far above what the test writes: the whole log must stay for the replay.
add_vm "$CONF" vm1 'frequency = "continuous"'
add_disk "$CONF" a "$T/a.img" 32M
add_disk "$CONF" b "$T/b.img" 32M
start_ready "$CONF"

step "ordered writer on a then b, fio noise on both, extra cuts from the CLI"
for d in a b; do
  fio --name=noise-$d --filename="$MNT/vm1/$d" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bs=4k --iodepth=4 --offset=16M --size=16M --time_based --runtime=6 --output="$T/fio-$d.out" &
  _PIDS+=("$!")
done
python3 - "$MNT/vm1/a" "$MNT/vm1/b" "$SLOTS" 6 >"$T/writer.out" <<'PY' &
import mmap, os, struct, sys, time
a = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
b = os.open(sys.argv[2], os.O_RDWR | os.O_DIRECT)
slots, seconds = int(sys.argv[3]), float(sys.argv[4])
buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT needs
i, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    i += 1
    struct.pack_into("<QQ", buf, 0, i, 0x5172E9)
    off = (i % slots) * 4096
    assert os.pwrite(a, buf, off) == 4096
    assert os.pwrite(b, buf, off) == 4096
print(i)
PY
WRITER=$!
_PIDS+=("$WRITER")
cli_cuts=0
for _ in $(seq 1 20); do
  sleep 0.25
  "$SITEREP" -c "$CONF" cut vm1 >/dev/null 2>&1 && cli_cuts=$((cli_cuts + 1))
done
wait "$WRITER" || fail "the ordered writer failed"
_forget_pid "$WRITER"
log "ordered writer: $(cat "$T/writer.out") pairs; $cli_cuts cuts from the CLI"
for pid in "${_PIDS[@]}"; do
  [[ $pid == "$DAEMON_PID" ]] && continue
  wait "$pid" || fail "fio noise failed"
  _forget_pid "$pid"
done
last_cycle=$(status_json "$CONF" | jq_py "d['vms'][0]['last_cycle']")
stop_clean "$DAEMON_PID" "$CONF"
last_cycle=$((last_cycle + 1))   # the clean stop may cut once more
log "cycles: up to $last_cycle"
[[ $last_cycle -ge 4 ]] || fail "only $last_cycle cycles in 6 s of 'continuous'"

cat >"$T/check.py" <<'PY'
import struct, sys
a_path, b_path, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])

def counters(path):
    data = open(path, "rb").read(slots * 4096)
    return [struct.unpack_from("<Q", data, s * 4096)[0] for s in range(slots)]

def check_prefix(name, values, top):
    for s, v in enumerate(values):
        k = top - ((top - s) % slots)
        want = k if k >= 1 else 0
        if v != want:
            sys.exit(f"{name}: slot {s} holds {v}, want {want} (max {top}): not a prefix")

ca, cb = counters(a_path), counters(b_path)
ma, mb = max(ca), max(cb)
if ma not in (mb, mb + 1):
    sys.exit(f"a is at {ma} and b at {mb}: the two disks were cut at different instants")
check_prefix("a", ca, ma)
check_prefix("b", cb, mb)
print(f"a {ma} b {mb}")
PY

step "replay both logs through each cycle: a consistent prefix every time"
checked=0
for ((n = 1; n <= last_cycle; n++)); do
  for d in a b; do truncate -s 32M "$T/$d.r$n"; done
  ok=1
  for d in a b; do
    "$SITEREP_LOG" replay "$T/$d.img.srlog" "$T/$d.r$n" --through-cycle "$n" >"$T/replay.out" 2>&1 || ok=0
  done
  if [[ $ok -eq 0 ]]; then
    [[ $n -eq $last_cycle ]] && break   # the extra cycle we allowed for may not exist
    fail "replay through cycle $n failed: $(cat "$T/replay.out")"
  fi
  state=$(python3 "$T/check.py" "$T/a.r$n" "$T/b.r$n" "$SLOTS" 2>&1) || fail "cycle $n: $state"
  log "cycle $n: $state"
  rm -f "$T/a.r$n" "$T/b.r$n"
  checked=$((checked + 1))
done
[[ $checked -ge 3 ]] || fail "only $checked cycles could be checked"

step "the full replay gives the final images"
for d in a b; do
  truncate -s 32M "$T/$d.full"
  "$SITEREP_LOG" replay "$T/$d.img.srlog" "$T/$d.full"
  cmp "$T/$d.full" "$T/$d.img" || fail "$d: full replay differs from the image"
done
python3 "$T/check.py" "$T/a.img" "$T/b.img" "$SLOTS" >/dev/null || fail "the final images are not consistent"
