#!/usr/bin/env bash
# vmcred in real VMs: qemu (TCG) boots Debian guests, each with its own
# kernel and systemd (bookworm 252, trixie 257, sid 262), with a real
# virtio-vsock device through vhost-user-vsock + the vhost-device-vsock daemon,
# whose host side is hybrid vsock (Unix sockets). vmcred-host launches qemu and
# puts the bootstrap on it through each carrier: SMBIOS type 11 on -M q35,
# fw_cfg and the kernel command line on -M microvm. The guest agent runs under
# the unit the NixOS module renders (tests/nix/render-guest-unit.sh).
#
# Boots: every carrier on every suite (focused checks: bootstrap imported,
# agent listening, first credential, one rotation with a real unit action,
# and on systemd >= 260 a RefreshOnReload=credentials reload), plus the full
# scenario (boot credentials, late credential, restarts, leaks) on
# bookworm + SMBIOS. Once, on one suite (bookworm): the nested proof
# (tests/vm/nested.sh): host agent -> guest agent over a real
# /dev/vhost-vsock, inside an L1 guest, with L2 under L1's qemu.
#
# Usage: tests/vm/run.sh [--infra-only] [--keep] [--suites "S..."] [--carriers "C..."] [--no-full]
#                        [--no-nested | --nested-only]
#   --infra-only  boot bookworm without vmcred: SMBIOS credential import and
#                 guest vsock listening only (the harness's own self-test)
#   --keep        keep the work directory (logs, consoles) after the run
#   --suites      Debian suites to boot (default: bookworm trixie sid)
#   --carriers    carriers to prove (default: smbios fw-cfg cmdline)
#   --no-full     skip the full scenario (matrix only)
#   --no-nested   skip the nested vhost-vsock proof
#   --nested-only the nested vhost-vsock proof alone (its suite only)
# Env: VMCRED_VM_CACHE (cache dir, default tests/vm/.cache), VMCRED_VM_MIRROR
#      (Debian mirror), VMCRED_VM_NO_BUILD=1 (use existing target/release
#      binaries), VMCRED_VM_RENDERED_UNIT_DIR (a directory holding the
#      module's rendered vmcred-guest.service, instead of running
#      tests/nix/render-guest-unit.sh), CARGO_TARGET_DIR,
#      VMCRED_VM_NESTED_SUITE (the nested proof's suite, default bookworm),
#      VMCRED_VM_NESTED_BOOT_TIMEOUT (seconds L2 may take to listen, 2400),
#      VMCRED_VM_NESTED_LAUNCH_KEY (vm2's launch_key, default required; off
#      is the negative control, under which the impostor checks fail).
# Exit: 0 all checks passed, 1 a check failed (or something needed could not be
#       fetched or built), 77 cannot run here at all (not root, not x86_64, no cargo).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

MODE=full
KEEP=0
SUITES=$ALL_SUITES
CARRIERS="smbios fw-cfg cmdline"
FULL=1
NESTED=1
NESTED_ONLY=0
while [ $# -gt 0 ]; do
	a=$1
	shift
	case $a in
	--infra-only) MODE=infra ;;
	--keep) KEEP=1 ;;
	--no-full) FULL=0 ;;
	--no-nested) NESTED=0 ;;
	--nested-only) NESTED_ONLY=1 ;;
	--suites)
		SUITES=${1:?--suites needs a list}
		shift
		;;
	--carriers)
		CARRIERS=${1:?--carriers needs a list}
		shift
		;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "unknown argument: $a" >&2
		exit 2
		;;
	esac
done

[ "$(id -u)" = 0 ] || skip "the VM test needs root (apt-get, debootstrap, mknod)"
[ "$(uname -m)" = x86_64 ] || skip "the VM test needs an x86_64 host"
command -v cargo >/dev/null 2>&1 || skip "cargo not found"

CACHE=${VMCRED_VM_CACHE:-$HERE/.cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
WORK=$(mktemp -d /tmp/vmcred-vm.XXXXXX)
chmod 0700 "$WORK"
T_START=$(now)

cleanup() {
	local rc=$?
	if [ "$rc" != 0 ] && [ "$rc" != 77 ] && [ "$SUMMARY_DONE" = 0 ]; then
		fail "the harness stopped early (exit status $rc); see the log above"
		summary
	fi
	stop_all
	if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
		log "work directory kept: $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- preparation

T=$(now)
# From here on, what cannot be fetched or built is a failure, not a skip: the
# stage can run on this machine, something in the way is broken.
install_host_packages || die "cannot install the host packages (qemu-system-x86 from bookworm-backports, debootstrap, busybox-static, ...)"
log "host packages ready ($(elapsed "$T") s): $(qemu-system-x86_64 --version | head -1)"

[ "$MODE" = infra ] && SUITES=bookworm
[ "$NESTED_ONLY" = 1 ] && SUITES=${VMCRED_VM_NESTED_SUITE:-bookworm}

# The suites' kernels and debootstraps (network-bound) run in the background,
# one per suite, while cargo builds vhost-device-vsock and vmcred (CPU-bound).
T_PREP=$(now)
PREP_PIDS=()
for s in $SUITES; do
	(
		use_suite "$s"
		T=$(now)
		prepare_kernel && prepare_rootfs_base && log "$s: kernel $(cat "$KDIR/version") and rootfs ready ($(elapsed "$T") s)"
	) >"$WORK/prepare-$s.log" 2>&1 &
	PREP_PIDS+=("$!")
	OUR_PIDS+=("$!")
done

T=$(now)
install_vhost_device_vsock || die "cannot build vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION with cargo"
log "vhost-device-vsock ready ($(elapsed "$T") s)"

HOST_BIN=
GUEST_BIN=
if [ "$MODE" = full ]; then
	TARGET=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
		grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4) || true
	TARGET=${TARGET:-$REPO/target}
	# The guest agent is linked statically (glibc, crt-static): one binary
	# for every guest, whatever glibc this machine has. A dynamic build on a
	# glibc >= 2.39 host needs GLIBC_2.39 (std's weak pidfd_spawnp) and does
	# not start on bookworm's 2.36. --target keeps build scripts and
	# proc-macros dynamic, and the output apart from the ordinary build.
	HOST_TRIPLE=x86_64-unknown-linux-gnu
	if [ "${VMCRED_VM_NO_BUILD:-0}" != 1 ]; then
		T=$(now)
		log "cargo build --release -p vmcred-host; static vmcred-guest and vmcred-vsock-probe (--target $HOST_TRIPLE, crt-static)"
		# The probe (tests/src/bin/vmcred-vsock-probe.rs) is built on its own:
		# with it, vmcred-proto's "host" feature would be unified into the
		# guest agent's build.
		if ! (cd "$REPO" && cargo build --release -p vmcred-host &&
			RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$HOST_TRIPLE" -p vmcred-guest &&
			RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$HOST_TRIPLE" \
				-p vmcred-tests --bin vmcred-vsock-probe) \
			>"$WORK/cargo-build.log" 2>&1; then
			tail -30 "$WORK/cargo-build.log"
			die "cargo build --release (vmcred-host, static vmcred-guest, static vmcred-vsock-probe)"
		fi
		log "release build done ($(elapsed "$T") s)"
	fi
	HOST_BIN="$TARGET/release/vmcred-host"
	GUEST_BIN="$TARGET/$HOST_TRIPLE/release/vmcred-guest"
	VSOCK_PROBE_BIN="$TARGET/$HOST_TRIPLE/release/vmcred-vsock-probe"
	# vmcred-host (the front) execs vmcred-host-agent from its own directory.
	for b in "$HOST_BIN" "$HOST_BIN-agent" "$GUEST_BIN" "$VSOCK_PROBE_BIN"; do
		[ -x "$b" ] || die "missing binary $b"
	done
fi

prep_failed=0
i=0
for s in $SUITES; do
	wait "${PREP_PIDS[$i]}" || prep_failed=1
	i=$((i + 1))
	cat "$WORK/prepare-$s.log" >&2
done
[ "$prep_failed" = 0 ] || die "cannot fetch a guest kernel or debootstrap a guest suite (see above)"
log "guest kernels and rootfs ready ($(elapsed "$T_PREP") s)"

MAPPED_UNIT=
if [ "$MODE" = full ] && [ "$NESTED_ONLY" = 0 ]; then
	render_guest_unit "$WORK/rendered" ||
		die "cannot render vmcred-guest.service from nixos-modules/guest.nix (tests/nix/render-guest-unit.sh); the VM test runs the agent under no other unit"
	MAPPED_UNIT="$WORK/vmcred-guest.service"
	map_rendered_unit "$WORK/rendered/vmcred-guest.service" "$MAPPED_UNIT" || die "mapping the rendered unit onto Debian"
	log "guest agent unit: the module's, rendered ($(tail -1 "$WORK/render-guest-unit.log" 2>/dev/null)); the only line mapped:"
	grep '^ExecStart=' "$MAPPED_UNIT" | indent >&2
fi

T=$(now)
for s in $SUITES; do
	[ "$NESTED_ONLY" = 1 ] && break
	use_suite "$s"
	KV=$(cat "$KDIR/version")
	IMG="$WORK/img-$s"
	mkdir -p "$IMG"
	cp "$KDIR/vmlinuz" "$IMG/vmlinuz"
	build_initramfs "$IMG/initramfs.img" || die "$s: building the initramfs"
	install_guest_overlay "$GUEST_BIN" "$MAPPED_UNIT" "$WORK/rendered/guest.toml" || die "$s: installing the test files into the guest tree"
	build_image "$IMG/root.img" || die "$s: building the guest image"
done
log "guest images built ($(elapsed "$T") s)"

# ---------------------------------------------------------------- infra only

infra_test() {
	local hs="$WORK/vm1.vsock" console="$WORK/console.log" t0 out
	vm_boot_prepare "$hs"
	printf 'io.systemd.credential:VMCRED_INFRA_FILE=value-from-a-file' >"$WORK/infra-cred"
	use_suite bookworm
	IMG="$WORK/img-bookworm"
	qemu_argv q35 "$console"
	t0=$(now)
	start_qemu "$WORK/qemu.log" -smbios type=11,value=io.systemd.credential:VMCRED_INFRA=hello-smbios \
		-smbios "type=11,path=$WORK/infra-cred"
	if ! wait_guest_up "$console"; then
		fail "guest booted and its command runner answered"
		return
	fi
	pass "guest booted under TCG; command runner ready after $(elapsed "$t0") s"

	if guest_run 'cat /run/credentials/@system/VMCRED_INFRA; echo; cat /run/credentials/@system/VMCRED_INFRA_FILE; echo; systemd-creds --system list --no-legend; findmnt -no FSTYPE,OPTIONS /run/credentials/@system' &&
		grep -qx hello-smbios <<<"$GUEST_OUT" && grep -qx value-from-a-file <<<"$GUEST_OUT"; then
		pass "SMBIOS type 11 credentials (value= and path=) imported by PID 1 into /run/credentials/@system"
	else
		fail "SMBIOS credentials imported"
	fi
	indent <<<"$GUEST_OUT"

	guest_run 'grep -E "^(vsock|vmw_vsock_virtio)" /proc/modules | cut -d" " -f1; setsid socat VSOCK-LISTEN:5000,fork SYSTEM:"echo hello-over-vsock" </dev/null >/dev/null 2>&1 & sleep 1; echo started' || true
	indent <<<"$GUEST_OUT"
	out=
	for _ in 1 2 3 4 5; do
		# Keep our write side open: a half-close would end the vsock stream.
		out=$( (printf 'CONNECT 5000\n'; sleep 2) | timeout 10 socat - "UNIX-CONNECT:$hs" 2>&1 || true)
		grep -q hello-over-vsock <<<"$out" && break
		sleep 1
	done
	if grep -q '^OK 5000' <<<"$out" && grep -q hello-over-vsock <<<"$out"; then
		pass "host reached a guest AF_VSOCK listener through hybrid vsock (CONNECT 5000 -> OK)"
	else
		fail "host reached a guest AF_VSOCK listener through hybrid vsock"
	fi
	indent <<<"$out"

	timeout 60 socat "UNIX-LISTEN:${hs}_6000" SYSTEM:"echo hello-from-host" >/dev/null 2>&1 &
	OUR_PIDS+=("$!")
	sleep 0.5
	# The exit status is not checked: when the host closes first, the guest's
	# socat may report ENOTCONN after it has read the data.
	guest_run 'timeout 10 socat -T 3 - VSOCK-CONNECT:2:6000 </dev/null' || true
	if grep -q hello-from-host <<<"$GUEST_OUT"; then
		pass "guest connected to host CID 2 port 6000 (arrives at ${hs}_6000)"
	else
		fail "guest connected to host CID 2"
	fi
	indent <<<"$GUEST_OUT"

	guest_run 'setpriv --reuid=65534 --regid=65534 --clear-groups timeout 2 socat VSOCK-LISTEN:701 /dev/null; echo "port 701 rc=$?"; setpriv --reuid=65534 --regid=65534 --clear-groups timeout 2 socat VSOCK-LISTEN:5001 /dev/null; echo "port 5001 rc=$?"' || true
	if grep -qi 'permission denied' <<<"$GUEST_OUT" && grep -q 'port 5001 rc=124' <<<"$GUEST_OUT"; then
		pass "an unprivileged guest user cannot bind vsock port 701 but can bind 5001"
	else
		fail "unprivileged vsock bind rules"
	fi
	indent <<<"$GUEST_OUT"

	t0=$(now)
	guest_run -t 5 'systemctl poweroff --no-block' || true
	for _ in $(seq 600); do
		kill -0 "$QEMU_PID" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$QEMU_PID" 2>/dev/null; then
		fail "guest powered off"
	else
		pass "guest powered off in $(elapsed "$t0") s"
	fi
}

if [ "$MODE" = infra ]; then
	infra_test
	log "total $(elapsed "$T_START") s"
	summary
	[ "$FAILED" = 0 ]
	exit
fi

# ---------------------------------------------------------------- full test
# shellcheck source=full.sh
. "$HERE/full.sh"
# shellcheck source=proofs.sh
. "$HERE/proofs.sh"
# shellcheck source=matrix.sh
. "$HERE/matrix.sh"
# shellcheck source=nested.sh
. "$HERE/nested.sh"
# run_nested: the nested vhost-vsock proof, timed.
run_nested() {
	local t
	t=$(now)
	nested_test
	log "nested proof on $NESTED_SUITE: $(elapsed "$t") s"
}
# finish: the run's total and verdict (the script's exit status).
finish() {
	log "total $(elapsed "$T_START") s"
	summary
	[ "$FAILED" = 0 ]
}
if [ "$NESTED_ONLY" = 1 ]; then
	run_nested
	finish
	exit
fi
if [ "$FULL" = 1 ] && grep -qw bookworm <<<"$SUITES" && grep -qw smbios <<<"$CARRIERS"; then
	use_suite bookworm
	KV=$(cat "$KDIR/version")
	IMG="$WORK/img-bookworm"
	T=$(now)
	full_test
	stop_pid "${VDV_PID:-}"
	log "full scenario on bookworm + SMBIOS: $(elapsed "$T") s"
fi
T=$(now)
matrix_test "$SUITES" "$CARRIERS"
log "matrix ($SUITES) x ($CARRIERS): $(elapsed "$T") s"
if [ "$NESTED" = 1 ] && grep -qw "$NESTED_SUITE" <<<"$SUITES"; then
	run_nested
fi
finish
