#!/usr/bin/env bash
# Evaluation tests of the NixOS modules and the flake, run offline:
# - the real nixpkgs module system and systemd unit types from a 2022 copy of
#   nixpkgs' lib/ and nixos/lib/ (test data of the `nixel` crate, fetched with
#   cargo into tests/nix/.cache, never committed);
# - stand-ins for the rest of NixOS, microvm.nix and the packages
#   (tests/nix/*-stub.nix), declaring only what the modules touch;
# - the rendered agent config is fed to the real `vmcred-host check-config`.
# No NixOS VM boots here; tests/nix/vm-test.nix is for `nix flake check`.
#
# Prints PASS:/FAIL: per check and "N passed, M failed"; exits 77 only if Nix
# cannot be installed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache="$here/.cache"
host_bin="${VMCRED_HOST_BIN:-$repo/target/release/vmcred-host}"
case "$host_bin" in /*) ;; *) host_bin="$repo/$host_bin" ;; esac

export NIX_CONFIG=$'experimental-features = nix-command flakes\nsubstituters =\nbuild-users-group =\nwarn-dirty = false'

passed=0 failed=0
pass() { echo "PASS: $1"; passed=$((passed + 1)); }
fail() { echo "FAIL: $1"; [ -n "${2:-}" ] && printf '%s\n' "$2" | sed 's/^/    /' | head -40; failed=$((failed + 1)); }

# --- Nix ---------------------------------------------------------------------
if ! command -v nix-instantiate >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing nix-bin (Debian) ..."
    apt-get update >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y nix-bin >/dev/null 2>&1
  fi
  if ! command -v nix-instantiate >/dev/null 2>&1; then
    echo "SKIP: nix-bin is not installed and could not be installed (needs root and apt-get)"
    exit 77
  fi
fi
echo "using $(nix --version)"

# --- nixpkgs lib from the nixel crate ----------------------------------------
nixpkgs="$cache/nixpkgs"
if [ ! -f "$nixpkgs/lib/default.nix" ] || [ ! -f "$nixpkgs/nixos/lib/systemd-unit-options.nix" ]; then
  mkdir -p "$cache/fetch/src"
  cat > "$cache/fetch/Cargo.toml" <<'EOF'
[package]
name = "nixel-fetch"
version = "0.0.0"
edition = "2021"

[workspace]

[dependencies]
nixel = "=5.2.0"
EOF
  echo 'fn main() {}' > "$cache/fetch/src/main.rs"
  (cd "$cache/fetch" && cargo fetch --quiet) || { echo "FAIL: cargo fetch of nixel 5.2.0"; echo "0 passed, 1 failed"; exit 1; }
  crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/nixel-5.2.0.crate 2>/dev/null | head -1)
  [ -n "$crate" ] || { echo "FAIL: nixel-5.2.0.crate not found in the cargo cache"; echo "0 passed, 1 failed"; exit 1; }
  tmp=$(mktemp -d)
  tar xzf "$crate" -C "$tmp" nixel-5.2.0/tests/inputs/nixpkgs/lib nixel-5.2.0/tests/inputs/nixpkgs/nixos/lib
  rm -rf "$nixpkgs"
  mv "$tmp/nixel-5.2.0/tests/inputs/nixpkgs" "$nixpkgs"
  rm -rf "$tmp"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- syntax of every .nix file ------------------------------------------------
while IFS= read -r f; do
  if out=$(nix-instantiate --parse "$f" 2>&1 >/dev/null); then
    pass "parses: ${f#"$repo"/}"
  else
    fail "parses: ${f#"$repo"/}" "$out"
  fi
done < <(find "$repo" -name '*.nix' -not -path '*/.cache/*' -not -path '*/target/*' -not -path '*/.git/*' | sort)

# --- checks decided in Nix ------------------------------------------------------
# A path literal used as a credential source must be refused without ever
# being copied into the store: use a canary file and look for it afterwards.
canary_dir="$work/canary"; mkdir -p "$canary_dir"
canary_name="vmcred-canary-secret-$$-$RANDOM"
echo "canary" > "$canary_dir/$canary_name"

checks_expr="import $here/checks.nix { nixpkgs = $nixpkgs; }"
eval_json() { nix-instantiate --read-write-mode --eval --strict --json -E "$1"; }

if json=$(eval_json "($checks_expr).results" 2>"$work/err"); then
  while IFS=$'\t' read -r ok name detail; do
    if [ "$ok" = true ]; then pass "$name"; else fail "$name" "$detail"; fi
  done < <(printf '%s' "$json" | python3 -c '
import json, sys
for k, v in json.load(sys.stdin).items():
    print("true" if v["ok"] else "false", k, v["detail"].replace("\t", " ").replace("\n", " | "), sep="\t")
')
else
  fail "evaluating tests/nix/checks.nix" "$(cat "$work/err")"
fi

if out=$(nix-instantiate --read-write-mode --eval --strict -E "
    let
      lib = import $nixpkgs/lib;
      pkgs = import $here/stub-pkgs.nix { inherit lib; };
      c = (lib.evalModules { modules = [
        (import $here/nixos-stub.nix { nixpkgs = $nixpkgs; inherit pkgs; })
        $repo/nixos-modules/host.nix
        { services.vmcred.host = { enable = true; vms.v = { cid = 3; credentials.A.source = $canary_dir/$canary_name; }; }; }
      ]; }).config;
    in c.test.failedAssertions" 2>&1) \
   && grep -q "is a Nix path literal" <<<"$out" \
   && ! ls /nix/store | grep -q "$canary_name"; then
  pass "refused: path-literal source is never copied into the Nix store"
else
  fail "refused: path-literal source is never copied into the Nix store" "$out"
fi

# --- evaluation errors that must name the offending option ------------------------
expect_error() { # name regex
  local out
  if out=$(nix-instantiate --read-write-mode --eval --strict -E "($checks_expr).errorCases.$1" 2>&1); then
    fail "$3" "evaluated without error: $out"
  elif grep -Eq "$2" <<<"$out"; then
    pass "$3"
  else
    fail "$3" "$out"
  fi
}
expect_error host-port-string "option .services\.vmcred\.host\.vms\.v\.port' is not of type" "refused: port given as a string (type error)"
expect_error host-typo-credentails "option .services\.vmcred\.host\.vms\.v\.credentails' does not exist" "refused: typo 'credentails' (unknown option)"
expect_error host-typo-sources "option .services\.vmcred\.host\.vms\.v\.credentials\.A\.sources' does not exist" "refused: typo 'sources' (unknown option)"
expect_error host-boot-string "credentials\.A\.boot' is not of type .boolean" "refused: boot = \"yes\" (type error)"
expect_error host-cid-negative "vms\.v\.cid' is not of type" "refused: negative CID (type error)"
expect_error host-source-int "credentials\.A\.source' is not of type .absolute path, as a string" "refused: source = 42 (type error)"
expect_error host-unknown-top "option .services\.vmcred\.host\.enabel' does not exist" "refused: typo 'enabel' (unknown option)"
expect_error host-path-literal-unit "source is a Nix path literal; write it as a string" "refused: rendering units with a path-literal source throws instead of copying"
expect_error guest-mode-bad "credentials\.A\.mode' is not of type" "refused: guest mode 0999 (type error)"
expect_error guest-typo-restartunit "credentials\.A\.restartUnit' does not exist" "refused: guest typo 'restartUnit' (unknown option)"
expect_error guest-timeout-bad "initialSyncTimeout' is not of type" "refused: guest initialSyncTimeout = \"soon\" (type error)"
if out=$(nix-instantiate --read-write-mode --eval --strict -E "($checks_expr).errorCases.control-valid-host" 2>&1) && [ "$out" = true ]; then
  pass "control: the same harness evaluates a valid config"
else
  fail "control: the same harness evaluates a valid config" "$out"
fi

# --- the rendered config against the real binary -------------------------------------
artifact() { eval_json "($checks_expr).artifacts.$1" 2>>"$work/err" | python3 -c 'import json,sys; print(json.load(sys.stdin))'; }
host_toml=$(artifact hostToml)
if [ ! -x "$host_bin" ]; then
  fail "vmcred-host check-config accepts the module's host.toml" "no executable at $host_bin (build it: cargo build --release -p vmcred-host, or set VMCRED_HOST_BIN)"
elif [ -z "$host_toml" ] || [ ! -f "$host_toml" ]; then
  fail "vmcred-host check-config accepts the module's host.toml" "rendered host.toml not found: $(cat "$work/err")"
elif out=$("$host_bin" check-config --config "$host_toml" 2>&1); then
  pass "vmcred-host check-config accepts the module's host.toml"
  for want in "test-vm" "API_KEY" "db-vm" "notify.vsock"; do
    grep -q -- "$want" <<<"$out" || { fail "check-config output names $want" "$out"; continue; }
  done
  grep -q "ENVIRONMENT <- /etc/vmcred/test-vm/environment \[boot\]" <<<"$out" \
    && pass "check-config sees ENVIRONMENT as a boot credential" \
    || fail "check-config sees ENVIRONMENT as a boot credential" "$out"
  # The agent reads each source file itself: check-config must show the
  # very path given as `source`, not a $CREDENTIALS_DIRECTORY name.
  missing_src=""
  for want in "API_KEY <- /run/secrets/vars/test-vm-secrets/api-key" \
              "DB_PASSWORD <- /run/secrets/vars/test-vm-secrets/db-password" \
              "JWT_SECRET <- /run/secrets/vars/test-vm-secrets/jwt-secret" \
              "DB_ROOT <- /run/secrets/db-root [boot]" \
              "weird%name <- /run/secrets/odd%file" \
              "TOKEN <- /run/secrets/token"; do
    grep -qF -- "$want" <<<"$out" || missing_src+="$want"$'\n'
  done
  if [ -z "$missing_src" ] && ! grep -q 'CREDENTIALS_DIRECTORY' <<<"$out"; then
    pass "check-config reads every source as path = <source>"
  else
    fail "check-config reads every source as path = <source>" "missing: $missing_src"$'\n'"$out"
  fi
else
  fail "vmcred-host check-config accepts the module's host.toml" "$out"$'\n'"--- host.toml:"$'\n'"$(cat "$host_toml")"
fi

# --- the launch wrappers, built and run ---------------------------------------------
vmcred=$(artifact vmcred)
check_wrapper() { # artifact binary hypervisor vm real-artifact
  local drv out real expected
  drv=$(artifact "$1")
  real=$(artifact "$5")
  if ! out=$(nix-store --realise "$drv" 2>&1 | tail -1) || [ ! -x "$out/bin/$2" ]; then
    fail "launch wrapper for $4 builds with bin/$2" "$out"
    return
  fi
  pass "launch wrapper for $4 builds with bin/$2"
  expected=$(printf '%s\n' vmcred-host launch --config /etc/vmcred/host.toml --vm "$4" --hypervisor "$3" -- "$real/bin/$2" --cpus 'boot=2' 'a b')
  got=$("$out/bin/$2" --cpus 'boot=2' 'a b' 2>&1)
  if [ "$got" = "$expected" ]; then
    pass "launch wrapper for $4 execs vmcred-host launch -- <real $2> \"\$@\""
  else
    fail "launch wrapper for $4 execs vmcred-host launch -- <real $2> \"\$@\"" "expected:"$'\n'"$expected"$'\n'"got:"$'\n'"$got"
  fi
}
check_wrapper chWrapper cloud-hypervisor cloud-hypervisor test-vm realCloudHypervisor
check_wrapper qemuWrapper qemu-system-x86_64 qemu db-vm realQemu
ch_out=$(nix-store --realise "$(artifact chWrapper)" 2>/dev/null | tail -1)
if [ -n "$ch_out" ] && [ "$(readlink -f "$ch_out/bin/ch-remote")" = "$(readlink -f "$(artifact realCloudHypervisor)/bin/ch-remote")" ]; then
  pass "launch wrapper keeps the real ch-remote (microvm.nix's balloon/shutdown scripts use it)"
else
  fail "launch wrapper keeps the real ch-remote (microvm.nix's balloon/shutdown scripts use it)" "$(ls -l "$ch_out/bin" 2>&1)"
fi

# --- the flake, offline, with stand-in nixpkgs and microvm.nix inputs -------------------
mkdir -p "$work/nixpkgs" "$work/microvm" "$work/repo"
cp -r "$nixpkgs/lib" "$work/nixpkgs/lib"
cp "$here/stub-pkgs.nix" "$work/nixpkgs/stub-pkgs.nix"
cp "$here/flake-stubs/nixpkgs-flake.nix" "$work/nixpkgs/flake.nix"
cp "$here/flake-stubs/microvm-flake.nix" "$work/microvm/flake.nix"
(cd "$repo" && cp --parents flake.nix Cargo.toml Cargo.lock nixos-modules/*.nix tests/nix/vm-test.nix "$work/repo/")
[ -f "$repo/flake.lock" ] && cp "$repo/flake.lock" "$work/repo/"
flake_args=(--no-write-lock-file --override-input nixpkgs "path:$work/nixpkgs" --override-input microvm "path:$work/microvm")

if out=$(nix flake show --json "path:$work/repo" "${flake_args[@]}" 2>&1); then
  missing=$(printf '%s' "$out" | sed -n '/^{/,$p' | python3 -c '
import json, sys
d = json.load(sys.stdin)
want = [("packages", "x86_64-linux", "default"), ("packages", "aarch64-linux", "default"),
        ("nixosModules", "host"), ("nixosModules", "guest"), ("nixosModules", "default"),
        ("overlays", "default"), ("devShells", "x86_64-linux", "default"),
        ("checks", "x86_64-linux", "microvm-rotate"), ("checks", "x86_64-linux", "package")]
for path in want:
    node = d
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    if node is None:
        print("/".join(path))
' 2>&1)
  if [ -z "$missing" ]; then pass "nix flake show: packages, nixosModules, overlays, devShells, checks"
  else fail "nix flake show: packages, nixosModules, overlays, devShells, checks" "missing: $missing"$'\n'"$out"; fi
else
  fail "nix flake show: packages, nixosModules, overlays, devShells, checks" "$out"
fi

if out=$(nix flake check --no-build "path:$work/repo" "${flake_args[@]}" 2>&1); then
  pass "nix flake check --no-build (stand-in nixpkgs)"
else
  fail "nix flake check --no-build (stand-in nixpkgs)" "$out"
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
