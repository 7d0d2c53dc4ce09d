#!/usr/bin/env bash
# Coverage-guided fuzzing of everything vmcred reads from a guest, a file or
# a socket: builds the targets in fuzz/ with `cargo afl` (AFL++, stable
# toolchain) and runs each for a bounded time.
#
#   fuzz/run.sh                      # every target, 20 s each (CI: 8 s)
#   fuzz/run.sh --seconds 3600       # the long run
#   fuzz/run.sh --targets "bootstrap rules" --seconds 60
#   fuzz/run.sh --seeds              # rewrite fuzz/corpus/ from real messages, then run
#
# Prints one line per target (executions, rate, crashes, hangs) and a final
# `N passed, M failed` (passed = no crash). A crashing input is copied to
# fuzz/artifacts/<target>/ and the script exits non-zero. Under CI=true a
# fuzzer that cannot be installed or built is a failure, not a skip.
# Fuzzing uses one core, at nice 10.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ_DIR=$PWD

ALL_TARGETS="bootstrap rules guest_hello guest_apply host_replies host_config guest_config control hybrid_reply guest_state host_generations host_session creds_address openbao_reply pins_file guest_recovery"
SECONDS_EACH=20
TARGETS=$ALL_TARGETS
SEEDS=0
CARGO_AFL_VERSION=0.18.2

while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH=${2:?--seconds needs a number}; shift 2 ;;
    --targets) TARGETS=${2:?--targets needs a list}; shift 2 ;;
    --seeds) SEEDS=1; shift ;;
    -h|--help) sed -n '2,16p' "$FUZZ_DIR/run.sh"; exit 0 ;;
    *) echo "fuzz/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$SECONDS_EACH" in ''|*[!0-9]*) echo "fuzz/run.sh: --seconds takes a whole number" >&2; exit 2 ;; esac

# Without the fuzzer: a failure in CI, a visible skip elsewhere.
unavailable() {
  echo "fuzz: cannot run: $1" >&2
  if [ "${CI:-}" = true ]; then
    echo "0 passed, 1 failed"
    exit 1
  fi
  echo "fuzz: SKIPPED (not in CI)"
  exit 0
}

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo afl --version >/dev/null 2>&1 || [ "$(cargo afl --version 2>/dev/null | awk '{print $2}')" != "$CARGO_AFL_VERSION" ]; then
  echo "fuzz: installing cargo-afl $CARGO_AFL_VERSION"
  cargo install --locked cargo-afl --version "$CARGO_AFL_VERSION" >&2 || unavailable "cargo install cargo-afl failed"
fi
# cargo-afl builds AFL++ itself, once per rustc version.
# (afl-fuzz -h exits 1 even when it is there: look at what it prints.)
afl_help=$(cargo afl fuzz -h 2>&1 || true)
if ! grep -q 'afl-fuzz++' <<<"$afl_help"; then
  echo "fuzz: building AFL++ (once per rustc version)"
  cargo afl config --build >&2 || unavailable "building AFL++ with cargo afl config --build failed"
fi

echo "fuzz: building targets"
# VMCRED_FUZZ_TARGET_DIR keeps the instrumented build outside a fresh clone
# (tests/run.sh points it at the user's cache directory).
export CARGO_TARGET_DIR=${VMCRED_FUZZ_TARGET_DIR:-$FUZZ_DIR/target}
nice -n 10 cargo afl build --release --bins >&2 || unavailable "cargo afl build failed"
BIN=$CARGO_TARGET_DIR/release

if [ "$SEEDS" = 1 ]; then
  rm -rf corpus
  "$BIN/gen_corpus" corpus
  echo "fuzz: wrote $(find corpus -type f | wc -l) seeds to fuzz/corpus"
fi

# The targets' scratch stores live in a directory of this run alone (on
# tmpfs when there is one), removed when the run ends. Several runs can
# share a machine: a run must never remove another's live stores (one that
# removed every vmcred-fuzz-* directory made a running guest_hello abort
# on every input).
scratch_base=/dev/shm
[ -d "$scratch_base" ] && [ -w "$scratch_base" ] || scratch_base=${TMPDIR:-/tmp}
# (Not named vmcred-fuzz-*: older copies of this script removed those.)
VMCRED_FUZZ_SCRATCH=$(mktemp -d "$scratch_base/vmcred-fuzzrun.XXXXXX")
export VMCRED_FUZZ_SCRATCH
trap 'rm -rf -- "$VMCRED_FUZZ_SCRATCH"' EXIT
# The guest fixtures answer Hello, which tells systemd the agent is ready
# when NOTIFY_SOCKET is set: never from a fuzz target.
unset NOTIFY_SOCKET

# The machine's core pattern pipes to a crash handler; AFL++ still sees
# every crash of the target itself. Other engineers' builds share the
# cores, so no CPU binding.
# (AFL_SKIP_BIN_CHECK must stay unset, whatever its value: it also skips
# the detection of persistent mode, and every input then times out.)
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 \
       AFL_NO_UI=1 AFL_FAST_CAL=1
stat() { awk -F' *: *' -v k="$2" '$1 == k { print $2 }' "$1" 2>/dev/null; }

passed=0 failed=0 total_execs=0
for t in $TARGETS; do
  [ -x "$BIN/$t" ] || { echo "$t: no such target (have: $ALL_TARGETS)"; failed=$((failed + 1)); continue; }
  [ -d "corpus/$t" ] || { echo "$t: no seeds in fuzz/corpus/$t (run with --seeds)"; failed=$((failed + 1)); continue; }
  out=$FUZZ_DIR/out/$t
  rm -rf "$out"
  mkdir -p "$out"
  # -V bounds the run; -t gives a slow execution on a busy machine room
  # before it counts as a hang; -m none because tokio reserves address space.
  # Without a UI afl-fuzz prints a line per queue entry: keep the end only.
  set +o pipefail
  nice -n 10 cargo afl fuzz -i "corpus/$t" -o "$out" -V "$SECONDS_EACH" -t 2000 -m none \
      -- "$BIN/$t" 2>&1 | tail -n 200 >"$out/afl.log"
  rc=${PIPESTATUS[0]}
  set -o pipefail
  # Stores and sockets a target process made live on until it exits; each
  # AFL++ restart of the target leaves one behind: empty this run's own
  # scratch directory, nothing else.
  find "$VMCRED_FUZZ_SCRATCH" -mindepth 1 -maxdepth 1 -exec rm -rf {} + 2>/dev/null || true
  stats=$out/default/fuzzer_stats
  if [ ! -f "$stats" ]; then
    echo "$t: afl-fuzz did not start (exit $rc); last lines of fuzz/out/$t/afl.log:"
    tail -n 15 "$out/afl.log" | sed 's/^/  /'
    failed=$((failed + 1))
    continue
  fi
  execs=$(stat "$stats" execs_done)
  rate=$(stat "$stats" execs_per_sec)
  crashes=$(stat "$stats" saved_crashes)
  hangs=$(stat "$stats" saved_hangs)
  paths=$(stat "$stats" corpus_count)
  total_execs=$((total_execs + ${execs:-0}))
  echo "$t: ${execs:-0} executions (${rate:-0}/s), ${crashes:-?} crashes, ${hangs:-?} hangs, ${paths:-?} paths"
  if [ "${crashes:-1}" != 0 ]; then
    mkdir -p "artifacts/$t"
    for f in "$out"/default/crashes/id:*; do
      [ -e "$f" ] || continue
      cp "$f" "artifacts/$t/"
      echo "  crash saved: fuzz/artifacts/$t/$(basename "$f")  (reproduce: fuzz/target/release/$t < that file)"
    done
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
  if [ "${hangs:-0}" != 0 ]; then
    mkdir -p "artifacts/$t"
    cp "$out"/default/hangs/id:* "artifacts/$t/" 2>/dev/null || true
    echo "  hangs (slower than 2 s on this machine) saved in fuzz/artifacts/$t/"
  fi
done
echo "fuzz: $total_execs executions in total"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
