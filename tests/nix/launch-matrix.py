#!/usr/bin/env python3
"""Runs each VM's microvm-run (built by microvm.nix's runner code from the
evaluated NixOS config) as an unprivileged user, the way microvm@<vm>.service
runs it (User=, WorkingDirectory=, $RUNTIME_DIRECTORY, $CREDENTIALS_DIRECTORY),
with vmcred's launch wrapper in it and the real `vmcred-host launch` in
dry-run mode, and checks the hypervisor argv it would exec.

Usage: launch-matrix.py CASES_JSON HOST_BIN HOST_TOML WORK_DIR
Prints PASS:/FAIL: lines (counted by run.sh).
"""
import base64
import json
import os
import pwd
import re
import shlex
import subprocess
import sys

cases_json, host_bin, host_toml, work = sys.argv[1:5]
cases = json.load(open(cases_json))
UID = 65534  # nobody: no rights on anything but what the unit would give it
DRY_RUN_ARGS = os.environ.get("VMCRED_TEST_DRY_RUN_ARGS", "--dry-run --json").split()

# Where boot data may go, per hypervisor (and qemu machine type): the
# carrier the guest's systemd reads, and whether it is a command line.
BIN = {"qemu": "qemu-system-x86_64", "cloud-hypervisor": "cloud-hypervisor",
       "firecracker": "firecracker", "crosvm": "crosvm", "kvmtool": "lkvm", "alioth": "alioth"}
CMDLINE_OPT = {"cloud-hypervisor": "--cmdline", "crosvm": "-p", "kvmtool": "-p", "alioth": "-c", "qemu": "-append"}


def result(ok, name, detail=""):
    print(("PASS: " if ok else "FAIL: ") + name)
    if not ok and detail:
        for line in str(detail).splitlines()[:40]:
            print("    " + line)


def nix_build(drv):
    p = subprocess.run(["nix-store", "--realise", drv], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return p.stdout.strip().splitlines()[-1]


def exec_line(script):
    for line in script.splitlines():
        if line.strip().startswith("exec "):
            return line.strip()
    return None


def find_argv(node, binary):
    """The first list of strings in the launcher's JSON whose first element
    is (or ends with) the hypervisor binary."""
    if isinstance(node, list) and node and all(isinstance(x, str) for x in node):
        if node[0] == binary or node[0].endswith("/" + os.path.basename(binary)):
            return node
    if isinstance(node, list):
        for x in node:
            r = find_argv(x, binary)
            if r:
                return r
    if isinstance(node, dict):
        for x in node.values():
            r = find_argv(x, binary)
            if r:
                return r
    return None


def opt_values(argv, opt):
    return [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == opt]


def run_case(name, c):
    vm, hv = c["vm"], c["hv"]
    label = f"{name} ({hv}{' -M ' + c['machine'] if c['machine'] else ''})"
    try:
        runner = nix_build(c["runner"])
    except RuntimeError as e:
        result(False, f"{label}: microvm.nix's runner builds", e)
        return
    script = open(os.path.join(runner, "bin", "microvm-run")).read()
    line = exec_line(script)
    words = shlex.split(line.replace("${runtime_args:-}", "")) if line else []
    # exec -a NAME BINARY ARGS...
    ok = len(words) > 3 and words[1] == "-a" and words[2] == c["argv0"]
    result(ok, f"{label}: microvm-run execs the hypervisor as {c['argv0']} (exec -a)", line)
    if not ok:
        return
    wrapper_bin, orig_args = words[3], words[4:]
    wrapper = open(wrapper_bin).read() if os.path.isfile(wrapper_bin) else ""
    wl = exec_line(wrapper)
    ww = shlex.split(wl) if wl else []
    want = ["launch", "--config", "/etc/vmcred/host.toml", "--vm", vm, "--hypervisor", hv, "--argv0", c["argv0"], "--"]
    ok = len(ww) == 14 and ww[0] == "exec" and ww[1].endswith("/bin/vmcred-host") and ww[2:12] == want \
        and ww[12].endswith("/bin/" + BIN[hv]) and ww[13] == "$@" \
        and os.path.realpath(ww[12]) != os.path.realpath(wrapper_bin) and os.access(ww[12], os.X_OK)
    result(ok, f"{label}: the runner's {BIN[hv]} is vmcred's wrapper: vmcred-host {' '.join(want)} <the user's {BIN[hv]}> \"$@\"", wrapper)
    if not ok:
        return
    real_bin = ww[12]

    # The unit's environment: the VM's state directory as working directory,
    # a 0700 runtime directory of its own, the boot credentials systemd
    # loaded (LoadCredential=), all owned by/for the unprivileged user.
    base = os.path.join(work, name)
    state, rundir, creds = (os.path.join(base, d) for d in ("state", "run/vmcred-launch/" + vm, "creds"))
    for d in (state, rundir, creds):
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chown(d, UID, UID)
        os.chmod(d, 0o700)
    os.chmod(os.path.join(base, "run"), 0o755)
    os.chmod(os.path.join(base, "run/vmcred-launch"), 0o755)
    os.chmod(base, 0o755)
    boot_value = f"boot-constant-{name}"
    canary = f"secret-canary-{name}-{os.getpid()}"
    # The launch key, as LoadCredential=vmcred.launch-key:<state_dir>/launch-keys/<vm>
    # would give it (the agent writes 64 lowercase hex digits).
    launch_key = os.urandom(32).hex() if c["launchKey"] == "required" else None
    loaded = [("BOOT_CONST", boot_value), ("SECRET_TOKEN", canary)]
    if launch_key:
        loaded.append(("vmcred.launch-key", launch_key))
    for cred, value in loaded:
        p = os.path.join(creds, cred)
        with open(p, "w") as f:
            f.write(value)
        os.chown(p, UID, UID)
        os.chmod(p, 0o400)
    env = {
        "PATH": "/usr/bin:/bin",
        "RUNTIME_DIRECTORY": rundir,
        "CREDENTIALS_DIRECTORY": creds,
        "VMCRED_TEST_HOST_BIN": host_bin,
        "VMCRED_TEST_HOST_CONFIG": host_toml,
        "VMCRED_TEST_DRY_RUN_ARGS": " ".join(DRY_RUN_ARGS),
    }
    p = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                        os.path.join(runner, "bin", "microvm-run")],
                       cwd=state, env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout
    ok = p.returncode == 0
    result(ok, f"{label}: vmcred-host launch --dry-run runs as uid {UID} from microvm-run",
           f"exit {p.returncode}\nstdout: {out}\nstderr: {p.stderr}")
    if not ok:
        return
    try:
        doc = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    except json.JSONDecodeError as e:
        result(False, f"{label}: dry-run output is JSON", f"{e}\n{out}")
        return
    argv = find_argv(doc, real_bin)
    result(argv is not None, f"{label}: dry-run shows the real {BIN[hv]} with an argv", out)
    if argv is None:
        return
    text = json.dumps(doc)
    result(c["argv0"] in text, f"{label}: the process keeps its name {c['argv0']}", out)
    result(canary not in text and canary not in p.stderr,
           f"{label}: a non-boot secret never reaches the argv or the output", out)

    # The bootstrap, in the form this machine reads.
    boot_re = "systemd.set_credential=vmcred.bootstrap:"
    detail = json.dumps(argv, indent=1)
    files = []
    if hv == "qemu" and c["machine"].startswith("microvm"):
        fw = [v for v in opt_values(argv, "-fw_cfg") if v.startswith("name=opt/io.systemd.credentials/vmcred.bootstrap,file=")]
        ok = len(fw) == 1
        result(ok, f"{label}: bootstrap as fw_cfg opt/io.systemd.credentials/vmcred.bootstrap (no SMBIOS on -M microvm)", detail)
        files = [v.split("file=", 1)[1] for v in opt_values(argv, "-fw_cfg") if "file=" in v]
        result(not any(v.startswith("type=11") for v in opt_values(argv, "-smbios")),
               f"{label}: no -smbios type=11 on -M microvm", detail)
    elif hv == "qemu":
        sm = [v for v in opt_values(argv, "-smbios") if v.startswith("type=11,path=")]
        result(len(sm) >= 1, f"{label}: bootstrap as -smbios type=11,path= (SMBIOS on -M {c['machine']})", detail)
        files = [v.split("path=", 1)[1] for v in sm]
    elif hv == "cloud-hypervisor":
        plats = opt_values(argv, "--platform")
        ok = len(plats) == 1 and "io.systemd.credential:vmcred.bootstrap=" in plats[0] \
            and "io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888" in plats[0]
        result(ok, f"{label}: bootstrap merged into the one --platform oem_strings, microvm.nix's vmm.notify_socket kept", detail)
    elif hv == "firecracker":
        cf = opt_values(argv, "--config-file")
        ok = len(cf) == 1 and cf[0].startswith(rundir + "/")
        result(ok, f"{label}: --config-file is a private copy in $RUNTIME_DIRECTORY", detail)
        if ok:
            conf = json.load(open(cf[0]))
            orig_conf = json.load(open(opt_values(orig_args, "--config-file")[0]))
            ba = conf.get("boot-source", {}).get("boot_args", "")
            result(boot_re in ba and orig_conf["boot-source"]["boot_args"] in ba,
                   f"{label}: boot_args carry the bootstrap and keep microvm.nix's", ba)
            result({k: v for k, v in conf.items() if k != "boot-source"}
                   == {k: v for k, v in orig_conf.items() if k != "boot-source"},
                   f"{label}: the rest of microvm.nix's Firecracker config is unchanged", json.dumps(conf))
            files = [cf[0]]
    else:
        vals = opt_values(argv, CMDLINE_OPT[hv])
        result(len(vals) == 1 and f'"{boot_re}' in vals[0],
               f"{label}: bootstrap quoted on the one kernel command line ({CMDLINE_OPT[hv]})", detail)

    # microvm.nix's own arguments: each is still there; the one value a
    # carrier merges into keeps the original text.
    merged = {"--platform", "--config-file", CMDLINE_OPT.get(hv, "")}
    if hv == "qemu":
        merged = set()  # files only: nothing of microvm.nix's is rewritten
    missing = []
    for i, a in enumerate(orig_args):
        if i > 0 and orig_args[i - 1] in merged:
            if hv == "firecracker":
                continue
            new = opt_values(argv, orig_args[i - 1])
            # --platform: microvm.nix's oem_strings items and other keys each
            # survive the merge; a command line: the original text survives.
            parts = [t for t in re.split(r"[\[\],]", a) if t] if orig_args[i - 1] == "--platform" else [a]
            if len(new) != 1 or not all(t in new[0] for t in parts):
                missing.append(f"{orig_args[i - 1]} {a}")
        elif a not in argv[1:]:
            missing.append(a)
    result(not missing, f"{label}: microvm.nix's arguments are all kept", "missing: " + repr(missing) + "\n" + detail)

    # Boot constant: through a file (qemu), or on the command line only
    # because the test config allows it there (allowOnCommandLine).
    # The dry run shows a command-line value as <redacted>; the name is
    # still there, and Firecracker's config copy holds the real one.
    argv_text = json.dumps(argv)
    on_argv = boot_value in argv_text or "BOOT_CONST" in argv_text \
        or any(boot_value in open(f).read() for f in files if hv == "firecracker")
    if hv == "qemu":
        def holds(f):
            try:
                text = open(f, errors="replace").read()
                # SMBIOS: io.systemd.credential.binary:NAME=<base64>
                return boot_value in text or base64.b64encode(boot_value.encode()).decode() in text
            except OSError:
                return False
        result(boot_value not in argv_text and any(holds(f) for f in files),
               f"{label}: the boot credential goes through a private file, not the argv", detail)
    else:
        result(on_argv, f"{label}: the boot credential (allowOnCommandLine) is carried on its command line", detail)

    # The launch key: through a private file only, never any argv or output.
    key_b64 = base64.b64encode(launch_key.encode()).decode() if launch_key else None
    if launch_key:
        want_carrier = "fw-cfg" if c["machine"].startswith("microvm") else "smbios"
        listed = [f for f in (doc.get("files", []) if isinstance(doc, dict) else []) if f.get("name") == "vmcred.launch-key"]
        ok = len(listed) == 1 and listed[0].get("mode") == "0400" and listed[0].get("carrier") == want_carrier \
            and listed[0].get("path", "").startswith(rundir + "/")
        result(ok, f"{label}: --dry-run --json lists the launch key file (vmcred.launch-key, {want_carrier}, 0400, in $RUNTIME_DIRECTORY)", out)
        if ok:
            held = open(listed[0]["path"]).read()
            want = launch_key if want_carrier == "fw-cfg" else f"io.systemd.credential.binary:vmcred.launch-key={key_b64}"
            result(held == want and listed[0]["path"] in files,
                   f"{label}: the launch key file holds the key as the guest's systemd imports it, and qemu's argv names it", detail)
        result(all(v not in s_ for v in (launch_key, key_b64, launch_key[:16]) for s_ in (text, p.stderr, p.stdout)),
               f"{label}: the launch key never reaches the argv, the dry-run output or stderr", out + p.stderr)
    else:
        result("launch-key" not in text, f"{label}: launch_key off: nothing about a launch key on the argv", out)

    # Carrier files: in the private runtime directory, owned by the
    # hypervisor's user, not readable by others.
    bad = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            bad.append(f"{f}: {e}")
            continue
        if not f.startswith(rundir + "/") or st.st_uid != UID or st.st_mode & 0o077:
            bad.append(f"{f}: uid {st.st_uid} mode {oct(st.st_mode)}")
    if files:
        result(not bad, f"{label}: carrier files are private ({UID}, no group/other bits) in $RUNTIME_DIRECTORY", "\n".join(bad))


for name, c in sorted(cases.items()):
    run_case(name, c)
