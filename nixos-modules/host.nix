# services.vmcred.host: the vmcred host agent, which reads every credential's
# source file itself (host.toml: path = "<source>"), and (when microvm.nix's
# host module is imported) the wiring of each microvm.nix VM named in
# services.vmcred.host.vms:
#   - on microvm@<name>.service (microvm.nix's template runs it as
#     User=microvm in /var/lib/microvms/<name>): LoadCredential= of its boot
#     credentials, RuntimeDirectory=vmcred-launch/<name> (0700, owned by
#     that user: the launcher's private carrier files), ordered after
#     vmcred-host.service;
#   - the transport read from the VM's own microvm.nix settings: its
#     hypervisor, `microvm.vsock.cid`, cloud-hypervisor's `--vsock` in
#     `microvm.cloud-hypervisor.extraArgs`, Firecracker's `uds_path`;
#   - for a `microvm.vms.<name>.config` VM: ./microvm-guest.nix in the guest
#     (the guest agent, and the launch wrapper around the hypervisor package
#     microvm.nix runs). `evaluatedConfig` and `flake` VMs are evaluated
#     elsewhere: they import it themselves, and an assertion says so.
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
  # microvm.nix's host module runs every microvm@ unit as this user.
  microvmUser = "microvm";

  isMicrovm = name: cfg.vms ? ${name} && microvmVms ? ${name};

  # How microvm.nix got the VM's NixOS configuration (host/options.nix).
  kindOf = name:
    let vm = microvmVms.${name} or null; in
    if vm == null then "none"
    else if (vm.config or null) != null then "config"
    else if (vm.evaluatedConfig or null) != null then "evaluatedConfig"
    else if (vm.flake or null) != null then "flake"
    else "none";

  # The VM's evaluated NixOS config, read the way microvm.nix's host module
  # reads it, else null.
  guestOf = name:
    let vm = microvmVms.${name}; kind = kindOf name; in
    if kind == "config" then vm.config.config
    else if kind == "evaluatedConfig" then vm.evaluatedConfig.config
    else if kind == "flake" then vm.flake.nixosConfigurations.${name}.config
    else null;

  # Its declared options: whether it imports vmcred's guest modules.
  guestOptionsOf = name:
    let vm = microvmVms.${name}; kind = kindOf name; in
    if kind == "config" then vm.config.options
    else if kind == "evaluatedConfig" then vm.evaluatedConfig.options
    else if kind == "flake" then vm.flake.nixosConfigurations.${name}.options
    else { };

  hypervisorOf = name:
    let g = guestOf name; in if g == null then null else g.microvm.hypervisor;

  # Hypervisors microvm.nix runs with vsock, and where each takes boot data.
  afVsockHypervisors = [ "qemu" "crosvm" "kvmtool" "alioth" ];
  hybridHypervisors = [ "cloud-hypervisor" "firecracker" ];
  supportedHypervisors = afVsockHypervisors ++ hybridHypervisors;
  # Only a command line can carry boot data (OEM strings or the kernel's).
  commandLineHypervisors = [ "cloud-hypervisor" "firecracker" "crosvm" "kvmtool" "alioth" ];

  # `--vsock cid=N,socket=S` in cloud-hypervisor's extraArgs, as microvm.nix's
  # runner reads it (the value after each `--vsock`, key=value pairs).
  chUserVsock = g:
    let
      args = g.microvm.cloud-hypervisor.extraArgs or [ ];
      idx = lib.findFirst (i: builtins.elemAt args i == "--vsock") null
        (lib.range 0 (builtins.length args - 2));
      pairs = if idx == null then [ ] else lib.splitString "," (builtins.elemAt args (idx + 1));
      kv = builtins.listToAttrs (map (p:
        let m = builtins.match "([^=]*)=(.*)" p; in
        if m == null then lib.nameValuePair p "" else lib.nameValuePair (builtins.elemAt m 0) (builtins.elemAt m 1)) pairs);
    in
    {
      cid = if kv ? cid then lib.toInt kv.cid else null;
      socket = kv.socket or null;
    };

  inStateDir = name: p: if hasPrefix "/" p then p else "${microvmStateDir}/${name}/${p}";

  # { cid; hybridSocket; } as microvm.nix configures the VM's vsock, or null
  # when it has none.
  transportOf = name:
    let
      g = guestOf name;
      hv = g.microvm.hypervisor;
      cid = g.microvm.vsock.cid;
    in
    if g == null then null
    else if builtins.elem hv afVsockHypervisors then
      (if cid == null then null else { inherit cid; hybridSocket = null; })
    else if hv == "cloud-hypervisor" then
      let user = chUserVsock g; in
      if cid == null && user.cid == null then null
      else { cid = null; hybridSocket = inStateDir name (if user.socket != null then user.socket else "notify.vsock"); }
    else if hv == "firecracker" then
      (if cid == null then null
       else { cid = null; hybridSocket = inStateDir name (g.microvm.firecracker.extraConfig.vsock.uds_path or "notify.vsock"); })
    else null;

  # qemu machine types with SMBIOS tables; the others get fw_cfg.
  qemuHasSmbios = machine: builtins.match "(q35|pc)([-,].*)?" machine != null;
  # fw_cfg file names are at most 55 bytes; "opt/io.systemd.credentials/" takes 27.
  fwCfgNameMax = 28;
  usesFwCfg = name:
    let g = guestOf name; in
    g != null && g.microvm.hypervisor == "qemu" && !(qemuHasSmbios g.microvm.qemu.machine);

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
        type = types.nullOr sourceType;
        default = null;
        example = "/run/secrets/vars/test-vm-secrets/api-key";
        description = ''
          Absolute path of the file on the host holding the credential's
          value, e.g. `config.sops.secrets.<name>.path` (sops-nix),
          `config.age.secrets.<name>.path` (agenix) or
          `config.clan.core.vars.generators.<gen>.files.<file>.path` (clan).
          Give it as a string: it is never copied into the Nix store (which
          every local user can read). Set exactly one of `source` and `value`.

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
      openbao = mkOption {
        type = types.nullOr (types.submodule {
          options = {
            mount = mkOption {
              type = types.str;
              default = "secret";
              description = "The KV version 2 secrets engine's mount.";
            };
            path = mkOption {
              type = types.str;
              example = "apps/db";
              description = "The secret's path under the mount.";
            };
            field = mkOption {
              type = types.str;
              example = "password";
              description = "The field of the secret whose (string) value is the credential.";
            };
            onDelete = mkOption {
              type = types.enum [ "keep" "remove" ];
              default = "keep";
              description = ''
                What a deleted or destroyed secret (or current version) does: `keep` leaves
                the guest its last value (status says why), `remove` removes the credential
                from the guest.
              '';
            };
          };
        });
        default = null;
        example = literalExpression ''{ path = "apps/db"; field = "password"; }'';
        description = ''
          Take the value from the OpenBao / Vault server in
          `services.vmcred.host.openbao`: one field of a KV v2 secret. The agent watches the
          secret's version and delivers a new one without `vmcred-rotate`. Set exactly one of
          `source`, `value` and `openbao`; not with `boot = true`.
        '';
      };
      value = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "production";
        description = ''
          An inline value for a NON-SECRET constant (like systemd's
          `SetCredential=`): it is written to the Nix store, which every
          local user can read. Secrets go in `source`.
        '';
      };
      restartUnits = mkOption {
        type = types.listOf vlib.unitNameType;
        default = [ ];
        example = [ "my-app.service" ];
        description = ''
          Units in the guest to restart after a new value was written there;
          forwarded into the guest's `services.vmcred.guest.credentials`
          (for `microvm.vms.<name>.config` VMs).
        '';
      };
      reloadUnits = mkOption {
        type = types.listOf vlib.unitNameType;
        default = [ ];
        description = ''
          Units in the guest to reload after a new value was written there
          (with `RefreshOnReload=credentials`, systemd >= 260, a reload hands
          the unit its new credential); forwarded like `restartUnits`.
        '';
      };
      boot = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Also pass this credential at VM launch, in the form the VM's
          hypervisor and machine type carry (qemu: fw_cfg or SMBIOS files;
          cloud-hypervisor: OEM strings; Firecracker, crosvm, kvmtool,
          alioth: the kernel command line), so systemd (PID 1) in the guest
          imports it before any service starts. Without it, the credential arrives over vsock shortly after
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
          Allow this boot-time value onto the hypervisor's command line, on
          the hypervisors that take boot data only there (cloud-hypervisor:
          OEM strings; Firecracker, crosvm, kvmtool, alioth: the kernel
          command line). Every local user can read it in
          `/proc/<pid>/cmdline` (and, for a kernel command line, every
          process in the guest in /proc/cmdline): non-secret values only.
        '';
      };
    };
  };

  vmModule = { name, config, ... }: {
    options = {
      cid = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = let t = if isMicrovm name then transportOf name else null; in if t == null then null else t.cid;
        defaultText = literalExpression
          ''for a microvm.nix qemu, crosvm, kvmtool or alioth VM: its microvm.vsock.cid, else null'';
        example = 3;
        description = ''
          AF_VSOCK CID of the guest. Set exactly one of `cid` and
          `hybridSocket`; for a microvm.nix VM both default from its own
          settings.
        '';
      };
      hybridSocket = mkOption {
        type = types.nullOr types.str;
        default = let t = if isMicrovm name then transportOf name else null; in if t == null then null else t.hybridSocket;
        defaultText = literalExpression
          ''for a microvm.nix cloud-hypervisor or Firecracker VM: its vsock socket in /var/lib/microvms/<name> ("notify.vsock", or `socket=` of `--vsock` in microvm.cloud-hypervisor.extraArgs), else null'';
        example = "/var/lib/microvms/test-vm/notify.vsock";
        description = ''
          Host-side Unix socket of a hybrid-vsock hypervisor
          (cloud-hypervisor, Firecracker, vhost-device-vsock). The agent
          connects to it and writes `CONNECT <port>`.
        '';
      };
      launchKey = mkOption {
        type = types.enum [ "off" "required" ];
        default =
          if isMicrovm name && hypervisorOf name == "qemu" && config.cid != null
          then "required" else "off";
        defaultText = literalExpression
          ''"required" for a microvm.nix qemu VM with a `cid` (qemu is the only hypervisor microvm.nix runs that takes boot data from private files), else "off"'';
        description = ''
          Whether the agent pushes anything to this VM only when its guest
          returns the VM's *launch key* (rendered as `launch_key =
          "required"`). It protects against H1: an AF_VSOCK VM is dialled by
          its CID alone, so while it is stopped a local user who can open
          `/dev/vhost-vsock` (root, or a `kvm` group member) could start a
          VM of their own on that CID and receive this VM's credentials.
          With "required" the agent keeps a random key for the VM
          (`/var/lib/vmcred/launch-keys/<name>`, made when the agent
          starts), `microvm@<name>.service` gets it with
          `LoadCredential=vmcred.launch-key:...`, and vmcred's launch
          wrapper hands it to the guest through a private qemu SMBIOS or
          fw_cfg file, never a command line. Only qemu has such a file, so
          "required" on another hypervisor is refused (for hybrid vsock,
          cloud-hypervisor and Firecracker, "off" is safe: the VMM's socket
          path is the VM's identity). Cost: a VM started before its key
          existed (before the agent first ran with this setting) is refused
          until it is restarted (`systemctl restart microvm@<name>`). For a
          VM that is not a microvm.nix VM, "required" means you pass the
          key yourself (`vmcred-host launch` with that `LoadCredential=`).
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
    // optionalAttrs (vm.launchKey == "required") { launch_key = "required"; }
    // {
      inherit (vm) port;
      # The agent reads the source itself: no LoadCredential= copy, which
      # systemd would take only once, when the unit starts.
      credentials = mapAttrs (credName: c:
        (if c.openbao != null && c.source == null && c.value == null
         then {
           openbao = {
             inherit (c.openbao) mount path field;
             on_delete = c.openbao.onDelete;
           };
         }
         else { path = sourceString vmName credName c; })
        // {
          inherit (c) boot;
          allow_on_command_line = c.allowOnCommandLine;
        }) vm.credentials;
    }) cfg.vms;

  renderedOpenbao = let o = cfg.openbao; in
    {
      inherit (o) address;
      poll_interval = o.pollInterval;
    }
    // optionalAttrs (o.caFile != null) { ca_file = o.caFile; }
    // optionalAttrs o.insecureLoopbackHttp { insecure_loopback_http = true; }
    // optionalAttrs (o.tokenFile != null) { token_file = o.tokenFile; }
    // optionalAttrs (o.appRole != null) {
      approle = {
        inherit (o.appRole) mount;
        role_id_file = o.appRole.roleIdFile;
        secret_id_file = o.appRole.secretIdFile;
      };
    };

  # Files the agent reads for the store's login: outside the Nix store.
  openbaoFiles = let o = cfg.openbao; in
    if o == null then [ ]
    else lib.filter (x: x.value != null) ([
      { name = "tokenFile"; value = o.tokenFile; }
      { name = "caFile"; value = o.caFile; }
    ] ++ optionals (o.appRole != null) [
      { name = "appRole.roleIdFile"; value = o.appRole.roleIdFile; }
      { name = "appRole.secretIdFile"; value = o.appRole.secretIdFile; }
    ]);

  metricsSettings = optionalAttrs cfg.metrics.socket { metrics_socket = "${runtimeDir}/metrics.sock"; }
    // optionalAttrs (cfg.metrics.textfile != null) { metrics_textfile = cfg.metrics.textfile; }
    // optionalAttrs (cfg.metrics.socket || cfg.metrics.textfile != null) { metrics_interval = cfg.metrics.interval; };
  metricsDir = if cfg.metrics.textfile == null then null else dirOf cfg.metrics.textfile;

  hostSettings = cfg.settings // fixedKeys // metricsSettings
    # Who may tell the agent a VM launched (root always may): microvm.nix
    # runs the hypervisor, and so the launcher, as this user.
    // optionalAttrs hasMicrovmHost { launch_users = [ microvmUser ]; }
    // optionalAttrs (cfg.openbao != null) { openbao = renderedOpenbao; }
    // { vms = renderedVms; };
  hostTomlText = vlib.toTOML hostSettings;
  # Type=notify-reload exists since systemd 253.
  notifyReload = lib.versionAtLeast (lib.getVersion config.systemd.package) "253";
  hostTomlRaw = pkgs.writeText "vmcred-host.toml" hostTomlText;
  # Checked at build time by the agent itself, as nixpkgs does for nginx or
  # sshd: a config the agent would refuse never reaches a running system.
  # The agent resolves `launch_users` to uids when it loads the config; the
  # build sandbox has no such users, so the copy it checks leaves them out
  # (every other key is checked as written).
  hostTomlForCheck = pkgs.writeText "vmcred-host-check.toml"
    (vlib.toTOML (builtins.removeAttrs hostSettings [ "launch_users" ]));
  hostToml =
    if cfg.checkConfig
    then pkgs.runCommand "vmcred-host.toml" { } ''
      ${cfg.package}/bin/vmcred-host check-config --config ${hostTomlForCheck} > /dev/null \
        && cp ${hostTomlRaw} "$out"
    ''
    else hostTomlRaw;

  # A path literal must never reach a string context (it would be copied into
  # the store); the assertions below explain, this only guards evaluation of
  # the config and unit files when assertions are not checked (e.g. `nix eval`).
  sourceString = vm: cred: c:
    if c.value != null
    # A non-secret constant: a store file is what it is meant to be.
    then "${pkgs.writeText "vmcred-${vm}-${lib.strings.sanitizeDerivationName cred}" c.value}"
    else if builtins.isPath c.source
    then throw "services.vmcred.host.vms.${vm}.credentials.${cred}.source is a Nix path literal; write it as a string"
    else if c.source == null
    then throw "services.vmcred.host.vms.${vm}.credentials.${cred}: set `source` (a file) or `value` (a non-secret constant)"
    else c.source;

  anyHybrid = any (vm: vm.hybridSocket != null) (attrValues cfg.vms);
  # A VM with a CID (qemu, crosvm, kvmtool, alioth) is dialled over AF_VSOCK
  # from a privileged source port (the guest admits no other).
  anyVsock = any (vm: vm.cid != null) (attrValues cfg.vms);
  # With control_group the agent gives control.sock (and metrics.sock) to
  # that group: a chown to a group root is not a member of.
  chownsSockets = (cfg.settings.control_group or null) != null;

  # The agent re-reads the sources itself on rotate, so this only fills in
  # the config path: push, then return when the guest has acknowledged.
  rotateCommand = pkgs.writeShellScriptBin "vmcred-rotate" ''
    exec ${cfg.package}/bin/vmcred-host rotate --config ${configPath} "$@"
  '';

  # --- the guest side of a `microvm.vms.<name>.config` VM -----------------
  # Added to microvm.vms.<name>.config: evaluated in the guest's NixOS.
  guestWiring = vmName: { lib, ... }:
    let vmCfg = cfg.vms.${vmName}; in
    {
      _file = "vmcred host.nix (microvm.vms.${vmName}.config)";
      imports = [ ./microvm-guest.nix ];
      services.vmcred.guest = {
        enable = mkDefault true;
        package = mkDefault cfg.guestPackage;
        port = mkDefault vmCfg.port;
        microvm = {
          launchWrapper = mkDefault true;
          vmName = vmName;
          hostPackage = mkDefault cfg.package;
          hostConfig = configPath;
        };
        credentials = mapAttrs (_: c: {
          restartUnits = c.restartUnits;
          reloadUnits = c.reloadUnits;
        }) (filterAttrs (_: c: c.restartUnits != [ ] || c.reloadUnits != [ ]) vmCfg.credentials);
      };
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

  # A microvm.nix VM as vmcred needs it: the hypervisor has vsock, the VM
  # has it turned on, and the guest runs vmcred's guest module and wrapper.
  microvmAssertions = vmName: vm:
    let
      opt = "services.vmcred.host.vms.${vmName}";
      kind = kindOf vmName;
      g = guestOf vmName;
      hv = hypervisorOf vmName;
      where = if kind == "config" then "microvm.vms.${vmName}.config" else "the VM's own NixOS configuration (microvm.vms.${vmName}.${kind})";
      guestHas = path: lib.hasAttrByPath path (guestOptionsOf vmName) && lib.attrByPath path false g;
    in
    optionals (g != null) ([
      {
        assertion = kind == "config"
          || (guestHas [ "services" "vmcred" "guest" "enable" ] && guestHas [ "services" "vmcred" "guest" "microvm" "launchWrapper" ]);
        message = ''
          ${opt}: microvm.vms.${vmName} is given as `${kind}`, so vmcred cannot add anything to it (it is
          evaluated outside this host's configuration). In that NixOS configuration, import vmcred's
          guest module for microvm.nix and turn it on:
            imports = [ vmcred.nixosModules.microvm-guest ];
            services.vmcred.guest = { enable = true; microvm.launchWrapper = true; };
        '';
      }
      {
        assertion = builtins.elem hv supportedHypervisors;
        message = ''
          ${opt}: microvm.nix runs this VM with "${hv}", which it gives no vsock (microvm.nix
          lib/runners/${hv}.nix), so vmcred cannot reach the guest agent. Set ${where}'s
          microvm.hypervisor to one of: ${concatStringsSep ", " supportedHypervisors}.
        '';
      }
      {
        assertion = !(builtins.elem hv supportedHypervisors) || transportOf vmName != null
          || vm.cid != null || vm.hybridSocket != null;
        message = ''
          ${opt}: the VM has no vsock: set microvm.vsock.cid in ${where}
          (a CID of 3 or more, unique on this host for qemu, crosvm, kvmtool and alioth)${lib.optionalString (hv == "cloud-hypervisor") ",\n          or `--vsock cid=N,socket=PATH` in microvm.cloud-hypervisor.extraArgs"}.
        '';
      }
      {
        assertion = vm.launchKey != "required" || !(builtins.elem hv supportedHypervisors) || hv == "qemu";
        message = ''
          ${opt}.launchKey = "required", but microvm.nix runs this VM with ${hv}, which takes boot
          data only on a command line (${if hv == "cloud-hypervisor" then "--platform oem_strings" else "the kernel command line"}), where ${if hv == "firecracker" then "every process in the guest can read it and the guest kernel logs it at boot" else "every local user can read it in /proc/<pid>/cmdline"}:
          whoever reads the launch key can answer as this VM. vmcred passes the key only through a
          private file, which of microvm.nix's hypervisors only qemu reads (SMBIOS or fw_cfg).
          Either run the VM under qemu (microvm.hypervisor = "qemu" in ${where}), or set
          ${opt}.launchKey = "off"${if builtins.elem hv hybridHypervisors then '':
          that is safe here, since ${hv} is reached through hybrid vsock, its own Unix socket,
          which only the VMM's user can create: the socket path already tells the agent which
          VM answers.'' else '', accepting that while this VM is stopped, anyone who can
          open /dev/vhost-vsock (root, the kvm group) can start a VM on its CID and receive its
          credentials.''}
        '';
      }
      {
        # (Without vmcred's guest module, the assertion above explains.)
        assertion = vm.launchKey != "required" || hv != "qemu"
          || !(lib.hasAttrByPath [ "services" "vmcred" "guest" "microvm" "launchWrapper" ] (guestOptionsOf vmName))
          || guestHas [ "services" "vmcred" "guest" "microvm" "launchWrapper" ];
        message = ''
          ${opt}.launchKey = "required", but the VM's runner has no vmcred launch wrapper
          (services.vmcred.guest.microvm.launchWrapper is off in ${where}), so nothing would pass
          the guest its launch key and the agent would refuse the guest forever. Turn the wrapper
          on (services.vmcred.guest.microvm.launchWrapper = true), or set ${opt}.launchKey = "off".
        '';
      }
    ]
    ++ concatLists (mapAttrsToList (credName: c:
      let copt = "${opt}.credentials.${vlib.tomlKey credName}"; in
      [
        {
          assertion = kind == "config" || (c.restartUnits == [ ] && c.reloadUnits == [ ]);
          message = ''
            ${copt}: restartUnits/reloadUnits can be forwarded only into a `microvm.vms.<name>.config`
            VM; this one is `${kind}`. Set them in that configuration:
              services.vmcred.guest.credentials.${vlib.tomlKey credName}.restartUnits = [ ... ];
          '';
        }
        {
          assertion = !(c.boot && usesFwCfg vmName) || builtins.stringLength credName <= fwCfgNameMax;
          message = ''
            ${copt}: boot = true on a qemu VM with machine type "${g.microvm.qemu.machine or ""}", whose only
            file carrier is fw_cfg (no SMBIOS tables): its names are opt/io.systemd.credentials/NAME,
            at most 55 bytes, which leaves ${toString fwCfgNameMax} for NAME; "${credName}" has
            ${toString (builtins.stringLength credName)}. Use a shorter name, set boot = false (it then
            arrives over vsock), or run the VM with microvm.qemu.machine = "q35" (SMBIOS).
          '';
        }
        {
          assertion = !(c.boot && builtins.elem hv commandLineHypervisors && !c.allowOnCommandLine);
          message = ''
            ${copt}: boot = true on a ${hv} VM. ${hv} takes boot data only on its command line
            (${if hv == "cloud-hypervisor" then "--platform oem_strings" else "the kernel command line"}), which every local user can read in
            /proc/<pid>/cmdline${lib.optionalString (hv != "cloud-hypervisor") " and every process in the guest in /proc/cmdline"}.
            Either set boot = false (the value then arrives over vsock right after boot; order its
            consumers after vmcred-guest.service), or, for a value that is not secret, set
            allowOnCommandLine = true.
          '';
        }
      ]) vm.credentials));

  # AF_VSOCK CIDs are host-wide: two VMs with one CID reach each other's
  # traffic. (Hybrid-vsock CIDs are private to each VM.)
  cidClashes =
    let
      byCid = lib.groupBy (n: toString cfg.vms.${n}.cid)
        (builtins.filter (n: cfg.vms.${n}.cid != null) (builtins.attrNames cfg.vms));
    in
    filterAttrs (_: names: builtins.length names > 1) byCid;
  # A hybrid-vsock socket is one VMM's: two VMs on it would each receive
  # the other's credentials (the agent refuses such a host.toml too).
  hybridClashes =
    let
      bySocket = lib.groupBy (n: cfg.vms.${n}.hybridSocket)
        (builtins.filter (n: cfg.vms.${n}.hybridSocket != null) (builtins.attrNames cfg.vms));
    in
    filterAttrs (_: names: builtins.length names > 1) bySocket;

  # systemd's 50-udev-default.rules gives /dev/vhost-vsock GROUP="kvm",
  # MODE="@DEV_KVM_MODE@" (0666 unless built otherwise); extraRules land in
  # 99-local.rules, read later, whose assignments win.
  vhostVsockRule = ''KERNEL=="vhost-vsock", GROUP="kvm", MODE="0660", OPTIONS+="static_node=vhost-vsock"'';

  vmAssertions = vmName: vm:
    let
      opt = "services.vmcred.host.vms.${vmName}";
    in
    [
      {
        assertion = (vm.cid == null) != (vm.hybridSocket == null)
          # A microvm.nix VM without vsock has its own, more precise message.
          || (isMicrovm vmName && vm.cid == null && transportOf vmName == null);
        message =
          if vm.cid == null then ''
            ${opt}: set exactly one of `cid` or `hybridSocket`; neither is set.
            - `cid`: the guest's AF_VSOCK CID (qemu vhost-vsock guest-cid).
            - `hybridSocket`: the Unix socket of a hybrid-vsock hypervisor (cloud-hypervisor,
              Firecracker, vhost-device-vsock), e.g. "/var/lib/microvms/${vmName}/notify.vsock".
            For a microvm.nix VM both come from its microvm.vsock.cid.
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
    ++ optionals (isMicrovm vmName) (microvmAssertions vmName vm)
    ++ concatLists (mapAttrsToList (credName: c:
      let
        copt = "${opt}.credentials.${vlib.tomlKey credName}";
        nameProblem = vlib.credentialNameProblem credName;
        src = c.source;
        hasValue = c.value != null;
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
          assertion = lib.length (lib.filter (x: x != null) [ src c.value c.openbao ]) == 1;
          message = ''
            ${copt}: set exactly one of `source` (a file on the host, for secrets), `openbao` (a
            field of a secret in the OpenBao / Vault server) or `value` (an inline non-secret
            constant, which lands in the world-readable Nix store).
          '';
        }
        {
          assertion = c.openbao == null || cfg.openbao != null;
          message = ''
            ${copt}.openbao needs the server: set services.vmcred.host.openbao.address and
            tokenFile or appRole.
          '';
        }
        {
          assertion = c.openbao == null || !c.boot;
          message = ''
            ${copt}: boot = true needs a file (`source` or `value`); an `openbao` credential is
            delivered over vsock once the guest agent runs.
          '';
        }
        {
          assertion = hasValue || src == null || isStr;
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
            (sops-nix, agenix or clan vars put secrets under /run/secrets) and give vmcred that path;
            for a constant that is not secret, use `value`.
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
            ${copt}: boot = true, but the name contains one of = , [ ] or " which no boot carrier
            can hold (SMBIOS/OEM string io.systemd.credential:NAME=VALUE, the quoted
            "systemd.set_credential=NAME:VALUE" on a kernel command line). Rename it or set boot = false.
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

    guestPackage = mkOption {
      type = types.package;
      default = cfg.package;
      defaultText = literalExpression "config.services.vmcred.host.package";
      description = ''
        The package whose bin/vmcred-guest runs in `microvm.vms.<name>.config`
        VMs. The flake's module sets it to `packages.<system>.vmcred-guest`,
        the guest agent alone built with the size-optimised `guest` profile.
      '';
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

    metrics = {
      socket = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Serve the agent's Prometheus metrics (text format 0.0.4) as
          `GET /metrics` on the Unix socket `/run/vmcred/metrics.sock`
          (0600, or 0660 and group `settings.control_group`). The unit has
          `IPAddressDeny=any`: there is no TCP listener, a local scraper or
          proxy reads the socket. The metrics are listed in the README
          ("Metrics").
        '';
      };
      textfile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/prometheus-node-exporter/vmcred.prom";
        description = ''
          Write the metrics to this file for node-exporter's textfile
          collector (point `--collector.textfile.directory` at its
          directory). It is replaced atomically when the metrics changed, at
          most once per `interval`. The directory is created (tmpfiles,
          0755 root) and made writable for the agent.
        '';
      };
      interval = mkOption {
        type = vlib.durationType;
        default = "15s";
        description = "How often the textfile is refreshed (at least 1s).";
      };
    };

    openbao = mkOption {
      type = types.nullOr (types.submodule {
        options = {
          address = mkOption {
            type = types.str;
            example = "https://bao.example.org:8200";
            description = ''
              The OpenBao / Vault server, `https://host:port` (`http://` only on loopback, and
              only with `insecureLoopbackHttp`).
            '';
          };
          insecureLoopbackHttp = mkOption {
            type = types.bool;
            default = false;
            description = ''
              Allow a plain `http://` address on loopback. Unsafe on a host where untrusted
              users log in: while the store is down, any of them can listen on its port, receive
              the agent's token and answer with values of their own. Prefer `https://` with
              `caFile` (`bao server -dev-tls` makes both for a dev server).
            '';
          };
          caFile = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/etc/ssl/bao-ca.pem";
            description = "PEM file of the CA(s) that signed the server's certificate; required with https.";
          };
          tokenFile = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/run/secrets/vmcred-bao-token";
            description = ''
              File holding the token (never in the config or the Nix store). The agent re-reads
              it before each round of requests, so writing a new token there takes effect
              without a restart. Set this, `appRole`, or both (AppRole is then used when the
              token is refused).
            '';
          };
          appRole = mkOption {
            type = types.nullOr (types.submodule {
              options = {
                mount = mkOption { type = types.str; default = "approle"; description = "The AppRole auth mount."; };
                roleIdFile = mkOption { type = types.str; description = "File holding the role id."; };
                secretIdFile = mkOption { type = types.str; description = "File holding the secret id."; };
              };
            });
            default = null;
            description = "Log in with AppRole (again whenever renewing the token fails).";
          };
          pollInterval = mkOption {
            type = types.str;
            default = "30s";
            description = ''
              How often each secret's version is checked (one small metadata request per
              secret; the data is read only when the version changed), jittered by ±20 %.
              "0s": only at start, on reload and on `vmcred-rotate`.
            '';
          };
          ipAddressAllow = mkOption {
            type = types.listOf types.str;
            default = [ "any" ];
            example = [ "10.0.0.10/32" "127.0.0.53/32" ];
            description = ''
              `IPAddressAllow=` of vmcred-host.service (otherwise `IPAddressDeny=any`): narrow
              it to the store's addresses (and the DNS resolver's, for a host name).
            '';
          };
        };
      });
      default = null;
      example = literalExpression ''
        {
          address = "https://bao.example.org:8200";
          caFile = "/etc/ssl/bao-ca.pem";
          tokenFile = "/run/secrets/vmcred-bao-token";
        }
      '';
      description = ''
        An OpenBao (or HashiCorp Vault) server that credentials may come from
        (`vms.<vm>.credentials.<cred>.openbao`).
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

    restrictVhostVsock = mkOption {
      type = types.bool;
      default = true;
      description = ''
        When any VM is reached by AF_VSOCK (a `cid`: qemu, crosvm, kvmtool,
        alioth), make `/dev/vhost-vsock` mode 0660, owner root, group `kvm`
        (a udev rule with `static_node=vhost-vsock`, so the node made at
        boot before the module loads gets it too). microvm.nix runs every
        VM as user `microvm`, whose primary group is `kvm`, so its VMs keep
        their vsock.

        systemd's own rule makes the device 0666 (`DEV_KVM_MODE`): then
        every local user can start a VM with vhost-vsock, and may give it
        the CID of one of these VMs while that VM is stopped. The agent
        finds a VM by its CID alone and accepts any guest certificate, so it
        would push the stopped VM's credentials to that user's VM. With
        this option only root and members of `kvm` can do that: treat `kvm`
        membership like the hypervisor user itself. Turn it off only if the
        device's mode is managed elsewhere; `vmcred-host serve` cannot see
        the device from its sandbox (`PrivateDevices=`), so nothing warns
        at run time.
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run `vmcred-host check-config` on the rendered host.toml at build
        time. Turn it off only when the package cannot run on the build
        machine (cross-compiling).
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
      # Only a VM microvm.nix evaluates from `config` modules; an
      # `evaluatedConfig` or `flake` VM is left as it is (see the assertion).
      config = mkIf (cfg.enable && cfg.vms ? ${name}
                     && (config.flake or null) == null && (config.evaluatedConfig or null) == null) {
        config = guestWiring name;
      };
    }));
  };

  config = mkMerge [
    # Gives microvm.vms a value on hosts without microvm.nix (merges as empty).
    { microvm.vms = { }; }

    (mkIf cfg.enable {
      assertions = concatLists (mapAttrsToList vmAssertions cfg.vms)
        ++ mapAttrsToList (cid: names: {
          assertion = false;
          message = ''
            services.vmcred.host.vms: ${concatStringsSep ", " names} all have AF_VSOCK CID ${cid}. A CID names
            one VM on the host; give each VM its own (microvm.vsock.cid in each VM's configuration).
          '';
        }) cidClashes
        ++ mapAttrsToList (socket: names: {
          assertion = false;
          message = ''
            services.vmcred.host.vms: ${concatStringsSep ", " names} all have hybridSocket ${socket}. A
            hybrid-vsock socket belongs to one VM's hypervisor; give each VM its own.
          '';
        }) hybridClashes
        ++ map (k: {
          assertion = !(cfg.settings ? ${k});
          message = "services.vmcred.host.settings.${k} is fixed by the NixOS module (${if k == "vms" then "use services.vmcred.host.vms" else "it must match the unit's StateDirectory/RuntimeDirectory"}); remove it from settings.";
        }) (builtins.attrNames fixedKeys ++ [ "vms" "openbao" ])
        ++ map (k: {
          assertion = !(cfg.settings ? ${k});
          message = "services.vmcred.host.settings.${k}: use services.vmcred.host.metrics instead (the module makes the unit able to write the file).";
        }) [ "metrics_socket" "metrics_textfile" "metrics_interval" ]
        ++ optional (cfg.metrics.textfile != null) {
          assertion = hasPrefix "/" cfg.metrics.textfile && lib.hasSuffix ".prom" cfg.metrics.textfile
            && !(hasPrefix builtins.storeDir cfg.metrics.textfile) && metricsDir != "/";
          message = "services.vmcred.host.metrics.textfile must be an absolute path ending in .prom (node-exporter reads only those), outside the Nix store and not directly in /; got ${cfg.metrics.textfile}.";
        }
        ++ optionals (cfg.openbao != null) ([
          {
            assertion = cfg.openbao.tokenFile != null || cfg.openbao.appRole != null;
            message = "services.vmcred.host.openbao: set tokenFile or appRole (the token is never put in the config).";
          }
          {
            assertion = !(hasPrefix "http://" cfg.openbao.address) || cfg.openbao.insecureLoopbackHttp;
            message = "services.vmcred.host.openbao.address is plain http: any local user who binds that port while the store is down receives the token. Use https:// with caFile, or set insecureLoopbackHttp = true (loopback only) on a host where no untrusted user logs in.";
          }
          {
            assertion = !cfg.openbao.insecureLoopbackHttp || hasPrefix "http://" cfg.openbao.address;
            message = "services.vmcred.host.openbao.insecureLoopbackHttp applies only to an http:// address; remove it.";
          }
        ] ++ map (f: {
          assertion = builtins.isString f.value && hasPrefix "/" f.value
            && !builtins.hasContext f.value && !(hasPrefix builtins.storeDir f.value);
          message = "services.vmcred.host.openbao.${f.name} must be an absolute path as a plain string, outside the Nix store.";
        }) openbaoFiles);

      warnings = concatLists (mapAttrsToList (vmName: vm:
          mapAttrsToList (credName: c:
            "services.vmcred.host.vms.${vmName}.credentials.${credName}: allowOnCommandLine = true puts its boot-time value on ${hypervisorOf vmName}'s command line, readable by every local user in /proc/<pid>/cmdline."
          ) (filterAttrs (_: c: c.boot && c.allowOnCommandLine && builtins.elem (hypervisorOf vmName) commandLineHypervisors) vm.credentials)
        ) (filterAttrs (n: _: isMicrovm n) cfg.vms));

      environment.etc."vmcred/host.toml".source = hostToml;
      # Only root and kvm (microvm.nix's VMM user) may start vhost-vsock
      # VMs: see restrictVhostVsock.
      services.udev.extraRules = lib.optionalString (cfg.restrictVhostVsock && anyVsock) vhostVsockRule;
      systemd.tmpfiles.rules = optional (metricsDir != null) "d ${metricsDir} 0755 root root -";
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
          # notify-reload (systemd >= 253): `systemctl reload` sends SIGHUP
          # (ReloadSignal= default) and waits for the agent's RELOADING=1 ...
          # READY=1, so a reload is done when the new config is in use.
          # Older systemd: notify, and ExecReload= sends the SIGHUP.
          Type = if notifyReload then "notify-reload" else "notify";
          ExecStart = "${cfg.package}/bin/vmcred-host serve --config ${configPath}";
          # WATCHDOG=1 every 30 s while the VM tasks' runtime still runs
          # tasks; a VM task blocking its workers stops it, and systemd
          # restarts the agent (Restart=on-failure covers the watchdog).
          WatchdogSec = "60s";
          Restart = "on-failure";
          RestartSec = "2s";
        } // optionalAttrs (!notifyReload) {
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        } // {
          # One connection (and a few files) per VM, plus the control and
          # launch sockets' clients.
          LimitNOFILE = 1024 + 8 * builtins.length (builtins.attrNames cfg.vms);

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
          # control.sock (0600, or 0660 with control_group) and launch.sock
          # (0666, answering only root and launch_users by SO_PEERCRED) are
          # guarded by the agent itself; keep them across restarts.
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
          # - CAP_NET_BIND_SERVICE, only with an AF_VSOCK VM (a `cid`): the
          #   agent dials from a source port below 1024, which the guest
          #   requires ("Guest: admission before TLS"), and the kernel's
          #   vsock bind() refuses a port <= 1023 without it (EACCES): no
          #   such VM would ever get a credential after boot. It lets the
          #   agent bind privileged ports, nothing else; RestrictAddressFamilies=
          #   below keeps it off IP sockets unless OpenBao is used.
          # - CAP_CHOWN, only with settings.control_group: the agent gives
          #   control.sock (and metrics.sock) to that group, which root is
          #   not a member of; without it the chown fails (EPERM) and the
          #   agent exits at start. ProtectSystem=strict leaves it only its
          #   own directories (and the metrics one) to chown in.
          # Several CapabilityBoundingSet= lines are ORed by systemd.
          CapabilityBoundingSet = [ "CAP_DAC_READ_SEARCH" ]
            ++ optional anyHybrid "CAP_DAC_OVERRIDE"
            ++ optional anyVsock "CAP_NET_BIND_SERVICE"
            ++ optional chownsSockets "CAP_CHOWN";
          NoNewPrivileges = true;
          RestrictAddressFamilies = "AF_UNIX AF_VSOCK"
            # The OpenBao source talks HTTP(S) to the store.
            + lib.optionalString (cfg.openbao != null) " AF_INET AF_INET6";
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
          # The first line decides: an allow list (@system-service), from
          # which each later line removes (~) or to which it adds, in
          # order (systemd.exec(5)). So "@chown" must come after
          # "~@privileged" (which contains @chown) to take effect; without
          # it the chown is killed with SIGSYS. Only with control_group.
          SystemCallFilter = [ "@system-service" "~@privileged" ]
            ++ optional chownsSockets "@chown";
        } // optionalAttrs (cfg.openbao != null) {
          IPAddressAllow = cfg.openbao.ipAddressAllow;
        } // optionalAttrs (metricsDir != null) {
          # ProtectSystem=strict: the textfile's directory only.
          ReadWritePaths = [ metricsDir ];
        };
      };
    })

    # microvm.nix VMs: on microvm@<name> (a drop-in: microvm.nix renders it
    # with overrideStrategy = "asDropin" over its microvm@ template).
    (mkIf (cfg.enable && hasMicrovmHost) {
      systemd.services = mapAttrs' (vmName: vm: nameValuePair "microvm@${vmName}" {
        # After=: the agent is Type=notify(-reload) and reports ready only
        # once it has made every required launch key, which LoadCredential=
        # below reads when this unit starts (a reload that adds a VM is
        # done, with notify-reload, only after its key exists too).
        # Wants=, not Requires=: Requires= would stop or restart every VM
        # whenever the agent is stopped or restarted (an upgrade), and the
        # VMs must outlive the agent. If the agent never ran, the key file
        # is missing and systemd refuses to start the VM (LoadCredential=
        # of a missing file fails the start): no VM runs without its key.
        after = [ "vmcred-host.service" ];
        wants = [ "vmcred-host.service" ];
        serviceConfig = {
          # The launcher runs as the unit's User= (microvm): systemd makes
          # this directory for it, 0700, and names it in
          # $RUNTIME_DIRECTORY; the carrier files (SMBIOS/fw_cfg files, a
          # Firecracker config copy) are written in its <vm> subdirectory
          # (the launcher's per-VM directory, 0700), never in /tmp.
          RuntimeDirectory = "vmcred-launch/${vlib.escapeUnitValue vmName}";
          RuntimeDirectoryMode = "0700";
        } // optionalAttrs (any (c: c.boot) (attrValues vm.credentials) || vm.launchKey == "required") {
          # The launcher reads $CREDENTIALS_DIRECTORY/<cred> for boot = true,
          # and $CREDENTIALS_DIRECTORY/vmcred.launch-key for launchKey =
          # "required" (the key the agent keeps for the VM).
          LoadCredential = mapAttrsToList (credName: c:
            "${vlib.escapeUnitValue credName}:${vlib.escapeUnitValue (sourceString vmName credName c)}")
            (filterAttrs (_: c: c.boot) vm.credentials)
            ++ optional (vm.launchKey == "required")
              "vmcred.launch-key:${vlib.escapeUnitValue "${stateDir}/launch-keys/${vmName}"}";
        };
      }) (filterAttrs (n: _: microvmVms ? ${n}) cfg.vms);
    })
  ];
}
