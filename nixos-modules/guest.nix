# services.vmcred.guest: the vmcred guest agent inside a VM.
#
# It receives credentials from the host agent over vsock and writes them into
# /run/credentials/@system, where `LoadCredential=NAME` in any service finds
# them. A service that wants a credential writes:
#
#   systemd.services.my-app = {
#     after = [ "vmcred-guest.service" ];
#     wants = [ "vmcred-guest.service" ];
#     serviceConfig.LoadCredential = [ "API_KEY" ];   # $CREDENTIALS_DIRECTORY/API_KEY
#   };
#   services.vmcred.guest.credentials.API_KEY.restartUnits = [ "my-app.service" ];
#
# Boot ordering (the choice, and why): vmcred-guest.service has
# DefaultDependencies=no and runs After=systemd-modules-load.service (the
# vsock transport modules) and local-fs.target, and Before=basic.target, which
# every ordinary service is ordered after. It needs nothing from
# sysinit.target beyond /run and the credentials directory, both of which PID 1
# sets up before any unit. Since it is Type=notify and reports READY=1 only after
# the first sync with the host (or after initialSyncTimeout), services that
# start at boot see the synced values; it is not in sysinit.target so that a
# host that is down delays only ordinary services, not early boot (udev,
# tmpfiles, journald). Services with DefaultDependencies=no must say
# After=vmcred-guest.service themselves.
{ config, lib, pkgs, options, ... }:

let
  inherit (lib)
    mkOption mkEnableOption mkIf types literalExpression mapAttrs
    mapAttrsToList concatLists escapeShellArg mkMerge optionalAttrs removeSuffix
    hasSuffix;

  vlib = import ./lib.nix { inherit lib; };
  cfg = config.services.vmcred.guest;

  # Whether /var/lib/vmcred outlives a reboot of the guest: on microvm.nix,
  # when a volume or share is mounted at /, /var or /var/lib (a microvm's
  # root is otherwise rebuilt at each boot); elsewhere, when / is not a
  # tmpfs.
  persistentVarLib =
    let
      persistent = m: builtins.elem m [ "/" "/var" "/var/lib" "/var/lib/vmcred" ];
      mounts = map (v: v.mountPoint or null) (config.microvm.volumes or [ ])
        ++ map (s: s.mountPoint or null) (config.microvm.shares or [ ]);
    in
    if options ? microvm
    then lib.any persistent mounts
    else (config.fileSystems."/".fsType or "tmpfs") != "tmpfs";

  # Served by the agent in its RuntimeDirectory (its default --state-dir).
  credsSocket = "/run/vmcred/creds.sock";

  credentialModule = { name, ... }: {
    options = {
      restartUnits = mkOption {
        type = types.listOf vlib.unitNameType;
        default = [ ];
        example = [ "my-app.service" ];
        description = ''
          Units to restart (`systemctl try-restart`) after a new value of
          this credential has been written. A unit sees a new value only
          when it (re)starts.
        '';
      };
      reloadUnits = mkOption {
        type = types.listOf vlib.unitNameType;
        default = [ ];
        description = ''
          Units to reload (`systemctl try-reload-or-restart`) after a new
          value has been written; useful with `RefreshOnReload=` on systemd
          versions that refresh credentials on reload.
        '';
      };
      mode = mkOption {
        type = vlib.modeType;
        default = "0400";
        description = "File mode of the credential in the credentials directory.";
      };
      socketUnits = mkOption {
        type = types.listOf vlib.unitNameType;
        default = [ ];
        example = [ "api.service" ];
        description = ''
          Services that take this credential from the agent's credential
          socket: each gets `LoadCredential=<name>:${credsSocket}` and
          After=/Wants=vmcred-guest.service, and the agent hands the
          current value to these units only. With systemd >= 260, add
          `RefreshOnReload=credentials` to the unit and list it in
          `reloadUnits` too: a rotation then reaches it by a reload, with
          no restart. Only `.service` units.
        '';
      };
      deliver = mkOption {
        type = types.enum [ "file" "socket" ];
        default = "file";
        description = ''
          `file`: the value is a file in the credentials directory (and the
          socket, for `socketUnits`, serves it from there). `socket`: the
          agent keeps it in memory only and no file is written, so the
          `socketUnits` are the only way to it; needs `socketUnits`.
        '';
      };
    };
  };

  # systemd binds "@<hex>/unit/<unit>/<credential>" to ask the socket
  # (src/core/exec-credential.c): at most 107 bytes, with up to 16 hex
  # digits, so unit and credential name share 83 (as the agent checks).
  socketUnitAndNameMax = 83;

  socketWiring = mkMerge (concatLists (mapAttrsToList (name: c:
    map (unit: {
      ${removeSuffix ".service" unit} = {
        # A template instance ("foo@bar.service") has no unit file of its
        # own, so NixOS's default strategy (asDropinIfExists) would write a
        # whole foo@bar.service with only these lines, which hides the
        # template (no ExecStart=). As a drop-in it extends the instance.
        # mkDefault: a NixOS-defined full instance can set it back.
        overrideStrategy = lib.mkIf (lib.hasInfix "@" unit) (lib.mkDefault "asDropin");
        after = [ "vmcred-guest.service" ];
        wants = [ "vmcred-guest.service" ];
        serviceConfig.LoadCredential = [ (vlib.escapeUnitValue "${name}:${credsSocket}") ];
      };
    }) c.socketUnits) cfg.credentials));

  guestSettings = {
    initial_sync_timeout = cfg.initialSyncTimeout;
  } // optionalAttrs (cfg.pinStateDir != null) {
    pin_state_dir = cfg.pinStateDir;
  } // {
    credentials = mapAttrs (_: c: {
      restart_units = c.restartUnits;
      reload_units = c.reloadUnits;
      inherit (c) mode;
    } // optionalAttrs (c.socketUnits != [ ]) {
      socket_units = c.socketUnits;
    } // optionalAttrs (c.deliver != "file") {
      inherit (c) deliver;
    }) cfg.credentials;
  };
  guestTomlText = vlib.toTOML guestSettings;
  guestTomlRaw = pkgs.writeText "vmcred-guest.toml" guestTomlText;
  # Checked at build time by the agent's own loader (as the host module does
  # with `vmcred-host check-config`): a config the agent would refuse at boot,
  # and then crash-loop on, never reaches a running system.
  guestToml =
    if cfg.checkConfig
    then pkgs.runCommand "vmcred-guest.toml" { } ''
      ${cfg.package}/bin/vmcred-guest --check-config --config ${guestTomlRaw} > /dev/null \
        && cp ${guestTomlRaw} "$out"
    ''
    else guestTomlRaw;
in
{
  options.services.vmcred.guest = {
    enable = mkEnableOption "the vmcred guest agent (vmcred-guest.service), which receives credentials from the host over vsock into /run/credentials/@system";

    package = mkOption {
      type = types.package;
      default = pkgs.vmcred or (throw "services.vmcred.guest.package: pkgs.vmcred does not exist; use vmcred's flake module (nixosModules.guest), its overlay (overlays.default), or set this option");
      defaultText = literalExpression "pkgs.vmcred";
      description = "The vmcred package (provides bin/vmcred-guest).";
    };

    port = mkOption {
      type = types.port;
      default = 700;
      description = ''
        Informational: the vsock port the agent listens on comes from the
        `vmcred.bootstrap` credential the host passes at launch
        (services.vmcred.host.vms.<name>.port on the host).
      '';
    };

    credentialsDirectory = mkOption {
      type = types.str;
      default = "/run/credentials/@system";
      description = ''
        Where credentials are written. The default is the directory PID 1
        imports SMBIOS credentials into, which `LoadCredential=NAME` searches
        first.
      '';
    };

    initialSyncTimeout = mkOption {
      type = vlib.durationType;
      default = "30s";
      description = ''
        The agent reports ready (and so lets services ordered after it
        start) after the first sync with the host, or after this long if
        the host does not connect.
      '';
    };

    pinStateDir = mkOption {
      type = types.nullOr types.str;
      default = if persistentVarLib then "/var/lib/vmcred" else null;
      defaultText = literalExpression ''
        "/var/lib/vmcred" when /var/lib survives a reboot (a microvm.nix volume or share at
        /, /var or /var/lib; without microvm.nix, a / that is not a tmpfs), else null'';
      example = "/var/lib/vmcred";
      description = ''
        Directory on storage that survives a reboot of the guest, for the host key pins
        (`pins.json`); created 0700, and refused if anyone but root can write it. Null: the
        pins live in /run/vmcred and a guest that reboots inside the same hypervisor
        process trusts its launch-time bootstrap pin again, even after a key rollover
        retired (or revoked) that key; relaunch such VMs instead of rebooting them.
      '';
    };

    credentials = mkOption {
      type = types.attrsOf (types.submodule credentialModule);
      default = { };
      example = literalExpression ''
        { API_KEY.restartUnits = [ "my-app.service" ]; }
      '';
      description = ''
        What to do when a credential changes, by credential name.
        Credentials not listed here are still written; they just trigger
        no unit action.
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run `vmcred-guest --check-config` on the rendered guest.toml at build
        time. Turn it off only when the package cannot run on the build
        machine (cross-compiling).
      '';
    };

    configFile = mkOption {
      type = types.package;
      readOnly = true;
      default = guestToml;
      defaultText = literalExpression "the rendered guest.toml";
      description = "The rendered guest agent configuration (also at /etc/vmcred/guest.toml).";
    };
  };

  config = mkIf cfg.enable (mkMerge [{
    assertions = concatLists (mapAttrsToList (name: _:
      let problem = vlib.credentialNameProblem name; in [{
        assertion = problem == null;
        message = ''
          services.vmcred.guest.credentials.${vlib.tomlKey name}: the credential name ${builtins.toJSON name} ${toString problem}.
          systemd credential names are ${vlib.credentialNameRules}.
        '';
      }]) cfg.credentials)
      ++ concatLists (mapAttrsToList (name: c: map (unit: {
        assertion = hasSuffix ".service" unit && unit != "vmcred-guest.service";
        message = ''
          services.vmcred.guest.credentials.${vlib.tomlKey name}.socketUnits: ${builtins.toJSON unit} is not a .service unit other than vmcred-guest.service; the credential socket is wired only into services (systemd.services.<name>.serviceConfig.LoadCredential).
        '';
      }) c.socketUnits) cfg.credentials)
      ++ concatLists (mapAttrsToList (name: c: map (unit:
        let total = builtins.stringLength unit + builtins.stringLength name; in {
        assertion = total <= socketUnitAndNameMax;
        message = ''
          services.vmcred.guest.credentials.${vlib.tomlKey name}.socketUnits: ${builtins.toJSON unit} (${toString (builtins.stringLength unit)} bytes) with this credential name (${toString (builtins.stringLength name)} bytes) is ${toString total} bytes. systemd asks the credential socket from the address "@<up to 16 hex digits>/unit/<unit>/<credential>", at most 107 bytes, which leaves ${toString socketUnitAndNameMax} for the unit and the credential name together; the unit would fail to start. Shorten one of them, or deliver this credential as a file.
        '';
      }) c.socketUnits) cfg.credentials)
      ++ mapAttrsToList (name: c: {
        assertion = c.deliver != "socket" || c.socketUnits != [ ];
        message = ''
          services.vmcred.guest.credentials.${vlib.tomlKey name}: deliver = "socket" needs socketUnits (the agent writes no file, so no unit could read the value otherwise).
        '';
      }) cfg.credentials
      ++ [{
        assertion = lib.hasPrefix "/" cfg.credentialsDirectory;
        message = "services.vmcred.guest.credentialsDirectory must be an absolute path.";
      }];

    # AF_VSOCK and its virtio transport (built in on some kernels; loading a
    # built-in module is a no-op).
    boot.kernelModules = [ "vsock" "vmw_vsock_virtio_transport" ];

    environment.etc."vmcred/guest.toml".source = guestToml;
    environment.systemPackages = [ cfg.package ];

    systemd.services.vmcred-guest = {
      description = "vmcred guest agent (systemd credentials from the host over vsock)";
      wantedBy = [ "basic.target" ];
      before = [ "basic.target" "shutdown.target" ];
      after = [ "systemd-modules-load.service" "local-fs.target" ];
      wants = [ "systemd-modules-load.service" ];
      conflicts = [ "shutdown.target" ];
      unitConfig = {
        DefaultDependencies = false;
        # Keep retrying: credentials already written stay in place meanwhile.
        StartLimitIntervalSec = 0;
      };
      serviceConfig = {
        Type = "notify";
        ExecStart = "${cfg.package}/bin/vmcred-guest --config ${guestToml} --credentials-dir ${escapeShellArg cfg.credentialsDirectory} --systemctl ${config.systemd.package}/bin/systemctl";
        Restart = "always";
        RestartSec = "1s";
        RuntimeDirectory = "vmcred";
        RuntimeDirectoryMode = "0700";
        RuntimeDirectoryPreserve = "yes";
        UMask = "0077";

        # What the agent does, and what each needs:
        # - listens on a vsock port below 1024 (only the guest's root can
        #   bind it: that is how the host knows who answers):
        #   CAP_NET_BIND_SERVICE; AF_VSOCK.
        # - remounts /run/credentials/@system read-write for each write and
        #   read-only again: CAP_SYS_ADMIN, mount(2) (@mount), and the
        #   SYSTEM's mount namespace: any setting that gives the unit its
        #   own namespace (ProtectSystem=, ProtectHome=, PrivateTmp=,
        #   PrivateDevices=, PrivateMounts=, ReadWritePaths=,
        #   ProtectKernel*=, ProtectControlGroups=, ProtectProc=, ...)
        #   would make the remount, and so the write, invisible to the
        #   units that read the credentials. None of them is set here.
        # - asks PID 1 to try-restart/reload units with systemctl (its
        #   private AF_UNIX socket; PID 1 checks the caller is uid 0, which
        #   needs no capability); sd_notify (AF_UNIX).
        CapabilityBoundingSet = [ "CAP_SYS_ADMIN" "CAP_NET_BIND_SERVICE" ];
        NoNewPrivileges = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_VSOCK" ];
        IPAddressDeny = "any";
        # The agent sets no clock, hostname or resource limits and opens
        # no device but the pseudo ones: each of these lowers
        # `systemd-analyze security` (3.8 -> 3.4 on 262) and creates no
        # mount namespace; the VM stage proves the agent still works under
        # them on systemd 252, 257 and 262.
        ProtectClock = true;
        ProtectHostname = true;
        DevicePolicy = "closed";
        SystemCallFilter = [ "@system-service" "@mount" "~@resources" ];
        SystemCallErrorNumber = "EPERM";
        SystemCallArchitectures = "native";
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
      };
    };
  }
  # LoadCredential=<name>:${credsSocket} on each credential's socketUnits.
  { systemd.services = socketWiring; }
  ]);
}
