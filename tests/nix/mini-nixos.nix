# Stand-in for nixpkgs' nixos/lib/eval-config.nix, which the REAL
# microvm.nix host module calls for every `microvm.vms.<name>.config` VM
# (host/options.nix: import "${config.nixpkgs}/nixos/lib/eval-config.nix").
# A full NixOS is not available offline (nixpkgs is not on a registry), so
# the VM is evaluated with:
#   - nixos-stub.nix: the real module system and systemd unit types, and the
#     NixOS options vmcred's modules touch;
#   - a freeform sink (types.anything) for every other NixOS option that
#     microvm.nix's guest modules define (boot.initrd, fileSystems, ...),
#     so their definitions evaluate as written;
#   - fixtures for what only a real NixOS build would produce: the kernel,
#     the initrd path, the toplevel and the store disk (fake store paths).
# Everything under `microvm.*` (options, runners, declaredRunner) is the
# real microvm.nix code the host module imports.
{ nixpkgs, standinPkgs }:
{ modules
, prefix ? [ ]
, extraModules ? [ ]
, specialArgs ? { }
, pkgs ? null
, ...
}:

let
  lib = import (nixpkgs + "/lib");
  thePkgs = if pkgs != null then pkgs else standinPkgs;
in
lib.evalModules {
  inherit prefix specialArgs;
  modules = [
    (import ./nixos-stub.nix { inherit nixpkgs; pkgs = thePkgs; })
    ({ lib, ... }: {
      config._module.freeformType = lib.types.lazyAttrsOf lib.types.anything;
      # Declared here because a freeform value next to a declared option
      # (networking.hostName) is merged as a whole, and microvm.nix defines
      # this one from the host name (system.nix): a real NixOS declares it.
      options.networking.hostId = lib.mkOption { type = lib.types.nullOr lib.types.str; default = null; };
      # Lists several of microvm.nix's modules define (types.anything does
      # not concatenate lists), declared as NixOS declares them.
      options.boot.kernelParams = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; };
      # microvm.nix tests `options.system ? switch`: the namespace must exist.
      options.system.build = lib.mkOption { type = lib.types.lazyAttrsOf lib.types.anything; default = { }; };
    })
    ./microvm-fixtures.nix
  ] ++ modules ++ extraModules;
}
