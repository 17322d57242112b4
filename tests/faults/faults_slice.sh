#!/usr/bin/env bash
# A short slice of the fault campaign for `make test` (ctest integration.faults/faults_slice):
# every class, a few times each: 6 crash points (about 4 of the primary, 2 of the replica),
# 10 link cuts at the proxy, 6 nftables cuts in a network namespace, 3 failpoint crashes,
# one of each corruption, one full log folder and one full state_dir, one throttled and one
# stopped replica. The classes run two at a time (FAULTS_PARALLEL=2). A new seed every run
# (printed; set FAULTS_SEED to replay one). Results go to BIN_DIR/../faults-results/, not to
# the source tree. Exit 0 when every check passed.
#
#   bash tests/faults/faults_slice.sh BIN_DIR
[[ $# -ge 1 && -d $1 ]] || { echo "usage: bash $0 BIN_DIR" >&2; exit 2; }
export FAULTS_CRASHES=${FAULTS_CRASHES:-6}
export FAULTS_CUTS=${FAULTS_CUTS:-10}
export FAULTS_CUT_CHECK_EVERY=${FAULTS_CUT_CHECK_EVERY:-10}
export FAULTS_NETNS_CUTS=${FAULTS_NETNS_CUTS:-6}
export FAULTS_FAILPOINT_ROUNDS=${FAULTS_FAILPOINT_ROUNDS:-1}
export FAULTS_FAILPOINT_POINTS=${FAULTS_FAILPOINT_POINTS:-3}
export FAULTS_CORRUPTIONS=${FAULTS_CORRUPTIONS:-1}
export FAULTS_ENOSPC=${FAULTS_ENOSPC:-1}
export FAULTS_ENOSPC_RESYNC=${FAULTS_ENOSPC_RESYNC:-operator}
export FAULTS_SLOW=${FAULTS_SLOW:-1}
export FAULTS_SLOW_LONG=${FAULTS_SLOW_LONG:-0}
export FAULTS_PARALLEL=${FAULTS_PARALLEL:-2}
export FAULTS_RESULTS=${FAULTS_RESULTS:-$(realpath -m "$1/../faults-results")}
exec bash "$(dirname "$0")/campaign.sh" "$1"
