# Stand-in nixpkgs flake for `nix flake show/check` offline: the real 2022
# nixpkgs lib (copied next to this file as ./lib by run.sh) and the stand-in
# packages of ../stub-pkgs.nix, plus the few builders flake.nix calls.
{
  outputs = { self }:
    let
      lib = import ./lib;
      forSystem = system:
        let
          base = import ./stub-pkgs.nix { inherit lib system; };
          stub = name: derivation { inherit name system; builder = "/bin/sh"; args = [ "-c" "echo stub > $out" ]; };
          pkgs = base // {
            callPackage = f: args:
              let fn = if builtins.isFunction f then f else import f;
              in fn (builtins.intersectAttrs (builtins.functionArgs fn) pkgs // args);
            rustPlatform.buildRustPackage = args:
              # Reads what the real builder reads at evaluation time.
              assert builtins.isString (builtins.readFile args.cargoLock.lockFile);
              assert builtins.pathExists (args.src + "/Cargo.toml");
              stub "${args.pname}-${args.version}" // { inherit (args) meta; };
            mkShell = args: stub "nix-shell";
            testers.runNixOSTest = test:
              let t = if builtins.isFunction test then test { } else test;
              in assert builtins.isString t.testScript && t.nodes ? host; stub "vm-test-run-${t.name}";
          } // lib.genAttrs [ "cargo" "rustc" "clippy" "rustfmt" "rust-analyzer" "nixpkgs-fmt" "installShellFiles" ] stub;
        in pkgs;
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] forSystem;
    };
}
