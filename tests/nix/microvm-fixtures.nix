# What a real NixOS build of a microvm.nix guest would produce, as fake store
# paths, so the runners (lib/runners/*.nix) can build their argv without
# building a kernel or a system closure. Used by mini-nixos.nix for the real
# microvm.nix and by the stand-in (microvm-stub.nix) alike.
{ lib, pkgs, ... }:
let
  fake = name: builtins.toFile name "fixture\n";
in
{
  boot.kernelPackages.kernel = pkgs.vmcredFixtures.kernel;
  system.build.toplevel = fake "toplevel";
  system.boot.loader.kernelFile = "bzImage";
  system.boot.loader.initrdFile = "initrd";
  system.build.initialRamdisk = fake "initrd-dir";
  nix.enable = false;
  nix.optimise.automatic = false;
  nix.settings.auto-optimise-store = false;
  # The store disk is an image build (erofs of the system closure); the
  # runner only needs its path.
  microvm.storeDisk = lib.mkForce (fake "store.erofs");
}
