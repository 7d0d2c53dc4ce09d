# Stand-in for the few nixpkgs packages and builders the modules use.
# Builders produce real derivations (builder /bin/sh, no dependencies), so
# tests can build and run e.g. the launch wrapper with nix-build; writeText
# uses builtins.toFile so rendered configs exist right after evaluation.
{ lib, system ? builtins.currentSystem, path ? null }:

let
  mkDrv = name: script: attrs: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  } // attrs);

  # A package with executables that print how they were called.
  fakeTool = name: bins: extra:
    let
      drv = mkDrv name ''
        mkdir -p "$out/bin"
        for b in $bins; do
          printf '#!/bin/sh\nprintf "%%s\\n" "%s" "$@"\n' "$b" > "$out/bin/$b"
          chmod +x "$out/bin/$b"
        done
      '' { bins = lib.concatStringsSep " " bins; };
    in drv // extra;
in
rec {
  inherit lib;
  # What lib.types.pkgs (microvm.vmHostPackages) checks for.
  _type = "pkgs";
  # microvm.nix's host module evaluates `config` VMs with
  # "${pkgs.path}/nixos/lib/eval-config.nix" (a stand-in there, see
  # mini-nixos.nix).
  inherit path;
  stdenv.hostPlatform = {
    inherit system;
    isLinux = true;
    isDarwin = false;
    linux-kernel.target = "bzImage";
  };
  stdenv.targetPlatform = stdenv.hostPlatform;
  buildPackages = import ./stub-pkgs.nix { inherit lib system path; };
  runtimeShell = "/bin/bash";
  linux.target = "bzImage";

  # A kernel package's shape as the runners read it: bzImage (out) and, for
  # cloud-hypervisor, dev/vmlinux.
  vmcredFixtures.kernel = (mkDrv "linux-6.12"
    "mkdir -p $out $dev; echo kernel > $out/bzImage; echo kernel > $dev/vmlinux"
    { outputs = [ "out" "dev" ]; }) // { version = "6.12.0"; };

  # A derivation, as in nixpkgs: the JSON may name store paths of
  # derivations (kernel, initrd), which builtins.toFile refuses.
  writers.writeJSON = name: value: mkDrv name ''printf '%s' "$json" > "$out"'' { json = builtins.toJSON value; };
  runCommandLocal = runCommand;

  writeText = name: text: builtins.toFile name text;

  writeShellScript = name: text: mkDrv name ''
    printf '#!/bin/bash\n%s' "$text" > "$out"; chmod +x "$out"
  '' { inherit text; };

  writeShellScriptBin = name: text: (mkDrv name ''
    mkdir -p "$out/bin"; printf '#!/bin/bash\n%s' "$text" > "$out/bin/$binName"; chmod +x "$out/bin/$binName"
  '' { inherit text; binName = name; }) // { meta.mainProgram = name; };

  # Like nixpkgs' symlinkJoin (lndir): the first path providing a file wins.
  symlinkJoin = { name, paths, ... }: mkDrv name ''
    mkdir -p "$out/bin"
    for p in $paths; do
      for f in "$p"/bin/*; do
        [ -e "$out/bin/''${f##*/}" ] || ln -s "$f" "$out/bin/''${f##*/}"
      done
    done
  '' { inherit paths; };

  # Like nixpkgs' runCommand: `passthru` lands on the result, `meta` too,
  # neither in the build environment.
  runCommand = name: env: script:
    mkDrv name script (builtins.removeAttrs env [ "passthru" "meta" ])
    // (env.passthru or { }) // { meta = env.meta or { }; };

  coreutils = fakeTool "coreutils" [ "kill" ] { };
  findutils = fakeTool "findutils" [ "find" ] { };
  gnugrep = fakeTool "gnugrep" [ "grep" ] { };
  gnused = fakeTool "gnused" [ "sed" ] { };
  systemd = fakeTool "systemd" [ "systemctl" ] { };

  vmcred = fakeTool "vmcred" [ "vmcred-host" "vmcred-guest" ] { };
  socat = fakeTool "socat" [ "socat" ] { };
  jq = fakeTool "jq" [ "jq" ] { };
  gawk = fakeTool "gawk" [ "awk" ] { };
  netcat = fakeTool "netcat" [ "nc" ] { };
  python3 = fakeTool "python3" [ "python3" ] { };
  iproute2 = fakeTool "iproute2" [ "ip" ] { };
  util-linux = fakeTool "util-linux" [ "mount" ] { };
  curl = fakeTool "curl" [ "curl" ] { };
  coreutils-full = coreutils;
  firecracker = fakeTool "firecracker-1.12.0" [ "firecracker" ] { version = "1.12.0"; };
  crosvm = fakeTool "crosvm-140.0" [ "crosvm" ] { version = "140.0"; };
  kvmtool = fakeTool "kvmtool-3.18" [ "lkvm" ] { version = "3.18"; };
  alioth = fakeTool "alioth-0.8.0" [ "alioth" ] { version = "0.8.0"; };
  qemu = qemu_kvm;

  cloud-hypervisor = fakeTool "cloud-hypervisor-48.0" [ "cloud-hypervisor" "ch-remote" ] {
    version = "48.0";
    override = f: cloud-hypervisor;
  };

  qemu_kvm = lib.makeOverridable ({ nixosTestRunner ? false }:
    fakeTool "qemu-host-cpu-only-9.0${lib.optionalString nixosTestRunner "-for-tests"}"
      [ "qemu-system-x86_64" "qemu-system-aarch64" "qemu-img" ] {
        version = "9.0";
        configureFlags = [ "--enable-seccomp" ];
        inherit nixosTestRunner;
      }) { };
}
