# Stand-in for microvm.nix: declares only the options the vmcred host module
# touches, with the same names and types as microvm.nix's
# nixos-modules/host/options.nix and nixos-modules/microvm/options.nix.
# A VM's `config` is evaluated like microvm.nix does (all definitions become
# modules of the guest's own evaluation), here with the NixOS stand-in.
{ nixpkgs, pkgs }:
{ lib, ... }:

let
  inherit (lib) mkOption types;

  guestOptions = { config, ... }: {
    options.microvm = {
      hypervisor = mkOption {
        type = types.enum [ "qemu" "cloud-hypervisor" "firecracker" "crosvm" "kvmtool" "stratovirt" "alioth" ];
        default = "qemu";
      };
      vsock.cid = mkOption { type = types.nullOr types.int; default = null; };
      cloud-hypervisor.package = mkOption { type = types.package; default = pkgs.cloud-hypervisor; };
      qemu.package = mkOption { type = types.package; default = pkgs.qemu_kvm; };
    };
  };
in
{
  options.microvm = {
    host.enable = mkOption { type = types.bool; default = true; };
    stateDir = mkOption { type = types.path; default = "/var/lib/microvms"; };
    vms = mkOption {
      default = { };
      description = "The MicroVMs that shall be built declaratively with the host NixOS.";
      type = types.attrsOf (types.submodule ({ name, ... }: {
        options = {
          config = mkOption {
            default = null;
            type = types.nullOr (lib.mkOptionType {
              name = "Toplevel NixOS config";
              merge = loc: defs: lib.evalModules {
                modules = [
                  (import ./nixos-stub.nix { inherit nixpkgs pkgs; })
                  guestOptions
                  { networking.hostName = lib.mkDefault name; }
                ] ++ map (x: x.value) defs;
              };
            });
          };
          flake = mkOption { type = types.nullOr types.path; default = null; };
          autostart = mkOption { type = types.bool; default = true; };
        };
      }));
    };
  };
}
