#!/usr/bin/env bash
# Evaluation tests of the NixOS modules and the flake, offline.
#
# What is real, what is a stand-in (each check's name says which run it is):
# - the nixpkgs module system: the current nixpkgs lib when
#   VMCRED_NIXPKGS_LIB names it (github:nix-community/nixpkgs.lib, plus
#   nixos/lib/), else the 2022 copy shipped as test data by the `nixel` crate
#   (fetched with cargo into tests/nix/.cache, never committed); the systemd
#   unit types (nixos/lib/systemd-*.nix) come from the same tree;
# - microvm.nix: the real one when VMCRED_MICROVM_SRC names a checkout
#   (github:microvm-nix/microvm.nix: its host module, guest module and
#   runners, evaluated as they are), else tests/nix/microvm-stub.nix, a
#   stand-in that follows the real runners for everything vmcred touches;
# - the rest of NixOS: tests/nix/nixos-stub.nix and mini-nixos.nix (the
#   options the modules touch, a freeform sink for the others, fake kernel
#   and store paths); packages: tests/nix/stub-pkgs.nix;
# - the binaries: the real `vmcred-host` (check-config, and `launch
#   --dry-run` run by microvm.nix's own microvm-run as an unprivileged user).
# No NixOS VM boots here; tests/nix/vm-test.nix is for `nix flake check`.
#
# Prints PASS:/FAIL: per check and "N passed, M failed"; exits 77 only if Nix
# cannot be installed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
host_bin="${VMCRED_HOST_BIN:-$repo/target/release/vmcred-host}"
case "$host_bin" in /*) ;; *) host_bin="$repo/$host_bin" ;; esac
guest_bin="${VMCRED_GUEST_BIN:-$repo/target/release/vmcred-guest}"
case "$guest_bin" in /*) ;; *) guest_bin="$repo/$guest_bin" ;; esac

passed=0 failed=0
pass() { echo "PASS: $1"; passed=$((passed + 1)); }
fail() { echo "FAIL: $1"; [ -n "${2:-}" ] && printf '%s\n' "$2" | sed 's/^/    /' | head -40; failed=$((failed + 1)); }

# The host config names launch_users = ["microvm"] (microvm.nix's user),
# which the agent resolves to a uid when it loads the config. This machine has
# no such user: commands that load the config run in a private mount
# namespace whose /etc/passwd adds `microvm` as uid/gid 65534, the
# unprivileged user the launch matrix runs the hypervisor as.
with_microvm_user() {
  if getent passwd microvm >/dev/null 2>&1 || [ "$(id -u)" != 0 ] || ! command -v unshare >/dev/null; then
    "$@"; return
  fi
  local pw="$work/passwd-with-microvm"
  [ -f "$pw" ] || { cat /etc/passwd; echo "microvm:x:65534:65534:microvm.nix hypervisor user (test):/var/lib/microvms:/usr/sbin/nologin"; } > "$pw"
  chmod 644 "$pw"
  unshare -m sh -c 'mount --make-rprivate / && mount --bind "$0" /etc/passwd && exec "$@"' "$pw" "$@"
}

# shellcheck source=tests/nix/common.sh
. "$here/common.sh"
nix_setup; rc=$?
if [ "$rc" = 77 ]; then exit 77; elif [ "$rc" != 0 ]; then echo "FAIL: setting up Nix and nixpkgs lib"; echo "0 passed, 1 failed"; exit 1; fi
echo "using $(nix --version)"
echo "nixpkgs lib: $nixpkgs_kind"
microvm_src="${VMCRED_MICROVM_SRC:-}"
if [ -n "$microvm_src" ]; then
  [ -f "$microvm_src/nixos-modules/host/default.nix" ] || { echo "FAIL: VMCRED_MICROVM_SRC=$microvm_src is not a microvm.nix checkout"; echo "0 passed, 1 failed"; exit 1; }
  microvm_kind="real microvm.nix at $microvm_src$( [ -f "$microvm_src/COMMIT" ] && printf ' (%s)' "$(cat "$microvm_src/COMMIT")" || true)"
  microvm_arg="microvmSrc = $microvm_src;"
else
  microvm_kind="stand-in microvm.nix (tests/nix/microvm-stub.nix)"
  microvm_arg=""
fi
echo "microvm.nix: $microvm_kind"
# Checks that evaluate microvm.nix say which one they ran on.
tag="[$( [ -n "$microvm_src" ] && echo real || echo stand-in ) microvm.nix]"

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

# microvm.nix's host module evaluates `config` VMs through
# "${pkgs.path}/nixos/lib/eval-config.nix": point it at mini-nixos.nix.
standin="$work/nixpkgs-standin"
mkdir -p "$standin/nixos/lib"
cat > "$standin/nixos/lib/eval-config.nix" <<EOF
import $here/mini-nixos.nix {
  nixpkgs = $nixpkgs;
  standinPkgs = import $here/stub-pkgs.nix { lib = import $nixpkgs/lib; path = $standin; };
}
EOF
checks_expr="import $here/checks.nix { nixpkgs = $nixpkgs; standin = $standin; $microvm_arg }"
eval_json() { nix-instantiate --read-write-mode --eval --strict --json -E "$1"; }

if json=$(eval_json "($checks_expr).results" 2>"$work/err"); then
  while IFS=$'\t' read -r ok name detail; do
    if [ "$ok" = true ]; then pass "$tag $name"; else fail "$tag $name" "$detail"; fi
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
expect_error host-source-int "credentials\.A\.source' is not of type .null or \(?absolute path, as a string" "refused: source = 42 (type error)"
expect_error host-unknown-top "option .services\.vmcred\.host\.enabel' does not exist" "refused: typo 'enabel' (unknown option)"
expect_error host-path-literal-unit "source is a Nix path literal; write it as a string" "refused: rendering units with a path-literal source throws instead of copying"
expect_error guest-mode-bad "credentials\.A\.mode' is not of type" "refused: guest mode 0999 (type error)"
expect_error guest-typo-restartunit "credentials\.A\.restartUnit' does not exist" "refused: guest typo 'restartUnit' (unknown option)"
expect_error guest-timeout-bad "initialSyncTimeout' is not of type" "refused: guest initialSyncTimeout = \"soon\" (type error)"
# What the guest agent refuses at boot (guest-agent/src/config.rs) must not evaluate.
expect_error guest-timeout-bare-number "initialSyncTimeout' is not of type .duration with a unit" "refused: guest initialSyncTimeout = \"30\" (the agent needs a unit)"
expect_error guest-mode-0644 "credentials\.A\.mode' is not of type .credential file mode" "refused: guest mode 0644 (the agent allows read bits only)"
expect_error guest-mode-0040 "credentials\.A\.mode' is not of type .credential file mode" "refused: guest mode 0040 (the owner must read)"
expect_error guest-unit-space "restartUnits.*is not of type .systemd unit name" "refused: guest unit name with a space"
expect_error guest-unit-dash "restartUnits.*is not of type .systemd unit name" "refused: guest unit name starting with -"
expect_error guest-deliver-both "credentials\.A\.deliver' is not of type" "refused: guest deliver = \"both\" (one of file, socket)"
expect_error guest-socketunit-slash "socketUnits.*is not of type .systemd unit name" "refused: guest socketUnits with /"
expect_error host-unit-slash "restartUnits.*is not of type .systemd unit name" "refused: host restartUnits with /"
if out=$(nix-instantiate --read-write-mode --eval --strict -E "($checks_expr).errorCases.control-valid-host" 2>&1) && [ "$out" = true ]; then
  pass "control: the same harness evaluates a valid config"
else
  fail "control: the same harness evaluates a valid config" "$out"
fi

# --- the rendered config against the real binary -------------------------------------
artifact() { eval_json "($checks_expr).artifacts.$1" 2>>"$work/err" | python3 -c 'import json,sys; print(json.load(sys.stdin))'; }
host_toml=$(artifact hostToml)
[ -n "$host_toml" ] && nix-store --realise "$host_toml" >/dev/null 2>&1
if [ ! -x "$host_bin" ]; then
  fail "vmcred-host check-config accepts the module's host.toml" "no executable at $host_bin (build it: cargo build --release -p vmcred-host, or set VMCRED_HOST_BIN)"
elif [ -z "$host_toml" ] || [ ! -f "$host_toml" ]; then
  fail "vmcred-host check-config accepts the module's host.toml" "rendered host.toml not found: $(cat "$work/err")"
elif out=$(with_microvm_user "$host_bin" check-config --config "$host_toml" 2>&1); then
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

# The guest module runs the same check at build time (checkConfig): the real
# binary must accept what the module renders, and refuse what it must refuse.
guest_toml=$(artifact guestToml)
[ -n "$guest_toml" ] && nix-store --realise "$guest_toml" >/dev/null 2>&1
if [ ! -x "$guest_bin" ]; then
  fail "vmcred-guest --check-config accepts the module's guest.toml" "no executable at $guest_bin (build it: cargo build --release -p vmcred-guest, or set VMCRED_GUEST_BIN)"
elif [ -z "$guest_toml" ] || [ ! -f "$guest_toml" ]; then
  fail "vmcred-guest --check-config accepts the module's guest.toml" "rendered guest.toml not found: $(cat "$work/err")"
elif out=$("$guest_bin" --check-config --config "$guest_toml" 2>&1) \
    && grep -q "credential JWT_SECRET: mode 0440 restart \[\] reload \[web.service\]" <<<"$out"; then
  pass "vmcred-guest --check-config accepts the module's guest.toml"
else
  fail "vmcred-guest --check-config accepts the module's guest.toml" "$out"$'\n'"--- guest.toml:"$'\n'"$(cat "$guest_toml")"
fi
if [ -x "$guest_bin" ]; then
  printf '[credentials.".X.vmcred-tmp"]\n' > "$work/bad-guest.toml"
  if out=$("$guest_bin" --check-config --config "$work/bad-guest.toml" 2>&1); then
    fail "vmcred-guest --check-config refuses a temp-file-shaped name" "$out"
  else
    pass "vmcred-guest --check-config refuses a temp-file-shaped name"
  fi
fi

# --- a template instance in socketUnits, through NixOS's own generateUnits ---------
# The guest module's unit for "getty@tty1.service" (socketUnits), built by
# nixos/lib/systemd-lib.nix's generateUnits next to a package shipping
# getty@.service: it must be a drop-in, not a whole unit hiding the template.
tmpl_step="guest socket: generateUnits writes getty@tty1.service.d/overrides.conf (LoadCredential=) and no getty@tty1.service over the template"
if tmpl_out=$(nix-store --realise "$(artifact templateInstanceUnits)" 2>&1 | tail -1) && [ -d "$tmpl_out" ] \
   && grep -qx 'LoadCredential=API_KEY:/run/vmcred/creds.sock' "$tmpl_out/getty@tty1.service.d/overrides.conf" 2>/dev/null \
   && [ ! -e "$tmpl_out/getty@tty1.service" ] && [ -e "$tmpl_out/getty@.service" ]; then
  pass "$tmpl_step"
else
  fail "$tmpl_step" "$tmpl_out"$'\n'"$(cd "$tmpl_out" 2>/dev/null && find . | sort)"
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
  expected=$(printf '%s\n' vmcred-host launch --config /etc/vmcred/host.toml --vm "$4" --hypervisor "$3" --argv0 "microvm@$4" -- "$real/bin/$2" --cpus 'boot=2' 'a b')
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

# --- every hypervisor microvm.nix runs with vsock -------------------------------------
# The README's seeds setup: the first nix block after its heading.
awk '/^### Host: a microvm.nix VM/{f=1} f&&/^```nix/{g=1; next} g&&/^```/{exit} g' "$repo/README.md" > "$work/readme-snippet.nix"
hv_expr="import $here/hypervisors.nix { nixpkgs = $nixpkgs; standin = $standin; readmeSnippet = $work/readme-snippet.nix; $microvm_arg }"
if hv_json=$(nix-instantiate --read-write-mode --eval --strict --json -E "$hv_expr" 2>"$work/hv-err"); then
  pass "$tag the module evaluates for qemu (-M microvm, q35), cloud-hypervisor (two vsock forms), firecracker, crosvm, kvmtool, alioth"
  printf '%s' "$hv_json" > "$work/hv.json"
  python3 "$here/hypervisors-check.py" "$work/hv.json" > "$work/hv-results"
  while IFS=$'\t' read -r st name detail; do
    if [ "$st" = PASS ]; then pass "$tag $name"; else fail "$tag $name" "$(printf '%s' "$detail" | tr '|' '\n')"; fi
  done < "$work/hv-results"

  # The agent's config as rendered for all of them, to the real binary.
  hv_toml="$work/hv-host.toml"
  python3 -c 'import json,sys; open(sys.argv[2], "w").write(json.load(open(sys.argv[1]))["hostTomlText"])' "$work/hv.json" "$hv_toml"
  if [ -x "$host_bin" ] && out=$(with_microvm_user "$host_bin" check-config --config "$hv_toml" 2>&1); then
    pass "$tag vmcred-host check-config accepts host.toml with every hypervisor (launch_users = [\"microvm\"])"
  else
    fail "$tag vmcred-host check-config accepts host.toml with every hypervisor (launch_users = [\"microvm\"])" "${out:-no executable at $host_bin}"$'\n'"$(cat "$hv_toml")"
  fi

  # Each VM's microvm-run, as microvm@<vm>.service runs it, as uid 65534.
  if [ "$(id -u)" != 0 ] || ! command -v setpriv >/dev/null; then
    fail "$tag launch matrix" "needs root and setpriv to run microvm-run as an unprivileged user"
  elif [ ! -x "$host_bin" ]; then
    fail "$tag launch matrix" "no executable at $host_bin"
  else
    mx="$work/matrix"; mkdir -p "$mx/state"; chmod 755 "$work" "$mx"
    # The rendered host.toml with state_dir pointing at a pin the test made.
    printf 'sha256:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$mx/state/host.pin"
    chmod 755 "$mx/state"; chmod 644 "$mx/state/host.pin"
    sed "s|^state_dir = .*|state_dir = \"$mx/state\"|" "$hv_toml" > "$mx/host.toml"; chmod 644 "$mx/host.toml"
    python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1]))["cases"], open(sys.argv[2], "w"))' "$work/hv.json" "$mx/cases.json"
    with_microvm_user python3 "$here/launch-matrix.py" "$mx/cases.json" "$host_bin" "$mx/host.toml" "$mx" > "$work/matrix-out" 2>&1
    while IFS= read -r line; do
      case "$line" in
        "PASS: "*) pass "$tag ${line#PASS: }" ;;
        "FAIL: "*) fail "$tag ${line#FAIL: }" ;;
        *) echo "$line" ;;
      esac
    done < "$work/matrix-out"
  fi
else
  fail "$tag the module evaluates for every hypervisor" "$(tail -30 "$work/hv-err")"
fi

# --- host.toml is checked at build time by the real binary ---------------------------
# services.vmcred.host.package: a package whose bin/vmcred-host is the real
# binary; the module's configFile derivation runs its check-config.
build_host_toml() { # extra-settings-nix
  local drv
  drv=$(nix-instantiate --read-write-mode --eval --strict --json -E "
    let
      lib = import $nixpkgs/lib;
      pkgs = import $here/stub-pkgs.nix { inherit lib; };
      real = derivation {
        name = \"vmcred-real\"; system = builtins.currentSystem; builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\";
        args = [ \"-c\" \"mkdir -p \$out/bin; ln -s $host_bin \$out/bin/vmcred-host\" ];
      };
      c = (lib.evalModules { modules = [
        (import $here/nixos-stub.nix { nixpkgs = $nixpkgs; inherit pkgs; })
        $repo/nixos-modules/host.nix
        { services.vmcred.host = { enable = true; package = real; vms.v = { cid = 3; credentials.A.source = \"/run/secrets/a\"; }; } // $1; }
      ]; }).config;
    in builtins.unsafeDiscardStringContext c.services.vmcred.host.configFile.drvPath" 2>&1 | tr -d '"') || { echo "$drv"; return 2; }
  nix-store --realise "$drv" 2>&1
}
if [ ! -x "$host_bin" ]; then
  fail "host.toml is checked at build time by vmcred-host check-config" "no executable at $host_bin"
else
  if out=$(build_host_toml '{ }'); then
    pass "host.toml is checked at build time by vmcred-host check-config: a valid one builds"
  else
    fail "host.toml is checked at build time by vmcred-host check-config: a valid one builds" "$out"
  fi
  if out=$(build_host_toml '{ settings.poll_interval = "soon"; }'); then
    fail "host.toml is checked at build time: one the agent refuses (poll_interval = \"soon\") does not build" "$out"
  elif grep -q "poll_interval" <<<"$out"; then
    pass "host.toml is checked at build time: one the agent refuses (poll_interval = \"soon\") does not build"
  else
    fail "host.toml is checked at build time: one the agent refuses (poll_interval = \"soon\") does not build" "$out"
  fi
fi

# --- the real agent under the capability bounding set the module renders ----------------
# The unit with every capability the module grants (an AF_VSOCK VM, a hybrid
# VM, control_group and the metrics socket: tests/nix/checks.nix
# fullCapsUnit): its CapabilityBoundingSet= lines become setpriv's bounding
# set, and `vmcred-host serve` runs under it as root with a config that has a
# control_group, as systemd would start it. It must give control.sock and
# metrics.sock to the group and keep serving. The same run without CAP_CHOWN
# (the set before it was added) must fail, or this step proves nothing.
# The VM is a plain Unix-socket target: no AF_VSOCK socket is ever opened
# here, so CAP_NET_BIND_SERVICE is proven by checks.nix's assertions and the
# VM stage only. The seccomp half (SystemCallFilter=) cannot be reproduced by
# setpriv: checks.nix asserts the lines and their order, and
# systemd-analyze (when present) resolves @chown here.
caps_step="the real vmcred-host serve under the rendered unit's CapabilityBoundingSet= gives control.sock/metrics.sock to control_group and stays up"
caps_skip() { # reason
  if [ "${CI:-}" = true ]; then fail "$caps_step" "cannot run: $1"; else echo "SKIP: $caps_step: $1"; fi
}
caps_unit=$(artifact hostUnitAllCaps)
cap_names=$(printf '%s\n' "$caps_unit" | sed -n 's/^CapabilityBoundingSet=//p' | tr ' ' '\n' | sed '/^$/d')
grp_gid=$(getent group nogroup 2>/dev/null | cut -d: -f3)
if [ -z "$cap_names" ]; then
  fail "$caps_step" "no CapabilityBoundingSet= in the rendered unit: $(cat "$work/err")"$'\n'"$caps_unit"
elif [ "$(id -u)" != 0 ]; then
  caps_skip "needs root (the agent runs as root under the unit)"
elif ! command -v setpriv >/dev/null; then
  caps_skip "setpriv (util-linux) is not installed"
elif [ ! -x "$host_bin" ]; then
  fail "$caps_step" "no executable at $host_bin"
elif [ -z "$grp_gid" ]; then
  caps_skip "this host has no group 'nogroup' to give the sockets to"
elif id -G | tr ' ' '\n' | grep -qx "$grp_gid"; then
  caps_skip "root is a member of nogroup here (the chown would need no capability)"
else
  # CAP_DAC_READ_SEARCH -> +dac_read_search, ...
  bset="-all$(printf '%s\n' "$cap_names" | sed 's/^CAP_//' | tr '[:upper:]' '[:lower:]' | sed 's/^/,+/' | tr -d '\n')"
  # The agent's CapBnd as /proc shows it, from linux/capability.h's numbers
  # of the capabilities the module may grant (a new one must be added here).
  want_bnd=$(printf '%s\n' "$cap_names" | python3 -c '
import sys
num = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_NET_BIND_SERVICE": 10}
print(format(sum(1 << num[c] for c in sys.stdin.read().split()), "016x"))' 2>&1)
  run_capped() { # dir bounding-set: starts the agent, sets $agent_pid
    local d=$1
    mkdir -p "$d/run"; chmod 755 "$d"
    printf '%s\n' "state_dir = \"$d/state\"" "control_socket = \"$d/run/control.sock\"" \
      "launch_socket = \"$d/run/launch.sock\"" "metrics_socket = \"$d/run/metrics.sock\"" \
      'control_group = "nogroup"' 'poll_interval = "0s"' '[vms.a]' "unix_socket = \"$d/absent.sock\"" > "$d/host.toml"
    setpriv --bounding-set "$2" --inh-caps -all --no-new-privs "$host_bin" serve --config "$d/host.toml" > "$d/serve.log" 2>&1 &
    agent_pid=$!
  }
  # Bounded wait for the event: both sockets in place, or the agent gone.
  wait_sockets() { # dir pid
    for _ in $(seq 300); do
      [ -S "$1/run/control.sock" ] && [ -S "$1/run/metrics.sock" ] && return 0
      kill -0 "$2" 2>/dev/null || return 1
      sleep 0.1
    done
    return 1
  }
  cd_ok="$work/caps-ok"; run_capped "$cd_ok" "$bset"; ok_pid=$agent_pid
  detail=""
  if ! wait_sockets "$cd_ok" "$ok_pid"; then
    detail="the agent did not come up under --bounding-set $bset"
  elif [ "$(stat -c %g "$cd_ok/run/control.sock")" != "$grp_gid" ] || [ "$(stat -c %g "$cd_ok/run/metrics.sock")" != "$grp_gid" ]; then
    detail="sockets not given to nogroup: $(stat -c '%n %U:%G %a' "$cd_ok"/run/*.sock)"
  else
    # Still serving: a status answered over the control socket (exit 1:
    # VM a is out of sync, its socket does not exist), and still running.
    st=$("$host_bin" status --config "$cd_ok/host.toml" 2>&1)
    if ! grep -q '^a ' <<<"$st"; then detail="status over control.sock did not answer: $st"
    elif ! kill -0 "$ok_pid" 2>/dev/null; then detail="the agent exited after start"
    elif [ "$(sed -n 's/^CapBnd:[[:space:]]*//p' "/proc/$ok_pid/status")" != "$want_bnd" ]; then
      detail="the agent's CapBnd is $(grep CapBnd: "/proc/$ok_pid/status"), expected $want_bnd"
    fi
  fi
  if [ -z "$detail" ]; then
    pass "$caps_step (--bounding-set $bset)"
  else
    fail "$caps_step" "$detail"$'\n'"$(cat "$cd_ok/serve.log")"
  fi
  kill "$ok_pid" 2>/dev/null; wait "$ok_pid" 2>/dev/null
  # Control: the same set without CAP_CHOWN (the unit before it was fixed).
  no_chown=${bset//,+chown/}
  cd_no="$work/caps-nochown"; run_capped "$cd_no" "$no_chown"; no_pid=$agent_pid
  no_step="control: without CAP_CHOWN (--bounding-set $no_chown) the same agent exits: cannot give control.sock to group nogroup"
  if wait_sockets "$cd_no" "$no_pid"; then
    kill "$no_pid" 2>/dev/null; wait "$no_pid" 2>/dev/null
    fail "$no_step" "it came up: this step would not catch a missing CAP_CHOWN"$'\n'"$(cat "$cd_no/serve.log")"
  else
    # Gone (wait_sockets saw it exit) or hung at start: a bounded wait either way.
    kill "$no_pid" 2>/dev/null; wait "$no_pid" 2>/dev/null; no_rc=$?
    if [ "$no_chown" != "$bset" ] && [ "$no_rc" != 0 ] && grep -q "cannot give .*control.sock to group nogroup" "$cd_no/serve.log"; then
      pass "$no_step"
    else
      fail "$no_step" "exit $no_rc"$'\n'"$(cat "$cd_no/serve.log")"
    fi
  fi
fi
# The rendered SystemCallFilter= lines, resolved by systemd's own tables:
# chown and fchownat (what chown(2) is on x86_64/aarch64) are allowed.
sc_step="the rendered SystemCallFilter= (with control_group) allows chown/fchownat: @chown added after ~@privileged"
sc_lines=$(printf '%s\n' "$caps_unit" | sed -n 's/^SystemCallFilter=//p')
# systemd-analyze comes with Debian's systemd package (a container may lack it).
if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing systemd (for systemd-analyze syscall-filter) ..." >&2
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd; } >/dev/null 2>&1
fi
if [ "$sc_lines" != $'@system-service\n~@privileged\n@chown' ]; then
  fail "$sc_step" "rendered: $sc_lines"
elif ! command -v systemd-analyze >/dev/null; then
  if [ "${CI:-}" = true ]; then fail "$sc_step" "cannot run: systemd-analyze is not installed"; else echo "SKIP: $sc_step: systemd-analyze is not installed"; fi
elif sc_out=$(python3 - "$sc_lines" 2>&1 <<'PY'
import subprocess, sys
def group(name):
    # `systemd-analyze syscall-filter @g` lists its members; nested groups
    # (lines starting with @) are expanded recursively.
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], check=True,
                         capture_output=True, text=True).stdout
    names = set()
    for line in out.splitlines():
        w = line.strip()
        if not w or w.startswith("#") or w == name:
            continue
        names |= group(w) if w.startswith("@") else {w}
    return names
lines = sys.argv[1].split("\n")
# systemd.exec(5): the first line decides (an allow list); each later line
# adds to it, or removes from it with ~, in order.
allowed = set()
for i, l in enumerate(lines):
    deny = l.startswith("~")
    items = set()
    for w in l.lstrip("~").split():
        items |= group(w) if w.startswith("@") else {w}
    if i == 0 and deny:
        sys.exit("first line is a deny list; this check expects an allow list")
    allowed = allowed - items if deny else allowed | items
missing = [s for s in ("chown", "fchown", "fchownat") if s not in allowed]
leaked = [s for s in ("setuid", "mount", "init_module", "reboot") if s in allowed]
if missing or leaked:
    sys.exit(f"missing {missing}, still allowed from @privileged {leaked}")
print(len(allowed))
PY
); then
  pass "$sc_step ($sc_out system calls, none of @privileged's others)"
else
  fail "$sc_step" "$sc_out"
fi

# --- the guest unit as the VM test runs it --------------------------------------------
if out=$("$here/render-guest-unit.sh" "$work/render" 2>&1) \
   && grep -Eqx "ExecStart=@VMCRED_GUEST@ --config @VMCRED_GUEST_CONFIG@ --credentials-dir '?/run/credentials/@system'? --systemctl /usr/bin/systemctl" "$work/render/vmcred-guest.service" \
   && grep -qx 'CapabilityBoundingSet=CAP_NET_BIND_SERVICE' "$work/render/vmcred-guest.service" \
   && [ "$(grep -c '^\[Install\]' "$work/render/vmcred-guest.service")" = 1 ] \
   && grep -qx 'WantedBy=basic.target' "$work/render/vmcred-guest.service" \
   && grep -q 'restart_units = \["vmcred-consumer.service"\]' "$work/render/guest.toml" \
   && [ "$(sed -n 's/^CapabilityBoundingSet=//p' "$work/render/vmcred-host.service" | tr '\n' ' ')" = "CAP_DAC_READ_SEARCH CAP_NET_BIND_SERVICE " ]; then
  pass "render-guest-unit.sh: the unit as NixOS renders it, with placeholders, [Install] and guest.toml; the host unit for the nested proof (one AF_VSOCK VM)"
else
  fail "render-guest-unit.sh: the unit as NixOS renders it, with placeholders, [Install] and guest.toml; the host unit for the nested proof (one AF_VSOCK VM)" "$out"$'\n'"$(cat "$work/render/vmcred-guest.service" "$work/render/vmcred-host.service" 2>&1)"
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
        ("packages", "x86_64-linux", "vmcred-guest"), ("packages", "aarch64-linux", "vmcred-guest"),
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
  if [ -z "$missing" ]; then pass "nix flake show: packages (default, vmcred-guest), nixosModules, overlays, devShells, checks"
  else fail "nix flake show: packages (default, vmcred-guest), nixosModules, overlays, devShells, checks" "missing: $missing"$'\n'"$out"; fi
else
  fail "nix flake show: packages (default, vmcred-guest), nixosModules, overlays, devShells, checks" "$out"
fi

if out=$(nix flake check --no-build "path:$work/repo" "${flake_args[@]}" 2>&1); then
  pass "nix flake check --no-build (stand-in nixpkgs)"
else
  fail "nix flake check --no-build (stand-in nixpkgs)" "$out"
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
