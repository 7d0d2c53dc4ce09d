# The slice of NixOS the vmcred modules touch, declared with the real nixpkgs
# module system and the real systemd unit types (nixos/lib/utils.nix,
# systemd-lib.nix, systemd-unit-options.nix, systemd-types.nix).
{ nixpkgs, pkgs }:
{ config, lib, ... }:

let
  inherit (lib) mkOption types;
  utils = import (nixpkgs + "/nixos/lib/utils.nix") { inherit lib config pkgs; };
in
{
  config._module.args = { inherit pkgs utils; };

  options = {
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    networking.hostName = mkOption { type = types.str; default = "nixos"; };
    boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
    environment.etc = mkOption {
      default = { };
      type = types.attrsOf (types.submodule {
        options.source = mkOption { type = types.path; };
        options.text = mkOption { type = types.nullOr types.lines; default = null; };
      });
    };
    systemd.package = mkOption { type = types.package; default = pkgs.systemd; };
    systemd.globalEnvironment = mkOption { type = types.attrsOf types.str; default = { }; };
    systemd.services = mkOption { type = utils.systemdUtils.types.services; default = { }; };
    systemd.targets = mkOption { type = utils.systemdUtils.types.targets; default = { }; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
    services.udev.extraRules = mkOption { type = types.lines; default = ""; };

    # What a test reads back: rendered unit files and failed assertions.
    test.unitText = mkOption { type = types.unspecified; readOnly = true; };
    test.failedAssertions = mkOption { type = types.unspecified; readOnly = true; };
    # How NixOS's generateUnits would write each service: asDropinIfExists
    # (a whole unit unless a package ships one of that exact name) or
    # asDropin (<name>.service.d/overrides.conf).
    test.overrideStrategy = mkOption { type = types.unspecified; readOnly = true; };
  };

  config.test = {
    unitText = lib.mapAttrs (n: d: (utils.systemdUtils.lib.serviceToUnit n d).text) config.systemd.services;
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    overrideStrategy = lib.mapAttrs (n: d: (utils.systemdUtils.lib.serviceToUnit n d).overrideStrategy) config.systemd.services;
  };
}
