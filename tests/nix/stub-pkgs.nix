# Stand-in for the few nixpkgs packages and builders the modules use.
# Builders produce real derivations (builder /bin/sh, no dependencies), so
# tests can build and run e.g. the launch wrapper with nix-build; writeText
# uses builtins.toFile so rendered configs exist right after evaluation.
{ lib, system ? builtins.currentSystem }:

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
  stdenv.hostPlatform.system = system;

  writeText = name: text: builtins.toFile name text;

  writeShellScript = name: text: mkDrv name ''
    printf '#!/bin/sh\n%s' "$text" > "$out"; chmod +x "$out"
  '' { inherit text; };

  writeShellScriptBin = name: text: (mkDrv name ''
    mkdir -p "$out/bin"; printf '#!/bin/sh\n%s' "$text" > "$out/bin/$binName"; chmod +x "$out/bin/$binName"
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

  runCommand = name: env: script: mkDrv name script env;

  coreutils = fakeTool "coreutils" [ "kill" ] { };
  findutils = fakeTool "findutils" [ "find" ] { };
  gnugrep = fakeTool "gnugrep" [ "grep" ] { };
  gnused = fakeTool "gnused" [ "sed" ] { };
  systemd = fakeTool "systemd" [ "systemctl" ] { };

  vmcred = fakeTool "vmcred" [ "vmcred-host" "vmcred-guest" ] { };

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
