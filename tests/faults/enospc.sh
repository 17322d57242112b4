#!/usr/bin/env bash
# Fault classes "full disk" (ENOSPC), on small ext4 file systems that this test makes on
# loop devices (a sparse file, mkfs.ext4 -m 0, attach_loop + mount_dev, so clean-up is
# registered):
#
#   enospc_primary_log      east's change logs are on a small file system: the log folder
#                           of a disk is <image>.srlog (USER_GUIDE "Change logs"; there is
#                           no config key for it), so $T/d0.img.srlog and $T/d1.img.srlog
#                           are symlinks into it, and so is the archive of --archive-logs
#                           ($T/archive): released segments are renamed into the archive,
#                           which needs one file system. Under write load it is filled:
#                             filler     a file (fallocate) takes all but 0-2 MiB, and the
#                                        load's log and archive growth take the rest;
#                             paused     a file leaves 2-8 MiB and shipping is held
#                                        (`siterep pause vm1`), so the unshipped log fills
#                                        it. (Not a proxy stalling the link: the test proxy
#                                        closes both ways on a half-close, which would turn
#                                        west's Error frames into resets in the other class.)
#                           Expected: the guest keeps writing and no disk loses track of
#                           which blocks changed: a cycle that cannot be cut for lack of
#                           space (its cut file) keeps its blocks in the map and the next
#                           cut retries (health warning naming the error); a save to the
#                           copy-on-write of an unshipped cycle that finds no space (the
#                           load overwrites its blocks; paused, that cycle waits) drops the
#                           disk's log for the dirty bitmap with the cycle's blocks and the
#                           map's (resync required, naming No space left on device), never
#                           every block. When the space returns (file removed, shipping
#                           resumed) the cycles catch the replica up, after a resync of
#                           those blocks when a disk fell back (automatic, or an operator's
#                           `siterep resync vm1` whenever the VM needs one).
#   enospc_secondary_state  west's state_dir is a small file system: room for the two
#                           replica images (fully allocated: the seed copies are random
#                           data), for the undo journal of a resync of both disks (a resync
#                           keeps the last point readable and needs that room: the primary
#                           class resyncs) and 24 MiB more; a file takes all but 0-3 MiB.
#                           Expected: west refuses what it cannot store (the reason in its
#                           log and in east's status), stays up and at a consistent point,
#                           east keeps its log and the guest keeps writing; when the file is
#                           removed (and, in some iterations, west restarted cleanly) the
#                           link resumes and the sites converge.
# In both classes, while the file system is to stay full, the file grows back whenever a
# daemon frees space (a dropped log, a pruned undo file: top_up).
#
# Checks of each iteration (pass/fail; the JSON record names them):
#   guest_io_ok        numbered writes kept being acknowledged by fsync while the disk was
#                      full (at least one; none failed), a 64 KiB marker per disk written
#                      while full was acknowledged, and fio ended its round with err=0
#   kept_log           (primary) no disk lost track of its changed blocks while full: none
#                      fell back to the bitmap, or one that did names No space left on
#                      device and marks fewer blocks than its VM's disks hold
#   health_shows       (primary, filler mode) east's health is not normal and its status
#                      names "No space left on device" (health_reason) while full;
#                      (secondary) east's status names it (link.last_error or health_reason)
#   refused_cleanly    (secondary) west's log names "No space left on device" within 30 s
#                      of the fill, west is still running at the end of the full period,
#                      and east stayed on its log (no fall back: its log folder had room)
#   consistent_while_full  (secondary) once west's applied and received cycles have stood
#                      still for 2 s while full, siterep-check finds the replica images
#                      consistent at exactly the applied cycle (nothing half-applied)
#   restart_ok         (secondary, some iterations) after the space returned, west stops
#                      with exit code 0 on SIGTERM, starts again, answers status within
#                      30 s at an applied cycle not older than before the stop, with no
#                      error in its log
#   recovered          (primary) every disk logs again and no resync is required within
#                      150 s of the space returning; (secondary) the link is connected and
#                      west has acknowledged a cycle newer than at the fill, within 90 s
#   acked              common.sh check_acked, after every load round of the iteration
#   sha256_at_resync   (primary) once the load stopped after the recovery and the replica
#                      caught up: primary and replica images hash the same
#   prefix, sha256     common.sh check_replica after the last load round
#
# The consistency check after a resync. siterep-check replays the archived log onto a
# pre-image, but a bitmap resync sends blocks, not log: the log of the cycles in which a
# disk tracked with its bitmap is dropped, and the archive has a gap there. So in the
# primary class the check is made in two steps: (1) after the recovery the load stops, the
# replica catches up and the images must hash the same as the primary's (sha256_at_resync);
# then the replica images become the pre-image and the archive is emptied (the rebase that
# check_replica does after a pass, here at the point the resync completed); (2) a second
# load round of 1.5-3 s runs on the logs the disks went back to, and then prefix (siterep-
# check over that round's archived log) and sha256 as in every class: the replica is a
# consistent point of the log shipped after the resync. The secondary class keeps its log
# throughout, so its prefix check covers the full period itself.
#
#   bash tests/faults/enospc.sh BIN_DIR OUT_DIR
# FAULTS_ENOSPC          iterations of each class (default 5; a slice: 1)
# FAULTS_SEED            the random choices (default: a new one, printed)
# FAULTS_ENOSPC_CLASSES  "primary secondary" (default), or one of them
# FAULTS_ENOSPC_RESYNC   mixed (default: half auto, half operator, from the seed), auto,
#                        operator
# FAULTS_ENOSPC_RATE     fio rate per disk (default 1m: the archive lives on the small
#                        file system too)
# FAULTS_ENOSPC_LOGFS_MIB  size of east's log file system (default 192)
# FAULTS_ENOSPC_BREAK    check names, to show that the checks can fail (not for figures):
#                        acked, prefix, sha256, sha256_at_resync get a flipped byte (in the
#                        expected marker data, in the replica's d1) around the check; the
#                        other checks get their expectation inverted
# Records go to OUT_DIR/enospc.jsonl.
CLASS_SCRIPT=enospc
OUT=$(realpath -m "$2")
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$FAULTS_DIR/../lib.sh"
source "$FAULTS_DIR/common.sh"

COUNT=${FAULTS_ENOSPC:-5}
SEED=${FAULTS_SEED:-$(new_seed)}
WHICH=${FAULTS_ENOSPC_CLASSES:-primary secondary}
RESYNC_MODE=${FAULTS_ENOSPC_RESYNC:-mixed}
RATE=${FAULTS_ENOSPC_RATE:-1m}
BREAK=${FAULTS_ENOSPC_BREAK:-}
[[ $COUNT =~ ^[0-9]+$ && $SEED =~ ^[0-9]+$ ]] || fail "FAULTS_ENOSPC and FAULTS_SEED must be whole numbers"
[[ $RESYNC_MODE =~ ^(mixed|auto|operator)$ ]] || fail "FAULTS_ENOSPC_RESYNC: mixed, auto or operator"
command -v mkfs.ext4 >/dev/null || skip "mkfs.ext4 is not installed"
command -v fallocate >/dev/null || skip "fallocate is not installed"
NOSPACE="No space left on device"

# ---------------------------------------------------------------------------------------
# Small file systems. LOGFS: east's log folders and the archive (192 MiB by default: the
# archive of a load round, and east's log while west refuses). STATEFS: west's state_dir,
# the two replica images, the undo journal of a resync of both, and 24 MiB more.
LOGFS=$T/logfs
STATEFS=$T/west/state
LOGFS_MIB=${FAULTS_ENOSPC_LOGFS_MIB:-192}
STATEFS_MIB=$((4 * DISK_MIB + 24))

# small_fs FILE DIR MIB: an ext4 of MIB MiB in FILE (sparse), mounted at DIR.
small_fs() {
  truncate -s "$3M" "$1"
  mkfs.ext4 -q -F -m 0 "$1"
  attach_loop "$1" >>"$LIBLOG"
  mount_dev "$LOOP" "$2"
}

# fs_free DIR: bytes available on DIR's file system.
fs_free() {
  stat -f -c '%a %S' "$1" | awk '{print $1 * $2}'
}

# fill DIR SLACK_KIB: a file DIR/filler takes all the free space but SLACK_KIB. Prints its
# size in bytes.
fill() {
  local free size
  free=$(fs_free "$1")
  size=$((free - $2 * 1024))
  ((size > 0)) || size=4096
  fallocate -l "$size" "$1/filler"
  echo "$size"
}

# top_up DIR SLACK_KIB: the daemons free space too (a dropped log, a pruned undo file):
# while the file system is to stay full, the filler grows back to leave SLACK_KIB. Prints
# the bytes added.
top_up() {
  local free add size
  free=$(fs_free "$1")
  add=$((free - $2 * 1024))
  if ((add > 256 * 1024)); then
    size=$(stat -c %s "$1/filler")
    fallocate -o "$size" -l "$add" "$1/filler" 2>/dev/null || add=0
  else
    add=0
  fi
  echo "$add"
}

small_fs "$T/logfs.img" "$LOGFS" "$LOGFS_MIB"
mkdir -p "$LOGFS/archive" "$LOGFS/d0.srlog" "$LOGFS/d1.srlog"
ln -s "$LOGFS/archive" "$T/archive"
ln -s "$LOGFS/d0.srlog" "$T/d0.img.srlog"
ln -s "$LOGFS/d1.srlog" "$T/d1.img.srlog"
small_fs "$T/statefs.img" "$STATEFS" "$STATEFS_MIB"

setup_sites >>"$LIBLOG"
ilog "sites up: east pid $EAST_PID replicates vm1 (2 x $DISK_MIB MiB) to west pid $WEST_PID; east's logs and archive on a $LOGFS_MIB MiB ext4 ($(fs_free "$LOGFS") bytes free), west's state_dir on a $STATEFS_MIB MiB ext4 ($(fs_free "$STATEFS") bytes free); load $RATE/s per disk; $COUNT iterations of ($WHICH), resync $RESYNC_MODE, seed $SEED (FAULTS_SEED)"

python3 "$TOOL" record "$RECORDS" kind=class_info class=enospc_primary_log \
  injected="east's change-log folders and log archive on a $LOGFS_MIB MiB ext4 on a loop device, filled under write load: a file leaving 0-2 MiB (filler) or 2-8 MiB with shipping paused (siterep pause) so the unshipped log fills it (paused); full for 2-4 s after the fall back, then the file removed and shipping resumed; the resync automatic or started by the operator" \
  checked='["guest_io_ok: numbered writes acknowledged by fsync while full, a marker per disk acknowledged while full, fio err=0", "kept_log: no disk fell back to the dirty bitmap while full, or one that did (a copy-on-write save without space) names No space left on device and marks fewer blocks than the disks hold", "health_shows: (filler) health not normal and the status names No space left on device while full", "recovered: both disks log again, no resync required (after the resync of a disk that fell back), within 150 s of the space returning", "acked: every acknowledged write reads back at the primary (each load round)", "sha256_at_resync: after the recovery, load stopped and caught up, the images hash the same", "prefix + sha256: siterep-check of a load round after the resync (pre-image rebased at the resync)"]'
python3 "$TOOL" record "$RECORDS" kind=class_info class=enospc_secondary_state \
  injected="west's state_dir on a $STATEFS_MIB MiB ext4 on a loop device (the two replica images fully allocated, room for a resync's undo journal and 24 MiB more), filled under write load by a file leaving 0-3 MiB, for 2-5 s; then the file removed and, in some iterations, west restarted (SIGTERM, start)" \
  checked='["guest_io_ok: numbered writes acknowledged by fsync while full, a marker per disk acknowledged while full, fio err=0", "refused_cleanly: west logs No space left on device, keeps running; east stays on its log", "health_shows: east status names No space left on device", "consistent_while_full: siterep-check finds the quiet replica consistent at its applied cycle while full", "restart_ok: west stops with exit code 0 and starts cleanly, its applied cycle not older, no error logged (some iterations)", "recovered: link connected and a newer cycle acknowledged within 90 s", "acked + prefix (siterep-check) + sha256 after the load stopped"]'

# The iterations, from the seed:
#   primary N MODE LOAD_S SLACK_KIB HOLD_S RESYNC POST_S SLOT
#   secondary N LOAD_S SLACK_KIB HOLD_S RESTART SLOT
python3 - "$SEED" "$COUNT" "$RESYNC_MODE" "$WHICH" >"$T/plan" <<'PY'
import random, sys
seed, count, resync_mode, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].split()
rng = random.Random(seed)
for n in range(1, count + 1):
    mode = "paused" if rng.random() < 0.4 else "filler"
    slack = rng.randrange(2048, 8192) if mode == "paused" else rng.randrange(0, 2048)
    resync = resync_mode if resync_mode != "mixed" else rng.choice(["auto", "operator"])
    p = (f"primary {n} {mode} {rng.uniform(1, 3):.2f} {slack} {rng.uniform(2, 4):.2f} "
         f"{resync} {rng.uniform(1.5, 3):.2f} {rng.randrange(1 << 20)}")
    restart = "yes" if n == 1 or rng.random() < 0.4 else "no"
    s = (f"secondary {n} {rng.uniform(1, 3):.2f} {rng.randrange(0, 3072)} "
         f"{rng.uniform(2, 5):.2f} {restart} {rng.randrange(1 << 20)}")
    if "primary" in which:
        print(p)
    if "secondary" in which:
        print(s)
PY

# ---------------------------------------------------------------------------------------
now_ns() { date +%s%N; }
since() { python3 -c "import time; print(round((time.time_ns() - $1) / 1e9, 2))"; }
ns_of() { awk -v s="$1" 'BEGIN { printf "%d", s * 1e9 }'; }

# flip_byte FILE OFFSET: inverts one byte in place (FAULTS_ENOSPC_BREAK of a data check: the
# byte is flipped before the check and back after it).
flip_byte() {
  python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDWR); at = int(sys.argv[2])
b = os.pread(fd, 1, at); os.pwrite(fd, bytes([b[0] ^ 0xFF]), at); os.fsync(fd); os.close(fd)' "$1" "$2"
}
# breaking NAME...: FAULTS_ENOSPC_BREAK names one of them.
breaking() {
  local c
  for c in "$@"; do [[ " $BREAK " == *" $c "* ]] && return 0; done
  return 1
}
# checked_acked / checked_replica / checked_images: check_acked, check_replica, images_same,
# with the mutation of FAULTS_ENOSPC_BREAK around them (acked: the expected marker data;
# prefix, sha256, sha256_at_resync: a byte of the replica's d1).
REPLICA_BYTE=5000000
checked_acked() {
  breaking acked && flip_byte "$T/markers-d0.exp" 100
  check_acked
  breaking acked && flip_byte "$T/markers-d0.exp" 100
  return 0
}
checked_replica() {
  breaking prefix sha256 && flip_byte "$WEST_STATE/replicas/vm1/d1.img" "$REPLICA_BYTE"
  check_replica
  breaking prefix sha256 && flip_byte "$WEST_STATE/replicas/vm1/d1.img" "$REPLICA_BYTE"
  return 0
}
checked_images() {
  local rc=0
  breaking sha256_at_resync && flip_byte "$WEST_STATE/replicas/vm1/d1.img" "$REPLICA_BYTE"
  images_same || rc=1
  breaking sha256_at_resync && flip_byte "$WEST_STATE/replicas/vm1/d1.img" "$REPLICA_BYTE"
  return $rc
}

# judge NAME OK: pass when OK is 1 (inverted for a check named in FAULTS_ENOSPC_BREAK).
judge() {
  local ok=$2
  breaking "$1" && ok=$((1 - ok))
  if ((ok)); then echo pass; else echo fail; fi
}

ack_count() { cat "$T/acks-d0" "$T/acks-d1" 2>/dev/null | wc -l; }

# fio_io_total: the bytes both fio jobs have written (their last status dump; SIGUSR1 asks
# for one).
fio_io_total() {
  python3 - "$T/fio-d0.out" "$T/fio-d1.out" <<'PY'
import re, sys
mult = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
total = 0
for p in sys.argv[1:]:
    found = re.findall(r"WRITE: bw=.*?io=\S+ \(([\d.]+)([kMG]?B)\)", open(p).read())
    if found:
        total += float(found[-1][0]) * mult[found[-1][1]]
print(int(total))
PY
}
fio_dump() {
  kill -USR1 "${LOAD_PIDS[0]}" "${LOAD_PIDS[1]}" 2>/dev/null || true
  sleep 0.3
  fio_io_total
}

# full_begin SLOT: the guest's figures as the full period starts, and a 64 KiB marker per
# disk written then (FULL_MARKER 1 when acknowledged). full_end: FULL_ACKS (numbered writes
# acknowledged) and FULL_IO (bytes fio wrote) since. full_lasts HOLD_S: true until HOLD_S
# seconds have passed since full_begin.
full_begin() {
  FULL_ACKS0=$(ack_count)
  FULL_IO0=$(fio_dump)
  FULL_NS=$(now_ns)
  FULL_MARKER=0
  write_markers "$1" && FULL_MARKER=1
  return 0
}
full_end() {
  FULL_ACKS=$(($(ack_count) - FULL_ACKS0))
  FULL_IO=$(($(fio_dump) - FULL_IO0))
}
full_lasts() { (($(now_ns) - FULL_NS < $(ns_of "$1"))); }

# guest_errors: what the load of the round that just ended reported as errors ("" if none).
guest_errors() {
  local d out=""
  for d in d0 d1; do
    # The last report (fio reports err=N at each status dump and at its end), and any
    # error line (an I/O error is reported as it happens).
    if [[ $(grep -o 'err= *[0-9]*' "$T/fio-$d.out" | tail -n 1) != "err= 0" ]] ||
      grep -qiE 'io_u error|error=|Input/output error' "$T/fio-$d.out"; then
      out+="fio on $d: $(grep -iE 'err=|error' "$T/fio-$d.out" | tail -n 1 | head -c 200); "
    fi
    [[ -s $T/ackwrite-$d.err ]] && out+="numbered writer on $d: $(head -c 200 "$T/ackwrite-$d.err"); "
  done
  echo "$out"
}

# east_snap: "STATE HEALTH ACKED LINK T0 T1 REASON_NOSPACE LINK_NOSPACE DIRTY LINK_ERROR" of
# vm1 at east (T0/T1: tracking of d0/d1, with /R when a resync is required; LINK_ERROR:
# link.last_error with _ for spaces, - when empty).
east_snap() {
  vm_field "$EAST_CONF" vm1 "' '.join([v['state'].replace(' ', '_'), v['health'], str(v.get('acked_cycle', 0)), v.get('link', {}).get('state', 'none')] + [x['tracking'] + ('/R' if x['resync_required'] else '') for x in v['disks']] + ['yes' if '$NOSPACE' in v['health_reason'] + ' '.join(x['resync_reason'] for x in v['disks']) else 'no', 'yes' if '$NOSPACE' in v.get('link', {}).get('last_error', '') + v['health_reason'] else 'no', str(sum(x.get('dirty_bytes', 0) for x in v['disks'])), (v.get('link', {}).get('last_error', '') or '-').replace(' ', '_')[:160]])" 2>/dev/null ||
    echo "unknown unknown 0 none ? ? no no 0 -"
}

# west_applied: "APPLIED RECEIVED" (cycles) of vm1 at west.
west_applied() {
  vm_field "$WEST_CONF" vm1 "f\"{v.get('applied_cycle', 0)} {v.get('received_cycle', 0)}\"" 2>/dev/null || echo "? ?"
}

# replica_consistent_now: siterep-check of the (quiet) replica against the pre-image and
# the archive; consistent at exactly west's applied cycle. Sets QUIET_MSG.
replica_consistent_now() {
  local rc=0 cycle applied
  "$BIN/siterep-check" --work-dir "$T/work" \
    "$T/pre/d0.img" "$T/archive/vm1/d0" "$WEST_STATE/replicas/vm1/d0.img" \
    "$T/pre/d1.img" "$T/archive/vm1/d1" "$WEST_STATE/replicas/vm1/d1.img" \
    >"$T/check-full.out" 2>&1 || rc=$?
  cycle=$(sed -n 's/^consistent: .* through cycle \([0-9]*\)$/\1/p' "$T/check-full.out")
  read -r applied _ <<<"$(west_applied)"
  QUIET_MSG="siterep-check: rc $rc, consistent through cycle ${cycle:-none}, west applied $applied"
  [[ $rc -eq 0 && -n $cycle && $cycle == "$applied" ]]
}

# images_same: sha256 of the primary's and the replica's images. Sets SAME_MSG.
images_same() {
  local d a b ok=1
  SAME_MSG=""
  for d in d0 d1; do
    a=$(sha256sum <"$T/$d.img" | cut -c1-64)
    b=$(sha256sum <"$WEST_STATE/replicas/vm1/$d.img" | cut -c1-64)
    [[ $a == "$b" ]] || { ok=0; SAME_MSG+="$d: primary ${a:0:16} != replica ${b:0:16}; "; }
  done
  ((ok))
}

# rebase_at_resync: the replica images (equal to the primary's, load stopped) become the
# pre-image; the archive (with its gap) goes.
rebase_at_resync() {
  local d
  for d in d0 d1; do
    cp --sparse=always "$WEST_STATE/replicas/vm1/$d.img" "$T/pre/$d.img.new"
    mv "$T/pre/$d.img.new" "$T/pre/$d.img"
  done
  (cd "$T/archive/vm1" && find d0 d1 -name '*.seg' -delete)
}

# restart_west: SIGTERM (exit code 0 wanted), start, status within 30 s. Sets RESTART_MSG;
# returns 1 when west is not up again (the caller stops the script: nothing can go on).
restart_west() {
  local before after i errs
  read -r before _ <<<"$(west_applied)"
  stop_daemon "$WEST_PID" >>"$LIBLOG"
  RESTART_MSG="stopped with exit code $STOP_RC"
  start_daemon "$WEST_CONF" >>"$LIBLOG"
  WEST_PID=$DAEMON_PID WEST_LOG=$DAEMON_LOG
  for ((i = 0; i < 300; i++)); do
    _alive "$WEST_PID" || break
    "$SITEREP" -c "$WEST_CONF" status >/dev/null 2>&1 && break
    sleep 0.1
  done
  if ! _alive "$WEST_PID" || ((i >= 300)); then
    RESTART_MSG+="; did not start: $(tail -n 5 "$WEST_LOG" | tr '\n' ' ' | head -c 400)"
    RESTART_OK=0
    return 1
  fi
  read -r after _ <<<"$(west_applied)"
  errs=$(grep -E ' (error|critical) ' "$WEST_LOG" | head -n 3 | tr '\n' ' ' | head -c 400 || true)
  RESTART_MSG+="; ready in $((i / 10)).$((i % 10))s at applied cycle $after (before the stop: $before)${errs:+; errors: $errs}"
  RESTART_OK=0
  # The space is back: the applier may have applied more before the stop, never less.
  [[ $STOP_RC -eq 0 && $after =~ ^[0-9]+$ && $before =~ ^[0-9]+$ && $after -ge $before && -z $errs ]] &&
    RESTART_OK=1
  return 0
}

# ---------------------------------------------------------------------------------------
# One iteration of enospc_primary_log.
primary_iteration() {
  local n=$1 mode=$2 load_s=$3 slack=$4 hold_s=$5 resync=$6 post_s=$7 slot=$8
  local t0 fill_ns space_ns filler st health acked link t0d t1d rnos lnos dirty lerr
  local fell=0 fell_s="" shows=0 health_seen="" recovered=0 rec_s="" conv_s="" gerr sha_resync=skip acked_first note=""
  local dirty_at_return=0 resync_out="" fell_disks="" resyncs=0 last_resync_ns=0 elines east_errors
  local topped=0 fell_dirty=0 fell_nos=no
  t0=$(now_ns)
  reset_checks
  elines=$(wc -l <"$EAST_LOG")
  start_load || note+="no numbered write acknowledged within 10 s of the load's start; "
  sleep "$load_s"
  write_markers "$slot" || note+="a marker write failed before the fill; "
  [[ $mode == paused ]] && "$SITEREP" -c "$EAST_CONF" pause vm1 >>"$LIBLOG" 2>&1
  filler=$(fill "$LOGFS" "$slack")
  fill_ns=$(now_ns)
  # Filler: until a cut fails for lack of space and the status says so (60 s at most).
  while [[ $mode != paused ]] && (($(now_ns) - fill_ns < 60 * 1000000000)); do
    read -r st health acked link t0d t1d rnos lnos dirty lerr <<<"$(east_snap)"
    if [[ $t0d == bitmap* || $t1d == bitmap* ]] && ((!fell)); then
      fell=1 fell_disks="d0 $t0d, d1 $t1d" fell_dirty=$dirty fell_nos=$rnos
    fi
    if [[ $health != normal && $rnos == yes ]]; then
      fell_s=$(since "$fill_ns")
      break
    fi
    topped=$((topped + $(top_up "$LOGFS" "$slack")))
    sleep 0.2
  done
  # Full, under load, for hold_s: the guest goes on.
  full_begin $((slot + 1))
  while full_lasts "$hold_s"; do
    read -r st health acked link t0d t1d rnos lnos dirty lerr <<<"$(east_snap)"
    health_seen+="$health/$st "
    [[ $health != normal && $rnos == yes ]] && shows=1
    if [[ $t0d == bitmap* || $t1d == bitmap* ]] && ((!fell)); then
      fell=1 fell_disks="d0 $t0d, d1 $t1d" fell_dirty=$dirty fell_nos=$rnos
    fi
    topped=$((topped + $(top_up "$LOGFS" "$slack")))
    sleep 0.2
  done
  full_end
  dirty_at_return=$dirty
  # The space returns.
  rm -f "$LOGFS/filler"
  [[ $mode == paused ]] && "$SITEREP" -c "$EAST_CONF" resume vm1 >>"$LIBLOG" 2>&1
  space_ns=$(now_ns)
  while (($(now_ns) - space_ns < 150 * 1000000000)); do
    read -r st health acked link t0d t1d rnos lnos dirty lerr <<<"$(east_snap)"
    if [[ $st == replicating && $t0d == log && $t1d == log ]]; then
      recovered=1 rec_s=$(since "$space_ns")
      break
    fi
    # The operator: `siterep resync vm1` whenever the VM needs one and none runs (once a
    # second at most; one that runs already, started while the disk was full, is refused).
    if [[ $resync == operator && $st == resync_required ]] &&
      (($(now_ns) - last_resync_ns > 1000000000)); then
      last_resync_ns=$(now_ns)
      resyncs=$((resyncs + 1))
      if resync_out=$("$SITEREP" -c "$EAST_CONF" resync vm1 2>&1); then
        resync_out="accepted"
      fi
    fi
    sleep 0.2
  done
  # Step 1 of the consistency check: load stopped, caught up, the same images.
  wait_load TERM
  gerr=$(guest_errors)
  checked_acked
  acked_first=$CHECK_acked
  if converge 120; then
    conv_s=$(since "$space_ns")
    if checked_images; then
      sha_resync=pass
      rebase_at_resync
    else
      sha_resync=fail
      add_msg "after the resync: $SAME_MSG"
    fi
  else
    sha_resync=fail
    add_msg "after the resync: $CONV_MSG"
  fi
  # Step 2: a load round on the logs after the resync, then the usual checks.
  start_load || note+="no numbered write acknowledged within 10 s of the second load's start; "
  sleep "$post_s"
  write_markers $((slot + 2)) || note+="a marker write failed after the resync; "
  wait_load TERM
  gerr+=$(guest_errors)
  checked_acked
  [[ $acked_first == fail ]] && CHECK_acked=fail
  if converge 120; then
    checked_replica
  else
    CHECK_prefix=fail CHECK_sha256=fail
    add_msg "$CONV_MSG"
  fi
  [[ -n $gerr ]] && add_msg "guest errors: $gerr"

  # Errors east logged (the log folder full: a bitmap file or state.json not written).
  east_errors=$(tail -n +"$((elines + 1))" "$EAST_LOG" | grep ' error ' | sed 's/^[^ ]* error //' |
    cut -c1-120 | sort | uniq -c | sort -rn | head -n 3 | tr -s ' \n' ' ' || true)
  local c_guest c_kept c_shows c_rec result secs what summary artifacts=""
  c_guest=$(judge guest_io_ok "$([[ $FULL_ACKS -gt 0 && $FULL_MARKER == 1 && -z $gerr ]] && echo 1 || echo 0)")
  c_kept=$(judge kept_log "$( ((!fell || (fell_dirty < 2 * DISK_MIB * 1048576))) && [[ $fell == 0 || $fell_nos == yes ]] && echo 1 || echo 0)")
  if [[ $mode == paused ]]; then
    c_shows=skip  # paused: pacing cuts no cycle, so a cut does not fail for lack of space
  else
    c_shows=$(judge health_shows "$shows")
  fi
  c_rec=$(judge recovered "$recovered")
  local checks
  checks=$(python3 -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    guest_io_ok "$c_guest" kept_log "$c_kept" health_shows "$c_shows" recovered "$c_rec" \
    acked "$CHECK_acked" sha256_at_resync "$sha_resync" prefix "$CHECK_prefix" sha256 "$CHECK_sha256")
  if [[ $checks == *'"fail"'* ]]; then result=fail; else result=pass; fi
  [[ $result == fail ]] && artifacts=$(save_failure "primary-$n")
  secs=$(since "$t0")
  what="$mode fill of east's log file system (filler $filler bytes, ${slack} KiB left, $topped bytes added back as the daemon freed space) after ${load_s}s of load; full for ${hold_s}s after the first failed cut; resync $resync"
  summary="primary $n: $what; kept its log: $c_kept${fell_disks:+ ($fell_disks, $fell_dirty bytes dirty, names no space: $fell_nos)}${fell_s:+; a cut failed after ${fell_s}s}; guest while full: $FULL_ACKS numbered writes acked, fio wrote $FULL_IO bytes, marker $( ((FULL_MARKER)) && echo acked || echo FAILED); $c_guest; health shows it: $c_shows (${health_seen% }); dirty at return: $dirty_at_return bytes; recovered: $c_rec${rec_s:+ in ${rec_s}s after the space returned}; caught up ${conv_s:+${conv_s}s after it}; sha256 at resync: $sha_resync; acked ($ACKED_WRITES numbered in the last round): $CHECK_acked; prefix after the resync: $CHECK_prefix${CHECK_CYCLE:+ (cycle $CHECK_CYCLE)}; sha256: $CHECK_sha256"
  [[ -n $east_errors ]] && summary+="; east logged errors: $east_errors"
  [[ $resync == operator ]] && summary+="; siterep resync run $resyncs times${resync_out:+, the last: $(tr '\n' ' ' <<<"$resync_out" | head -c 200)}"
  [[ -n $note ]] && summary+="; note: ${note%; }"
  [[ -n $CHECK_MSG ]] && summary+="; why: $CHECK_MSG"
  ilog "$summary -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class=enospc_primary_log n="$n" mode="$mode" \
    seed_choice="{\"load_s\": $load_s, \"slack_kib\": $slack, \"hold_s\": $hold_s, \"resync\": \"$resync\", \"post_s\": $post_s}" \
    action="$what" checks="$checks" result="$result" seconds="$secs" \
    build_failed_seconds="${fell_s:-null}" acked_while_full="$FULL_ACKS" \
    fio_bytes_while_full="$FULL_IO" dirty_bytes_at_return="$dirty_at_return" \
    recovery_seconds="${rec_s:-null}" converge_seconds="${conv_s:-null}" operator_resyncs="$resyncs" \
    acked_writes="$ACKED_WRITES" cycle="${CHECK_CYCLE:-null}" rebased="$REBASED" \
    summary="$summary" why="$CHECK_MSG" artifacts="$artifacts"
  [[ $result == pass ]]
}

# ---------------------------------------------------------------------------------------
# One iteration of enospc_secondary_state.
secondary_iteration() {
  local n=$1 load_s=$2 slack=$3 hold_s=$4 restart=$5 slot=$6
  local t0 fill_ns space_ns filler st health acked link t0d t1d rnos lnos dirty lerr
  local acked_at_fill wlines refused=0 refused_s="" shows=0 kept_log=1 health_seen=""
  local alive=0 quiet=0 quiet_msg=""
  local last="" same=0 applied received i recovered=0 rec_s="" conv_s="" gerr note=""
  local c_restart=skip restart_msg="" link_errors="" west_refusals=0 apply_retries=0 topped=0
  t0=$(now_ns)
  reset_checks
  start_load || note+="no numbered write acknowledged within 10 s of the load's start; "
  sleep "$load_s"
  write_markers "$slot" || note+="a marker write failed before the fill; "
  read -r st health acked_at_fill link t0d t1d rnos lnos dirty lerr <<<"$(east_snap)"
  wlines=$(wc -l <"$WEST_LOG")
  filler=$(fill "$STATEFS" "$slack")
  fill_ns=$(now_ns)
  while (($(now_ns) - fill_ns < 30 * 1000000000)); do
    if tail -n +"$((wlines + 1))" "$WEST_LOG" | grep -q "$NOSPACE"; then
      refused=1 refused_s=$(since "$fill_ns")
      break
    fi
    topped=$((topped + $(top_up "$STATEFS" "$slack")))
    sleep 0.2
  done
  full_begin $((slot + 1))
  while full_lasts "$hold_s"; do
    read -r st health acked link t0d t1d rnos lnos dirty lerr <<<"$(east_snap)"
    health_seen+="$health "
    [[ $lerr != - && $link_errors != *"${lerr//_/ }"* ]] && link_errors+="${lerr//_/ } | "
    [[ $lnos == yes ]] && shows=1
    [[ $t0d == log && $t1d == log ]] || kept_log=0
    topped=$((topped + $(top_up "$STATEFS" "$slack")))
    sleep 0.2
  done
  full_end
  _alive "$WEST_PID" && alive=1
  # The replica at rest while full: its applied and received cycles still for 2 s, then
  # siterep-check.
  for ((i = 0; i < 75; i++)); do
    read -r applied received <<<"$(west_applied)"
    if [[ "$applied $received" == "$last" ]]; then
      same=$((same + 1))
      ((same >= 10)) && break
    else
      same=0 last="$applied $received"
    fi
    sleep 0.2
  done
  QUIET_MSG=""
  if ((same >= 10)) && replica_consistent_now; then quiet=1; fi
  quiet_msg=$QUIET_MSG
  ((same >= 10)) || quiet_msg="the replica did not stand still for 2 s while full (applied, received: $last)"
  # What west's log says of the full period: refusals to store, apply retries.
  west_refusals=$(tail -n +"$((wlines + 1))" "$WEST_LOG" | grep -c "ended: .*$NOSPACE" || true)
  apply_retries=$(tail -n +"$((wlines + 1))" "$WEST_LOG" | grep -c "apply failed, retrying" || true)
  # The space returns.
  rm -f "$STATEFS/filler"
  space_ns=$(now_ns)
  if [[ $restart == yes ]]; then
    restart_west || {
      save_failure "secondary-$n-restart" >/dev/null
      fail "west did not start again after the space returned: $RESTART_MSG"
    }
    c_restart=$(judge restart_ok "$RESTART_OK")
    restart_msg=$RESTART_MSG
  fi
  while (($(now_ns) - space_ns < 90 * 1000000000)); do
    read -r st health acked link t0d t1d rnos lnos dirty lerr <<<"$(east_snap)"
    if [[ $link == connected && $acked -gt $acked_at_fill ]]; then
      recovered=1 rec_s=$(since "$space_ns")
      break
    fi
    sleep 0.2
  done
  wait_load TERM
  gerr=$(guest_errors)
  checked_acked
  if converge 120; then
    conv_s=$(since "$space_ns")
    checked_replica
  else
    CHECK_prefix=fail CHECK_sha256=fail
    add_msg "$CONV_MSG"
  fi
  [[ -n $gerr ]] && add_msg "guest errors: $gerr"
  ((quiet)) || add_msg "while full: $quiet_msg"

  local c_guest c_ref c_shows c_quiet c_rec result secs what summary artifacts="" checks
  c_guest=$(judge guest_io_ok "$([[ $FULL_ACKS -gt 0 && $FULL_MARKER == 1 && -z $gerr ]] && echo 1 || echo 0)")
  c_ref=$(judge refused_cleanly "$([[ $refused == 1 && $alive == 1 && $kept_log == 1 ]] && echo 1 || echo 0)")
  c_shows=$(judge health_shows "$shows")
  c_quiet=$(judge consistent_while_full "$quiet")
  c_rec=$(judge recovered "$recovered")
  checks=$(python3 -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    guest_io_ok "$c_guest" refused_cleanly "$c_ref" health_shows "$c_shows" \
    consistent_while_full "$c_quiet" restart_ok "$c_restart" recovered "$c_rec" \
    acked "$CHECK_acked" prefix "$CHECK_prefix" sha256 "$CHECK_sha256")
  if [[ $checks == *'"fail"'* ]]; then result=fail; else result=pass; fi
  [[ $result == fail ]] && artifacts=$(save_failure "secondary-$n")
  secs=$(since "$t0")
  what="west's state_dir filled (filler $filler bytes, ${slack} KiB left, $topped bytes added back as west freed space) after ${load_s}s of load, full for ${hold_s}s$([[ $restart == yes ]] && echo "; west restarted after the space returned")"
  summary="secondary $n: $what; west refused: $c_ref${refused_s:+ (in its log ${refused_s}s after the fill)}, $west_refusals connections ended for it, $apply_retries apply retries, alive $alive, east kept its log $kept_log; east's status names it: $c_shows (health ${health_seen% }; link errors seen: $(head -c 400 <<<"${link_errors% | }")); guest while full: $FULL_ACKS numbered writes acked, fio wrote $FULL_IO bytes; $c_guest; consistent while full: $c_quiet ($quiet_msg)${restart_msg:+; restart: $c_restart ($restart_msg)}; recovered: $c_rec${rec_s:+ in ${rec_s}s after the space returned}; caught up ${conv_s:+${conv_s}s after it}; acked ($ACKED_WRITES numbered): $CHECK_acked; prefix: $CHECK_prefix${CHECK_CYCLE:+ (cycle $CHECK_CYCLE)}; sha256: $CHECK_sha256"
  [[ -n $note ]] && summary+="; note: ${note%; }"
  [[ -n $CHECK_MSG ]] && summary+="; why: $CHECK_MSG"
  ilog "$summary -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class=enospc_secondary_state n="$n" \
    seed_choice="{\"load_s\": $load_s, \"slack_kib\": $slack, \"hold_s\": $hold_s, \"restart\": \"$restart\"}" \
    action="$what" checks="$checks" result="$result" seconds="$secs" \
    refused_seconds="${refused_s:-null}" refused_connections="$west_refusals" \
    apply_retries="$apply_retries" acked_while_full="$FULL_ACKS" \
    fio_bytes_while_full="$FULL_IO" recovery_seconds="${rec_s:-null}" \
    converge_seconds="${conv_s:-null}" acked_writes="$ACKED_WRITES" cycle="${CHECK_CYCLE:-null}" \
    rebased="$REBASED" summary="$summary" why="$CHECK_MSG" artifacts="$artifacts"
  [[ $result == pass ]]
}

# ---------------------------------------------------------------------------------------
failed_in_row=0
total=$(wc -l <"$T/plan")
while read -r kind rest <&3; do
  # shellcheck disable=SC2086
  if "${kind}_iteration" $rest; then
    failed_in_row=0
  else
    failed_in_row=$((failed_in_row + 1))
  fi
  give_up_after "$failed_in_row" enospc "$kind iteration"
done 3<"$T/plan"

ilog "done: $total iterations"
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
