# One microvm.nix VM per hypervisor (and qemu machine type) that microvm.nix
# runs with vsock, evaluated with vmcred's host module on top of microvm.nix's
# host module: the REAL microvm.nix when `microvmSrc` is given (its
# nixos-modules/host and, through mini-nixos.nix, nixos-modules/microvm with
# the real runners), else the stand-in microvm-stub.nix. Driven by run.sh,
# which builds each VM's runner (declaredRunner), runs its microvm-run as an
# unprivileged user with the launcher in dry-run mode, and checks the argv.
#
#   cases.<case> = { vm; hv; machine; runner; hostToml; units; failed;
#                    cid; hybridSocket; argv0; realBin; }
#   refusals.<name> = list of failed assertion messages (must be non-empty)
#   accepted.<name> = list of failed assertion messages (must be empty)
{ nixpkgs, standin, microvmSrc ? null, hostPackage ? null, readmeSnippet ? null }:

let
  lib = import (nixpkgs + "/lib");
  pkgs = import ./stub-pkgs.nix { inherit lib; path = standin; };
  repo = ../..;
  nixosStub = import ./nixos-stub.nix { inherit nixpkgs pkgs; };
  microvmHost =
    if microvmSrc != null
    then [ ./host-sinks.nix (microvmSrc + "/nixos-modules/host") ]
    else [ (import ./microvm-stub.nix { inherit nixpkgs pkgs; }) ];
  # microvm.nix's guest module (options, runners, declaredRunner).
  microvmGuest =
    if microvmSrc != null then microvmSrc + "/nixos-modules/microvm"
    else ./microvm-stub-guest.nix;
  guestModulesOf = settings: { imports = [ microvmGuest settings ]; microvm.socket = "control.sock"; };
  # The vmcred package the launch wrappers exec: a test shim that runs the
  # real binary (named by $VMCRED_TEST_HOST_BIN at run time) as
  # `launch <dry-run args> --config <the rendered host.toml, state_dir
  # rewritten>`, keeping every other argument the wrapper passes.
  vmcredShim = pkgs.runCommand "vmcred-test-shim" { } ''
    mkdir -p "$out/bin"
    cat > "$out/bin/vmcred-host" <<'EOF'
    #!/bin/sh
    [ "$1" = launch ] && [ "$2" = --config ] || { echo "vmcred test shim: unexpected arguments: $*" >&2; exit 97; }
    shift 3
    exec "$VMCRED_TEST_HOST_BIN" launch $VMCRED_TEST_DRY_RUN_ARGS --config "$VMCRED_TEST_HOST_CONFIG" "$@"
    EOF
    chmod +x "$out/bin/vmcred-host"
    # The guest module's build-time check; run.sh checks the rendered
    # guest.toml with the real binary.
    cat > "$out/bin/vmcred-guest" <<'EOF'
    #!/bin/sh
    [ "$1" = --check-config ] && exit 0
    echo "vmcred test shim: unexpected arguments: $*" >&2; exit 97
    EOF
    chmod +x "$out/bin/vmcred-guest"
  '';
  vmcredPkg = if hostPackage != null then hostPackage else vmcredShim;

  evalHost = modules: (lib.evalModules {
    modules = [ nixosStub (repo + "/nixos-modules/host.nix") ] ++ microvmHost ++ modules
      # The shim runs the real binary only at run time (run.sh checks the
      # build-time check-config with the real binary separately).
      ++ [{ services.vmcred.host = { package = vmcredPkg; checkConfig = false; }; }];
  }).config;

  secretDir = "/run/secrets/vmcred-nix-test";

  # name -> the VM's microvm.nix settings
  vmSettings = {
    qemu-microvm = { microvm.hypervisor = "qemu"; microvm.vsock.cid = 11; microvm.qemu.machine = "microvm"; };
    qemu-q35 = { microvm.hypervisor = "qemu"; microvm.vsock.cid = 12; microvm.qemu.machine = "q35"; };
    ch = { microvm.hypervisor = "cloud-hypervisor"; microvm.vsock.cid = 13; };
    ch-extraargs = {
      microvm.hypervisor = "cloud-hypervisor";
      microvm.cloud-hypervisor.extraArgs = [ "--vsock" "cid=14,socket=my.vsock" ];
    };
    firecracker = { microvm.hypervisor = "firecracker"; microvm.vsock.cid = 15; };
    crosvm = { microvm.hypervisor = "crosvm"; microvm.vsock.cid = 16; };
    kvmtool = { microvm.hypervisor = "kvmtool"; microvm.vsock.cid = 17; };
    alioth = { microvm.hypervisor = "alioth"; microvm.vsock.cid = 18; };
  };
  commandLineOnly = [ "cloud-hypervisor" "firecracker" "crosvm" "kvmtool" "alioth" ];

  # Every VM on one host, as an operator of many VMs would have them.
  host = evalHost [{
    microvm.vms = lib.mapAttrs (name: settings: {
      config = { lib, ... }: {
        imports = [ settings ];
        microvm.shares = [ ];
        microvm.socket = "control.sock";
      };
    }) vmSettings;
    services.vmcred.host = {
      enable = true;
      vms = lib.mapAttrs (name: settings: {
        credentials = {
          SECRET_TOKEN.source = "${secretDir}/${name}-secret";
          BOOT_CONST = {
            source = "${secretDir}/${name}-boot";
            boot = true;
            allowOnCommandLine = builtins.elem settings.microvm.hypervisor commandLineOnly;
            restartUnits = [ "app.service" ];
          };
        };
      }) vmSettings;
    };
  }];

  guest = name: host.microvm.vms.${name}.config.config;
  hostTomlParsed = builtins.fromTOML (str (builtins.readFile host.services.vmcred.host.configFile));
  str = x: builtins.unsafeDiscardStringContext (toString x);

  cases = lib.mapAttrs (name: settings:
    let
      g = guest name;
      hv = g.microvm.hypervisor;
      real = g.microvm.${hv}.package.vmcredWrapped or null;
      bin = {
        qemu = "qemu-system-x86_64"; cloud-hypervisor = "cloud-hypervisor"; firecracker = "firecracker";
        crosvm = "crosvm"; kvmtool = "lkvm"; alioth = "alioth";
      }.${hv};
      vm = host.services.vmcred.host.vms.${name};
    in
    {
      vm = name;
      inherit hv;
      machine = if hv == "qemu" then g.microvm.qemu.machine else "";
      runner = builtins.unsafeDiscardOutputDependency g.microvm.declaredRunner.drvPath;
      realBin = if real == null then "" else "${str real}/bin/${bin}";
      argv0 = "microvm@${g.networking.hostName}";
      cid = vm.cid;
      hybridSocket = vm.hybridSocket;
      launchKey = vm.launchKey;
      tomlLaunchKey = hostTomlParsed.vms.${name}.launch_key or null;
      unit = host.test.unitText."microvm@${name}" or "";
      guestToml = builtins.readFile g.services.vmcred.guest.configFile;
      guestFailed = g.test.failedAssertions or [ ];
    }) vmSettings;

  failedOf = modules: (evalHost modules).test.failedAssertions;
  oneVm = name: settings: extra: [{
    microvm.vms.${name}.config = { imports = [ settings ]; microvm.socket = "control.sock"; };
    services.vmcred.host = { enable = true; vms.${name} = extra; };
  }];
in
{
  inherit cases;
  kind = if microvmSrc != null then "real microvm.nix" else "stand-in microvm.nix";
  # Built (import from derivation): the module checks it at build time.
  hostTomlText = str (builtins.readFile host.services.vmcred.host.configFile);
  hostFailed = host.test.failedAssertions;
  templateUnit = host.test.unitText."microvm@" or "";
  agentUnit = host.test.unitText.vmcred-host or "";

  refusals = {
    fw-cfg-name-too-long = failedOf (oneVm "q" vmSettings.qemu-microvm {
      credentials.THIS_NAME_IS_TOO_LONG_FOR_FW_CFG = { source = "/run/secrets/x"; boot = true; };
    });
    boot-secret-on-kernel-cmdline = failedOf (oneVm "c" vmSettings.crosvm {
      credentials.DB_PASSWORD = { source = "/run/secrets/x"; boot = true; };
    });
    boot-secret-on-ch-oem-strings = failedOf (oneVm "c" vmSettings.ch {
      credentials.DB_PASSWORD = { source = "/run/secrets/x"; boot = true; };
    });
    no-vsock = failedOf (oneVm "n" { microvm.hypervisor = "qemu"; } { credentials.A.source = "/run/secrets/x"; });
    hypervisor-without-vsock = failedOf (oneVm "s" { microvm.hypervisor = "stratovirt"; } { credentials.A.source = "/run/secrets/x"; });
    cid-clash = failedOf [{
      microvm.vms.a.config = { imports = [ vmSettings.qemu-microvm ]; microvm.socket = "control.sock"; };
      microvm.vms.b.config = { imports = [ vmSettings.qemu-microvm ]; microvm.socket = "control.sock"; };
      services.vmcred.host = { enable = true; vms.a.credentials.A.source = "/run/secrets/x"; vms.b.credentials.A.source = "/run/secrets/x"; };
    }];
    launch-key-on-cloud-hypervisor = failedOf (oneVm "c" vmSettings.ch {
      launchKey = "required"; credentials.A.source = "/run/secrets/x";
    });
    launch-key-on-firecracker = failedOf (oneVm "f" vmSettings.firecracker {
      launchKey = "required"; credentials.A.source = "/run/secrets/x";
    });
    launch-key-on-crosvm = failedOf (oneVm "k" vmSettings.crosvm {
      launchKey = "required"; credentials.A.source = "/run/secrets/x";
    });
    launch-key-on-kvmtool = failedOf (oneVm "k" vmSettings.kvmtool {
      launchKey = "required"; credentials.A.source = "/run/secrets/x";
    });
    launch-key-on-alioth = failedOf (oneVm "k" vmSettings.alioth {
      launchKey = "required"; credentials.A.source = "/run/secrets/x";
    });
    launch-key-without-wrapper = failedOf (oneVm "q"
      (vmSettings.qemu-microvm // { services.vmcred.guest.microvm.launchWrapper = false; })
      { credentials.A.source = "/run/secrets/x"; });
    evaluated-config-without-guest-module = failedOf [{
      microvm.vms.e.evaluatedConfig = (import ./mini-nixos.nix { inherit nixpkgs; standinPkgs = pkgs; }) {
        modules = [ (guestModulesOf vmSettings.qemu-microvm) ];
      };
      services.vmcred.host = { enable = true; vms.e.credentials.A.source = "/run/secrets/x"; };
    }];
  };

  accepted = {
    qemu-fw-cfg-name-at-limit = failedOf (oneVm "q" vmSettings.qemu-microvm {
      credentials.NAME_OF_TWENTY_EIGHT_BYTES_X = { source = "/run/secrets/x"; boot = true; };
    });
    launch-key-off-on-crosvm = failedOf (oneVm "k" vmSettings.crosvm {
      launchKey = "off"; credentials.A.source = "/run/secrets/x";
    });
    qemu-q35-long-boot-name = failedOf (oneVm "q" vmSettings.qemu-q35 {
      credentials.THIS_NAME_IS_TOO_LONG_FOR_FW_CFG = { source = "/run/secrets/x"; boot = true; };
    });
  };

  # The README's seeds setup, as written (a sops-nix secret path included).
  readme = if readmeSnippet == null then null else
    let
      h = (lib.evalModules {
        specialArgs.inputs = {
          microvm.nixosModules.host = { imports = microvmHost; };
          vmcred.nixosModules.host = { imports = [ (repo + "/nixos-modules/host.nix") ]; services.vmcred.host = { package = vmcredPkg; checkConfig = false; }; };
        };
        modules = [
          nixosStub
          ({ lib, ... }: {
            options.sops.secrets = lib.mkOption {
              type = lib.types.attrsOf (lib.types.submodule ({ name, ... }: {
                options.path = lib.mkOption { type = lib.types.str; default = "/run/secrets/${name}"; };
              }));
              default = { };
            };
            config.sops.secrets.api-key = { };
          })
          readmeSnippet
        ];
      }).config;
    in
    {
      failed = h.test.failedAssertions;
      toml = builtins.unsafeDiscardStringContext (builtins.readFile h.services.vmcred.host.configFile);
      guestToml = builtins.readFile h.microvm.vms.test-vm.config.config.services.vmcred.guest.configFile;
    };

  # An evaluatedConfig VM that imports vmcred's module itself: accepted,
  # and vmcred added nothing to it (its wrapper is its own setting).
  evaluatedWithModule =
    let
      evaluated = (import ./mini-nixos.nix { inherit nixpkgs; standinPkgs = pkgs; }) {
        modules = [
          (guestModulesOf vmSettings.qemu-microvm)
          (repo + "/nixos-modules/microvm-guest.nix")
          { networking.hostName = "e"; services.vmcred.guest = { enable = true; package = vmcredPkg; microvm.launchWrapper = true; }; }
        ];
      };
      h = evalHost [{
        microvm.vms.e.evaluatedConfig = evaluated;
        services.vmcred.host = { enable = true; vms.e.credentials.A.source = "/run/secrets/x"; };
      }];
    in
    {
      failed = h.test.failedAssertions;
      cid = h.services.vmcred.host.vms.e.cid;
      configIsNull = h.microvm.vms.e.config == null;
      wrapped = (evaluated.config.microvm.qemu.package.vmcredLaunchWrapper or null) == "e";
    };
}
