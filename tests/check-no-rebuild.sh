#!/usr/bin/env bash
# A second build of anything the project builds compiles nothing, whatever
# ran in between: the debug build, `cargo test --workspace`, the release
# agents (VM and Nix stages) and `cargo run --bin vmcred-demo` (the README's
# first command, whose own build of the agents included). Pass 1 builds each
# (a no-op after tests/run.sh's build and test steps); pass 2 repeats each and
# fails on any `"fresh":false` compiler-artifact message, or any `Compiling`
# line from the demo. To see why a unit was dirty:
#   CARGO_LOG=cargo::core::compiler::fingerprint=info cargo build ...
set -euo pipefail
cd "$(dirname "$0")/.."

cmds=("build --workspace --bins" "test --workspace --no-run"
  "build --release -p vmcred-host -p vmcred-guest")
log=$(mktemp)
trap 'rm -f "$log"' EXIT
demo() {
  cargo run --bin vmcred-demo >"$log" 2>&1 || { cat "$log"; echo "FAIL: vmcred-demo"; exit 1; }
}

for cmd in "${cmds[@]}"; do
  # shellcheck disable=SC2086 # cmd is a list of words
  cargo $cmd --quiet
done
demo

rebuilt=0
for cmd in "${cmds[@]}"; do
  # shellcheck disable=SC2086 # cmd is a list of words
  out=$(cargo $cmd --message-format=json 2>/dev/null |
    grep '"reason":"compiler-artifact"' | grep '"fresh":false' |
    grep -o '"package_id":"[^"]*"' || true)
  if [ -n "$out" ]; then
    echo "FAIL: cargo $cmd compiled again what was already built:"; echo "$out"; rebuilt=1
  fi
done
demo
tail -1 "$log"
if grep -E '^ *Compiling ' "$log"; then
  echo "FAIL: cargo run --bin vmcred-demo (or its build of the agents) compiled again what was already built"; rebuilt=1
fi
[ $rebuilt -eq 0 ] || exit 1
echo "nothing rebuilt by a second: cargo build --workspace --bins; cargo test --workspace --no-run; cargo build --release -p vmcred-host -p vmcred-guest; cargo run --bin vmcred-demo"
