# Stand-in for microvm.nix's guest module (nixos-modules/microvm), for CI,
# which cannot fetch microvm.nix. Rebuilt from the real files at commit
# 71beea0 (options.nix, lib/runner.nix, lib/runners/*.nix) for everything
# vmcred's modules touch or that the tests read:
# - the options, names, types and defaults: hypervisor, vsock.cid,
#   prettyProcnames, socket, qemu.machine (mkDefault "microvm" on x86_64),
#   <hypervisor>.package (from vmHostPackages), extraArgs,
#   cloud-hypervisor.platformOEMStrings, firecracker.extraConfig, kernel,
#   initrdPath, kernelParams, storeDisk, credentialFiles;
# - the runner as microvm.nix builds it: bin/microvm-run ends in
#   `exec -a "microvm@<hostName>" <package>/bin/<binary> <argv> ${runtime_args:-}`
#   with each runner's argv shape: qemu's -M <machine,...>, -append and
#   vhost-vsock-{device,pci},guest-cid=; cloud-hypervisor's one --cmdline,
#   one --platform oem_strings=[...] with microvm.nix's vmm.notify_socket
#   string, --vsock cid=,socket= (or the user's from extraArgs; both at once
#   is an error, as in microvm.nix); firecracker's --config-file JSON
#   (boot-source.boot_args, vsock.uds_path = "notify.vsock") and
#   --api-sock; crosvm's `run ... -p <cmdline> --vsock <cid> ... <kernel>`;
#   kvmtool's `lkvm run ... -p <cmdline> --vsock <cid>`; alioth's
#   `alioth run ... -c <cmdline> --vsock vhost,cid=<cid>`;
# - what the runners read from a package: qemu `.override` (closure
#   trimming, with optimize.enable) and `configureFlags` (-sandbox on),
#   firecracker `.version` (--enable-pci from 1.13.0).
# Arguments vmcred never reads (disks, network, shares, balloon, ...) are
# left out; tests/nix/run.sh runs the same checks against the real thing.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types mkDefault optionals optional escapeShellArgs concatStringsSep;
  cfg = config.microvm;
  hostName = config.networking.hostName;
  system = pkgs.stdenv.hostPlatform.system;
  arch = builtins.head (builtins.split "-" system);
  hypervisors = [ "qemu" "cloud-hypervisor" "firecracker" "crosvm" "kvmtool" "stratovirt" "alioth" "vfkit" ];
  kernelParams = toString cfg.kernelParams;
  kernel = cfg.kernel;

  # lib/default.nix extractOptValues: every value of `opt`, and the rest.
  extractOptValues = opt: args:
    let
      go = acc: rest:
        if rest == [ ] then acc
        else if builtins.head rest == opt && builtins.length rest > 1
        then go (acc // { values = acc.values ++ [ (builtins.elemAt rest 1) ]; }) (lib.drop 2 rest)
        else go (acc // { args = acc.args ++ [ (builtins.head rest) ]; }) (builtins.tail rest);
    in
    go { values = [ ]; args = [ ]; } args;
  paramValue = key: str:
    let m = builtins.match "(.*,)?${key}=([^,]*)(,.*)?" str; in
    if m == null then null else builtins.elemAt m 1;

  commands = {
    qemu =
      let
        qemu0 = cfg.qemu.package;
        qemu = if cfg.optimize.enable then qemu0.override (oa: { nixosTestRunner = true; }) else qemu0;
        machine = cfg.qemu.machine;
        requirePci = !(lib.hasPrefix "microvm" machine);
        devType = if requirePci then "pci" else "device";
        machineOpts = { accel = "kvm:tcg"; mem-merge = "on"; acpi = "on"; }
          // lib.optionalAttrs (machine == "microvm") { pit = "off"; pic = "off"; pcie = "off"; rtc = "on"; usb = "off"; };
      in
      escapeShellArgs ([
        "${qemu}/bin/qemu-system-${arch}"
        "-name" hostName
        "-M" (concatStringsSep "," ([ machine ] ++ lib.mapAttrsToList (n: v: "${n}=${v}") machineOpts))
        "-m" "${toString cfg.mem}M" "-smp" (toString cfg.vcpu)
        "-nodefaults" "-no-user-config" "-no-reboot"
        "-kernel" "${kernel.out}/bzImage" "-initrd" cfg.initrdPath
        "-chardev" "stdio,id=stdio,signal=off" "-device" "virtio-rng-${devType}"
      ]
      ++ builtins.concatMap (o: [ "-fw_cfg" o ]) (lib.mapAttrsToList (n: p: "name=opt/io.systemd.credentials/${n},file=${p}") cfg.credentialFiles)
      ++ [ "-serial" "chardev:stdio" "-enable-kvm" "-cpu" "host,+x2apic,-sgx" "-device" "i8042"
           "-append" "earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1 ${kernelParams}" ]
      ++ optionals cfg.storeOnDisk [ "-drive" "id=store,format=raw,read-only=on,file=${cfg.storeDisk},if=none,aio=io_uring"
                                     "-device" "virtio-blk-${devType},drive=store" ]
      ++ [ "-nographic" ]
      ++ optionals (builtins.elem "--enable-seccomp" (qemu.configureFlags or [ ])) [ "-sandbox" "on" ]
      ++ optionals (cfg.socket != null) [ "-qmp" "unix:${cfg.socket},server,nowait" ]
      ++ optionals (cfg.vsock.cid != null) [ "-device" "vhost-vsock-${devType},guest-cid=${toString cfg.vsock.cid}" ]
      ++ cfg.qemu.extraArgs);

    cloud-hypervisor =
      let
        ch = cfg.cloud-hypervisor;
        extracted = extractOptValues "--vsock" ch.extraArgs;
        userVsock = if extracted.values == [ ] then null else builtins.head extracted.values;
        userCid = if userVsock == null then null else paramValue "cid" userVsock;
        userSocket = if userVsock == null then null else paramValue "socket" userVsock;
        vsockCid =
          if cfg.vsock.cid != null && userCid != null
          then throw "Cannot set `microvm.vsock.cid` and --vsock 'cid=${userCid}...' via `microvm.cloud-hypervisor.extraArgs` at the same time"
          else if cfg.vsock.cid != null then cfg.vsock.cid else userCid;
        vsockPath = if userSocket != null then userSocket else "notify.vsock";
        oemStrings = ch.platformOEMStrings
          ++ optional (vsockCid != null) "io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888";
        platform = extractOptValues "--platform" extracted.args;
        platformOps = concatStringsSep "," (optional (oemStrings != [ ]) "oem_strings=[${concatStringsSep "," oemStrings}]" ++ platform.values);
      in
      if cfg.credentialFiles != { } then throw "cloud-hypervisor does not support credentialFiles"
      else escapeShellArgs ([
        "${ch.package}/bin/cloud-hypervisor"
        "--cpus" "boot=${toString cfg.vcpu}" "--watchdog"
        "--kernel" "${kernel.dev}/vmlinux" "--initramfs" cfg.initrdPath
        "--cmdline" "earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1 ${kernelParams}"
        "--seccomp" "true" "--memory" "mergeable=on,shared=off,size=${toString cfg.mem}M"
        "--platform" platformOps "--console" "null" "--serial" "tty"
      ]
      ++ optionals (vsockCid != null) [ "--vsock" "cid=${toString vsockCid},socket=${vsockPath}" ]
      ++ optionals cfg.storeOnDisk [ "--disk" "path=${cfg.storeDisk},readonly=on" ]
      ++ optionals (cfg.socket != null) [ "--api-socket" cfg.socket ])
      + " " + escapeShellArgs platform.args;

    firecracker =
      let
        fc = cfg.firecracker;
        conf = lib.recursiveUpdate {
          boot-source = {
            kernel_image_path = "${kernel.dev}/vmlinux";
            initrd_path = cfg.initrdPath;
            boot_args = "console=ttyS0,115200 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ${kernelParams}";
          };
          machine-config = { vcpu_count = cfg.vcpu; mem_size_mib = cfg.mem; smt = system != "aarch64-linux"; };
          drives = [ { drive_id = "store"; path_on_host = cfg.storeDisk; is_root_device = false; is_read_only = true; io_engine = "Async"; } ];
          network-interfaces = [ ];
          vsock = if cfg.vsock.cid != null then { guest_cid = cfg.vsock.cid; uds_path = "notify.vsock"; } else null;
        } fc.extraConfig;
      in
      if cfg.credentialFiles != { } then throw "credentialFiles are not implemented for Firecracker"
      else escapeShellArgs ([
        "${fc.package}/bin/firecracker"
        "--config-file" (pkgs.writers.writeJSON "firecracker-${hostName}.json" conf)
        "--api-sock" (if cfg.socket != null then cfg.socket else throw "Firecracker must be configured with an API socket (option microvm.socket)!")
      ] ++ optional (lib.versionAtLeast fc.package.version "1.13.0") "--enable-pci" ++ fc.extraArgs);

    crosvm =
      if cfg.credentialFiles != { } then throw "crosvm does not support credentialFiles"
      else escapeShellArgs ([
        "${cfg.crosvm.package}/bin/crosvm" "run"
        "-m" (toString cfg.mem) "-c" (toString cfg.vcpu)
        "--serial" "type=stdout,console=true,stdin=true"
        "-p" "console=ttyS0 reboot=k panic=1 ${kernelParams}"
        "--no-balloon"
      ]
      ++ optionals cfg.storeOnDisk [ "-r" cfg.storeDisk ]
      ++ optionals (cfg.socket != null) [ "-s" cfg.socket ]
      ++ optionals (cfg.vsock.cid != null) [ "--vsock" (toString cfg.vsock.cid) ]
      ++ [ "--initrd" cfg.initrdPath "${kernel.dev}/vmlinux" ])
      + " " + escapeShellArgs cfg.crosvm.extraArgs;

    # kvmtool and alioth join pre-quoted words with spaces, as microvm.nix does.
    kvmtool = concatStringsSep " " ([
      "${cfg.kvmtool.package}/bin/lkvm" "run" "--name" (lib.escapeShellArg hostName)
      "-m" (toString cfg.mem) "-c" (toString cfg.vcpu) "--console" "serial" "--rng"
      "-k" (lib.escapeShellArg "${kernel}/bzImage") "-i" cfg.initrdPath
      "-p" (lib.escapeShellArg "console=ttyS0 reboot=k panic=1 ${kernelParams}")
    ]
    ++ optionals cfg.storeOnDisk [ "-d" (lib.escapeShellArg "${cfg.storeDisk},ro") ]
    ++ optionals (cfg.vsock.cid != null) [ "--vsock" (toString cfg.vsock.cid) ]);

    alioth = concatStringsSep " " ([
      "${cfg.alioth.package}/bin/alioth" "run"
      "--memory" "size=${toString cfg.mem}M,backend=memfd" "--num-cpu" (toString cfg.vcpu)
      "-k" (lib.escapeShellArg "${kernel}/bzImage") "-i" cfg.initrdPath
      "-c" (lib.escapeShellArg "console=ttyS0 reboot=k panic=1 ${kernelParams}") "--entropy"
    ]
    ++ optionals cfg.storeOnDisk [ "--blk" (lib.escapeShellArg "path=${cfg.storeDisk},readonly=true") ]
    ++ optionals (cfg.vsock.cid != null) [ "--vsock" "vhost,cid=${toString cfg.vsock.cid}" ]);

    stratovirt = escapeShellArgs [ "${cfg.stratovirt.package}/bin/stratovirt" "-name" hostName ];
    vfkit = throw "vfkit runs on macOS only";
  };

  # lib/runner.nix: bin/microvm-run.
  runnerFor = hypervisor:
    let
      execArg = lib.optionalString cfg.prettyProcnames ''-a "microvm@${hostName}"'';
      run = pkgs.writeShellScript "microvm-${hostName}-microvm-run" ''
        set -eou pipefail
        ${cfg.preStart}
        runtime_args=${lib.optionalString (cfg.extraArgsScript != null) "$(${cfg.extraArgsScript})"}

        exec ${execArg} ${commands.${hypervisor}} ''${runtime_args:-}
      '';
    in
    pkgs.runCommand "microvm-${hypervisor}-${hostName}" {
      meta.mainProgram = "microvm-run";
      passthru = {
        inherit hypervisor;
        canShutdown = cfg.socket != null;
        supportsNotifySocket = hypervisor == "cloud-hypervisor" && cfg.vsock.cid != null;
        tapMultiQueue = false;
        registerWithMachined = false;
        machineId = null;
      };
    } ''
      mkdir -p $out/bin $out/share/microvm
      ln -s ${run} $out/bin/microvm-run
      echo "${hypervisor}" > $out/share/microvm/hypervisor
    '';

  pkgOption = name: default: mkOption { type = types.package; inherit default; };
in
{
  options.microvm = {
    guest.enable = mkOption { type = types.bool; default = true; };
    optimize.enable = mkOption { type = types.bool; default = true; };
    hypervisor = mkOption { type = types.enum hypervisors; default = "qemu"; };
    preStart = mkOption { type = types.lines; default = ""; };
    extraArgsScript = mkOption { type = types.nullOr types.str; default = null; };
    socket = mkOption { type = types.nullOr types.str; default = "${hostName}.sock"; };
    kernel = mkOption { type = types.package; default = config.boot.kernelPackages.kernel; };
    initrdPath = mkOption { type = types.path; default = "${config.system.build.initialRamdisk}/${config.system.boot.loader.initrdFile}"; };
    kernelParams = mkOption { type = types.listOf types.str; };
    storeDisk = mkOption { type = types.path; };
    storeOnDisk = mkOption { type = types.bool; default = true; };
    vcpu = mkOption { type = types.int; default = 1; };
    mem = mkOption { type = types.int; default = 512; };
    shares = mkOption { type = types.listOf types.attrs; default = [ ]; };
    vsock.cid = mkOption { type = types.nullOr types.int; default = null; };
    prettyProcnames = mkOption { type = types.bool; default = true; };
    credentialFiles = mkOption { type = types.attrsOf types.path; default = { }; };
    vmHostPackages = mkOption { type = types.unspecified; default = pkgs; };
    qemu.machine = mkOption { type = types.str; };
    qemu.extraArgs = mkOption { type = types.listOf types.str; default = [ ]; };
    qemu.package = pkgOption "qemu" cfg.vmHostPackages.qemu_kvm;
    cloud-hypervisor.extraArgs = mkOption { type = types.listOf types.str; default = [ ]; };
    cloud-hypervisor.platformOEMStrings = mkOption { type = types.listOf types.str; default = [ ]; };
    cloud-hypervisor.package = pkgOption "cloud-hypervisor" cfg.vmHostPackages.cloud-hypervisor;
    firecracker.extraArgs = mkOption { type = types.listOf types.str; default = [ ]; };
    firecracker.extraConfig = mkOption { type = types.attrs; default = { }; };
    firecracker.package = pkgOption "firecracker" cfg.vmHostPackages.firecracker;
    crosvm.extraArgs = mkOption { type = types.listOf types.str; default = [ ]; };
    crosvm.package = pkgOption "crosvm" cfg.vmHostPackages.crosvm;
    kvmtool.package = pkgOption "kvmtool" cfg.vmHostPackages.kvmtool;
    alioth.package = pkgOption "alioth" cfg.vmHostPackages.alioth;
    stratovirt.package = mkOption { type = types.package; };
    runner = mkOption { type = types.attrsOf types.package; };
    declaredRunner = mkOption { type = types.package; default = cfg.runner.${cfg.hypervisor}; };
  };

  config = {
    microvm.qemu.machine = lib.mkIf (system == "x86_64-linux") (mkDefault "microvm");
    microvm.kernelParams = config.boot.kernelParams ++ [ "init=${config.system.build.toplevel}/init" ];
    microvm.runner = lib.genAttrs (lib.remove "vfkit" hypervisors) runnerFor;
  };
}
