# Stand-in microvm.nix flake: only the outputs vmcred's flake refers to.
{
  outputs = { self }: {
    nixosModules.host = { ... }: { };
    nixosModules.microvm = { ... }: { };
  };
}
