#!/usr/bin/env bash
# Fault class "netns cuts": the replica (west) siterepd runs in a network namespace of
# this test, reached over a veth pair; east (primary) stays in the host's namespace. The
# link is cut and healed many times under write load by an nftables table added to and
# deleted from west's namespace (the host's rules are never touched). Each cut, chosen
# from FAULTS_SEED:
#   drop      both directions dropped: a black hole, the open TCP connection hangs until
#             the shipper's and the receiver's timeouts (io_timeout 15 s) give up on it
#   reset     every TCP segment either way answered by a reset (reject with tcp reset):
#             the connection dies at once, new ones are refused
#   drop_in   only east -> west dropped (the data; west's heartbeats still get out)
#   drop_out  only west -> east dropped (the acknowledgements)
# up 0.5-3 s, down 0.3-8 s, or (FAULTS_NETNS_LONG of the cuts, default 0.15) 16-22 s,
# past the shipper's io_timeout. After each heal the link must recover: the shipper
# connected and the replica's acknowledged cycle past the one before the cut. Every
# FAULTS_CUT_CHECK_EVERY cuts and after the last, the load stops and the replica must
# converge: acknowledged writes read back, siterep-check passes, the images hash the same.
#
#   bash tests/faults/netns_cuts.sh BIN_DIR OUT_DIR
# FAULTS_NETNS_CUTS cuts (default 100), FAULTS_SEED (default: a new one, printed),
# FAULTS_NETNS_BANDWIDTH east's bandwidth_limit to west (default 10MiB), FAULTS_NETNS_RATE
# fio's rate per disk (default 2m).
# Records go to OUT_DIR/netns_cuts.jsonl (class netns_cut).
#
# The namespace (srnetns-PID), the veth pair (srnPIDh on the host, srnPIDn in the
# namespace) and a free 169.254.N.M/30 link-local pair are this test's own. West is
# started with `nsenter --net` only (not `ip netns exec`, which also makes a mount
# namespace), so its mounts and its control socket stay visible to the test.
CLASS_SCRIPT=netns_cuts
OUT=$(realpath -m "$2")
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$FAULTS_DIR/../lib.sh"
source "$FAULTS_DIR/common.sh"
command -v nft >/dev/null || skip "nft is not installed (apt-get install nftables)"
command -v nsenter >/dev/null || skip "nsenter is not installed"

CUTS=${FAULTS_NETNS_CUTS:-100}
CHECK_EVERY=${FAULTS_CUT_CHECK_EVERY:-25}
LONG_SHARE=${FAULTS_NETNS_LONG:-0.15}
SEED=${FAULTS_SEED:-$(new_seed)}
[[ $CUTS =~ ^[0-9]+$ && $CHECK_EVERY =~ ^[1-9][0-9]*$ && $SEED =~ ^[0-9]+$ ]] ||
  fail "FAULTS_NETNS_CUTS, FAULTS_CUT_CHECK_EVERY and FAULTS_SEED must be whole numbers"
# As link_cuts.sh, a bandwidth_limit keeps the link busy, so that cuts land mid-transfer;
# a little more of it than there: these cuts are longer (at 6 MiB/s the backlog of 25
# cuts took 113 s to drain at a checkpoint).
BANDWIDTH=${FAULTS_NETNS_BANDWIDTH:-10MiB}
RATE=${FAULTS_NETNS_RATE:-2m}

NS=srnetns-$$
VETH_HOST=srn$$h
VETH_NS=srn$$n
NFT_TABLE=srcut
NS_MADE=0

# in_ns CMD...: CMD in the namespace's network only.
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }

# pick_subnet: a 169.254.N.M/30 that no address or route of the host's covers. Sets
# ADDR_HOST (east's end) and ADDR_NS (west's end).
pick_subnet() {
  local used i n m
  used=$(ip -4 -o addr show; ip -4 route show table all)
  for ((i = 0; i < 64; i++)); do
    n=$(((100 + $$ + i * 7) % 200 + 20)) m=$(((($$ / 200 + i) % 60) * 4))
    grep -q "169\.254\.$n\." <<<"$used" && continue
    ADDR_HOST=169.254.$n.$((m + 1)) ADDR_NS=169.254.$n.$((m + 2))
    return 0
  done
  fail "no free 169.254.N.M/30 subnet"
}

make_netns() {
  pick_subnet
  ip netns add "$NS"
  NS_MADE=1
  ip link add "$VETH_HOST" type veth peer name "$VETH_NS" netns "$NS"
  ip addr add "$ADDR_HOST/30" dev "$VETH_HOST"
  ip link set "$VETH_HOST" up
  in_ns ip addr add "$ADDR_NS/30" dev "$VETH_NS"
  in_ns ip link set "$VETH_NS" up
  in_ns ip link set lo up
  local i
  for ((i = 0; i < 50; i++)); do
    ip -o link show "$VETH_HOST" | grep -q "state UP" &&
      in_ns ip -o link show "$VETH_NS" | grep -q "state UP" && return 0
    sleep 0.1
  done
  fail "the veth pair $VETH_HOST/$VETH_NS is not up"
}

# cut_link MODE: the table with MODE's rules (see the top) in west's namespace.
cut_link() {
  local in="" out=""
  case $1 in
    drop) in="iifname \"$VETH_NS\" drop" out="oifname \"$VETH_NS\" drop" ;;
    reset)
      in="iifname \"$VETH_NS\" meta l4proto tcp reject with tcp reset"
      # (not the resets themselves: a reset rejected is dropped, and east would never
      # hear of the one its segment drew)
      out="oifname \"$VETH_NS\" tcp flags & rst == 0 reject with tcp reset"
      ;;
    drop_in) in="iifname \"$VETH_NS\" drop" ;;
    drop_out) out="oifname \"$VETH_NS\" drop" ;;
    *) fail "no cut mode $1" ;;
  esac
  in_ns nft -f - <<EOF
table inet $NFT_TABLE {
  chain input {
    type filter hook input priority 0; policy accept;
    $in
  }
  chain output {
    type filter hook output priority 0; policy accept;
    $out
  }
}
EOF
  echo "nft: table inet $NFT_TABLE ($1) added in $NS" >>"$LIBLOG"
}

heal_link() {
  in_ns nft delete table inet "$NFT_TABLE"
  echo "nft: table inet $NFT_TABLE deleted in $NS" >>"$LIBLOG"
}

table_present() { in_ns nft list table inet "$NFT_TABLE" >/dev/null 2>&1; }

# On any exit: the table, then west (it lives in the namespace), the veth pair and the
# namespace; then the script_end record and lib.sh's clean-up (east, the load, mounts,
# the temp folder).
_netns_end() {
  local rc=$? i
  set +e
  if ((NS_MADE)); then
    table_present && in_ns nft delete table inet "$NFT_TABLE"
    if [[ -n ${WEST_PID:-} ]] && _alive "$WEST_PID"; then
      kill -TERM "$WEST_PID"
      for ((i = 0; i < 200; i++)); do
        _alive "$WEST_PID" || break
        sleep 0.1
      done
      _alive "$WEST_PID" && kill -KILL "$WEST_PID"
      wait "$WEST_PID" 2>/dev/null
      _forget_pid "$WEST_PID"
    fi
    ip link show "$VETH_HOST" >/dev/null 2>&1 && ip link del "$VETH_HOST"
    ip netns del "$NS"
  fi
  # common.sh's _faults_end, keeping the exit code for lib.sh's _cleanup.
  python3 "$TOOL" record "$RECORDS" kind=script_end script="$CLASS_SCRIPT" exit_code="$rc" \
    seconds="$((SECONDS - START_SECONDS))" detail="@$LIBLOG" 2>/dev/null
  (exit "$rc")
  _cleanup
}
trap _netns_end EXIT

# two_sites as lib.sh writes it, then the addresses moved to the veth pair: west listens
# on ADDR_NS in the namespace, east on ADDR_HOST; each names the other there. East's
# bandwidth_limit to west is set here (setup_sites adds it only to 127.0.0.1 peers).
eval "_lib_two_sites() $(declare -f two_sites | tail -n +2)"
two_sites() {
  _lib_two_sites "$@"
  sed -i -e "s/^listen = \"127\.0\.0\.1:/listen = \"$ADDR_NS:/" \
    -e "s/^address = \"127\.0\.0\.1:/address = \"$ADDR_HOST:/" "$WEST_CONF"
  sed -i -e "s/^listen = \"127\.0\.0\.1:/listen = \"$ADDR_HOST:/" \
    -e "s/^address = \"127\.0\.0\.1:\(.*\)\"$/address = \"$ADDR_NS:\1\"\nbandwidth_limit = \"$BANDWIDTH\"/" \
    "$EAST_CONF"
  ! grep -q '127\.0\.0\.1' "$EAST_CONF" "$WEST_CONF" || fail "a 127.0.0.1 address is left in the configs"
  grep -q "^bandwidth_limit = \"$BANDWIDTH\"" "$EAST_CONF" || fail "no bandwidth_limit in $EAST_CONF"
}

# siterepd for west enters the namespace's network (nsenter execs it: the pid is the
# daemon's); every other start is the plain binary.
SITEREPD_REAL=$SITEREPD
SITEREPD=$T/siterepd-netns
cat >"$SITEREPD" <<EOF
#!/bin/sh
if [ "\$2" = "$T/west.toml" ]; then exec nsenter --net=/run/netns/$NS "$SITEREPD_REAL" "\$@"; fi
exec "$SITEREPD_REAL" "\$@"
EOF
chmod +x "$SITEREPD"

make_netns
setup_sites >>"$LIBLOG"

# West must be in the namespace's network but in our mount namespace; its control
# socket answers (setup_sites used it) and east's FUSE disks take writes (start_load).
[[ $(readlink "/proc/$WEST_PID/ns/net") == "$(in_ns readlink /proc/self/ns/net)" ]] ||
  fail "west (pid $WEST_PID) is not in network namespace $NS"
[[ $(readlink "/proc/$WEST_PID/ns/net") != "$(readlink /proc/self/ns/net)" ]] ||
  fail "west (pid $WEST_PID) is in the host's network namespace"
[[ $(readlink "/proc/$WEST_PID/ns/mnt") == "$(readlink /proc/self/ns/mnt)" ]] ||
  fail "west (pid $WEST_PID) has a mount namespace of its own"
is_mounted "$(config_value "$WEST_CONF" mountpoint)" || fail "west's FUSE mount is not seen here"
in_ns ss -Htln | grep -q "$ADDR_NS:$WEST_PORT" || fail "west does not listen on $ADDR_NS:$WEST_PORT in $NS"
ilog "sites up: east pid $EAST_PID ($ADDR_HOST on $VETH_HOST) replicates vm1 (2 x $DISK_MIB MiB) to west pid $WEST_PID ($ADDR_NS:$WEST_PORT in network namespace $NS, host mount namespace); bandwidth_limit $BANDWIDTH, load $RATE/s per disk; $CUTS cuts, seed $SEED (FAULTS_SEED), checkpoint every $CHECK_EVERY"

python3 "$TOOL" record "$RECORDS" kind=class_info class=netns_cut \
  injected="the replica siterepd (west) in a network namespace reached over a veth pair; under write load the link is cut by an nftables table added in that namespace and healed by deleting it: drop both ways (black hole), reject with tcp reset both ways, or drop one direction only (east->west or west->east), down 0.3-8 s or (share $LONG_SHARE) 16-22 s past the shipper's 15 s io_timeout, up 0.5-3 s between cuts" \
  checked='["recovered: after each heal the shipper is connected and the replica acknowledged a newer cycle (within 90 s)", "at each checkpoint (every FAULTS_CUT_CHECK_EVERY cuts and after the last): acked + prefix (siterep-check) + sha256"]'

# The cuts: N MODE UP_S DOWN_S, from the seed alone.
python3 - "$SEED" "$CUTS" "$LONG_SHARE" >"$T/plan" <<'PY'
import random, sys
rng = random.Random(f"netns_cut:{sys.argv[1]}")
for n in range(1, int(sys.argv[2]) + 1):
    r = rng.random()
    mode = "drop" if r < 0.35 else "reset" if r < 0.65 else rng.choice(["drop_in", "drop_out"])
    up = rng.uniform(0.5, 3.0)
    down = rng.uniform(16.0, 22.0) if rng.random() < float(sys.argv[3]) else rng.uniform(0.3, 8.0)
    print(f"{n} {mode} {up:.3f} {down:.3f}")
PY

# link_state: "STATE ACKED_CYCLE CONNECTS" of vm1 at east.
link_state() {
  vm_field "$EAST_CONF" vm1 "f\"{v['link']['state']} {v.get('acked_cycle', 0)} {v['link']['connects']}\""
}
since() { python3 -c "import time; print(round((time.time_ns() - $1) / 1e9, 2))"; }

start_load || ilog "warning: no numbered write acknowledged within 10 s of starting the load"
failed_in_row=0
while read -r n mode up_s down_s; do
  t0_ns=$(date +%s%N)
  sleep "$up_s"
  read -r st_before acked_before connects_before <<<"$(link_state)"
  write_markers "$n" || true
  cut_link "$mode"
  sleep "$down_s"
  # What the shipper made of the cut by its end: still connected (the cut was shorter
  # than its timeouts, or a reset it has not met yet) or connecting, and why.
  at_heal=$(vm_field "$EAST_CONF" vm1 "v['link']['state'] + ': ' + v['link']['last_error']" 2>/dev/null || echo "?")
  heal_link
  heal_ns=$(date +%s%N)
  recovered=fail rec_s="" st="?" acked=0 connects=0
  while (($(date +%s%N) - heal_ns < 90 * 1000000000)); do
    read -r st acked connects <<<"$(link_state 2>/dev/null || echo "? 0 0")"
    if [[ $st == connected && $acked -gt $acked_before ]]; then
      recovered=pass
      rec_s=$(since "$heal_ns")
      break
    fi
    sleep 0.2
  done
  secs=$(since "$t0_ns")
  what="$mode for ${down_s}s after ${up_s}s up (link $st_before, acked cycle $acked_before, $connects_before connects before)"
  summary="cut $n/$CUTS: $what; at the heal: ${at_heal%: }; recovered: $recovered${rec_s:+ in ${rec_s}s after the heal} (acked cycle $acked, $((connects - connects_before)) reconnects)"
  artifacts=""
  if [[ $recovered == pass ]]; then
    result=pass failed_in_row=0
  else
    result=fail failed_in_row=$((failed_in_row + 1))
    artifacts=$(save_failure "netns-cut-$n")
  fi
  ilog "$summary -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class=netns_cut n="$n" mode="$mode" \
    seed_choice="{\"up_s\": $up_s, \"down_s\": $down_s}" action="$what" \
    checks="{\"recovered\": \"$recovered\"}" result="$result" seconds="$secs" \
    recovery_seconds="${rec_s:-null}" link_at_heal="$at_heal" \
    reconnects="$((connects - connects_before))" summary="$summary" artifacts="$artifacts"
  give_up_after "$failed_in_row" netns_cut "cut $n"
  if ((n % CHECK_EVERY == 0 || n == CUTS)); then
    class_checkpoint netns_cut "$n" 300
    ((n == CUTS)) || start_load || ilog "warning: no numbered write acknowledged within 10 s of starting the load"
  fi
done <"$T/plan"

ilog "done: $CUTS cuts (seed $SEED)"
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
