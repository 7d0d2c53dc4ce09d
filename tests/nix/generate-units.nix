# NixOS's own generateUnits (nixos/lib/systemd-lib.nix, from the nixpkgs
# tree under test) run for one service unit next to a package that ships a
# template, to see which file NixOS would write for it: a whole unit
# (<name>) or a drop-in (<name>.d/overrides.conf). The builders are
# /bin/bash derivations without dependencies, like stub-pkgs.nix's.
{ nixpkgs, name, text, strategy, template }:
let
  lib = import (nixpkgs + "/lib");
  drv = drvName: env: script: derivation ({
    name = drvName;
    system = builtins.currentSystem;
    builder = "/bin/bash";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  } // builtins.removeAttrs env [ "passthru" "meta" ]);
  # A package shipping the template (lib/systemd/system/<template>).
  templatePkg = drv "template-units" { inherit template; } ''
    mkdir -p "$out/lib/systemd/system"
    printf '[Service]\nExecStart=/bin/true %%i\n' > "$out/lib/systemd/system/$template"
  '';
  systemd = drv "systemd-units-stand-in" { } ''mkdir -p "$out/example/systemd/system/multi-user.target.wants"'';
  slib = import (nixpkgs + "/nixos/lib/systemd-lib.nix") {
    inherit lib;
    pkgs = { runCommand = drv; buildPackages.xorg.lndir = drv "lndir-unused" { } ''mkdir -p "$out/bin"''; };
    config.systemd = {
      package = systemd;
      packages = [ templatePkg ];
      defaultUnit = "multi-user.target";
      ctrlAltDelUnit = "reboot.target";
    };
  };
  # What makeUnit writes (its own name escaping needs replaceChars, which
  # the current lib no longer has).
  unit = drv "unit-file" { unitName = name; inherit text; } ''mkdir -p "$out"; printf '%s' "$text" > "$out/$unitName"'';
in
slib.generateUnits {
  type = "system";
  units.${name} = { inherit unit; overrideStrategy = strategy; };
  upstreamUnits = [ ];
  upstreamWants = [ "multi-user.target.wants" ];
}
