#!/usr/bin/env bash
# Renders vmcred-guest.service as nixos-modules/guest.nix makes it, for the
# VM test (tests/vm), which runs the guest agent under exactly this unit on
# Debian guests (systemd 252/257/262).
#
#   tests/nix/render-guest-unit.sh OUT_DIR
#
# Writes:
#   OUT_DIR/vmcred-guest.service  [Unit] and [Service] as NixOS renders them
#       (nixpkgs' own serviceToUnit), plus an [Install] section carrying the
#       unit's wantedBy (NixOS links it into basic.target.wants instead;
#       `systemctl enable` of this file does the same). Placeholders:
#         @VMCRED_GUEST@         the vmcred-guest binary (absolute path)
#         @VMCRED_GUEST_CONFIG@  the guest config (where you put guest.toml)
#       systemctl is /usr/bin/systemctl. Environment="PATH=..." names
#       stand-in store paths; the agent does no PATH lookup.
#   OUT_DIR/guest.toml  the rendered guest agent config.
#   OUT_DIR/vmcred-socket.service.d/vmcred-module.conf  what the module adds
#       to a unit in socketUnits (After=, Wants=, LoadCredential= from the
#       credential socket), as a drop-in for the VM test's own unit.
#   OUT_DIR/vmcred-host.service  the HOST agent's unit as nixos-modules/host.nix
#       renders it for one AF_VSOCK VM (cid 3, port 700: the VM stage's
#       nested proof, tests/vm/nested.sh, which runs the L1 host agent under
#       its CapabilityBoundingSet=).
#
# Sample guest config: credential API_KEY restarts vmcred-consumer.service,
# RELOADED reloads vmcred-reload.service, SOCKET_TOKEN is delivered only
# through the credential socket (deliver = "socket") to vmcred-socket.service,
# which it also reloads; initialSyncTimeout 30s.
# Uses the same nixpkgs lib and stand-ins as tests/nix/run.sh (offline in CI).
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
out=$1
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/nix/common.sh
. "$here/common.sh"
nix_setup

json=$(nix-instantiate --read-write-mode --eval --strict --json -E "
  let
    lib = import $nixpkgs/lib;
    pkgs = import $here/stub-pkgs.nix { inherit lib; };
    c = (lib.evalModules { modules = [
      (import $here/nixos-stub.nix { nixpkgs = $nixpkgs; inherit pkgs; })
      $repo/nixos-modules/guest.nix
      {
        # A Debian guest's systemctl.
        systemd.package = { type = \"derivation\"; name = \"systemd\"; outPath = \"/usr\"; };
        services.vmcred.guest = {
          enable = true;
          initialSyncTimeout = \"30s\";
          credentials.API_KEY.restartUnits = [ \"vmcred-consumer.service\" ];
          credentials.RELOADED.reloadUnits = [ \"vmcred-reload.service\" ];
          credentials.SOCKET_TOKEN = {
            deliver = \"socket\";
            socketUnits = [ \"vmcred-socket.service\" ];
            reloadUnits = [ \"vmcred-socket.service\" ];
          };
        };
      }
    ]; }).config;
    s = c.systemd.services.vmcred-guest;
    sock = c.systemd.services.vmcred-socket;
  in {
    socketUnit = { inherit (sock) after wants; loadCredential = sock.serviceConfig.LoadCredential; };
    unit = c.test.unitText.vmcred-guest;
    wantedBy = s.wantedBy;
    toml = builtins.readFile c.services.vmcred.guest.configFile;
    tomlPath = builtins.unsafeDiscardStringContext \"\${c.services.vmcred.guest.configFile}\";
    bin = builtins.unsafeDiscardStringContext \"\${c.services.vmcred.guest.package}/bin/vmcred-guest\";
    hostUnit = (lib.evalModules { modules = [
      (import $here/nixos-stub.nix { nixpkgs = $nixpkgs; inherit pkgs; })
      $repo/nixos-modules/host.nix
      { services.vmcred.host = { enable = true; vms.vm2 = { cid = 3; port = 700; credentials.API_KEY.source = \"/root/nested/secrets/api-key\"; }; }; }
    ]; }).config.test.unitText.vmcred-host;
  }")

mkdir -p "$out"
python3 - "$out" "$json" <<'PY'
import json, os, sys
out, d = sys.argv[1], json.loads(sys.argv[2])
unit = d["unit"].replace(d["bin"], "@VMCRED_GUEST@").replace(d["tomlPath"], "@VMCRED_GUEST_CONFIG@")
if "/nix/store" in "".join(l for l in unit.splitlines() if l.startswith("ExecStart=")):
    sys.exit("render-guest-unit: ExecStart= still names a store path:\n" + unit)
if d["wantedBy"] and "[Install]" not in unit:
    unit = unit.rstrip("\n") + "\n\n[Install]\nWantedBy=" + " ".join(d["wantedBy"]) + "\n"
open(f"{out}/vmcred-guest.service", "w").write(unit)
open(f"{out}/guest.toml", "w").write(d["toml"])
open(f"{out}/vmcred-host.service", "w").write(d["hostUnit"])
su = d["socketUnit"]
os.makedirs(f"{out}/vmcred-socket.service.d", exist_ok=True)
open(f"{out}/vmcred-socket.service.d/vmcred-module.conf", "w").write(
    "# What nixos-modules/guest.nix adds to a unit in socketUnits.\n[Unit]\n"
    + "".join(f"After={u}\n" for u in su["after"])
    + "".join(f"Wants={u}\n" for u in su["wants"])
    + "\n[Service]\n"
    + "".join(f"LoadCredential={v}\n" for v in su["loadCredential"]))
PY
echo "wrote $out/vmcred-guest.service, $out/guest.toml and $out/vmcred-host.service ($nixpkgs_kind)"
