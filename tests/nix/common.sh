# Sourced by tests/nix/*.sh: finds Nix and the nixpkgs sources to evaluate
# against, installing/fetching what is missing.
#
# Sets: nixpkgs  a directory with lib/ and nixos/lib/ (the nixpkgs module
#                system and the systemd unit types);
#       nixpkgs_kind  "real (<where>)" or "stand-in (...)", for the reports.
# Environment:
#   VMCRED_NIXPKGS_LIB  a current nixpkgs tree: lib/ (e.g. from
#                       github:nix-community/nixpkgs.lib) plus nixos/lib/
#                       (utils.nix, systemd-lib.nix, systemd-types.nix,
#                       systemd-unit-options.nix from NixOS/nixpkgs).
#   Without it: the 2022 nixpkgs lib/ and nixos/lib/ shipped as test data in
#   the `nixel` crate (cargo fetches it from crates.io into tests/nix/.cache).
# Returns 77 from nix_setup when Nix cannot be installed.

nix_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
nix_cache="$nix_here/.cache"

export NIX_CONFIG=$'experimental-features = nix-command flakes\nsubstituters =\nbuild-users-group =\nwarn-dirty = false\nsandbox = false'

nix_at_least() { # VERSION
  local have
  have=$(nix-instantiate --version 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -1)
  [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$1" "$have" | sort -V | head -1)" = "$1" ]
}

# Debian trixie's nix-bin through a PRIVATE sources list (the machine's own
# apt configuration is left as it is), from the mirror that configuration uses.
nix_install_trixie() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  local mirror dir opts
  mirror=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*debian\)\/*[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
  [ -n "$mirror" ] || mirror=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\(http[^[:space:]]*debian\)\/*[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -1)
  [ -n "$mirror" ] || return 1
  dir="$nix_cache/apt"; mkdir -p "$dir/lists/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$dir/trixie.list"
  opts=(-o "Dir::Etc::sourcelist=$dir/trixie.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$dir/lists" -o DPkg::Lock::Timeout=300)
  echo "installing nix-bin from Debian trixie ($mirror, private sources list) ..." >&2
  apt-get "${opts[@]}" update >/dev/null 2>&1 \
    && DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y --no-install-recommends -t trixie nix-bin >/dev/null 2>&1 \
    && nix_at_least 2.18
}

nix_setup() {
  if ! command -v nix-instantiate >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing nix-bin (Debian) ..." >&2
      apt-get update >/dev/null 2>&1
      DEBIAN_FRONTEND=noninteractive apt-get install -y nix-bin >/dev/null 2>&1
    fi
    if ! command -v nix-instantiate >/dev/null 2>&1; then
      echo "SKIP: nix-bin is not installed and could not be installed (needs root and apt-get)" >&2
      return 77
    fi
  fi

  if [ -n "${VMCRED_NIXPKGS_LIB:-}" ] && ! nix_at_least 2.18; then
    # A current nixpkgs lib needs Nix >= 2.18; Debian bookworm has 2.8.
    nix_install_trixie || { echo "VMCRED_NIXPKGS_LIB needs Nix >= 2.18; have $(nix --version 2>&1)" >&2; return 1; }
  fi
  if [ -n "${VMCRED_NIXPKGS_LIB:-}" ]; then
    nixpkgs=$VMCRED_NIXPKGS_LIB
    for f in lib/default.nix nixos/lib/utils.nix nixos/lib/systemd-lib.nix nixos/lib/systemd-types.nix nixos/lib/systemd-unit-options.nix; do
      [ -f "$nixpkgs/$f" ] || { echo "VMCRED_NIXPKGS_LIB=$nixpkgs has no $f" >&2; return 1; }
    done
    nixpkgs_kind="real: nixpkgs lib at $nixpkgs"
    if [ -f "$nixpkgs/COMMIT" ]; then nixpkgs_kind+=" ($(cat "$nixpkgs/COMMIT"))"; fi
    return 0
  fi

  nixpkgs="$nix_cache/nixpkgs"
  nixpkgs_kind="stand-in: 2022 nixpkgs lib from the nixel 5.2.0 crate"
  if [ ! -f "$nixpkgs/lib/default.nix" ] || [ ! -f "$nixpkgs/nixos/lib/systemd-unit-options.nix" ]; then
    mkdir -p "$nix_cache/fetch/src"
    cat > "$nix_cache/fetch/Cargo.toml" <<'TOML'
[package]
name = "nixel-fetch"
version = "0.0.0"
edition = "2021"

[workspace]

[dependencies]
nixel = "=5.2.0"
TOML
    echo 'fn main() {}' > "$nix_cache/fetch/src/main.rs"
    (cd "$nix_cache/fetch" && cargo fetch --quiet) || { echo "cargo fetch of nixel 5.2.0 failed" >&2; return 1; }
    local crate tmp
    crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/nixel-5.2.0.crate 2>/dev/null | head -1)
    [ -n "$crate" ] || { echo "nixel-5.2.0.crate not found in the cargo cache" >&2; return 1; }
    tmp=$(mktemp -d)
    tar xzf "$crate" -C "$tmp" nixel-5.2.0/tests/inputs/nixpkgs/lib nixel-5.2.0/tests/inputs/nixpkgs/nixos/lib
    rm -rf "$nixpkgs"
    mv "$tmp/nixel-5.2.0/tests/inputs/nixpkgs" "$nixpkgs"
    rm -rf "$tmp"
  fi
}
