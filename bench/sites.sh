# Shared by the benchmarks (bench/run.sh, replication.sh, sync.sh, failover.sh): the exit
# trap's end, certificates and the two site configs. Source it; it defines functions only.

# bench_finish RC: the end of every bench script's exit trap: removes the work folder $W
# (unless something is still mounted under it) and exits with RC.
bench_finish() {
  local rc=$1
  if findmnt -rn -o TARGET | grep -q "^$W/"; then
    echo "bench: mounts remain under $W; leaving it" >&2
  else
    rm -rf "$W"
  fi
  [[ $rc -eq 0 ]] || echo "bench: failed (exit $rc)" >&2
  exit "$rc"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# bench_certs DIR: a CA and certificates for east and west in DIR/certs.
bench_certs() {
  "$BIN/siterep-certs" "$1/certs" ca >/dev/null
  "$BIN/siterep-certs" "$1/certs" site east >/dev/null
  "$BIN/siterep-certs" "$1/certs" site west >/dev/null
}

# bench_site_configs DIR EAST_PORT WEST_PORT: DIR/east.toml and DIR/west.toml, each with
# the other as its peer (folders DIR/<site>/{state,mnt}, certificates from bench_certs).
bench_site_configs() {
  local dir=$1 east_port=$2 west_port=$3 s port peer peer_port
  for s in east west; do
    mkdir -p "$dir/$s"
    port=$east_port peer=west peer_port=$west_port
    [[ $s == west ]] && port=$west_port peer=east peer_port=$east_port
    cat >"$dir/$s.toml" <<TOML
[site]
name = "$s"
state_dir = "$dir/$s/state"
mountpoint = "$dir/$s/mnt"
control_socket = "$dir/$s/control.sock"
listen = "127.0.0.1:$port"

[tls]
ca = "$dir/certs/ca.pem"
cert = "$dir/certs/$s.pem"
key = "$dir/certs/$s.key"

[[peers]]
name = "$peer"
address = "127.0.0.1:$peer_port"
TOML
  done
}
