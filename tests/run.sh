#!/usr/bin/env bash
# The project's test command (README, .ci/run). Installs what it needs, then:
#   1. cargo fmt --check and clippy -D warnings
#   2. the workspace's unit and end-to-end tests (real agents, real TLS,
#      hybrid vsock through a muxer stand-in; never AF_VSOCK on this machine)
#   3. the NixOS module evaluation tests (tests/nix/run.sh)
#   4. the real-VM test (tests/vm/run.sh): qemu TCG, systemd guests, virtio-vsock
#   5. a short run of every fuzz target (fuzz/run.sh, VMCRED_FUZZ_SECONDS each)
# Downloads and builds that do not depend on this checkout (guest images,
# the instrumented fuzz build) are cached in ${XDG_CACHE_HOME:-~/.cache}/vmcred,
# so a fresh clone on the same machine reuses them; a new machine builds them.
# Set VMCRED_SKIP_VM=1, VMCRED_SKIP_NIX=1 or VMCRED_SKIP_FUZZ=1 to leave a stage out (it is then
# reported as skipped, never as passed). With CI=true nothing is skipped: a
# stage that cannot run (exit 77), or one disabled by environment, fails.
set -euo pipefail
cd "$(dirname "$0")/.."
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/vmcred
export VMCRED_VM_CACHE=${VMCRED_VM_CACHE:-$cache_root/vm}
export VMCRED_FUZZ_TARGET_DIR=${VMCRED_FUZZ_TARGET_DIR:-$cache_root/fuzz-target}

need_apt=()
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v base64 >/dev/null || need_apt+=(coreutils)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true

echo "== fmt, clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== build"
# Each binary is built once per profile. The debug build, `cargo test
# --workspace` and `cargo run --bin vmcred-demo` resolve every shared crate
# with the same features (vmcred-tests depends on both agents), so the tests
# and the demo reuse these artifacts. Release is for the VM and Nix stages
# only; its selection is the one tests/vm/run.sh builds, so that is a no-op.
cargo build --workspace --bins
cargo build --release -p vmcred-host -p vmcred-guest

echo "== unit and end-to-end tests"
cargo test --workspace --quiet 2>&1 | tee /tmp/vmcred-cargo-test.log
grep -q "test result: FAILED" /tmp/vmcred-cargo-test.log && exit 1

echo "== demo, and nothing rebuilt by a second build of any of the above"
tests/check-no-rebuild.sh

stage() { # name script
  local name=$1 script=$2 rc=0
  echo "== $name"
  if [ "${3:-}" = skip ]; then
    if [ "${CI:-}" = true ]; then echo "FAIL: $name disabled by environment under CI=true"; exit 1; fi
    echo "SKIP: $name (disabled by environment)"; return 0
  fi
  "$script" || rc=$?
  if [ $rc -eq 77 ] && [ "${CI:-}" = true ]; then
    echo "FAIL: $name could not run, and under CI=true a stage that cannot run is a failure"; exit 1
  elif [ $rc -eq 77 ]; then
    echo "SKIP: $name could not run here (see above)"
  elif [ $rc -ne 0 ]; then
    echo "FAIL: $name (exit $rc)"; exit $rc
  fi
}
stage "NixOS module evaluation" tests/nix/run.sh "$([ "${VMCRED_SKIP_NIX:-}" = 1 ] && echo skip)"
stage "real VM (qemu TCG)" tests/vm/run.sh "$([ "${VMCRED_SKIP_VM:-}" = 1 ] && echo skip)"
# Every fuzz target, each for a short bounded time. A decoy directory named
# like another run's scratch stores must survive: a run removes only its
# own scratch directory (one that removed every vmcred-fuzz-* directory in
# /dev/shm pulled the store from under a concurrent run's guest_hello,
# which then aborted on every input).
fuzz_stage() {
  local base=/dev/shm decoy rc=0
  [ -d "$base" ] && [ -w "$base" ] || base=${TMPDIR:-/tmp}
  decoy=$(mktemp -d "$base/vmcred-fuzz-decoy.XXXXXX")
  fuzz/run.sh --seconds "${VMCRED_FUZZ_SECONDS:-8}" || rc=$?
  if [ ! -d "$decoy" ]; then
    echo "fuzz: FAIL: the run removed $decoy, a scratch directory that was not its own"
    rc=1
  fi
  rm -rf -- "$decoy"
  return $rc
}
stage "fuzzing (every target, ${VMCRED_FUZZ_SECONDS:-8} s each)" fuzz_stage "$([ "${VMCRED_SKIP_FUZZ:-}" = 1 ] && echo skip)"
echo "== all stages done"
