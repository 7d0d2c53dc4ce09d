# Evaluation checks for nixos-modules/{host,guest}.nix with the real nixpkgs
# module system and systemd unit types (see run.sh for which copy), on the
# real microvm.nix host module when `microvmSrc` is given, else on the
# stand-in (microvm-stub.nix). Driven by tests/nix/run.sh.
#
#   results      name -> { ok; detail; }   checks decided here
#   artifacts    files for run.sh (rendered TOML, wrapper derivations)
#   errorCases   name -> expression that must fail to evaluate (run.sh checks
#                the error text)
{ nixpkgs, standin, microvmSrc ? null }:

let
  lib = import (nixpkgs + "/lib");
  pkgs = import ./stub-pkgs.nix { inherit lib; path = standin; };
  repo = ../..;
  nixosStub = import ./nixos-stub.nix { inherit nixpkgs pkgs; };
  microvmStub =
    if microvmSrc != null
    then { imports = [ (microvmSrc + "/nixos-modules/host") ./host-sinks.nix ]; }
    else import ./microvm-stub.nix { inherit nixpkgs pkgs; };

  evalHost = { microvm ? true, modules }: (lib.evalModules {
    modules = [ nixosStub (repo + "/nixos-modules/host.nix") ]
      ++ lib.optional microvm microvmStub ++ modules;
  }).config;

  evalGuest = modules: (lib.evalModules {
    modules = [ nixosStub (repo + "/nixos-modules/guest.nix") ] ++ modules;
  }).config;

  hasInfix = a: b: lib.hasInfix (builtins.unsafeDiscardStringContext a) (builtins.unsafeDiscardStringContext b);
  check = ok: detail: { inherit ok detail; };
  contains = haystack: needle: check (hasInfix needle haystack) "expected to contain: ${needle}";
  lacks = haystack: needle: check (!(hasInfix needle haystack)) "expected not to contain: ${needle}";
  eq = a: b: check (a == b) "expected ${builtins.toJSON b}, got ${builtins.toJSON a}";

  secrets = "/run/secrets/vars/test-vm-secrets";

  # The seeds' setup: test-vm on cloud-hypervisor, plus a qemu VM and a VM
  # that microvm.nix does not manage.
  seedsModule = {
    microvm.vms.test-vm.config = { microvm.hypervisor = "cloud-hypervisor"; microvm.vsock.cid = 3; };
    microvm.vms.db-vm.config = { microvm.hypervisor = "qemu"; microvm.vsock.cid = 5; };
    services.vmcred.host = {
      enable = true;
      settings.poll_interval = "10s";
      vms.test-vm.credentials = {
        API_KEY.source = "${secrets}/api-key";
        DB_PASSWORD = { source = "${secrets}/db-password"; restartUnits = [ "db-client.service" ]; };
        JWT_SECRET.source = "${secrets}/jwt-secret";
        ENVIRONMENT = { source = "/etc/vmcred/test-vm/environment"; boot = true; allowOnCommandLine = true; };
      };
      vms.db-vm.credentials = {
        DB_ROOT = { source = "/run/secrets/db-root"; boot = true; };
        "weird%name" = { source = "/run/secrets/odd%file"; };
        TIER = { value = "production"; boot = true; };
      };
      vms.plain = {
        hybridSocket = "/run/vhost-device-vsock/plain.sock";
        port = 701;
        credentials.TOKEN.source = "/run/secrets/token";
      };
    };
  };

  host = evalHost { modules = [ seedsModule ]; };
  units = host.test.unitText;
  agentUnit = units.vmcred-host or "";
  chUnit = units."microvm@test-vm" or "";
  qemuUnit = units."microvm@db-vm" or "";
  hostTomlFile = host.services.vmcred.host.configFile;
  hostToml = builtins.readFile hostTomlFile;
  parsedToml = builtins.fromTOML (builtins.unsafeDiscardStringContext hostToml);
  vmcredPkg = "${pkgs.vmcred}";
  tierFile = parsedToml.vms.db-vm.credentials.TIER.path;

  chGuest = host.microvm.vms.test-vm.config.config;
  qemuGuest = host.microvm.vms.db-vm.config.config;
  chPkg = chGuest.microvm.cloud-hypervisor.package;
  qemuPkg = qemuGuest.microvm.qemu.package;
  # What microvm.nix's qemu runner does with the package (closure trimming).
  qemuPkgOverridden = qemuPkg.override (oa: { nixosTestRunner = true; });

  expectedToml = {
    state_dir = "/var/lib/vmcred";
    control_socket = "/run/vmcred/control.sock";
    launch_socket = "/run/vmcred/launch.sock";
    launch_users = [ "microvm" ];
    poll_interval = "10s";
    vms = {
      test-vm = {
        hybrid_socket = "/var/lib/microvms/test-vm/notify.vsock";
        port = 700;
        credentials = {
          API_KEY = { path = "${secrets}/api-key"; boot = false; allow_on_command_line = false; };
          DB_PASSWORD = { path = "${secrets}/db-password"; boot = false; allow_on_command_line = false; };
          JWT_SECRET = { path = "${secrets}/jwt-secret"; boot = false; allow_on_command_line = false; };
          ENVIRONMENT = { path = "/etc/vmcred/test-vm/environment"; boot = true; allow_on_command_line = true; };
        };
      };
      db-vm = {
        cid = 5;
        port = 700;
        launch_key = "required";
        credentials = {
          DB_ROOT = { path = "/run/secrets/db-root"; boot = true; allow_on_command_line = false; };
          "weird%name" = { path = "/run/secrets/odd%file"; boot = false; allow_on_command_line = false; };
          TIER = { path = tierFile; boot = true; allow_on_command_line = false; };
        };
      };
      plain = {
        hybrid_socket = "/run/vhost-device-vsock/plain.sock";
        port = 701;
        credentials.TOKEN = { path = "/run/secrets/token"; boot = false; allow_on_command_line = false; };
      };
    };
  };

  # --- guest --------------------------------------------------------------
  guest = evalGuest [{
    services.vmcred.guest = {
      enable = true;
      credentials.API_KEY.restartUnits = [ "demo-consumer.service" ];
      credentials.JWT_SECRET = { reloadUnits = [ "web.service" ]; mode = "0440"; };
    };
  }];
  guestUnit = guest.test.unitText.vmcred-guest or "";

  # --- guest: the credential socket (issue 12 part 2) -----------------------
  socketGuest = evalGuest [{
    systemd.services.api.serviceConfig.ExecStart = "/bin/true";
    services.vmcred.guest = {
      enable = true;
      credentials.API_KEY = { socketUnits = [ "api.service" ]; reloadUnits = [ "api.service" ]; };
      credentials."odd%name".socketUnits = [ "api.service" "other.service" ];
      credentials.FILE_ONLY.restartUnits = [ "api.service" ];
      credentials.MEMORY = { socketUnits = [ "api.service" ]; deliver = "socket"; };
    };
  }];
  templGuest = evalGuest [{
    services.vmcred.guest = { enable = true; credentials.API_KEY.socketUnits = [ "getty@tty1.service" "api.service" ]; };
  }];
  socketToml = builtins.fromTOML (builtins.readFile socketGuest.services.vmcred.guest.configFile);
  guestTomlFile = guest.services.vmcred.guest.configFile;
  guestToml = builtins.readFile guestTomlFile;

  # --- disabled / without microvm.nix --------------------------------------
  disabledHost = evalHost { modules = [ seedsModule { services.vmcred.host.enable = lib.mkForce false; } ]; };
  disabledGuest = evalGuest [{ services.vmcred.guest.credentials.API_KEY.restartUnits = [ "x.service" ]; }];
  noMicrovm = evalHost {
    microvm = false;
    modules = [{ services.vmcred.host = { enable = true; vms.vm1 = { cid = 7; credentials.A.source = "/run/secrets/a"; }; }; }];
  };

  # --- the agent's capabilities and system calls, by transport and group ---
  # vmcred-host.service for `vms` (no microvm.nix) plus extra host options.
  agentUnitOf = vms: extra: (evalHost {
    microvm = false;
    modules = [{ services.vmcred.host = { enable = true; inherit vms; } // extra; }];
  }).test.unitText.vmcred-host or "";
  unitLines = key: text: lib.filter (lib.hasPrefix "${key}=") (lib.splitString "\n" text);
  vsockVm = { cid = 3; credentials.A.source = "/run/secrets/a"; };
  hybridVm = { hybridSocket = "/run/vhost-device-vsock/h.sock"; credentials.B.source = "/run/secrets/b"; };
  hybridOnlyUnit = agentUnitOf { h = hybridVm; } { };
  # Both transports and a control group: every capability the module grants.
  # run.sh runs the real agent under this unit's bounding set.
  fullCapsUnit = agentUnitOf { v = vsockVm; h = hybridVm; } { settings.control_group = "nogroup"; metrics.socket = true; };
  groupNoMetricsUnit = agentUnitOf { h = hybridVm; } { settings.control_group = "vmcred-status"; };

  # --- OpenBao source -------------------------------------------------------
  baoServer = { address = "https://bao.example.org:8200"; caFile = "/etc/ssl/bao-ca.pem"; tokenFile = "/run/secrets/bao-token"; };
  baoHost = evalHost {
    microvm = false;
    modules = [{
      services.vmcred.host = {
        enable = true;
        openbao = baoServer;
        vms.vm1 = {
          cid = 7;
          credentials.DB.openbao = { path = "apps/db"; field = "password"; };
          credentials.GONE.openbao = { mount = "kv"; path = "apps/gone"; field = "k"; onDelete = "remove"; };
          credentials.FILE.source = "/run/secrets/file";
        };
      };
    }];
  };
  baoToml = builtins.fromTOML (builtins.unsafeDiscardStringContext (builtins.readFile baoHost.services.vmcred.host.configFile));
  baoUnit = baoHost.test.unitText.vmcred-host or "";
  baoWith = server: creds: [{ services.vmcred.host = { enable = true; vms.v = { cid = 3; credentials = creds; }; } // lib.optionalAttrs (server != null) { openbao = server; }; }];

  # --- assertions: one bad setting each -----------------------------------
  failedWith = modules: (evalHost { inherit modules; }).test.failedAssertions;
  refusedWith = name: modules: needle:
    let msgs = failedWith modules; in
    check (lib.any (m: hasInfix needle m) msgs)
      "${name}: expected an assertion containing \"${needle}\", got ${builtins.toJSON msgs}";
  vmWith = attrs: [{ services.vmcred.host = { enable = true; vms.v = { cid = 3; } // attrs; }; }];
  credWith = name: attrs: vmWith { credentials.${name} = { source = "/run/secrets/x"; } // attrs; };

  guestRefused = modules: needle:
    let msgs = (evalGuest modules).test.failedAssertions; in
    check (lib.any (m: hasInfix needle m) msgs) "expected a guest assertion containing \"${needle}\", got ${builtins.toJSON msgs}";

  microvmGuestFailed = vmConfig: hostExtra:
    (evalHost { modules = [{
      microvm.vms.v.config = vmConfig;
      services.vmcred.host = { enable = true; vms.v = { credentials.A.source = "/run/secrets/a"; } // hostExtra; };
    }]; }).microvm.vms.v.config.config.test.failedAssertions;

in
{
  artifacts = {
    hostToml = "${hostTomlFile}";
    guestToml = "${guestTomlFile}";
    chWrapper = chPkg.drvPath;
    qemuWrapper = qemuPkg.drvPath;
    realCloudHypervisor = "${pkgs.cloud-hypervisor}";
    realQemu = "${pkgs.qemu_kvm}";
    vmcred = vmcredPkg;
    hostUnitAllCaps = fullCapsUnit;
    # run.sh builds it and looks for getty@tty1.service.d/overrides.conf.
    templateInstanceUnits = (import ./generate-units.nix {
      inherit nixpkgs;
      name = "getty@tty1.service";
      template = "getty@.service";
      text = templGuest.test.unitText."getty@tty1";
      strategy = templGuest.test.overrideStrategy."getty@tty1";
    }).drvPath;
  };

  results = {
    "host: openbao: no failed assertions" = eq baoHost.test.failedAssertions [ ];
    "host: openbao: [openbao] rendered (token by file, never inline)" = eq baoToml.openbao {
      address = "https://bao.example.org:8200"; ca_file = "/etc/ssl/bao-ca.pem";
      token_file = "/run/secrets/bao-token"; poll_interval = "30s";
    };
    "host: openbao: credential rendered as openbao = { mount, path, field, on_delete }" = eq baoToml.vms.vm1.credentials {
      DB = { openbao = { mount = "secret"; path = "apps/db"; field = "password"; on_delete = "keep"; }; boot = false; allow_on_command_line = false; };
      GONE = { openbao = { mount = "kv"; path = "apps/gone"; field = "k"; on_delete = "remove"; }; boot = false; allow_on_command_line = false; };
      FILE = { path = "/run/secrets/file"; boot = false; allow_on_command_line = false; };
    };
    "host: openbao: AppRole rendered" =
      let t = builtins.fromTOML (builtins.unsafeDiscardStringContext (builtins.readFile (evalHost {
        microvm = false;
        modules = baoWith { address = "http://127.0.0.1:8200"; insecureLoopbackHttp = true; appRole = { roleIdFile = "/run/secrets/role-id"; secretIdFile = "/run/secrets/secret-id"; }; }
          { A.openbao = { path = "a"; field = "f"; }; };
      }).services.vmcred.host.configFile)); in
      check (t.openbao.approle == { mount = "approle"; role_id_file = "/run/secrets/role-id"; secret_id_file = "/run/secrets/secret-id"; }
        && (t.openbao.insecure_loopback_http or false) == true) (builtins.toJSON t.openbao);
    "host: openbao: insecure_loopback_http is not rendered unless set" = check (!(baoToml.openbao ? insecure_loopback_http)) (builtins.toJSON baoToml.openbao);
    "refused: openbao over plain http without insecureLoopbackHttp" =
      refusedWith "plain http" (baoWith { address = "http://127.0.0.1:8200"; tokenFile = "/run/secrets/t"; } { }) "insecureLoopbackHttp = true";
    "refused: insecureLoopbackHttp with https" =
      refusedWith "https opt-in" (baoWith (baoServer // { insecureLoopbackHttp = true; }) { }) "applies only to an http:// address";
    "host: openbao: the agent may open IP sockets (AF_INET, IPAddressAllow)" =
      check (hasInfix "RestrictAddressFamilies=AF_UNIX AF_VSOCK AF_INET AF_INET6" baoUnit && hasInfix "IPAddressAllow=any" baoUnit) baoUnit;
    "host: no IP sockets without openbao" = check (!(hasInfix "AF_INET" agentUnit) && hasInfix "IPAddressDeny=any" agentUnit) agentUnit;
    "refused: openbao credential without services.vmcred.host.openbao" =
      refusedWith "no server" (baoWith null { A.openbao = { path = "a"; field = "f"; }; }) "needs the server";
    "refused: openbao credential with boot = true" =
      refusedWith "boot" (baoWith baoServer { A = { openbao = { path = "a"; field = "f"; }; boot = true; }; }) "boot = true needs a file";
    "refused: openbao and source both set" =
      refusedWith "both" (baoWith baoServer { A = { openbao = { path = "a"; field = "f"; }; source = "/run/secrets/a"; }; }) "set exactly one of `source`";
    "refused: openbao without tokenFile or appRole" =
      refusedWith "login" (baoWith { address = "http://127.0.0.1:8200"; } { }) "set tokenFile or appRole";
    "refused: openbao tokenFile in the Nix store" =
      refusedWith "store token" (baoWith (baoServer // { tokenFile = "${builtins.storeDir}/0000-token"; }) { }) "outside the Nix store";
    "host: seeds config has no failed assertions" = eq host.test.failedAssertions [ ];
    "host: warns that ENVIRONMENT goes on cloud-hypervisor's command line" =
      check (lib.any (w: hasInfix "test-vm.credentials.ENVIRONMENT: allowOnCommandLine" w) host.warnings) (builtins.toJSON host.warnings);
    "host: vmcred-host.service is Type=notify-reload (systemd >= 253), else notify with ExecReload= SIGHUP" =
      if lib.versionAtLeast (lib.getVersion pkgs.systemd) "253"
      then check (hasInfix "Type=notify-reload" agentUnit && !(hasInfix "ExecReload=" agentUnit)) agentUnit
      else check (hasInfix "Type=notify" agentUnit && !(hasInfix "Type=notify-reload" agentUnit) && hasInfix "ExecReload=${pkgs.coreutils}/bin/kill -HUP $MAINPID" agentUnit) agentUnit;
    "host: vmcred-host.service has a watchdog" = contains agentUnit "WatchdogSec=60s";
    "host: ExecStart runs vmcred-host serve with the rendered config" =
      contains agentUnit "ExecStart=${vmcredPkg}/bin/vmcred-host serve --config /etc/vmcred/host.toml";
    "host: no LoadCredential= on vmcred-host.service (the agent reads sources itself)" = lacks agentUnit "LoadCredential";
    "host: no LoadCredential= on vmcred-host.service without microvm.nix either" =
      lacks (noMicrovm.test.unitText.vmcred-host or "") "LoadCredential";
    "host: agent has no $CREDENTIALS_DIRECTORY sources (no SetCredential=, no ImportCredential=)" =
      check (!(hasInfix "SetCredential" agentUnit) && !(hasInfix "ImportCredential" agentUnit)) agentUnit;
    "host: agent is sandboxed (ProtectSystem=strict)" = contains agentUnit "ProtectSystem=strict";
    "host: agent only opens AF_UNIX and AF_VSOCK sockets" = contains agentUnit "RestrictAddressFamilies=AF_UNIX AF_VSOCK";
    "host: NoNewPrivileges, PrivateTmp, ProtectHome" =
      check (lib.all (l: hasInfix l agentUnit) [ "NoNewPrivileges=true" "PrivateTmp=true" "ProtectHome=true" ]) agentUnit;
    "host: capabilities: CAP_DAC_READ_SEARCH (sources) + CAP_DAC_OVERRIDE (hybrid-vsock sockets) + CAP_NET_BIND_SERVICE (qemu VM over AF_VSOCK), nothing else" =
      eq (unitLines "CapabilityBoundingSet" agentUnit)
        [ "CapabilityBoundingSet=CAP_DAC_READ_SEARCH" "CapabilityBoundingSet=CAP_DAC_OVERRIDE" "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" ];
    "host: an AF_VSOCK VM only (cid): CAP_NET_BIND_SERVICE for the privileged source port, no CAP_DAC_OVERRIDE" =
      eq (unitLines "CapabilityBoundingSet" (noMicrovm.test.unitText.vmcred-host or ""))
        [ "CapabilityBoundingSet=CAP_DAC_READ_SEARCH" "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" ];
    "host: hybrid vsock only: no CAP_NET_BIND_SERVICE (the VMM picks the source port)" =
      eq (unitLines "CapabilityBoundingSet" hybridOnlyUnit)
        [ "CapabilityBoundingSet=CAP_DAC_READ_SEARCH" "CapabilityBoundingSet=CAP_DAC_OVERRIDE" ];
    "host: without control_group: no CAP_CHOWN, and ~@privileged (with @chown) stays denied" =
      check (lib.all (u: !(hasInfix "CAP_CHOWN" u)
          && unitLines "SystemCallFilter" u == [ "SystemCallFilter=@system-service" "SystemCallFilter=~@privileged" ])
        [ agentUnit hybridOnlyUnit (noMicrovm.test.unitText.vmcred-host or "") ])
        (lib.concatStringsSep "\n" (unitLines "SystemCallFilter" agentUnit ++ unitLines "CapabilityBoundingSet" agentUnit));
    "host: control_group: CAP_CHOWN to give control.sock and metrics.sock to the group" =
      eq (unitLines "CapabilityBoundingSet" fullCapsUnit)
        [ "CapabilityBoundingSet=CAP_DAC_READ_SEARCH" "CapabilityBoundingSet=CAP_DAC_OVERRIDE"
          "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" "CapabilityBoundingSet=CAP_CHOWN" ];
    "host: control_group: @chown allowed AFTER ~@privileged (systemd applies the lines in order)" =
      eq (unitLines "SystemCallFilter" fullCapsUnit)
        [ "SystemCallFilter=@system-service" "SystemCallFilter=~@privileged" "SystemCallFilter=@chown" ];
    "host: control_group without metrics socket: CAP_CHOWN and @chown as well" =
      check (unitLines "CapabilityBoundingSet" groupNoMetricsUnit
          == [ "CapabilityBoundingSet=CAP_DAC_READ_SEARCH" "CapabilityBoundingSet=CAP_DAC_OVERRIDE" "CapabilityBoundingSet=CAP_CHOWN" ]
        && unitLines "SystemCallFilter" groupNoMetricsUnit
          == [ "SystemCallFilter=@system-service" "SystemCallFilter=~@privileged" "SystemCallFilter=@chown" ])
        groupNoMetricsUnit;
    "host: NoNewPrivileges=true and no AmbientCapabilities= in every variant" =
      check (lib.all (u: hasInfix "NoNewPrivileges=true" u && !(hasInfix "AmbientCapabilities" u))
        [ agentUnit fullCapsUnit hybridOnlyUnit ]) fullCapsUnit;
    "host: sandbox does not hide /run/secrets (no InaccessiblePaths=, no TemporaryFileSystem=/run)" =
      check (!(hasInfix "InaccessiblePaths" agentUnit) && !(hasInfix "TemporaryFileSystem" agentUnit)
        && !(hasInfix "ProtectHome=tmpfs" agentUnit)) agentUnit;
    "host: state directory 0755 (host.pin readable by the hypervisor user)" =
      check (hasInfix "StateDirectory=vmcred\n" agentUnit && hasInfix "StateDirectoryMode=0755" agentUnit) agentUnit;
    "host: runtime directory kept across restarts" =
      check (hasInfix "RuntimeDirectory=vmcred\n" agentUnit && hasInfix "RuntimeDirectoryPreserve=yes" agentUnit
        && hasInfix "RuntimeDirectoryMode=0755" agentUnit) agentUnit;
    "host: agent starts before microvms.target" = contains agentUnit "Before=microvms.target";
    "host: agent wanted by multi-user.target" = eq host.systemd.services.vmcred-host.wantedBy [ "multi-user.target" ];
    "host: config changes reload the agent" = contains agentUnit "X-Reload-Triggers=${hostTomlFile}";
    "host: a changed credential list only changes host.toml (reload, not restart)" =
      let
        more = evalHost { modules = [ seedsModule { services.vmcred.host.vms.test-vm.credentials.NEW.source = "/run/secrets/new"; } ]; };
        strip = t: lib.concatStringsSep "\n" (lib.filter (l: !(lib.hasPrefix "X-Reload-Triggers=" l)) (lib.splitString "\n" t));
        moreUnit = more.test.unitText.vmcred-host or "";
      in check (strip moreUnit == strip agentUnit && moreUnit != agentUnit) "unit text differs beyond X-Reload-Triggers";
    "host: package changes still restart the agent (restartIfChanged not disabled)" =
      check (!(hasInfix "X-RestartIfChanged=false" agentUnit) && !(hasInfix "X-ReloadIfChanged" agentUnit)) agentUnit;
    "host: /etc/vmcred/host.toml is the rendered config" = eq "${host.environment.etc."vmcred/host.toml".source}" "${hostTomlFile}";
    "host: vmcred-rotate is on PATH" =
      check (lib.any (p: (p.name or "") == "vmcred-rotate") host.environment.systemPackages) "no vmcred-rotate in environment.systemPackages";
    "host: vmcred-rotate runs vmcred-host rotate with the config" =
      let p = lib.findFirst (p: (p.name or "") == "vmcred-rotate") { text = ""; } host.environment.systemPackages; in
      contains p.text "exec ${vmcredPkg}/bin/vmcred-host rotate --config /etc/vmcred/host.toml \"$@\"";
    "host: vmcred-rotate restarts nothing" =
      let p = lib.findFirst (p: (p.name or "") == "vmcred-rotate") { text = ""; } host.environment.systemPackages; in
      check (!(hasInfix "systemctl" p.text) && !(hasInfix "restart" p.text) && !(hasInfix "VMCRED_ROTATE_NO_RESTART" p.text)) p.text;

    "toml: parses back to exactly the expected structure" = eq parsedToml expectedToml;
    "toml: cloud-hypervisor VM defaults to microvm.nix's notify.vsock" =
      contains hostToml "hybrid_socket = \"/var/lib/microvms/test-vm/notify.vsock\"";
    "toml: qemu VM defaults to microvm.vsock.cid" = eq (parsedToml.vms.db-vm.cid or null) 5;
    "toml: every credential's path = is its source" =
      let
        rendered = lib.concatLists (lib.mapAttrsToList (vm: v: lib.mapAttrsToList (c: x: "${vm}.${c}=${x.path or "<none>"}") v.credentials) parsedToml.vms);
        sources = lib.concatLists (lib.mapAttrsToList (vm: v: lib.mapAttrsToList (c: x: "${vm}.${c}=${if x.value != null then tierFile else x.source}") v.credentials) host.services.vmcred.host.vms);
      in eq rendered sources;
    "toml: no credential = (nothing read through $CREDENTIALS_DIRECTORY)" = lacks hostToml "credential =";
    "toml: % in a source path is kept as is (no unit-file escaping in TOML)" =
      eq (parsedToml.vms.db-vm.credentials."weird%name".path or null) "/run/secrets/odd%file";

    "microvm: boot credentials on microvm@test-vm" = contains chUnit "LoadCredential=ENVIRONMENT:/etc/vmcred/test-vm/environment";
    "microvm: late credentials not on microvm@test-vm" = lacks chUnit "API_KEY";
    "microvm: microvm@test-vm after and wants vmcred-host.service" =
      check (hasInfix "After=vmcred-host.service" chUnit && hasInfix "Wants=vmcred-host.service" chUnit) chUnit;
    "microvm: qemu VM gets its boot credential" = contains qemuUnit "LoadCredential=DB_ROOT:/run/secrets/db-root";
    "launch key: a qemu VM with a CID defaults to launch_key = \"required\"" =
      eq (map (v: parsedToml.vms.${v}.launch_key or null) [ "db-vm" "test-vm" "plain" ]) [ "required" null null ];
    "launch key: microvm@db-vm loads vmcred.launch-key from the agent's launch-keys/db-vm" =
      contains qemuUnit "LoadCredential=vmcred.launch-key:/var/lib/vmcred/launch-keys/db-vm\n";
    "launch key: cloud-hypervisor microvm@test-vm gets no launch key" = lacks chUnit "launch-key";
    "launch key: the key's unit is ordered after (and wants) vmcred-host.service, which makes it" =
      check (hasInfix "After=vmcred-host.service" qemuUnit && hasInfix "Wants=vmcred-host.service" qemuUnit
        && !(hasInfix "Requires=vmcred-host.service" qemuUnit) && !(hasInfix "BindsTo=vmcred-host.service" qemuUnit)) qemuUnit;
    "launch key: launchKey = \"off\" on a qemu VM renders nothing and loads no key" =
      let
        h = evalHost { modules = [ seedsModule { services.vmcred.host.vms.db-vm.launchKey = "off"; } ]; };
        t = builtins.fromTOML (builtins.unsafeDiscardStringContext (builtins.readFile h.services.vmcred.host.configFile));
        u = h.test.unitText."microvm@db-vm" or "";
      in check (!(t.vms.db-vm ? launch_key) && !(hasInfix "launch-key" u) && hasInfix "LoadCredential=DB_ROOT:" u
        && h.test.failedAssertions == [ ]) u;
    "launch key: a qemu VM with only the key (no boot credential) still gets its LoadCredential=" =
      let
        h = evalHost { modules = [{
          microvm.vms.k.config = { microvm.hypervisor = "qemu"; microvm.vsock.cid = 9; };
          services.vmcred.host = { enable = true; vms.k.credentials.A.source = "/run/secrets/a"; };
        }]; };
        u = h.test.unitText."microvm@k" or "";
      in check (hasInfix "LoadCredential=vmcred.launch-key:/var/lib/vmcred/launch-keys/k\n" u && h.test.failedAssertions == [ ]) u;
    "launch key: a VM microvm.nix does not manage may require one (its launch is the user's)" =
      let
        h = evalHost { modules = vmWith { launchKey = "required"; credentials.A.source = "/run/secrets/a"; }; };
        t = builtins.fromTOML (builtins.unsafeDiscardStringContext (builtins.readFile h.services.vmcred.host.configFile));
      in check (h.test.failedAssertions == [ ] && (t.vms.v.launch_key or null) == "required") (builtins.toJSON h.test.failedAssertions);
    "refused: launchKey = \"required\" on cloud-hypervisor (no private carrier)" =
      refusedWith "chkey" [{ microvm.vms.v.config = { microvm.hypervisor = "cloud-hypervisor"; microvm.vsock.cid = 3; };
                             services.vmcred.host = { enable = true; vms.v = { launchKey = "required"; credentials.A.source = "/run/secrets/a"; }; }; }]
        "is reached through hybrid vsock";
    "refused: launchKey = \"required\" on crosvm names the CID risk of \"off\"" =
      refusedWith "crosvmkey" [{ microvm.vms.v.config = { microvm.hypervisor = "crosvm"; microvm.vsock.cid = 3; };
                                 services.vmcred.host = { enable = true; vms.v = { launchKey = "required"; credentials.A.source = "/run/secrets/a"; }; }; }]
        "can start a VM on its CID";
    "refused: launchKey = \"required\" on a qemu VM without the launch wrapper" =
      refusedWith "nowrapper" [{ microvm.vms.v.config = { microvm.hypervisor = "qemu"; microvm.vsock.cid = 3; services.vmcred.guest.microvm.launchWrapper = false; };
                                 services.vmcred.host = { enable = true; vms.v.credentials.A.source = "/run/secrets/a"; }; }]
        "has no vmcred launch wrapper";
    "microvm: no microvm@ unit for a VM microvm.nix does not manage" = eq (units ? "microvm@plain") false;
    "microvm: cloud-hypervisor package is the launch wrapper" = eq (chPkg.vmcredLaunchWrapper or null) "test-vm";
    "microvm: wrapper keeps the real version" = eq (chPkg.version or null) "48.0";
    "microvm: the VM's own vsock CID is kept (no default injected)" = eq chGuest.microvm.vsock.cid 3;
    "microvm: qemu package is the launch wrapper" = eq (qemuPkg.vmcredLaunchWrapper or null) "db-vm";
    "microvm: qemu wrapper survives microvm.nix's .override" =
      check ((qemuPkgOverridden.vmcredLaunchWrapper or null) == "db-vm" && hasInfix "for-tests" qemuPkgOverridden.name) qemuPkgOverridden.name;
    "microvm: qemu wrapper keeps configureFlags (seccomp detection)" = eq qemuPkg.configureFlags [ "--enable-seccomp" ];
    "microvm: user-set CID on qemu VM is kept" = eq qemuGuest.microvm.vsock.cid 5;
    "microvm: guest agent enabled inside the VMs" = eq [ chGuest.services.vmcred.guest.enable qemuGuest.services.vmcred.guest.enable ] [ true true ];
    "microvm: guests have no failed assertions" = eq (chGuest.test.failedAssertions ++ qemuGuest.test.failedAssertions) [ ];
    "microvm: a VM not named in services.vmcred.host.vms is untouched" =
      let h = evalHost { modules = [ seedsModule { microvm.vms.other.config = { microvm.hypervisor = "cloud-hypervisor"; }; } ]; };
      in check (!(lib.hasAttrByPath [ "services" "vmcred" ] h.microvm.vms.other.config.options) && h.microvm.vms.other.config.config.microvm.cloud-hypervisor.package == pkgs.cloud-hypervisor
        && !(hasInfix "vmcred" (h.test.unitText."microvm@other" or ""))) "other VM was modified";
    "microvm: the user's microvm.cloud-hypervisor.package is wrapped, not replaced" =
      let
        mine = pkgs.cloud-hypervisor // { version = "99.0"; };
        h = evalHost { modules = [ seedsModule { microvm.vms.test-vm.config.microvm.cloud-hypervisor.package = mine; } ]; };
        p = h.microvm.vms.test-vm.config.config.microvm.cloud-hypervisor.package;
      in eq [ (p.vmcredLaunchWrapper or null) (p.vmcredWrapped.version or null) p.version ] [ "test-vm" "99.0" "99.0" ];
    "microvm: even a forced package is wrapped (the wrapper is an apply, not a definition)" =
      let
        mine = pkgs.cloud-hypervisor // { version = "98.0"; };
        h = evalHost { modules = [ seedsModule { microvm.vms.test-vm.config.microvm.cloud-hypervisor.package = lib.mkForce mine; } ]; };
        p = h.microvm.vms.test-vm.config.config.microvm.cloud-hypervisor.package;
      in eq [ (p.vmcredLaunchWrapper or null) (p.vmcredWrapped.version or null) ] [ "test-vm" "98.0" ];
    "microvm: an aarch64 guest on this host gets qemu-system-aarch64 (the guest's architecture)" =
      let
        h = evalHost { modules = [ seedsModule {
          microvm.vms.db-vm.pkgs = import ./stub-pkgs.nix { inherit lib; path = standin; system = "aarch64-linux"; };
        } ]; };
        p = h.microvm.vms.db-vm.config.config.microvm.qemu.package;
      in eq [ (p.meta.mainProgram or null) (p.vmcredLaunchWrapper or null) ] [ "qemu-system-aarch64" "db-vm" ];
    "microvm: restartUnits on the host credential reach the guest's config" =
      eq (chGuest.services.vmcred.guest.credentials.DB_PASSWORD.restartUnits or null) [ "db-client.service" ];
    "microvm: an inline value is a store file named in host.toml, loaded at boot" =
      check (lib.hasPrefix builtins.storeDir tierFile && builtins.readFile tierFile == "production"
        && hasInfix "LoadCredential=TIER:${tierFile}" qemuUnit) qemuUnit;
    "microvm: microvm@ units get RuntimeDirectory=vmcred-launch/<vm> (0700)" =
      check (hasInfix "RuntimeDirectory=vmcred-launch/test-vm\n" chUnit && hasInfix "RuntimeDirectoryMode=0700" chUnit
        && hasInfix "RuntimeDirectory=vmcred-launch/db-vm\n" qemuUnit) chUnit;
    "host: LimitNOFILE sized from the VM count (1024 + 8 per VM)" = contains agentUnit "LimitNOFILE=${toString (1024 + 8 * 3)}";
    "host: metrics off by default (no metrics_* keys, no ReadWritePaths)" =
      check (!(parsedToml ? metrics_socket) && !(parsedToml ? metrics_textfile) && !(hasInfix "ReadWritePaths=" agentUnit)) hostToml;
    "host: metrics.socket and metrics.textfile render metrics_* and make only the textfile's directory writable" =
      let
        h = evalHost { modules = [ seedsModule {
          services.vmcred.host.metrics = { socket = true; textfile = "/var/lib/prometheus-node-exporter/vmcred.prom"; interval = "30s"; };
        } ]; };
        t = builtins.fromTOML (builtins.unsafeDiscardStringContext (builtins.readFile h.services.vmcred.host.configFile));
        u = h.test.unitText.vmcred-host or "";
      in check (t.metrics_socket == "/run/vmcred/metrics.sock" && t.metrics_textfile == "/var/lib/prometheus-node-exporter/vmcred.prom"
        && t.metrics_interval == "30s" && hasInfix "ReadWritePaths=/var/lib/prometheus-node-exporter\n" u
        && h.systemd.tmpfiles.rules == [ "d /var/lib/prometheus-node-exporter 0755 root root -" ]) "${builtins.toJSON t}\n${u}";
    "host: a metrics textfile that node-exporter would not read is refused" =
      refusedWith "textfile" (vmWith { } ++ [ { services.vmcred.host.metrics.textfile = "/var/lib/x/vmcred.txt"; } ]) "metrics.textfile must be an absolute path ending in .prom";
    "host: metrics_* in settings is refused (the unit could not write the file)" =
      refusedWith "settings" (vmWith { } ++ [ { services.vmcred.host.settings.metrics_textfile = "/x/v.prom"; } ]) "use services.vmcred.host.metrics";

    "guest: Type=notify, Restart=always" =
      check (hasInfix "Type=notify" guestUnit && hasInfix "Restart=always" guestUnit) guestUnit;
    "guest: ExecStart runs vmcred-guest with the rendered config" =
      contains guestUnit "ExecStart=${vmcredPkg}/bin/vmcred-guest --config ${guestTomlFile} --credentials-dir ${lib.escapeShellArg "/run/credentials/@system"} --systemctl ${pkgs.systemd}/bin/systemctl";
    "guest: can bind its vsock port below 1024 and remount the credentials (CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN, @mount)" =
      let lines = lib.filter (l: hasInfix "CapabilityBoundingSet=" l || hasInfix "SystemCallFilter=" l) (lib.splitString "\n" guestUnit); in
      eq lines [ "CapabilityBoundingSet=CAP_SYS_ADMIN" "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" "SystemCallFilter=@system-service" "SystemCallFilter=@mount" "SystemCallFilter=~@resources" ];
    "guest: hardened where the agent needs nothing (ProtectClock, ProtectHostname, DevicePolicy=closed; no namespace of its own)" =
      check (lib.all (l: hasInfix l guestUnit) [ "ProtectClock=true" "ProtectHostname=true" "DevicePolicy=closed" ]) guestUnit;
    "guest: no setting that gives the unit its own mount namespace (the remount must be the system's)" =
      check (lib.all (k: !(hasInfix "${k}=" guestUnit)) [
        "ProtectSystem" "ProtectHome" "PrivateTmp" "PrivateDevices" "PrivateMounts" "ReadWritePaths" "ReadOnlyPaths"
        "InaccessiblePaths" "TemporaryFileSystem" "BindPaths" "ProtectKernelTunables" "ProtectKernelModules"
        "ProtectKernelLogs" "ProtectControlGroups" "ProtectProc" "ProcSubset" "MountFlags" "RootDirectory" ]) guestUnit;
    "guest: early boot ordering" =
      check (lib.all (l: hasInfix l guestUnit) [
        "DefaultDependencies=false" "Before=basic.target shutdown.target"
        "After=systemd-modules-load.service local-fs.target" ]) guestUnit;
    "guest: wanted by basic.target" = eq guest.systemd.services.vmcred-guest.wantedBy [ "basic.target" ];
    "guest: vsock modules loaded" = eq guest.boot.kernelModules [ "vsock" "vmw_vsock_virtio_transport" ];
    "guest: toml parses to the expected structure" = eq (builtins.fromTOML guestToml) {
      initial_sync_timeout = "30s";
      credentials = {
        API_KEY = { restart_units = [ "demo-consumer.service" ]; reload_units = [ ]; mode = "0400"; };
        JWT_SECRET = { restart_units = [ ]; reload_units = [ "web.service" ]; mode = "0440"; };
      };
    };

    "guest: pins stay on /run (pinStateDir null) when nothing persistent is mounted" =
      check (guest.services.vmcred.guest.pinStateDir == null && !((builtins.fromTOML guestToml) ? pin_state_dir)) guestToml;
    "guest: pinStateDir defaults to /var/lib/vmcred when / is not a tmpfs, and is rendered" =
      let g = evalGuest [
            { options.fileSystems = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; }; }
            { fileSystems."/" = { device = "/dev/vda"; fsType = "ext4"; }; services.vmcred.guest.enable = true; }
          ];
          t = builtins.fromTOML (builtins.unsafeDiscardStringContext (builtins.readFile g.services.vmcred.guest.configFile)); in
      check (g.services.vmcred.guest.pinStateDir == "/var/lib/vmcred" && (t.pin_state_dir or null) == "/var/lib/vmcred") (builtins.toJSON t);
    "guest: on microvm.nix, pinStateDir follows a volume or share at /var, and only that" =
      let mv = microvm: (evalGuest [
            { options.microvm = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; }; }
            { inherit microvm; services.vmcred.guest.enable = true; }
          ]).services.vmcred.guest.pinStateDir;
          got = [
            (mv { volumes = [ { image = "var.img"; mountPoint = "/var"; size = 64; } ]; })
            (mv { shares = [ { tag = "ro-store"; source = "/nix/store"; mountPoint = "/nix/.ro-store"; } ]; })
            (mv { })
          ]; in
      eq got [ "/var/lib/vmcred" null null ];
    "guest: an explicit pinStateDir is rendered as pin_state_dir" =
      let g = evalGuest [{ services.vmcred.guest = { enable = true; pinStateDir = "/persist/vmcred"; }; }];
          t = builtins.fromTOML (builtins.unsafeDiscardStringContext (builtins.readFile g.services.vmcred.guest.configFile)); in
      check ((t.pin_state_dir or null) == "/persist/vmcred") (builtins.toJSON t);

    "guest socket: socketUnits wire LoadCredential=<cred>:/run/vmcred/creds.sock (escaped) on each unit" =
      eq [ (lib.sort (a: b: a < b) socketGuest.systemd.services.api.serviceConfig.LoadCredential)
           socketGuest.systemd.services.other.serviceConfig.LoadCredential ]
         [ [ "API_KEY:/run/vmcred/creds.sock" "MEMORY:/run/vmcred/creds.sock" "odd%%name:/run/vmcred/creds.sock" ] [ "odd%%name:/run/vmcred/creds.sock" ] ];
    "guest socket: mapped units are ordered after and want vmcred-guest.service" =
      check (lib.all (u: lib.elem "vmcred-guest.service" socketGuest.systemd.services.${u}.after
                        && lib.elem "vmcred-guest.service" socketGuest.systemd.services.${u}.wants) [ "api" "other" ])
        (builtins.toJSON (map (u: socketGuest.systemd.services.${u}.after) [ "api" "other" ]));
    "guest socket: guest.toml carries socket_units, only where set" =
      eq [ socketToml.credentials.API_KEY.socket_units socketToml.credentials."odd%name".socket_units
           (socketToml.credentials.FILE_ONLY ? socket_units) ]
         [ [ "api.service" ] [ "api.service" "other.service" ] false ];
    "guest socket: guest.toml uses the key names the agent parses (socket_units; config.rs tests them)" =
      eq (builtins.attrNames socketToml.credentials.API_KEY) [ "mode" "reload_units" "restart_units" "socket_units" ];
    "guest socket: deliver = \"socket\" reaches guest.toml; the default \"file\" is not written" =
      eq [ (socketToml.credentials.MEMORY.deliver or null) (socketToml.credentials.API_KEY ? deliver) ] [ "socket" false ];
    "refused: guest deliver = \"socket\" without socketUnits" =
      guestRefused [{ services.vmcred.guest = { enable = true; credentials.A.deliver = "socket"; }; }] "needs socketUnits";
    "guest socket: the agent unit itself is untouched" =
      check (!(hasInfix "creds.sock" (socketGuest.test.unitText.vmcred-guest or ""))) "vmcred-guest names creds.sock";
    "refused: guest socketUnits on a unit that is not a service" =
      guestRefused [{ services.vmcred.guest = { enable = true; credentials.A.socketUnits = [ "x.mount" ]; }; }] "is not a .service unit";
    "refused: guest socketUnits + credential name longer than systemd's socket address leaves (83 bytes; here 84)" =
      guestRefused [{ services.vmcred.guest = { enable = true;
        credentials.${lib.concatStrings (lib.genList (_: "N") 36)}.socketUnits = [ "${lib.concatStrings (lib.genList (_: "u") 40)}.service" ]; }; }]
        "(48 bytes) with this credential name (36 bytes) is 84 bytes";
    "accepted: guest socketUnits + credential name of exactly 83 bytes" =
      eq (evalGuest [{ services.vmcred.guest = { enable = true;
        credentials.${lib.concatStrings (lib.genList (_: "N") 35)}.socketUnits = [ "${lib.concatStrings (lib.genList (_: "u") 40)}.service" ]; }; }]).test.failedAssertions [ ];
    "guest socket: a template instance in socketUnits is a drop-in (asDropin), other units keep NixOS's default" =
      eq [ templGuest.test.overrideStrategy."getty@tty1" templGuest.test.overrideStrategy.api
           (lib.hasInfix "LoadCredential=API_KEY:/run/vmcred/creds.sock" (templGuest.test.unitText."getty@tty1" or "")) ]
         [ "asDropin" "asDropinIfExists" true ];
    "guest socket: a NixOS-defined full instance can set its overrideStrategy back" =
      eq (evalGuest [
        { services.vmcred.guest = { enable = true; credentials.API_KEY.socketUnits = [ "getty@tty1.service" ]; }; }
        { systemd.services."getty@tty1".overrideStrategy = "asDropinIfExists"; }
      ]).test.overrideStrategy."getty@tty1" "asDropinIfExists";
    "refused: guest socketUnits naming vmcred-guest.service itself" =
      guestRefused [{ services.vmcred.guest = { enable = true; credentials.A.socketUnits = [ "vmcred-guest.service" ]; }; }] "is not a .service unit";

    "disabled host: no vmcred unit, nothing of vmcred on microvm.nix's units" =
      check (!(disabledHost.systemd.services ? vmcred-host)
        && lib.all (n: !(hasInfix "vmcred" disabledHost.test.unitText.${n}))
             (lib.filter (lib.hasPrefix "microvm@") (builtins.attrNames disabledHost.systemd.services)))
        "a microvm@ unit names vmcred";
    "disabled host: no vmcred /etc files, no vmcred packages" =
      eq [ (lib.filter (lib.hasPrefix "vmcred") (builtins.attrNames disabledHost.environment.etc))
           (lib.filter (p: lib.hasInfix "vmcred" (p.name or "")) disabledHost.environment.systemPackages) ] [ [ ] [ ] ];
    "disabled host: microvm guests untouched" =
      eq disabledHost.microvm.vms.test-vm.config.config.microvm.cloud-hypervisor.package pkgs.cloud-hypervisor;
    "disabled guest: renders nothing" =
      eq [ disabledGuest.systemd.services disabledGuest.environment.etc disabledGuest.boot.kernelModules ] [ { } { } [ ] ];
    "without microvm.nix: evaluates, renders the agent" =
      check (noMicrovm.test.failedAssertions == [ ] && hasInfix "ExecStart=" (noMicrovm.test.unitText.vmcred-host or "")
        && (builtins.fromTOML (builtins.readFile noMicrovm.services.vmcred.host.configFile)).vms.vm1.credentials.A.path == "/run/secrets/a")
        (builtins.toJSON noMicrovm.test.failedAssertions);

    "refused: source in the Nix store" =
      refusedWith "store" (credWith "A" { source = "${builtins.storeDir}/0000-secret"; }) "is in the Nix store,\nwhich every local user can read";
    "refused: source from a package (string context)" =
      refusedWith "context" (credWith "A" { source = "${pkgs.vmcred}/secret"; }) "plain string";
    "refused: source as a Nix path literal" =
      refusedWith "path" (credWith "A" { source = ./checks.nix; }) "is a Nix path literal";
    "refused: relative source" = refusedWith "relative" (credWith "A" { source = "secrets/a"; }) "must be an absolute path";
    "refused: newline in source" = refusedWith "newline" (credWith "A" { source = "/run/a\nExecStart=/bin/sh"; }) "control character";
    "refused: credential name with /" = refusedWith "slash" (credWith "a/b" { }) "contains \"/\"";
    "refused: credential name with :" = refusedWith "colon" (credWith "a:b" { }) "contains \":\"";
    "refused: credential name with a space" = refusedWith "space" (credWith "a b" { }) "contains a space";
    "refused: credential name .." = refusedWith "dotdot" (credWith ".." { }) "is \"..\"";
    "refused: empty credential name" = refusedWith "empty" (credWith "" { }) "is empty";
    "refused: non-ASCII credential name" = refusedWith "utf8" (credWith "pässword" { }) "not printable ASCII";
    "refused: 256-character credential name" =
      refusedWith "long" (credWith (lib.concatStrings (lib.genList (_: "a") 256)) { }) "at most 255";
    "accepted: 255-character credential name (no <vm>-<cred> ID to fit any more)" =
      eq (failedWith (credWith (lib.concatStrings (lib.genList (_: "a") 255)) { })) [ ];
    "refused: source under /root (hidden by ProtectHome=)" =
      refusedWith "root" (credWith "A" { source = "/root/secrets/a"; }) "hidden from\nvmcred-host.service by its sandbox (ProtectHome=true)";
    "refused: source under /home (hidden by ProtectHome=)" =
      refusedWith "home" (credWith "A" { source = "/home/alice/a"; }) "(ProtectHome=true)";
    "refused: source under /tmp (hidden by PrivateTmp=)" =
      refusedWith "tmp" (credWith "A" { source = "/tmp/a"; }) "(PrivateTmp=true)";
    "accepted: source under /root once ProtectHome=read-only" =
      eq (failedWith (credWith "A" { source = "/root/secrets/a"; } ++ [{ systemd.services.vmcred-host.serviceConfig.ProtectHome = lib.mkForce "read-only"; }])) [ ];
    "accepted: /rootfs and /tmpx are not /root and /tmp" =
      eq (failedWith (vmWith { credentials = { A.source = "/rootfs/a"; B.source = "/tmpx/b"; }; })) [ ];
    "refused: boot credential name with , (cannot go into an OEM string)" =
      refusedWith "oem" (credWith "A,B" { boot = true; }) "which no boot carrier\ncan hold";
    "accepted: late credential name with , (vsock only)" = eq (failedWith (credWith "A,B" { })) [ ];
    "refused: two VMs on one hybridSocket" =
      refusedWith "hybrid clash" [{ services.vmcred.host = { enable = true;
        vms.a = { hybridSocket = "/var/lib/microvms/c/notify.vsock"; };
        vms.b = { hybridSocket = "/var/lib/microvms/c/notify.vsock"; }; }; }]
        "a, b all have hybridSocket /var/lib/microvms/c/notify.vsock";
    "refused: two VMs on one CID" =
      refusedWith "cid clash" [{ services.vmcred.host = { enable = true; vms.a.cid = 5; vms.b.cid = 5; }; }] "a, b all have AF_VSOCK CID 5";
    "host: an AF_VSOCK VM makes /dev/vhost-vsock 0660 root:kvm (udev rule, static node)" =
      eq host.services.udev.extraRules
        ''KERNEL=="vhost-vsock", GROUP="kvm", MODE="0660", OPTIONS+="static_node=vhost-vsock"'';
    "host: no vhost-vsock rule with hybrid-vsock VMs only, with restrictVhostVsock = false, or disabled" =
      eq [ (evalHost { microvm = false; modules = [{ services.vmcred.host = { enable = true; vms.h = hybridVm; }; }]; }).services.udev.extraRules
           (evalHost { modules = [ seedsModule { services.vmcred.host.restrictVhostVsock = false; } ]; }).services.udev.extraRules
           disabledHost.services.udev.extraRules ]
         [ "" "" "" ];
    "microvm: microvm.nix runs VMs as user microvm in group kvm (so the 0660 root:kvm vhost-vsock keeps working)" =
      if microvmSrc == null then check true "stand-in microvm.nix: checked only with the real one"
      else let grp = lib.attrByPath [ "users" "users" "microvm" "group" ] null host; tmpl = units."microvm@" or ""; in
        check (grp == "kvm" && hasInfix "\nGroup=kvm\n" tmpl && hasInfix "\nUser=microvm\n" tmpl)
          "users.users.microvm.group = ${builtins.toJSON grp}; microvm@ unit:\n${tmpl}";
    "refused: port 1024" = refusedWith "port" (vmWith { port = 1024; }) "must be 1-1023";
    "refused: both cid and hybridSocket" = refusedWith "both" (vmWith { hybridSocket = "/run/x.sock"; }) "set exactly one of `cid`";
    "refused: neither cid nor hybridSocket" =
      refusedWith "neither" [{ services.vmcred.host = { enable = true; vms.v = { }; }; }] "neither is set";
    "refused: reserved CID 2" = refusedWith "cid" (vmWith { cid = 2; }) "CIDs 0, 1 and 2 are reserved";
    "refused: relative hybridSocket" =
      refusedWith "hybrid" [{ services.vmcred.host = { enable = true; vms.v.hybridSocket = "x.sock"; }; }] "must be an absolute path";
    "refused: qemu microvm without vsock CID" =
      refusedWith "nocid" [{ microvm.vms.v.config = { microvm.hypervisor = "qemu"; };
                              services.vmcred.host = { enable = true; vms.v = { }; }; }] "set microvm.vsock.cid in microvm.vms.v.config";
    "refused: secret boot credential on cloud-hypervisor" =
      refusedWith "chboot" [{ microvm.vms.v.config = { microvm.hypervisor = "cloud-hypervisor"; microvm.vsock.cid = 3; };
                              services.vmcred.host = { enable = true; vms.v.credentials.K = { source = "/run/secrets/k"; boot = true; }; }; }]
        "/proc/<pid>/cmdline";
    "refused: settings.state_dir" =
      refusedWith "settings" [{ services.vmcred.host = { enable = true; settings.state_dir = "/tmp"; }; }] "fixed by the NixOS module";
    "refused: a hypervisor microvm.nix runs without vsock (guest assertion)" =
      let msgs = microvmGuestFailed { microvm.hypervisor = "stratovirt"; } { cid = 3; }; in
      check (lib.any (hasInfix "has no vsock in microvm.nix") msgs) (builtins.toJSON msgs);
    "refused: source and value both set" =
      refusedWith "both" (credWith "A" { value = "x"; }) "set exactly one of `source`";
    "refused: neither source nor value" =
      refusedWith "none" (vmWith { credentials.A = { }; }) "set exactly one of `source`";
    "guest: accepts what the agent accepts (\"1m 30s\", \"500ms\", modes 0440/444/0o400, unit names with @ and \\x2d)" =
      let c = evalGuest [{ services.vmcred.guest = {
        enable = true; initialSyncTimeout = "1m 30s";
        credentials.A = { mode = "0440"; restartUnits = [ "getty@tty1.service" "a\\x2db.mount" ]; };
        credentials.B = { mode = "444"; reloadUnits = [ "x.service" ]; };
        credentials.C.mode = "0o400";
      }; }]; in eq c.test.failedAssertions [ ];
    "refused: guest credential name with /" =
      guestRefused [{ services.vmcred.guest = { enable = true; credentials."a/b" = { }; }; }] "systemd credential names are";
  };

  # Each must fail to evaluate; run.sh checks the message.
  errorCases =
    let
      forceHost = modules: let c = evalHost { inherit modules; }; in
        # vmcred's units and microvm.nix's microvm@ (the others are microvm.nix's own).
        builtins.deepSeq [ (lib.filterAttrs (n: _: lib.hasPrefix "vmcred" n || lib.hasPrefix "microvm@" n) c.test.unitText)
          c.test.failedAssertions (builtins.readFile c.services.vmcred.host.configFile) c.services.vmcred.host.vms ] true;
      forceGuest = modules: let c = evalGuest modules; in
        builtins.deepSeq [ c.test.unitText c.test.failedAssertions (builtins.readFile c.services.vmcred.guest.configFile) ] true;
    in
    {
      host-port-string = forceHost (vmWith { port = "700"; });
      host-typo-credentails = forceHost (vmWith { credentails.A.source = "/run/secrets/a"; });
      host-typo-sources = forceHost (credWith "A" { sources = "/run/secrets/a"; });
      host-boot-string = forceHost (credWith "A" { boot = "yes"; });
      host-cid-negative = forceHost (vmWith { cid = -3; });
      host-source-int = forceHost (credWith "A" { source = 42; });
      host-unknown-top = forceHost [{ services.vmcred.host.enabel = true; }];
      host-path-literal-unit = let c = evalHost { modules = credWith "A" { source = ./checks.nix; }; }; in builtins.deepSeq c.test.unitText true;
      guest-mode-bad = forceGuest [{ services.vmcred.guest = { enable = true; credentials.A.mode = "0999"; }; }];
      guest-typo-restartunit = forceGuest [{ services.vmcred.guest = { enable = true; credentials.A.restartUnit = [ "x" ]; }; }];
      guest-timeout-bad = forceGuest [{ services.vmcred.guest = { enable = true; initialSyncTimeout = "soon"; }; }];
      # What the agent refuses at boot (and would crash-loop on) must not evaluate.
      guest-timeout-bare-number = forceGuest [{ services.vmcred.guest = { enable = true; initialSyncTimeout = "30"; }; }];
      guest-mode-0644 = forceGuest [{ services.vmcred.guest = { enable = true; credentials.A.mode = "0644"; }; }];
      guest-mode-0040 = forceGuest [{ services.vmcred.guest = { enable = true; credentials.A.mode = "0040"; }; }];
      guest-unit-space = forceGuest [{ services.vmcred.guest = { enable = true; credentials.A.restartUnits = [ "my app.service" ]; }; }];
      guest-unit-dash = forceGuest [{ services.vmcred.guest = { enable = true; credentials.A.restartUnits = [ "-x.service" ]; }; }];
      guest-deliver-both = forceGuest [{ services.vmcred.guest = { enable = true; credentials.A = { deliver = "both"; socketUnits = [ "a.service" ]; }; }; }];
      guest-socketunit-slash = forceGuest [{ services.vmcred.guest = { enable = true; credentials.A.socketUnits = [ "a/b.service" ]; }; }];
      host-unit-slash = forceHost (credWith "A" { restartUnits = [ "a/b.service" ]; });
      control-valid-host = forceHost (credWith "A" { });
    };
}
