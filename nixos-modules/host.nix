# services.vmcred.host: the vmcred host agent, which reads every credential's
# source file itself (host.toml: path = "<source>"), and (when microvm.nix's
# host module is imported) the wiring of each microvm.nix VM named in
# services.vmcred.host.vms:
#   - LoadCredential=<cred>:<source> of its boot-time credentials on
#     microvm@<name>.service, ordered after vmcred-host.service;
#   - the launch wrapper as the VM's hypervisor package
#     (microvm.cloud-hypervisor.package / microvm.qemu.package), so the runner
#     microvm.nix builds execs `vmcred-host launch ... -- <real hypervisor>`;
#   - services.vmcred.guest enabled inside the guest.
# No declaredRunner and no binScripts are replaced.
{ config, lib, pkgs, options, ... }:

let
  inherit (lib)
    mkOption mkEnableOption mkIf mkMerge mkDefault mkOverride types
    literalExpression mapAttrs mapAttrs' mapAttrsToList nameValuePair
    filterAttrs concatLists concatStringsSep optional optionals optionalAttrs
    hasPrefix any attrValues escapeShellArg;

  vlib = import ./lib.nix { inherit lib; };

  hostConfig = config;
  cfg = config.services.vmcred.host;

  stateDir = "/var/lib/vmcred";
  runtimeDir = "/run/vmcred";
  configPath = "/etc/vmcred/host.toml";
  fixedKeys = {
    state_dir = stateDir;
    control_socket = "${runtimeDir}/control.sock";
    launch_socket = "${runtimeDir}/launch.sock";
  };

  # --- microvm.nix --------------------------------------------------------
  # The host module of microvm.nix declares microvm.host.* and microvm.vms.
  hasMicrovmHost = options ? microvm && options.microvm ? host;
  microvmVms = if hasMicrovmHost then hostConfig.microvm.vms else { };
  microvmStateDir = if hasMicrovmHost then hostConfig.microvm.stateDir else "/var/lib/microvms";

  isMicrovm = name: cfg.vms ? ${name} && microvmVms ? ${name};

  # The evaluated guest NixOS config of a declarative (`config = ...`) VM,
  # else null (flake-based VMs are evaluated elsewhere; see the warning below).
  guestOf = name:
    let vm = microvmVms.${name} or null; in
    if vm == null || (vm.config or null) == null then null else vm.config.config;

  hypervisorOf = name:
    let g = guestOf name; in if g == null then null else g.microvm.hypervisor;

  supportedHypervisors = [ "cloud-hypervisor" "qemu" ];

  # --- options ------------------------------------------------------------
  sourceType = lib.mkOptionType {
    name = "vmcredSource";
    description = "absolute path, as a string";
    # Path literals are accepted here only to be refused by an assertion with
    # a message; they are never interpolated (that would copy the secret into
    # the Nix store).
    check = x: builtins.isString x || builtins.isPath x;
    merge = lib.mergeEqualOption;
  };

  credentialModule = { name, ... }: {
    options = {
      source = mkOption {
        type = sourceType;
        example = "/run/secrets/vars/test-vm-secrets/api-key";
        description = ''
          Absolute path of the file on the host holding the credential's
          value, e.g. a sops-nix / agenix / clan vars secret under
          `/run/secrets`. Give it as a string: it is never copied into the
          Nix store (which every local user can read).

          The agent (vmcred-host.service, root) reads the file itself
          (`path = "<source>"` in host.toml) when it starts, every
          `settings.poll_interval` (10 s by default) and on
          `vmcred-rotate`, so a replaced file reaches the guest without
          restarting anything. The file may appear after boot (a late
          credential): until it does, `vmcred-host status` shows it as
          `source-missing`, and it is delivered as soon as it appears. It
          must not be under /home, /root, /run/user, /tmp or /var/tmp,
          which the agent's sandbox hides.
        '';
      };
      boot = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Also pass this credential at VM launch through SMBIOS OEM strings,
          so systemd (PID 1) in the guest imports it before any service
          starts. Without it, the credential arrives over vsock shortly after
          boot (services can order themselves after vmcred-guest.service).
          systemd reads a boot credential's source with `LoadCredential=`
          when `microvm@<name>.service` starts, so it must exist by then:
          a missing one makes that start fail.
        '';
      };
      allowOnCommandLine = mkOption {
        type = types.bool;
        default = false;
        description = ''
          cloud-hypervisor only: allow this boot-time value onto the
          hypervisor's command line. cloud-hypervisor takes OEM strings only
          as arguments, which every local user can read in
          `/proc/<pid>/cmdline`; use it for non-secret values only.
        '';
      };
    };
  };

  vmModule = { name, config, ... }: {
    options = {
      cid = mkOption {
        type = types.nullOr types.ints.unsigned;
        default =
          if isMicrovm name && hypervisorOf name == "qemu"
          then (guestOf name).microvm.vsock.cid
          else null;
        defaultText = literalExpression
          ''for a microvm.nix qemu VM: microvm.vms.<name>.config.microvm.vsock.cid, else null'';
        example = 3;
        description = ''
          AF_VSOCK CID of the guest (qemu's vhost-vsock `guest-cid`). Set
          exactly one of `cid` and `hybridSocket`.
        '';
      };
      hybridSocket = mkOption {
        type = types.nullOr types.str;
        default =
          if isMicrovm name && hypervisorOf name == "cloud-hypervisor" && config.cid == null
          then "${microvmStateDir}/${name}/notify.vsock"
          else null;
        defaultText = literalExpression
          ''for a microvm.nix cloud-hypervisor VM: "/var/lib/microvms/<name>/notify.vsock", else null'';
        example = "/var/lib/microvms/test-vm/notify.vsock";
        description = ''
          Host-side Unix socket of a hybrid-vsock hypervisor
          (cloud-hypervisor, Firecracker, vhost-device-vsock). The agent
          connects to it and writes `CONNECT <port>`.
        '';
      };
      port = mkOption {
        type = types.port;
        default = 700;
        description = ''
          vsock port the guest agent listens on. Must be below 1024: only
          root inside the guest can bind a privileged port, which is how the
          host knows it talks to the guest's root. Reaches the guest in the
          `vmcred.bootstrap` credential at launch.
        '';
      };
      hypervisorPackage = mkOption {
        type = types.nullOr types.package;
        default = null;
        description = ''
          microvm.nix VMs only: the real hypervisor package the launch wrapper
          execs. null uses microvm.nix's default
          (`microvm.cloud-hypervisor.package` / `microvm.qemu.package`).
          Set this instead of those options: vmcred replaces them with its
          wrapper.
        '';
      };
      credentials = mkOption {
        type = types.attrsOf (types.submodule credentialModule);
        default = { };
        description = ''
          Credentials for this VM, by the name they get in the guest
          (`/run/credentials/@system/<name>`, `LoadCredential=<name>`).
        '';
      };
    };
  };

  # --- rendering ----------------------------------------------------------
  renderedVms = mapAttrs (vmName: vm:
    optionalAttrs (vm.cid != null) { inherit (vm) cid; }
    // optionalAttrs (vm.hybridSocket != null) { hybrid_socket = vm.hybridSocket; }
    // {
      inherit (vm) port;
      # The agent reads the source itself: no LoadCredential= copy, which
      # systemd would take only once, when the unit starts.
      credentials = mapAttrs (credName: c: {
        path = sourceString vmName credName c;
        inherit (c) boot;
        allow_on_command_line = c.allowOnCommandLine;
      }) vm.credentials;
    }) cfg.vms;

  hostSettings = cfg.settings // fixedKeys // { vms = renderedVms; };
  hostTomlText = vlib.toTOML hostSettings;
  hostToml = pkgs.writeText "vmcred-host.toml" hostTomlText;

  # A path literal must never reach a string context (it would be copied into
  # the store); the assertions below explain, this only guards evaluation of
  # the config and unit files when assertions are not checked (e.g. `nix eval`).
  sourceString = vm: cred: c:
    if builtins.isPath c.source
    then throw "services.vmcred.host.vms.${vm}.credentials.${cred}.source is a Nix path literal; write it as a string"
    else c.source;

  anyHybrid = any (vm: vm.hybridSocket != null) (attrValues cfg.vms);

  # The agent re-reads the sources itself on rotate, so this only fills in
  # the config path: push, then return when the guest has acknowledged.
  rotateCommand = pkgs.writeShellScriptBin "vmcred-rotate" ''
    exec ${cfg.package}/bin/vmcred-host rotate --config ${configPath} "$@"
  '';

  # --- launch wrappers (microvm.nix) --------------------------------------
  launchScript = vmName: hypervisor: realBin:
    ''
      exec ${cfg.package}/bin/vmcred-host launch --config ${configPath} --vm ${escapeShellArg vmName} --hypervisor ${hypervisor} -- ${realBin} "$@"
    '';

  # Keeps what microvm.nix's runners read from the package: bin/ch-remote,
  # `version` (cloud-hypervisor argument syntax), `override`/`overrideAttrs`
  # and `configureFlags` (qemu closure trimming, seccomp sandbox detection).
  wrapHypervisor = vmName: hypervisor: binName: real:
    (pkgs.symlinkJoin {
      name = "vmcred-${real.name or hypervisor}";
      paths = [
        (pkgs.writeShellScriptBin binName (launchScript vmName hypervisor "${real}/bin/${binName}"))
        real
      ];
      meta.mainProgram = binName;
    }) // {
      version = real.version or "";
      vmcredLaunchWrapper = vmName;
      configureFlags = real.configureFlags or [ ];
      override = f: wrapHypervisor vmName hypervisor binName (real.override f);
      overrideAttrs = f: wrapHypervisor vmName hypervisor binName (real.overrideAttrs f);
    };

  hostArch = builtins.head (builtins.split "-" pkgs.stdenv.hostPlatform.system);

  # Module added to microvm.vms.<name>.config: evaluated in the guest's NixOS.
  guestWiring = vmName: { config, options, lib, ... }:
    let
      hv = config.microvm.hypervisor;
      vmCfg = cfg.vms.${vmName};
      mv = options.microvm;
      hasPackageOption = hvName: mv ? ${hvName} && mv.${hvName} ? package;
      realPackage = hvName:
        if vmCfg.hypervisorPackage != null then vmCfg.hypervisorPackage
        else mv.${hvName}.package.default;
      wrapperFor = {
        cloud-hypervisor = wrapHypervisor vmName "cloud-hypervisor" "cloud-hypervisor" (realPackage "cloud-hypervisor");
        qemu = wrapHypervisor vmName "qemu" "qemu-system-${hostArch}" (realPackage "qemu");
      };
    in
    {
      _file = "vmcred host.nix (microvm.vms.${vmName}.config)";
      imports = [ ./guest.nix ];

      config = mkMerge ([
        {
          services.vmcred.guest.enable = mkDefault true;
          services.vmcred.guest.package = mkDefault cfg.package;
          services.vmcred.guest.port = mkDefault vmCfg.port;

          assertions = [
            {
              assertion = builtins.elem hv supportedHypervisors;
              message = ''
                services.vmcred.host.vms.${vmName}: microvm.nix runs this VM with "${hv}", but vmcred's
                launch wrapper supports ${concatStringsSep " and " supportedHypervisors}. The wrapper is what
                hands the guest its bootstrap (the host key pin and port) through SMBIOS, so set
                microvm.vms.${vmName}.config.microvm.hypervisor to one of those.
              '';
            }
            {
              assertion = !(builtins.elem hv supportedHypervisors) || hasPackageOption hv;
              message = ''
                services.vmcred.host.vms.${vmName}: this microvm.nix has no microvm.${hv}.package option,
                which vmcred uses to put its launch wrapper in the runner. Update microvm.nix.
              '';
            }
            {
              assertion = !(builtins.elem hv supportedHypervisors) || !(hasPackageOption hv)
                || (config.microvm.${hv}.package.vmcredLaunchWrapper or null) == vmName;
              message = ''
                services.vmcred.host.vms.${vmName}: microvm.${hv}.package is forced to something other than
                vmcred's launch wrapper, so the VM would start without its bootstrap. To choose the real
                hypervisor package, set services.vmcred.host.vms.${vmName}.hypervisorPackage instead.
              '';
            }
          ];
        }
        # cloud-hypervisor only enables vsock (notify.vsock) when a CID is set;
        # with hybrid vsock the CID is private to the VM, so any value >= 3 works.
        (mkIf (hv == "cloud-hypervisor") {
          microvm.vsock.cid = mkDefault 3;
        })
      ]
      ++ optional (hasPackageOption "cloud-hypervisor") (mkIf (hv == "cloud-hypervisor") {
        microvm.cloud-hypervisor.package = mkOverride 90 wrapperFor.cloud-hypervisor;
      })
      ++ optional (hasPackageOption "qemu") (mkIf (hv == "qemu") {
        microvm.qemu.package = mkOverride 90 wrapperFor.qemu;
      }));
    };

  # --- assertions ---------------------------------------------------------
  # The agent reads sources from inside its sandbox: ProtectHome= hides
  # /home, /root and /run/user (unless "read-only"), PrivateTmp= gives it
  # its own empty /tmp and /var/tmp. Returns the setting hiding `src`, or
  # null. Follows what the unit actually gets, so an administrator who
  # relaxes the sandbox can use those places.
  agentServiceConfig = hostConfig.systemd.services.vmcred-host.serviceConfig or { };
  sandboxHides = [
    {
      setting = "ProtectHome=${showUnitValue (agentServiceConfig.ProtectHome or false)}";
      active = builtins.elem (agentServiceConfig.ProtectHome or false) [ true "yes" "tmpfs" ];
      dirs = [ "/home" "/root" "/run/user" ];
    }
    {
      setting = "PrivateTmp=true";
      active = builtins.elem (agentServiceConfig.PrivateTmp or false) [ true "yes" ];
      dirs = [ "/tmp" "/var/tmp" ];
    }
  ];
  showUnitValue = v: if builtins.isBool v then lib.boolToString v else toString v;
  under = dir: p: p == dir || hasPrefix "${dir}/" p;
  hiddenFromAgent = src:
    let hit = lib.findFirst (h: h.active && any (d: under d src) h.dirs) null sandboxHides; in
    if hit == null then null else hit.setting;

  vmAssertions = vmName: vm:
    let
      opt = "services.vmcred.host.vms.${vmName}";
      hv = if isMicrovm vmName then hypervisorOf vmName else null;
    in
    [
      {
        assertion = (vm.cid == null) != (vm.hybridSocket == null);
        message =
          if vm.cid == null then ''
            ${opt}: set exactly one of `cid` or `hybridSocket`; neither is set.
            - `cid`: the guest's AF_VSOCK CID (qemu vhost-vsock-pci guest-cid; for a microvm.nix
              qemu VM, set microvm.vms.${vmName}.config.microvm.vsock.cid and it is used).
            - `hybridSocket`: the Unix socket of a hybrid-vsock hypervisor (cloud-hypervisor,
              Firecracker), e.g. "/var/lib/microvms/${vmName}/notify.vsock".
          '' else ''
            ${opt}: set exactly one of `cid` (${toString vm.cid}) or `hybridSocket` ("${vm.hybridSocket}"):
            a VM has one vsock transport. Set the other to null.
          '';
      }
      {
        assertion = vm.cid == null || (vm.cid >= 3 && vm.cid < 4294967295);
        message = ''
          ${opt}.cid = ${toString vm.cid}: CIDs 0, 1 and 2 are reserved (hypervisor, loopback, host)
          and 4294967295 is VMADDR_CID_ANY; a guest CID is 3 or more.
        '';
      }
      {
        assertion = vm.hybridSocket == null || hasPrefix "/" vm.hybridSocket;
        message = "${opt}.hybridSocket must be an absolute path.";
      }
      {
        assertion = vm.port >= 1 && vm.port < 1024;
        message = ''
          ${opt}.port = ${toString vm.port}: must be 1-1023. Only root inside the guest can bind a
          vsock port below 1024, which is what tells the host it is talking to the guest's root
          and not to an unprivileged process.
        '';
      }
    ]
    ++ concatLists (mapAttrsToList (credName: c:
      let
        copt = "${opt}.credentials.${vlib.tomlKey credName}";
        nameProblem = vlib.credentialNameProblem credName;
        src = c.source;
        isStr = builtins.isString src;
        hiddenBy = if isStr then hiddenFromAgent src else null;
      in
      [
        {
          assertion = nameProblem == null;
          message = ''
            ${copt}: the credential name ${builtins.toJSON credName} ${toString nameProblem}.
            systemd credential names are ${vlib.credentialNameRules}.
          '';
        }
        {
          assertion = isStr;
          message = ''
            ${copt}.source is a Nix path literal. Nix copies such paths into the Nix store, which
            every local user can read. Give the path as a string, e.g. "/run/secrets/...".
          '';
        }
        {
          assertion = !isStr || (hasPrefix "/" src && !builtins.hasContext src);
          message = ''
            ${copt}.source must be an absolute path given as a plain string (not derived from a
            package or a store path); got ${builtins.toJSON (builtins.unsafeDiscardStringContext src)}.
          '';
        }
        {
          assertion = !isStr || !(hasPrefix builtins.storeDir src);
          message = ''
            ${copt}.source ${builtins.toJSON (builtins.unsafeDiscardStringContext src)} is in the Nix store,
            which every local user can read: a secret there is no secret. Keep it outside the store
            (sops-nix, agenix or clan vars put secrets under /run/secrets) and give vmcred that path.
          '';
        }
        {
          assertion = !isStr || builtins.match "[^[:cntrl:]]*" src != null;
          message = "${copt}.source contains a control character (such as a newline).";
        }
        {
          assertion = hiddenBy == null;
          message = ''
            ${copt}.source ${builtins.toJSON (builtins.unsafeDiscardStringContext src)} is hidden from
            vmcred-host.service by its sandbox (${toString hiddenBy}): the agent reads each source
            itself and would never find this one. Keep secrets where sops-nix, agenix or clan vars
            put them (/run/secrets/...), or somewhere else outside /home, /root, /run/user, /tmp and /var/tmp.
          '';
        }
        {
          assertion = !c.boot || builtins.match ''.*[],=["].*'' credName == null;
          message = ''
            ${copt}: boot = true, but the name contains one of = , [ ] or " which cannot be
            carried in an SMBIOS OEM string (io.systemd.credential:NAME=VALUE). Rename it or set boot = false.
          '';
        }
        {
          assertion = !(hv == "cloud-hypervisor" && c.boot && !c.allowOnCommandLine);
          message = ''
            ${copt}: boot = true on a cloud-hypervisor VM. cloud-hypervisor takes SMBIOS OEM strings
            only on its command line, which every local user can read in /proc/<pid>/cmdline.
            Either set boot = false (the value then arrives over vsock right after boot; order
            consumers after vmcred-guest.service), or, for a value that is not secret, set
            allowOnCommandLine = true.
          '';
        }
      ]) vm.credentials);

in
{
  options.services.vmcred.host = {
    enable = mkEnableOption "the vmcred host agent (vmcred-host.service), which delivers systemd credentials into VMs over vsock and rotates them without restarting the VMs";

    package = mkOption {
      type = types.package;
      default = pkgs.vmcred or (throw "services.vmcred.host.package: pkgs.vmcred does not exist; use vmcred's flake module (nixosModules.host), its overlay (overlays.default), or set this option");
      defaultText = literalExpression "pkgs.vmcred";
      description = "The vmcred package (provides bin/vmcred-host).";
    };

    settings = mkOption {
      type = types.submodule { freeformType = types.attrsOf vlib.tomlValueType; };
      default = { };
      example = { poll_interval = "10s"; dial_backoff_max = "30s"; rpc_timeout = "30s"; };
      description = ''
        Extra top-level keys of the agent's `host.toml` (see the README's
        "Config" section), e.g. `poll_interval`, `dial_backoff_max`,
        `rpc_timeout`. `state_dir`, `control_socket` and `launch_socket` are
        fixed by this module; VMs are configured through `vms`.
      '';
    };

    vms = mkOption {
      type = types.attrsOf (types.submodule vmModule);
      default = { };
      example = literalExpression ''
        {
          test-vm.credentials = {
            API_KEY.source = "/run/secrets/vars/test-vm-secrets/api-key";
            ENVIRONMENT = { source = "/etc/vmcred/test-vm/environment"; boot = true; allowOnCommandLine = true; };
          };
        }
      '';
      description = ''
        VMs to deliver credentials to, by name. A name that is also in
        `microvm.vms` (microvm.nix) is wired up automatically: the transport
        defaults from its hypervisor, its runner gets the launch wrapper, its
        unit gets the boot credentials, and the guest gets
        `services.vmcred.guest`.
      '';
    };

    configFile = mkOption {
      type = types.package;
      readOnly = true;
      default = hostToml;
      defaultText = literalExpression "the rendered host.toml";
      description = "The rendered agent configuration (also at ${configPath}).";
    };
  };

  # Extends microvm.nix's `microvm.vms.<name>` entries (only entries that
  # exist: defining microvm.vms.<name> ourselves would create VMs) with the
  # guest-side wiring. Declared without description/default so it merges with
  # microvm.nix's own declaration; hidden from the manual because on a host
  # without microvm.nix it would be an undocumented option.
  options.microvm.vms = mkOption {
    visible = false;
    type = types.attrsOf (types.submodule ({ name, config, ... }: {
      config = mkIf (cfg.enable && cfg.vms ? ${name} && (config.flake or null) == null) {
        config = guestWiring name;
      };
    }));
  };

  config = mkMerge [
    # Gives microvm.vms a value on hosts without microvm.nix (merges as empty).
    { microvm.vms = { }; }

    (mkIf cfg.enable {
      assertions = concatLists (mapAttrsToList vmAssertions cfg.vms)
        ++ map (k: {
          assertion = !(cfg.settings ? ${k});
          message = "services.vmcred.host.settings.${k} is fixed by the NixOS module (${if k == "vms" then "use services.vmcred.host.vms" else "it must match the unit's StateDirectory/RuntimeDirectory"}); remove it from settings.";
        }) (builtins.attrNames fixedKeys ++ [ "vms" ]);

      warnings = concatLists (mapAttrsToList (vmName: vm:
        optional (cfg.vms ? ${vmName} && microvmVms ? ${vmName} && guestOf vmName == null) ''
          services.vmcred.host.vms.${vmName}: microvm.vms.${vmName} is built from a flake, so vmcred cannot
          add its launch wrapper to it. In that flake's nixosConfiguration, import vmcred's
          nixosModules.guest and set microvm.<hypervisor>.package to a wrapper that execs
          `vmcred-host launch --config ${configPath} --vm ${vmName} --hypervisor <hv> -- <real binary> "$@"`.
        '') microvmVms)
        ++ concatLists (mapAttrsToList (vmName: vm:
          mapAttrsToList (credName: c:
            "services.vmcred.host.vms.${vmName}.credentials.${credName}: allowOnCommandLine = true puts its boot-time value on cloud-hypervisor's command line, readable by every local user in /proc/<pid>/cmdline."
          ) (filterAttrs (_: c: c.boot && c.allowOnCommandLine && hypervisorOf vmName == "cloud-hypervisor") vm.credentials)
        ) (filterAttrs (n: _: isMicrovm n) cfg.vms));

      environment.etc."vmcred/host.toml".source = hostToml;
      environment.systemPackages = [ cfg.package rotateCommand ];

      systemd.services.vmcred-host = {
        description = "vmcred host agent (systemd credentials into VMs over vsock)";
        wantedBy = [ "multi-user.target" ];
        before = [ "microvms.target" ];
        # The unit no longer depends on the credential list (no
        # LoadCredential=), so a change to VMs or credentials changes only
        # host.toml, a reload trigger: switch-to-configuration reloads
        # (SIGHUP: the agent re-reads host.toml and re-syncs the VMs whose
        # entries changed) instead of restarting. restartIfChanged stays
        # true on purpose: a change to the unit itself (a new package) must
        # restart to run the new binary, and restarting the agent does not
        # touch the running VMs.
        reloadTriggers = [ hostToml ];
        serviceConfig = {
          Type = "notify";
          ExecStart = "${cfg.package}/bin/vmcred-host serve --config ${configPath}";
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          Restart = "on-failure";
          RestartSec = "2s";

          # No LoadCredential=: the agent reads each source file itself
          # (host.toml: path = "<source>"). systemd would copy a
          # LoadCredential= source only when the unit starts (so a rotation
          # would need a restart), and one missing source would fail the
          # whole start (so a secret that appears after boot could not be
          # delivered). ProtectSystem=strict leaves every path readable;
          # ProtectHome=/PrivateTmp= hide a few, refused by an assertion.

          # host.pin there must be readable by the hypervisor user (launch).
          StateDirectory = "vmcred";
          StateDirectoryMode = "0755";
          # control.sock (root only) and launch.sock (anyone) are protected by
          # their own modes; keep them across restarts.
          RuntimeDirectory = "vmcred";
          RuntimeDirectoryMode = "0755";
          RuntimeDirectoryPreserve = "yes";

          # It dials AF_VSOCK and Unix sockets, serves two Unix sockets and
          # reads the source files; root owns its state.
          # - CAP_DAC_READ_SEARCH: root reads a root-owned 0400 secret
          #   without any capability, but sops-nix/agenix/clan secrets can
          #   be owned by another user (`owner = "..."`, mode 0400) or sit in
          #   a directory root may not search; this capability lets it read
          #   and traverse, and grants no write access.
          # - CAP_DAC_OVERRIDE, only with hybrid vsock: those sockets belong
          #   to the hypervisor user (microvm.nix: microvm, mode 0755), and
          #   connecting needs write permission on them.
          # Several CapabilityBoundingSet= lines are ORed by systemd.
          CapabilityBoundingSet = [ "CAP_DAC_READ_SEARCH" ] ++ optional anyHybrid "CAP_DAC_OVERRIDE";
          NoNewPrivileges = true;
          RestrictAddressFamilies = "AF_UNIX AF_VSOCK";
          IPAddressDeny = "any";
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RemoveIPC = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
        };
      };
    })

    # microvm.nix VMs: boot credentials and ordering on microvm@<name>.
    (mkIf (cfg.enable && hasMicrovmHost) {
      systemd.services = mapAttrs' (vmName: vm: nameValuePair "microvm@${vmName}" {
        after = [ "vmcred-host.service" ];
        wants = [ "vmcred-host.service" ];
        # The launch wrapper reads $CREDENTIALS_DIRECTORY/<cred> for boot = true.
        serviceConfig = optionalAttrs (any (c: c.boot) (attrValues vm.credentials)) {
          LoadCredential = mapAttrsToList (credName: c:
            "${vlib.escapeUnitValue credName}:${vlib.escapeUnitValue (sourceString vmName credName c)}")
            (filterAttrs (_: c: c.boot) vm.credentials);
        };
      }) (filterAttrs (n: _: microvmVms ? ${n}) cfg.vms);
    })
  ];
}
