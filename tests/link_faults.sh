#!/usr/bin/env bash
# The replication link under faults, with east replicating vm1 to west through a TCP
# proxy in this test: connections closed (several times, under load), the link stalled
# (a black hole: the primary's writes are not blocked, the RPO grows, and the replica
# converges once it heals), a frame corrupted after decryption at the receiver
# (failpoint receiver.corrupt_frame: the frame CRC refuses it), and a client whose
# certificate comes from another CA (refused before anything is read; no replica
# is created for it). After each, the replica converges to the primary byte for byte.
# Last, a record damaged in a received segment on west's disk: the apply stops, nothing
# of that cycle reaches the image, and both sites report Critical with the reason.
source "$(dirname "$0")/lib.sh"

command -v fio >/dev/null || skip "fio is not installed"
command -v openssl >/dev/null || skip "openssl is not installed"

PROXY_PORT=$(free_port)
two_sites "$PROXY_PORT"
add_vm "$EAST_CONF" vm1 'frequency = "continuous"'
add_disk "$EAST_CONF" d0 "$T/d0.img" 64M

start_proxy "$PROXY_PORT" "$WEST_PORT"
start_ready "$WEST_CONF"
WEST_PID=$DAEMON_PID
WEST_LOG=$DAEMON_LOG
start_ready "$EAST_CONF"
EAST_PID=$DAEMON_PID
timeout 60 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait || fail "enable --wait did not finish"

converged() {
  wait_caught_up "$EAST_CONF" vm1 120
  same_sha256 "$T/d0.img" "$WEST_STATE/replicas/vm1/d0.img" "replica after $1"
  log "converged after $1"
}

step "connections closed five times under verified load"
fio --name=load --filename="$EAST_MNT/vm1/d0" --ioengine=io_uring --direct=1 --rw=randwrite \
  --bs=16k --iodepth=4 --size=32M --verify=crc32c --verify_fatal=1 --rate=8m \
  >"$T/fio-load.out" 2>&1 &
FIO=$!
for i in 1 2 3 4 5; do
  sleep 1
  proxy_mode close
  sleep 0.5
  proxy_mode pass
done
wait "$FIO" || { cat "$T/fio-load.out" >&2; fail "fio failed"; }
converged "5 closed connections"
connects=$(vm_field "$EAST_CONF" vm1 "v['link']['connects']")
((connects >= 2)) || fail "the shipper connected only $connects time(s)"

step "the link stalls (black hole): guest writes go on, RPO grows, then it heals"
proxy_mode stall
start=$SECONDS
dd if=/dev/urandom of="$EAST_MNT/vm1/d0" bs=1M count=16 seek=40 oflag=direct conv=notrunc status=none
"$SITEREP" -c "$EAST_CONF" cut vm1 >/dev/null
((SECONDS - start < 10)) || fail "guest writes took $((SECONDS - start)) s while the link stalled"
sleep 8
rpo=$(vm_field "$EAST_CONF" vm1 "v['rpo_seconds']")
python3 -c "import sys; sys.exit(0 if float('$rpo') >= 5 else 1)" || fail "RPO $rpo s while stalled (want >= 5)"
log "RPO while stalled: $rpo s"
sleep 12  # long enough for the shipper's 15 s I/O timeout to fire
proxy_mode pass
converged "a stall"

step "a frame corrupted after decryption is refused by its CRC"
"$SITEREP" -c "$WEST_CONF" failpoint 'receiver.corrupt_frame=trigger*1' >/dev/null
dd if=/dev/urandom of="$EAST_MNT/vm1/d0" bs=1M count=4 seek=10 oflag=direct conv=notrunc status=none
converged "a corrupted frame"
grep -qi "crc" "$WEST_LOG" || fail "west's log does not mention the refused frame's CRC"
grep -i "crc" "$WEST_LOG" | tail -n 1 | sed 's/^/    /'

step "a client with a certificate from another CA is refused (it trusts west's CA itself)"
make_certs "$T/rogue" east
ROGUE_CONF=$T/rogue.toml
mkdir -p "$T/rogue-site"
cat >"$ROGUE_CONF" <<EOT
[site]
name = "east"
state_dir = "$T/rogue-site/state"
mountpoint = "$T/rogue-site/mnt"
control_socket = "$T/rogue-site/control.sock"

[tls]
ca = "$CERTS/ca.pem"
cert = "$T/rogue/east.pem"
key = "$T/rogue/east.key"
EOT
add_peer "$ROGUE_CONF" west "127.0.0.1:$WEST_PORT"
add_vm "$ROGUE_CONF" vm9 'frequency = "continuous"'
add_disk "$ROGUE_CONF" d0 "$T/rogue-d0.img" 16M
start_ready "$ROGUE_CONF"
ROGUE_PID=$DAEMON_PID
"$SITEREP" -c "$ROGUE_CONF" enable vm9 --to west >/dev/null
dd if=/dev/urandom of="$T/rogue-site/mnt/vm9/d0" bs=1M count=1 oflag=direct conv=notrunc status=none
sleep 4
[[ ! -e $WEST_STATE/replicas/vm9 ]] || fail "west created a replica for a peer from another CA"
[[ $(vm_field "$WEST_CONF" vm9 "v['name']") == "" ]] || fail "west lists vm9"
[[ $(vm_field "$ROGUE_CONF" vm9 "v['link']['state']") != connected ]] || fail "the rogue client is connected"
log "rogue: $(vm_field "$ROGUE_CONF" vm9 "v['link']['last_error']")"
grep -q "refused" "$WEST_LOG" || fail "west's log does not show the refused handshake"
grep "refused" "$WEST_LOG" | tail -n 1 | sed 's/^/    /'
stop_clean "$ROGUE_PID" "$ROGUE_CONF"

step "a record damaged on the replica's disk stops the apply: critical on both sites"
"$SITEREP" -c "$WEST_CONF" failpoint 'applier.before_apply=error' >/dev/null
dd if=/dev/urandom of="$EAST_MNT/vm1/d0" bs=1M count=1 seek=3 oflag=direct conv=notrunc status=none
"$SITEREP" -c "$EAST_CONF" cut vm1 >/dev/null
for ((i = 0; i < 100; i++)); do
  [[ $(vm_field "$WEST_CONF" vm1 "v['received_cycle'] > v['applied_cycle']") == true ]] && break
  sleep 0.2
done
((i < 100)) || fail "west did not receive the cycle"
seg=$(ls "$WEST_STATE"/replicas/vm1/received/d0/*.seg | head -n 1)
printf '\xff' | dd of="$seg" bs=1 seek=100 conv=notrunc status=none
before=$(sha256sum <"$WEST_STATE/replicas/vm1/d0.img")
"$SITEREP" -c "$WEST_CONF" failpoint 'applier.before_apply=off' >/dev/null
for ((i = 0; i < 200; i++)); do
  [[ $(vm_field "$WEST_CONF" vm1 "v['health']") == critical ]] && break
  sleep 0.2
done
((i < 200)) || fail "west did not turn critical: $(vm_field "$WEST_CONF" vm1 "v['health_reason']")"
[[ $(vm_field "$WEST_CONF" vm1 "v['state']") == "apply failed" ]] || fail "west state is not 'apply failed'"
log "west: $(vm_field "$WEST_CONF" vm1 "v['health_reason']")"
[[ $(sha256sum <"$WEST_STATE/replicas/vm1/d0.img") == "$before" ]] || fail "the damaged cycle was applied"
for ((i = 0; i < 50; i++)); do
  [[ $(vm_field "$EAST_CONF" vm1 "v['health']") == critical ]] && break
  sleep 0.2
done
((i < 50)) || fail "east did not turn critical"
log "east: $(vm_field "$EAST_CONF" vm1 "v['health_reason']")"
"$SITEREP" -c "$WEST_CONF" status vm1 | grep -q "apply stopped" || fail "siterep status at west does not say why"

stop_clean "$EAST_PID" "$EAST_CONF"
stop_clean "$WEST_PID" "$WEST_CONF"
