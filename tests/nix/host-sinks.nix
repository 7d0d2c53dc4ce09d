# The NixOS options microvm.nix's REAL host module (nixos-modules/host)
# defines besides those nixos-stub.nix declares, as sinks (types.anything):
# vmcred never reads them. Declared one by one rather than with a freeform
# catch-all, so that a typo in vmcred's own options still fails to evaluate.
{ lib, ... }:
let
  sink = lib.mkOption { type = lib.types.anything; default = { }; };
in
{
  options = {
    users.users = sink;
    users.groups = sink;
    security.pam.loginLimits = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
    security.wrappers = sink;
    systemd.tmpfiles.settings = sink;
    hardware.ksm.enable = lib.mkOption { type = lib.types.bool; default = false; };
    system.activationScripts = sink;
    virtualisation.libvirtd.enable = lib.mkOption { type = lib.types.bool; default = false; };
  };
}
