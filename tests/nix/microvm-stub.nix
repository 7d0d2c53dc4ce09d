# Stand-in for microvm.nix's host module (nixos-modules/host), for CI, which
# cannot fetch microvm.nix. Rebuilt from the real files at commit 71beea0
# (host/options.nix, host/default.nix) for what vmcred touches:
# - microvm.vms.<name>: `config` evaluated like microvm.nix does it, with
#   "${config.nixpkgs}/nixos/lib/eval-config.nix" (nixpkgs defaults to
#   pkgs.path; run.sh points that at mini-nixos.nix) and the guest module
#   (here ./microvm-stub-guest.nix), `networking.hostName` defaulting to the
#   VM's name, prefix microvm.vms.<name>.config; `evaluatedConfig`, `flake`,
#   `pkgs`, `specialArgs`, `extraModules`, `autostart`, `restartIfChanged`;
# - the units: the `microvm@` template (User=microvm, Group=kvm,
#   WorkingDirectory=/var/lib/microvms/%i, ExecStart=.../current/bin/microvm-run)
#   and one `microvm@<name>` drop-in per VM (overrideStrategy = "asDropin",
#   Type from the runner's supportsNotifySocket), guestConfig read from
#   flake, evaluatedConfig or config, in that order.
{ nixpkgs, pkgs }:
{ config, lib, options, ... }:

let
  inherit (lib) mkOption types;
  stateDir = config.microvm.stateDir;
  user = "microvm";
  group = "kvm";
  # The real systemd unit options have overrideStrategy since 2023; the
  # 2022 nixpkgs copy used in CI has not.
  hasOverrideStrategy = options.systemd.services.type.getSubOptions [ ] ? overrideStrategy;
  guestConfigOf = name:
    let vm = config.microvm.vms.${name}; in
    if vm.flake != null then vm.flake.nixosConfigurations.${name}.config
    else if vm.evaluatedConfig != null then vm.evaluatedConfig.config
    else vm.config.config;
in
{
  options.microvm = {
    host.enable = mkOption { type = types.bool; default = true; };
    stateDir = mkOption { type = types.path; default = "/var/lib/microvms"; };
    autostart = mkOption { type = types.listOf types.str; default = [ ]; };
    vms = mkOption {
      default = { };
      type = types.attrsOf (types.submodule ({ config, name, ... }: {
        options = {
          evaluatedConfig = mkOption { type = types.nullOr types.unspecified; default = null; };
          config = mkOption {
            default = null;
            type = types.nullOr (lib.mkOptionType {
              name = "Toplevel NixOS config";
              merge = loc: defs: (import "${toString config.nixpkgs}/nixos/lib/eval-config.nix" {
                modules = [
                  ({ lib, ... }: { config.networking.hostName = lib.mkDefault name; })
                  ./microvm-stub-guest.nix
                ] ++ map (x: x.value) defs;
                prefix = [ "microvm" "vms" name "config" ];
                inherit (config) extraModules specialArgs pkgs;
              });
            });
          };
          nixpkgs = mkOption { type = types.path; default = if config.pkgs != null then config.pkgs.path else pkgs.path; };
          pkgs = mkOption { type = types.nullOr types.unspecified; default = null; };
          specialArgs = mkOption { type = types.attrsOf types.unspecified; default = { }; };
          extraModules = mkOption { type = types.listOf types.unspecified; default = [ ]; };
          flake = mkOption { type = types.nullOr types.path; default = null; };
          autostart = mkOption { type = types.bool; default = true; };
          restartIfChanged = mkOption { type = types.bool; default = config.config != null; };
        };
      }));
    };
  };

  config = lib.mkIf config.microvm.host.enable {
    assertions = lib.concatMap (vmName: [{
      assertion = config.microvm.vms.${vmName}.config != null -> config.microvm.vms.${vmName}.flake == null;
      message = "vm ${vmName}: Fully-declarative VMs cannot also set a flake!";
    }]) (builtins.attrNames config.microvm.vms);

    systemd.services = builtins.foldl' (acc: name: acc // {
      "microvm@${name}" = {
        restartTriggers = [ (guestConfigOf name).system.build.toplevel ];
        serviceConfig.Type =
          if (guestConfigOf name).microvm.declaredRunner.supportsNotifySocket then "notify" else "simple";
      } // lib.optionalAttrs hasOverrideStrategy { overrideStrategy = "asDropin"; };
    }) {
      "microvm@" = {
        description = "MicroVM '%i'";
        unitConfig.ConditionPathExists = "${stateDir}/%i/current/bin/microvm-run";
        restartIfChanged = false;
        serviceConfig = {
          Type = "simple";
          WorkingDirectory = "${stateDir}/%i";
          ExecStart = "${stateDir}/%i/current/bin/microvm-run";
          ExecStop = "${stateDir}/%i/booted/bin/microvm-shutdown";
          Restart = "always";
          RestartSec = "5s";
          User = user;
          Group = group;
          SyslogIdentifier = "microvm@%i";
          LimitNOFILE = 1048576;
          NotifyAccess = "all";
          LimitMEMLOCK = "infinity";
        };
      };
    } (builtins.attrNames config.microvm.vms);
  };
}
