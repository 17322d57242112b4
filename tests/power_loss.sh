#!/usr/bin/env bash
# Host power loss at the primary and at the replica, POWER_CUTS times (default 3 in `make
# test`; the fault campaign runs more), the sites taking turns (POWER_SITES, default "east
# west": east, west, east, ...). Each site's images, change-tracking folders and state_dir
# live on a siterep-powerfs of its own (tests/powerfs), which keeps every write not yet
# synced in memory and, at a cut, keeps a random half of the pending 4 KiB pages (mode
# random) or tears one page per file at a 512-byte boundary too (mode torn), as a disk
# losing its power would.
# Each round: a writer of 64 KiB blocks on each of east's disks (each recorded as
# acknowledged once its fsync returned, and as many writes never flushed), then the cut of
# one site: kill -9 of its daemon (and, at east, of the writers), the kernel's dirty pages
# dropped with the FUSE connection; a new siterep-powerfs on the same folder, and the site
# started again as after a reboot (another boot id). Checks per round:
#   repaired  (east) east names the unclean host stop for every disk (its log and status),
#             and the automatic resync of the marked blocks ends (the disks log again);
#   kept      (west) west came back holding every cycle it had acknowledged before the cut
#             (received_cycle >= east's acked_cycle read just before it): east has let
#             those go, so a lost one could never be sent again;
#   acked     every acknowledged block reads back at the primary;
#   equal     once caught up, `siterep verify vm1` finds both sites equal.
# POWER_LOSS_NO_REPAIR=1 restarts east with the same boot id (as after a kill -9, so no
# repair): a check of the checks, whose equal (or acked) check is expected to fail in some
# east round. POWER_CUT_MODES (default "random torn") and POWER_SEED choose the cuts.
TESTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$TESTS_DIR/lib.sh"

command -v openssl >/dev/null || skip "openssl is not installed"
[[ -e /dev/fuse ]] || skip "no /dev/fuse"

CUTS=${POWER_CUTS:-3}
SEED=${POWER_SEED:-$(new_seed)}
MODES=(${POWER_CUT_MODES:-random torn})
NO_REPAIR=${POWER_LOSS_NO_REPAIR:-0}
SITES=(${POWER_SITES:-east west})
# The check of the checks is about east's repair: its rounds all cut east unless told.
((NO_REPAIR)) && [[ -z ${POWER_SITES:-} ]] && SITES=(east)
log "seed $SEED (POWER_SEED=$SEED replays it), $CUTS cuts, modes ${MODES[*]}, sites ${SITES[*]}"

# One siterep-powerfs per site; powerfs/lib.sh works on the one that BACK, PFMNT, CTL and
# PF_PID name, and on SITE CMD... points them at SITE's for CMD.
declare -A PF_BACK=([east]=$T/backing [west]=$T/backing-west)
declare -A PF_MNT=([east]=$T/pfs [west]=$T/pfs-west)
declare -A PF_CTL=([east]=$T/powerfs.sock [west]=$T/powerfs-west.sock)
declare -A PF_PIDS=()
BACK=${PF_BACK[west]} PFMNT=${PF_MNT[west]}
source "$TESTS_DIR/powerfs/lib.sh" # registers the west mount
BACK=${PF_BACK[east]} PFMNT=${PF_MNT[east]} CTL=${PF_CTL[east]}
mkdir -p "$BACK" "$PFMNT"
_FUSE_MNTS+=("$PFMNT")
on() {
  local site=$1
  shift
  BACK=${PF_BACK[$site]} PFMNT=${PF_MNT[$site]} CTL=${PF_CTL[$site]} PF_PID=${PF_PIDS[$site]:-}
  "$@"
  PF_PIDS[$site]=$PF_PID
}

two_sites
EAST_DIR=${PF_MNT[east]}/east
sed -i "s#^state_dir = .*#state_dir = \"$EAST_DIR/state\"#" "$EAST_CONF"
WEST_MNT=$(sed -n 's/^mountpoint = "\(.*\)"$/\1/p' "$WEST_CONF")
WEST_STATE=${PF_MNT[west]}/west/state
sed -i "s#^state_dir = .*#state_dir = \"$WEST_STATE\"#" "$WEST_CONF"
add_vm "$EAST_CONF" vm1 'frequency = "continuous"'
mkdir -p "${PF_BACK[east]}/east/state" "${PF_BACK[west]}/west/state/replicas/vm1"
for d in d0 d1; do
  # Made on the backing folders themselves (durable), seeded at west too.
  truncate -s 64M "${PF_BACK[east]}/east/$d.img"
  fill_random "${PF_BACK[east]}/east/$d.img" 0 16
  cp --sparse=always "${PF_BACK[east]}/east/$d.img" "${PF_BACK[west]}/west/state/replicas/vm1/$d.img"
  add_disk "$EAST_CONF" "$d" "$EAST_DIR/$d.img"
done
on east mount_powerfs
on west mount_powerfs

BOOT=1
start_east() {
  SITEREP_BOOT_ID="power-loss-boot-$BOOT" start_ready "$EAST_CONF" >>"$LIBLOG"
  EAST_PID=$DAEMON_PID EAST_LOG=$DAEMON_LOG
}
LIBLOG=$T/lib.log
start_west() {
  start_ready "$WEST_CONF" >>"$LIBLOG"
  WEST_PID=$DAEMON_PID
}
start_west
start_east
timeout 120 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --seed --wait >>"$LIBLOG" 2>&1 ||
  fail "enable --seed --wait failed: $(tail -n 3 "$LIBLOG")"

# writer DISK ROUND SEED: writes 64 KiB blocks at distinct slots of the disk's first 48 MiB
# (this round's share of them, so no acknowledged block is written again in the round),
# alternately flushed (fsync; then "SLOT SHA256" goes to acked-DISK-ROUND) and not.
writer() {
  python3 - "$EAST_MNT/vm1/$1" "$T/acked-$1-$2" "$3" "$2" <<'EOF'
import hashlib, os, random, sys, time
path, acked, seed, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
slots = list(range(768))                     # 64 KiB slots of the first 48 MiB
random.Random(seed).shuffle(slots)
mine = slots[(rnd * 96) % 768:][:96]         # this round's slots
rng = random.Random(seed * 31 + rnd)
fd = os.open(path, os.O_RDWR)
with open(acked, "w") as out:
    for i, slot in enumerate(mine):
        data = rng.randbytes(65536)
        os.pwrite(fd, data, slot * 65536)
        if i % 2 == 0:
            os.fsync(fd)
            out.write(f"{slot} {hashlib.sha256(data).hexdigest()}\n")
            out.flush()
        time.sleep(0.01)
EOF
}

# bulk DISK: 1 MiB writes of random data at random places of the disk's last 16 MiB,
# never flushed, until killed.
bulk() {
  python3 - "$EAST_MNT/vm1/$1" <<'EOF' 2>/dev/null
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
while True:
    os.pwrite(fd, os.urandom(1 << 20), (48 + random.randrange(16)) << 20)
EOF
}

check_acked() {
  local d r bad=0 n=0
  for d in d0 d1; do
    [[ -s $T/acked-$d-$1 ]] || continue
    r=$(python3 - "$EAST_MNT/vm1/$d" "$T/acked-$d-$1" <<'EOF'
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
bad = total = 0
for line in open(sys.argv[2]):
    slot, sha = line.split()
    total += 1
    if hashlib.sha256(os.pread(fd, 65536, int(slot) * 65536)).hexdigest() != sha:
        bad += 1
print(total, bad)
EOF
)
    n=$((n + ${r% *}))
    bad=$((bad + ${r#* }))
  done
  ACKED_N=$n
  ((bad == 0))
}

# repair_ends: the automatic resync after east's restart ends (the disks log again).
repair_ends() {
  local i st
  for ((i = 0; i < 600; i++)); do
    st=$(vm_field "$EAST_CONF" vm1 "f\"{v['state'].replace(' ', '_')} {int(any(x['resync_required'] for x in v['disks']))}\"" 2>/dev/null || echo "? 1")
    [[ $st == "replicating 0" ]] && return 0
    sleep 0.2
  done
  return 1
}

FAILED=0
for ((round = 1; round <= CUTS; round++)); do
  mode=${MODES[$(((round - 1) % ${#MODES[@]}))]}
  site=${SITES[$(((round - 1) % ${#SITES[@]}))]}
  cut_seed=$(((SEED + round) % 100000))
  step "round $round: load, then a power cut at $site ($mode, seed $cut_seed)"
  writer d0 "$round" "$SEED" 2>>"$T/writers.log" &
  W0=$!
  writer d1 "$round" "$((SEED + 1))" 2>>"$T/writers.log" &
  W1=$!
  _PIDS+=("$W0" "$W1")
  BULK=()
  if [[ $site == west ]]; then
    # West must be busy when its power goes: unflushed bulk writes to the last 16 MiB of
    # each disk (the writers stay below 48 MiB) make cycles of megabytes that west is
    # receiving, syncing and applying at the cut.
    for d in d0 d1; do
      bulk "$d" &
      BULK+=($!)
      _PIDS+=("$!")
    done
  fi
  sleep "0.$((RANDOM % 8 + 2))"
  named=- repaired=skip kept=skip
  if [[ $site == east ]]; then
    on east power_cut "$mode" "$cut_seed" -- "$EAST_PID" "$W0" "$W1"
    # east's own FUSE mount died with it.
    is_mounted "$EAST_MNT" && fusermount3 -u -z "$EAST_MNT"
    on east mount_powerfs
    ((NO_REPAIR)) || BOOT=$((BOOT + 1))
    start_east
    # repaired: named, then the automatic resync ends.
    named=$(grep -c "unclean host stop" "$EAST_LOG" || true)
    repaired=fail
    if ((NO_REPAIR)); then
      repaired=skip
    elif ((named >= 2)) && repair_ends; then
      repaired=pass
    fi
  else
    acked_before=$(vm_field "$EAST_CONF" vm1 "v.get('acked_cycle', 0)")
    on west power_cut "$mode" "$cut_seed" -- "$WEST_PID"
    is_mounted "$WEST_MNT" && fusermount3 -u -z "$WEST_MNT"
    for pid in "${BULK[@]}"; do
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      _forget_pid "$pid"
    done
    for pid in "$W0" "$W1"; do wait "$pid" 2>/dev/null || true; done
    on west mount_powerfs
    start_west
    received=$(vm_field "$WEST_CONF" vm1 "v.get('received_cycle', 0)")
    kept=fail
    [[ -n $received && -n $acked_before && $received -ge $acked_before ]] && kept=pass
    kept+=" (received $received, acked before the cut $acked_before)"
  fi
  if check_acked "$round"; then acked=pass; else acked=fail; fi
  # equal: caught up, then the sites compared block by block.
  equal=fail
  if wait_caught_up "$EAST_CONF" vm1 120 >>"$LIBLOG" 2>&1 &&
    "$SITEREP" -c "$EAST_CONF" verify vm1 >"$T/verify-$round.out" 2>&1; then
    equal=pass
  fi
  why=""
  [[ $equal == fail ]] && why=" ($(tail -n 1 "$T/verify-$round.out" 2>/dev/null))"
  log "round $round ($site, $mode): $CUT_REPLY; unclean stop named for $named disk(s); repaired: $repaired; kept: $kept; acked ($ACKED_N blocks): $acked; equal: $equal$why"
  [[ $repaired == fail || $kept == fail* || $acked == fail || $equal == fail ]] && FAILED=$((FAILED + 1))
  if [[ $equal == fail && $NO_REPAIR == 1 ]]; then
    # Without the repair the sites can differ for good: start from equal sites again.
    "$SITEREP" -c "$EAST_CONF" resync vm1 --full --wait >>"$LIBLOG" 2>&1 || true
  fi
done
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
if ((NO_REPAIR)); then
  log "without the repair: $FAILED of $CUTS round(s) failed a check (expected: some)"
  exit 0
fi
((FAILED == 0)) || fail "$FAILED of $CUTS round(s) failed a check"
