# NixOS VM test, run by `nix flake check` (checks.<system>.microvm-rotate).
# It cannot run on the project's CI machine (no Nix store with nixpkgs, no
# KVM); it is here for users and developers with Nix.
#
# Shape: one NixOS test node is the hypervisor host. It runs microvm.nix with
# a qemu microVM "test-vm" (vhost-vsock CID 3) configured only through
# services.vmcred.host.vms.test-vm: no declaredRunner, no binScripts. Two
# test nodes talking vsock is not possible (vsock does not cross test VMs),
# so the guest is nested inside the host node; it uses TCG if the build
# machine has no nested KVM, hence the long timeouts.
#
# It checks: a late credential (API_KEY) and a boot-time one (ENVIRONMENT,
# SMBIOS) reach a guest service through LoadCredential=; a rotation with
# vmcred-rotate is applied and restarts the consumer without restarting the
# VM or the agent; a credential whose file appears only after boot
# (JWT_SECRET) is reported missing, then delivered, without a restart; the
# value never shows on a command line.
{ pkgs, self, microvm }:

let
  initial = "initial-api-key-value";
  rotated = "rotated-api-key-value";
  sha = builtins.hashString "sha256";
in
pkgs.testers.runNixOSTest {
  name = "vmcred-microvm-rotate";

  nodes.host = { config, lib, pkgs, ... }: {
    imports = [ microvm.nixosModules.host self.nixosModules.host ];

    virtualisation.memorySize = 3072;
    virtualisation.cores = 2;
    boot.kernelModules = [ "vhost_vsock" ];

    # Stand-ins for sops-nix / clan vars secrets: root-only files in /run/secrets.
    systemd.tmpfiles.rules = [
      "d /run/secrets/vars/test-vm-secrets 0700 root root -"
      "f /run/secrets/vars/test-vm-secrets/api-key 0400 root root - ${initial}"
    ];
    environment.etc."vmcred/test-vm/environment".text = "test";

    services.vmcred.host = {
      enable = true;
      settings.poll_interval = "0s";
      vms.test-vm.credentials = {
        # restartUnits given on the host are forwarded into the guest.
        API_KEY = { source = "/run/secrets/vars/test-vm-secrets/api-key"; restartUnits = [ "demo-consumer.service" ]; };
        # Not created at boot: a late credential.
        JWT_SECRET.source = "/run/secrets/vars/test-vm-secrets/jwt-secret";
        ENVIRONMENT = { source = "/etc/vmcred/test-vm/environment"; boot = true; };
      };
    };

    microvm.vms.test-vm.config = { pkgs, ... }: {
      microvm = {
        hypervisor = "qemu";
        # qemu's "microvm" machine may not expose SMBIOS tables; q35 does.
        qemu.machine = "q35";
        cpu = "max"; # no -enable-kvm: works without nested KVM (TCG)
        vsock.cid = 3;
        mem = 768;
        interfaces = [ ];
        shares = [{ source = "/nix/store"; mountPoint = "/nix/.ro-store"; tag = "ro-store"; proto = "9p"; }];
      };
      system.stateVersion = lib.trivial.release;

      # A consumer written the way the README tells users to write one.
      systemd.services.demo-consumer = {
        wantedBy = [ "multi-user.target" ];
        after = [ "vmcred-guest.service" ];
        wants = [ "vmcred-guest.service" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          LoadCredential = [ "API_KEY" "ENVIRONMENT" ];
          StandardOutput = "journal+console";
        };
        script = ''
          echo "vmcred-demo API_KEY sha256=$(${pkgs.coreutils}/bin/sha256sum < "$CREDENTIALS_DIRECTORY/API_KEY" | ${pkgs.coreutils}/bin/cut -d' ' -f1)"
          echo "vmcred-demo ENVIRONMENT=$(cat "$CREDENTIALS_DIRECTORY/ENVIRONMENT")"
        '';
      };
    };
  };

  testScript = ''
    host.start()
    host.wait_for_unit("vmcred-host.service")
    host.wait_for_unit("microvm@test-vm.service", timeout=900)

    # Boot-time credential through SMBIOS, late one over vsock.
    host.wait_until_succeeds("journalctl -u microvm@test-vm | grep -q 'vmcred-demo ENVIRONMENT=test'", timeout=900)
    host.wait_until_succeeds("journalctl -u microvm@test-vm | grep -q 'vmcred-demo API_KEY sha256=${sha initial}'", timeout=300)
    vm_pid = host.succeed("systemctl show -P MainPID microvm@test-vm").strip()
    agent_pid = host.succeed("systemctl show -P MainPID vmcred-host").strip()

    # Rotate: new file, one command, acknowledged, consumer restarted, VM not.
    host.succeed("printf %s ${rotated} > /run/secrets/vars/test-vm-secrets/api-key")
    host.succeed("vmcred-rotate test-vm API_KEY --timeout 120s")
    host.wait_until_succeeds("journalctl -u microvm@test-vm | grep -q 'vmcred-demo API_KEY sha256=${sha rotated}'", timeout=120)
    assert host.succeed("systemctl show -P MainPID microvm@test-vm").strip() == vm_pid, "the VM was restarted"

    # Late credential: missing when the agent started (which did not stop
    # it from starting), reported, then delivered once the file exists.
    host.wait_until_succeeds("vmcred-host status --config /etc/vmcred/host.toml | grep -q 'JWT_SECRET: source-missing'", timeout=120)
    host.succeed("printf %s late-jwt-value > /run/secrets/vars/test-vm-secrets/jwt-secret")
    host.succeed("vmcred-rotate test-vm JWT_SECRET --timeout 120s")
    host.succeed("vmcred-host status --config /etc/vmcred/host.toml | grep -q 'JWT_SECRET: applied'")
    assert host.succeed("systemctl show -P MainPID vmcred-host").strip() == agent_pid, "the agent was restarted"
    assert host.succeed("systemctl show -P MainPID microvm@test-vm").strip() == vm_pid, "the VM was restarted"

    print(host.succeed("vmcred-host status --config /etc/vmcred/host.toml"))
    # No secret on any command line, and none in the agent's journal.
    host.fail("grep -a -e ${initial} -e ${rotated} -e late-jwt-value /proc/[0-9]*/cmdline")
    host.fail("journalctl -u vmcred-host | grep -e ${initial} -e ${rotated} -e late-jwt-value")
  '';
}
