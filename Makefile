# siterep: top-level entry points. Every target does its own set-up on a fresh Debian 12
# machine as root: `make deps` installs whatever is missing, the others build on it.
#
#   make demo        build, then run tools/demo.sh (two sites: enable, write, planned
#                    failover, failback, with status between the steps)
#   make test        build, a short fuzz run (TEST_FUZZ_SECONDS, default 10, per harness),
#                    then every test (unit + integration) through ctest
#   make bench       build, then bench/run.sh (fio: raw image vs FUSE vs FUSE + log) and
#                    bench/replication.sh (two sites on loopback: guest cost, shipping, RPO)
#                    and bench/sync.sh (initial copy vs openssl, seeded enable, sparse disk)
#                    and bench/failover.sh (planned and unplanned failover RTO, reverse replication)
#   make check-asan  everything built with AddressSanitizer/UBSan in build-asan/: the unit
#                    tests, then the integration tests (but qemu's) with sanitized daemons
#                    (a sanitizer report makes the daemon exit non-zero: the test fails)
#   make fuzz        libFuzzer harnesses (clang) for the log record and wire frame parsers,
#                    the control socket's request parser and the control daemon's plan and
#                    peer-reply parsers, FUZZ_SECONDS
#                    each (default 60), in build-fuzz/
#   make faults      build, then the fault campaign (tests/faults/campaign.sh), every class
#                    one after another (FAULTS_CLASSES picks some): FAULTS_CRASHES kill -9
#                    crash points (default 200, 60% primary), FAULTS_CUTS proxy link cuts
#                    (default 100), 100 nftables cuts, 84 failpoint crashes, 40 corruptions,
#                    10 full disks, 20 slow or stalled replicas, FAULTS_PARALLEL classes at
#                    a time (default 2); random choices from FAULTS_SEED (default: new,
#                    printed); figures in tests/faults/results/<UTC time>.json and a
#                    summary table (about 45 minutes); then POWER_CUTS host power cuts, at
#                    the primary and the replica in turn (tests/power_loss.sh, default 200)
#   make deps | build | clean

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
export DEBIAN_FRONTEND := noninteractive

BUILD_DIR ?= build
ASAN_DIR ?= build-asan
FUZZ_DIR ?= build-fuzz
FUZZ_SECONDS ?= 60
TEST_FUZZ_SECONDS ?= 10
FAULTS_CRASHES ?= 200
FAULTS_CUTS ?= 100
FAULTS_SEED ?=
FAULTS_PARALLEL ?= 2
POWER_CUTS ?= 200
BUILD_TYPE ?= RelWithDebInfo
JOBS ?= $(shell nproc)

# Everything the build, the tests, the benchmark and the demo use.
PACKAGES := build-essential cmake pkg-config g++ \
	libfuse3-dev fuse3 libboost-dev libssl-dev openssl \
	libgtest-dev libtomlplusplus-dev libcli11-dev nlohmann-json3-dev libspdlog-dev \
	libzstd-dev libisal-dev libxxhash-dev \
	clang fio e2fsprogs util-linux mount kmod procps python3 nftables iproute2 \
	qemu-utils qemu-system-x86 busybox-static cpio gzip linux-image-amd64

.PHONY: all deps build test demo bench check-asan fuzz faults clean

all: build

deps:
	@missing=""; \
	for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing$$missing"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo apt-get update; \
	  $$sudo apt-get install -y --no-install-recommends $$missing; \
	fi; \
	if [ "$$(id -u)" -eq 0 ]; then \
	  [ -c /dev/fuse ] || modprobe fuse 2>/dev/null || true; \
	  [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true; \
	  [ -c /dev/fuse ] || echo "make deps: warning: /dev/fuse is missing; the FUSE tests will be skipped or fail" >&2; \
	fi

build: deps
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE)
	cmake --build $(BUILD_DIR) -j$(JOBS)

# Unit tests run in parallel; integration tests are RUN_SERIAL (see tests/CMakeLists.txt).
# ctest's own closing lines ("N% tests passed, ...") are the last thing printed.
test: build
	$(MAKE) fuzz FUZZ_SECONDS=$(TEST_FUZZ_SECONDS)
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j$(JOBS)

demo: build
	bash tools/demo.sh $(BUILD_DIR)/bin

bench: build
	bash bench/run.sh $(BUILD_DIR)/bin
	bash bench/replication.sh $(BUILD_DIR)/bin
	bash bench/sync.sh $(BUILD_DIR)/bin
	bash bench/failover.sh $(BUILD_DIR)/bin

check-asan: deps
	cmake -S . -B $(ASAN_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSITEREP_SANITIZE=ON
	cmake --build $(ASAN_DIR) -j$(JOBS)
	ctest --test-dir $(ASAN_DIR) --output-on-failure -j$(JOBS) -L unit
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  ctest --test-dir $(ASAN_DIR) --output-on-failure -L integration -E 'qemu'

# Seeds come from the project's own encoders (fuzz/make_seeds.cc); inputs that crash a
# harness are kept in $(FUZZ_DIR)/found/<harness>/ and fail the target.
fuzz: deps
	cmake -S . -B $(FUZZ_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ -DSITEREP_FUZZ=ON
	cmake --build $(FUZZ_DIR) -j$(JOBS)
	$(FUZZ_DIR)/bin/make_seeds $(FUZZ_DIR)/corpus
	@rc=0; for f in log_record wire_frame control_input control_request; do \
	  mkdir -p $(FUZZ_DIR)/found/$$f; \
	  $(FUZZ_DIR)/bin/$${f}_fuzz -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_DIR)/found/$$f/ $(FUZZ_DIR)/corpus/$$f >$(FUZZ_DIR)/$$f.log 2>&1 || rc=1; \
	  echo "== $$f ($(FUZZ_SECONDS) s)"; tail -n 12 $(FUZZ_DIR)/$$f.log; \
	done; \
	if [ $$rc -ne 0 ]; then echo "fuzz: a harness failed; inputs in $(FUZZ_DIR)/found/" >&2; fi; \
	exit $$rc

# Exit 1 when a check failed; the result file is written either way.
faults: build
	rc=0; \
	FAULTS_CRASHES=$(FAULTS_CRASHES) FAULTS_CUTS=$(FAULTS_CUTS) FAULTS_SEED=$(FAULTS_SEED) \
	  FAULTS_PARALLEL=$(FAULTS_PARALLEL) \
	  bash tests/faults/campaign.sh $(BUILD_DIR)/bin || rc=1; \
	POWER_CUTS=$(POWER_CUTS) bash tests/power_loss.sh $(BUILD_DIR)/bin || rc=1; \
	exit $$rc

clean:
	rm -rf $(BUILD_DIR) $(ASAN_DIR) $(FUZZ_DIR) build-int
