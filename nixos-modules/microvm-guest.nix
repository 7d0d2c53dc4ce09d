# vmcred's launch wrapper in a microvm.nix guest's runner.
#
# Imported into a VM's NixOS configuration next to microvm.nix's own guest
# module (nixos-modules/microvm): vmcred's host module adds it to
# `microvm.vms.<name>.config` VMs; a VM given as `evaluatedConfig` or
# `flake` imports it itself (vmcred's flake: nixosModules.microvm-guest,
# which also imports the guest agent module).
#
# How: microvm.nix builds the runner (`microvm.declaredRunner`) from
# `microvm.<hypervisor>.package`. This module adds an `apply` to that
# option, so whatever package the user or microvm.nix chose is wrapped, not
# replaced: the wrapper's bin/<hypervisor binary> execs
#   vmcred-host launch --config /etc/vmcred/host.toml --vm <name>
#     --hypervisor <hv> [--argv0 microvm@<name>] -- <real binary> "$@"
# and every other file of the real package (ch-remote, qemu-img, ...) and
# the attributes microvm.nix reads from it (version, configureFlags,
# override, overrideAttrs) are the real package's.
#
# The runner execs the hypervisor with `exec -a microvm@<hostName>`
# (microvm.prettyProcnames); a script cannot see that name, so the wrapper
# hands it to the launcher (`--argv0`), which execs the real binary with it.
{ config, lib, pkgs, options, ... }:

let
  inherit (lib) mkOption mkIf types literalExpression escapeShellArg optionalString;

  cfg = config.services.vmcred.guest.microvm;
  hv = config.microvm.hypervisor;

  # The guest's own platform: microvm.nix's runners take the architecture
  # from the VM's pkgs (qemu-system-<arch>), not from the host's.
  guestArch = builtins.head (builtins.split "-" pkgs.stdenv.hostPlatform.system);

  # Hypervisors microvm.nix runs with vsock, and the binary its runner execs
  # (lib/runners/<hv>.nix).
  binaries = {
    qemu = "qemu-system-${guestArch}";
    cloud-hypervisor = "cloud-hypervisor";
    firecracker = "firecracker";
    crosvm = "crosvm";
    kvmtool = "lkvm";
    alioth = "alioth";
  };
  supported = builtins.attrNames binaries;

  argv0 = "microvm@${config.networking.hostName}";

  launchScript = real: binName: ''
    exec ${cfg.hostPackage}/bin/vmcred-host launch --config ${cfg.hostConfig} --vm ${escapeShellArg cfg.vmName} --hypervisor ${hv}${optionalString config.microvm.prettyProcnames " --argv0 ${escapeShellArg argv0}"} -- ${real}/bin/${binName} "$@"
  '';

  wrap = real:
    let binName = binaries.${hv}; in
    (pkgs.symlinkJoin {
      name = "vmcred-${real.name or hv}";
      paths = [ (pkgs.writeShellScriptBin binName (launchScript real binName)) real ];
      meta = (real.meta or { }) // { mainProgram = binName; };
    }) // {
      version = real.version or "";
      configureFlags = real.configureFlags or [ ];
      vmcredLaunchWrapper = cfg.vmName;
      vmcredWrapped = real;
      override = f: wrap (real.override f);
      overrideAttrs = f: wrap (real.overrideAttrs f);
    };

  applyFor = name: pkg:
    if cfg.launchWrapper && hv == name then wrap pkg else pkg;
in
{
  imports = [ ./guest.nix ];

  options.services.vmcred.guest.microvm = {
    launchWrapper = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Put vmcred's launch wrapper around the hypervisor microvm.nix runs
        for this VM (`microvm.<hypervisor>.package` stays what you set; it
        is wrapped). The wrapper hands the guest its bootstrap (the host
        key's pin and the port) at launch and tells the host agent the VM
        started. vmcred's host module sets this for `microvm.vms.<name>.config`
        VMs; set it yourself in an `evaluatedConfig` or flake VM.
      '';
    };
    vmName = mkOption {
      type = types.strMatching "[A-Za-z0-9_.+-]+";
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = "The VM's name on the host: `microvm.vms.<name>` and `services.vmcred.host.vms.<name>`.";
    };
    hostPackage = mkOption {
      type = types.package;
      default = config.services.vmcred.guest.package;
      defaultText = literalExpression "config.services.vmcred.guest.package";
      description = "The vmcred package whose bin/vmcred-host the wrapper runs (on the host).";
    };
    hostConfig = mkOption {
      type = types.str;
      default = "/etc/vmcred/host.toml";
      description = "The host agent's config, as the wrapper passes it to `vmcred-host launch --config`.";
    };
  };

  # A second declaration of microvm.nix's options that only adds `apply`
  # (the module system merges it with microvm.nix's, which sets none).
  options.microvm = lib.genAttrs supported (name: {
    package = mkOption { apply = applyFor name; };
  });

  config = mkIf cfg.launchWrapper {
    assertions = [
      {
        assertion = options.microvm ? hypervisor;
        message = ''
          services.vmcred.guest.microvm.launchWrapper is set, but this NixOS configuration does not
          import microvm.nix's guest module (microvm.nixosModules.microvm), whose runner it wraps.
        '';
      }
      {
        assertion = !(options.microvm ? hypervisor) || builtins.elem hv supported;
        message = ''
          vmcred: microvm.nix runs VM "${cfg.vmName}" with "${hv}", which has no vsock in microvm.nix
          (lib/runners/${hv}.nix), so vmcred cannot reach the guest agent. Set
          microvm.hypervisor to one of: ${lib.concatStringsSep ", " supported}.
        '';
      }
    ];
  };
}
