{
  description = "vmcred: systemd credentials from a hypervisor host into its microVMs, rotated without restarting them";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # Only the VM test (checks.<system>.microvm-rotate) uses it; the modules
    # work with or without microvm.nix.
    microvm.url = "github:microvm-nix/microvm.nix";
    microvm.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs = { self, nixpkgs, microvm }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);

      vmcredPackage = { lib, rustPlatform }:
        rustPlatform.buildRustPackage {
          pname = "vmcred";
          version = cargoToml.workspace.package.version;
          src = lib.cleanSourceWith {
            src = ./.;
            filter = path: type:
              let base = baseNameOf path; in
              # Rebuild only when Rust sources change, not on edits to Nix files.
              !(builtins.elem base [ "target" ".cache" "result" ".git" ])
              && !(lib.hasSuffix ".nix" base);
          };
          cargoLock.lockFile = ./Cargo.lock;
          # The test suite needs hybrid-vsock stand-ins and a qemu guest
          # (tests/run.sh); the flake's checks run the NixOS VM test instead.
          doCheck = false;
          meta = {
            description = "systemd credentials from a hypervisor host into its microVMs (vmcred-host, vmcred-guest)";
            license = with lib.licenses; [ mit asl20 ];
            mainProgram = "vmcred-host";
            platforms = lib.platforms.linux;
          };
        };

      # The modules, with the package defaulting to this flake's build.
      withPackage = kind: file: { pkgs, lib, ... }: {
        imports = [ file ];
        config.services.vmcred.${kind}.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };
    in
    {
      overlays.default = final: prev: {
        vmcred = final.callPackage vmcredPackage { };
      };

      packages = forAllSystems (pkgs: rec {
        vmcred = pkgs.callPackage vmcredPackage { };
        default = vmcred;
      });

      nixosModules = {
        host = withPackage "host" ./nixos-modules/host.nix;
        guest = withPackage "guest" ./nixos-modules/guest.nix;
        # For a microvm.nix VM given as `evaluatedConfig` or `flake` (the host
        # module adds it to `config` VMs itself): the guest agent and the
        # launch wrapper around the VM's hypervisor package.
        microvm-guest = withPackage "guest" ./nixos-modules/microvm-guest.nix;
        default = { imports = [ self.nixosModules.host self.nixosModules.guest ]; };
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = with pkgs; [ cargo rustc clippy rustfmt rust-analyzer nixpkgs-fmt ];
        };
      });

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        microvm-rotate = import ./tests/nix/vm-test.nix {
          inherit pkgs self microvm;
        };
      });
    };
}
