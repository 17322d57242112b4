# The power-loss helpers of siterep-powerfs (tests/powerfs/powerfs.cc), sourced after
# tests/lib.sh by tests that set BACK (the backing folder), PFMNT (the mountpoint) and CTL
# (the control socket) first:
#   mount_powerfs                  starts siterep-powerfs on $BACK at $PFMNT (sets PF_PID)
#   ctl COMMAND...                 one command on the control socket; prints the answer
#   field LINE NAME                the value of NAME=VALUE in an answer
#   power_cut MODE [SEED] -- PID...  the power-loss sequence: cut, kill -9 of the PIDs,
#                                  the FUSE connection aborted (the kernel's dirty pages
#                                  go too), lazy unmount; sets CUT_REPLY
POWERFS=$BIN/siterep-powerfs
[[ -x $POWERFS ]] || fail "$POWERFS is missing (build the siterep-powerfs target)"
mkdir -p "$BACK" "$PFMNT"
_FUSE_MNTS+=("$PFMNT")

# The FUSE control folder (fusectl), mounted privately when the host has not mounted it.
FUSECTL=/sys/fs/fuse/connections
if ! findmnt -rn -t fusectl --mountpoint "$FUSECTL" >/dev/null 2>&1; then
  FUSECTL=$T/fusectl
  mkdir -p "$FUSECTL"
  mount -t fusectl none "$FUSECTL" || skip "cannot mount fusectl"
  _MOUNTS+=("$FUSECTL")
fi

# mount_powerfs: starts siterep-powerfs on $BACK at $PFMNT, sets PF_PID.
_pf_count=0
mount_powerfs() {
  local i
  _pf_count=$((_pf_count + 1))
  PF_LOG=$T/powerfs.$_pf_count.log
  _LOGS+=("$PF_LOG")
  "$POWERFS" "$BACK" "$PFMNT" --control "$CTL" -f 2>"$PF_LOG" &
  PF_PID=$!
  _PIDS+=("$PF_PID")
  for ((i = 0; i < 100; i++)); do
    _alive "$PF_PID" || fail "siterep-powerfs exited at start: $(cat "$PF_LOG")"
    is_mounted "$PFMNT" && [[ -S $CTL ]] && return 0
    sleep 0.1
  done
  fail "siterep-powerfs did not mount $PFMNT in 10 s"
}

# ctl COMMAND...: one command on the control socket; prints the answer line.
ctl() {
  python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall((" ".join(sys.argv[2:]) + "\n").encode())
print(s.makefile().readline().strip())
' "$CTL" "$@"
}

# field LINE NAME: the value of NAME=VALUE in a control answer.
field() { sed -n "s/.* $2=\([0-9]*\).*/\1/p" <<<"$1"; }

# power_cut MODE [SEED] -- [PID...]: the power-loss sequence. Sets CUT_REPLY.
power_cut() {
  local args=() pid dev conn minor i rc=0
  while [[ $# -gt 0 && $1 != -- ]]; do args+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  # The connection's name is the FUSE super block's device number (major 0, so the minor).
  dev=$(stat -c %d "$PFMNT")
  conn=$(((dev & 0xff) | ((dev >> 12) & ~0xff)))
  minor=$(mountpoint -d "$PFMNT" | cut -d: -f2)
  [[ $conn == "$minor" ]] || fail "connection number $conn from st_dev $dev is not minor $minor"
  # 1. The power goes.
  CUT_REPLY=$(ctl cut "${args[@]}")
  log "cut ${args[*]}: $CUT_REPLY"
  [[ $CUT_REPLY == "ok cut "* ]] || fail "cut refused: $CUT_REPLY"
  # 2. The processes on the mount die with it.
  for pid in "$@"; do
    kill -KILL "$pid" 2>/dev/null || true  # it may have ended already
    wait "$pid" 2>/dev/null || true
    _forget_pid "$pid"
  done
  # 3. The kernel's own dirty pages for the mount go too.
  [[ -e $FUSECTL/$conn/abort ]] || fail "no $FUSECTL/$conn/abort for $PFMNT"
  echo 1 >"$FUSECTL/$conn/abort"
  # 4. The mount goes; siterep-powerfs sees the connection gone and exits.
  fusermount3 -u -z "$PFMNT"
  for ((i = 0; i < 100; i++)); do
    _alive "$PF_PID" || break
    sleep 0.1
  done
  _alive "$PF_PID" && fail "siterep-powerfs pid $PF_PID still runs after the abort"
  wait "$PF_PID" || rc=$?
  _forget_pid "$PF_PID"
  [[ $rc -eq 0 ]] || fail "siterep-powerfs exited with $rc after the abort: $(cat "$PF_LOG")"
  ! is_mounted "$PFMNT" || fail "$PFMNT is still mounted"
}

