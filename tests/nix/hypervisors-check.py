#!/usr/bin/env python3
"""Checks the evaluated outputs of tests/nix/hypervisors.nix (given as JSON):
units, transports, forwarded unit actions, assertions that must refuse and
configurations that must be accepted. Prints STATUS<TAB>name<TAB>detail."""
import json
import sys

d = json.load(open(sys.argv[1]))
out = []


def check(ok, name, detail=""):
    out.append(("PASS" if ok else "FAIL", name, detail))


check(d["hostFailed"] == [], "no failed assertion on the host with every hypervisor", "\n".join(d["hostFailed"]))
for n, c in sorted(d["cases"].items()):
    vm = c["vm"]
    check(c["guestFailed"] == [], f"{n}: no failed assertion in the guest", "\n".join(c["guestFailed"]))
    u = c["unit"]
    check(f"RuntimeDirectory=vmcred-launch/{vm}\n" in u and "RuntimeDirectoryMode=0700\n" in u,
          f"{n}: microvm@{vm} gets RuntimeDirectory=vmcred-launch/{vm} (0700) for the launcher", u)
    check("After=vmcred-host.service" in u and "Wants=vmcred-host.service" in u,
          f"{n}: microvm@{vm} is ordered after and wants vmcred-host.service", u)
    check(f"LoadCredential=BOOT_CONST:/run/secrets/vmcred-nix-test/{vm}-boot\n" in u and "SECRET_TOKEN" not in u,
          f"{n}: only the boot credential is loaded into microvm@{vm}", u)
    check('restart_units = ["app.service"]' in c["guestToml"],
          f"{n}: restartUnits given on the host reach the guest's config", c["guestToml"])
    key_line = f"LoadCredential=vmcred.launch-key:/var/lib/vmcred/launch-keys/{vm}\n"
    if c["hv"] == "qemu":
        check(c["launchKey"] == "required" and c["tomlLaunchKey"] == "required" and key_line in u,
              f"{n}: launch key required by default (qemu with a CID): launch_key = \"required\" in host.toml, {key_line.strip()}",
              json.dumps([c["launchKey"], c["tomlLaunchKey"]]) + "\n" + u)
    else:
        check(c["launchKey"] == "off" and c["tomlLaunchKey"] is None and "launch-key" not in u,
              f"{n}: no launch key by default ({c['hv']} has no private carrier): nothing in host.toml or the unit",
              json.dumps([c["launchKey"], c["tomlLaunchKey"]]) + "\n" + u)
    if c["hv"] in ("cloud-hypervisor", "firecracker"):
        sock = {"ch-extraargs": "my.vsock"}.get(n, "notify.vsock")
        check(c["cid"] is None and c["hybridSocket"] == f"/var/lib/microvms/{vm}/{sock}",
              f"{n}: transport is hybrid vsock on /var/lib/microvms/{vm}/{sock}",
              json.dumps([c["cid"], c["hybridSocket"]]))
    else:
        check(c["cid"] is not None and c["hybridSocket"] is None,
              f"{n}: transport is AF_VSOCK to microvm.vsock.cid ({c['cid']})",
              json.dumps([c["cid"], c["hybridSocket"]]))

t = d["templateUnit"]
if t:
    check("User=microvm" in t and "WorkingDirectory=/var/lib/microvms/%i" in t,
          "microvm.nix's microvm@ template runs as User=microvm in /var/lib/microvms/%i", t)
a = d["agentUnit"]
n_vms = len(d["cases"])
check(f"LimitNOFILE={1024 + 8 * n_vms}" in a,
      f"vmcred-host.service: LimitNOFILE=1024 + 8 per VM ({1024 + 8 * n_vms})", a)

expect = {
    "fw-cfg-name-too-long": "at most 55 bytes",
    "boot-secret-on-kernel-cmdline": "the kernel command line",
    "boot-secret-on-ch-oem-strings": "oem_strings",
    "no-vsock": "the VM has no vsock",
    "hypervisor-without-vsock": "which it gives no vsock",
    "cid-clash": "all have AF_VSOCK CID",
    "evaluated-config-without-guest-module": "nixosModules.microvm-guest",
    "launch-key-without-wrapper": "has no vmcred launch wrapper",
}
# launchKey = "required" where microvm.nix's hypervisor has no private
# carrier: refused, with the choices, and what "off" means there.
for hv, off_is in (("cloud-hypervisor", "is reached through hybrid vsock"),
                   ("firecracker", "is reached through hybrid vsock"),
                   ("crosvm", "can start a VM on its CID"),
                   ("kvmtool", "can start a VM on its CID"),
                   ("alioth", "can start a VM on its CID")):
    expect[f"launch-key-on-{hv}"] = (f"microvm.nix runs this VM with {hv}", "run the VM under qemu", off_is)
for k, want in expect.items():
    msgs = d["refusals"].get(k, [])
    wants = want if isinstance(want, tuple) else (want,)
    check(any(all(w in " ".join(m.split()) for w in wants) for m in msgs),
          f"refused with a lesson: {k}", "\n".join(msgs) or "(no failed assertion)")
for k, msgs in sorted(d["accepted"].items()):
    check(msgs == [], f"accepted: {k}", "\n".join(msgs))
e = d["evaluatedWithModule"]
check(e["failed"] == [] and e["configIsNull"] and e["wrapped"] and e["cid"] == 11,
      "evaluatedConfig VM importing vmcred's module: accepted, nothing injected, its own wrapper, CID read from it",
      json.dumps(e))

r = d.get("readme")
if r is not None:
    check(r["failed"] == [] and 'path = "/run/secrets/api-key"' in r["toml"]
          and 'hybrid_socket = "/var/lib/microvms/test-vm/notify.vsock"' in r["toml"]
          and 'restart_units = ["app.service"]' in r["guestToml"],
          "the README's seeds setup evaluates: sops path, hybrid socket, restartUnits forwarded",
          json.dumps(r))
for st, name, detail in out:
    print(st, name, detail.replace("\t", " ").replace("\n", " | "), sep="\t")
