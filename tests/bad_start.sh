#!/usr/bin/env bash
# Refusals at start-up, each exit 1 with a clear message and no mount left behind:
# a missing image, an image whose size is not a multiple of 512, an image already
# protected by another running siterepd (file lock), a mountpoint that is already a mount
# (another file system, another siterepd, a stale FUSE mount after a crash). The first
# daemon keeps serving through all of it.
source "$(dirname "$0")/lib.sh"

step "a missing image"
new_site missing
add_vm "$CONF" vm1
add_disk "$CONF" d0 "$T/does-not-exist.img"
expect_exit1 "missing image" "$SITEREPD" -c "$CONF"
expect_output_has "$T/does-not-exist.img"
! is_mounted "$MNT" || fail "mounted despite a missing image"

step "an image whose size is not a multiple of 512"
new_site odd
add_vm "$CONF" vm1
add_disk "$CONF" d0 "$T/odd.img" 1000
expect_exit1 "odd-sized image" "$SITEREPD" -c "$CONF"
expect_output_has "$T/odd.img"
! is_mounted "$MNT" || fail "mounted despite an odd-sized image"

step "site A protects a.img"
new_site a
CONF_A=$CONF MNT_A=$MNT
add_vm "$CONF_A" vm1
add_disk "$CONF_A" d0 "$T/a.img" 64M
start_ready "$CONF_A"
PID_A=$DAEMON_PID
echo "data of A" | dd of="$MNT_A/vm1/d0" conv=notrunc,fsync status=none

step "site B wants the same image: refused (locked)"
new_site b
add_vm "$CONF" vmb
add_disk "$CONF" d0 "$T/a.img"
expect_exit1 "image locked by another siterepd" "$SITEREPD" -c "$CONF"
expect_output_has "$T/a.img"
! is_mounted "$MNT" || fail "site B mounted"

step "site C wants A's mountpoint: refused"
new_site c
sed -i "s|^mountpoint = .*|mountpoint = \"$MNT_A\"|" "$CONF"
add_vm "$CONF" vmc
add_disk "$CONF" d0 "$T/c.img" 64M
expect_exit1 "mountpoint of another siterepd" "$SITEREPD" -c "$CONF"
expect_output_has "$MNT_A"
# Site C did not take C's image lock for good either: it can start elsewhere.
sed -i "s|^mountpoint = .*|mountpoint = \"$T/c/mnt\"|" "$CONF"
start_ready "$CONF"
stop_clean "$DAEMON_PID" "$CONF"

step "a mountpoint with another file system on it: refused"
new_site d
mkdir -p "$MNT"
mount -t tmpfs -o size=1m siterep-test "$MNT"
_MOUNTS+=("$MNT")
add_vm "$CONF" vmd
add_disk "$CONF" d0 "$T/d.img" 64M
expect_exit1 "mountpoint in use" "$SITEREPD" -c "$CONF"
expect_output_has "$MNT"
umount "$MNT"

step "site A is unharmed"
"$SITEREP" -c "$CONF_A" status >/dev/null || fail "site A does not answer"
head -c 9 "$MNT_A/vm1/d0" | grep -q "data of A" || fail "site A's disk lost its data"

step "a stale FUSE mount after kill -9: refused until it is unmounted"
kill -KILL "$PID_A"
wait "$PID_A" 2>/dev/null || true
_forget_pid "$PID_A"
is_mounted "$MNT_A" || fail "expected the stale mount of A after kill -9"
expect_exit1 "stale mount" "$SITEREPD" -c "$CONF_A"
expect_output_has "$MNT_A"
fusermount3 -u "$MNT_A"
start_ready "$CONF_A"
head -c 9 "$MNT_A/vm1/d0" | grep -q "data of A" || fail "site A's disk lost its data across the crash"
stop_clean "$DAEMON_PID" "$CONF_A"

step "control_group: the socket is 0660 in that group; members are served, others not"
new_site e
sed -i "/^control_socket = /a control_group = \"nogroup\"" "$CONF"
add_vm "$CONF" vme
add_disk "$CONF" d0 "$T/e.img" 16M
start_ready "$CONF"
PID_E=$DAEMON_PID
[[ $(stat -c '%a %G' "$SOCK") == "660 nogroup" ]] ||
  fail "control socket is $(stat -c '%a %U:%G' "$SOCK"), want 660 in group nogroup"
chmod 0711 "$T" "$T/e"  # so that another user can reach the socket at all
# ask_as GROUP: a status request over the socket as user nobody in GROUP only.
ask_as() {
  setpriv --reuid=65534 --regid="$1" --clear-groups /usr/bin/python3 -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect:", e.strerror); sys.exit(0)
s.sendall(b"{\"op\": \"status\"}\n")
r = json.loads(s.makefile().readline())
print("served" if r["ok"] else r["error"])' "$SOCK"
}
got=$(ask_as nogroup)
[[ $got == served ]] || fail "a member of nogroup was not served: $got"
got=$(ask_as 4343)
[[ $got == "connect: Permission denied" ]] || fail "a user outside the group got: $got"
log "nogroup member: served; outsider: $got"
stop_clean "$PID_E" "$CONF"

step "control_group naming no group: refused"
sed -i "s/^control_group = .*/control_group = \"no-such-group-here\"/" "$CONF"
sed -i "s|^state_dir = .*|state_dir = \"$T/not-made\"|" "$CONF"
expect_exit1 "unknown control_group" "$SITEREPD" -c "$CONF"
expect_output_has "no group named no-such-group-here"
! is_mounted "$MNT" || fail "mounted despite an unknown control_group"
[[ ! -e $T/not-made ]] || fail "a start refused for its control_group made its state_dir"
