# shellcheck shell=bash disable=SC2016,SC2153 # guest commands are single-quoted on purpose; GUEST_BIN, HOST_BIN, ... are run.sh's
# Issue 9's last proof (sourced by tests/vm/run.sh after lib.sh): the host
# agent dials the guest agent over a real /dev/vhost-vsock, one level down.
#
# This machine is itself a VM and never opens AF_VSOCK. So the proof runs
# inside an L1 guest (this stage's Debian, booted under qemu TCG like every
# other boot here), where we are root on our own kernel: L1 loads
# vhost_vsock, runs `vmcred-host serve` (AF_VSOCK, CID 3 port 700, from a
# privileged source port) and `vmcred-host launch --carrier fw-cfg` of a
# small L2 guest under L1's qemu with `-device vhost-vsock-device,guest-cid=3`.
# L2 is the suite's kernel + a busybox initramfs (tests/vm/guest/nested-init)
# holding the static vmcred-guest, which admits the host under the `vsock`
# rule (bootstrap host=vsock). Every AF_VSOCK socket lives in L1 or L2.
#
# L1 gets CID 4 from this machine's vhost-device-vsock (hybrid, Unix
# sockets; L1 uses no vsock of its own): with CID 3, L1's kernel would refuse
# CID 3 for L2 (vhost_vsock: a CID its guest-to-host transport holds is in
# use).
#
# Checks are tagged [nested]. Values are generated inside L1 and never leave
# it: L1 and L2 show SHA-256 digests only.

NESTED_SUITE=${VMCRED_VM_NESTED_SUITE:-bookworm}
# How long L2 may take from qemu start to the agent's `listening` (TCG in TCG).
NESTED_BOOT_TIMEOUT=${VMCRED_VM_NESTED_BOOT_TIMEOUT:-2400}
# L1 runs L2's qemu: more memory than the other boots.
NESTED_L1_MEM=1024M
NESTED_L1_CID=4
# Modules L1 loads to be a vsock host (with what they need that L1 lacks).
NESTED_HOST_MODULES="vhost_vsock"
# Modules of L2's initramfs, in load order (a subset of the suite's
# initramfs modules: vsock over virtio-mmio, and fw_cfg for the bootstrap).
NESTED_L2_MODULES="vsock.ko vmw_vsock_virtio_transport_common.ko virtio.ko virtio_ring.ko
vmw_vsock_virtio_transport.ko virtio_mmio.ko qemu_fw_cfg.ko"
# Where L1 keeps the nested pieces.
NL1=/usr/local/lib/vmcred-test/nested
# vm2's launch_key setting. "off" is the negative control: the host then
# pushes to the impostor, and the launch key checks and the impostor's
# fail (which shows they are not vacuous).
NESTED_LAUNCH_KEY=${VMCRED_VM_NESTED_LAUNCH_KEY:-required}
# What `vmcred-host status --json` says of a VM whose guest returned no
# launch key (grep -E): the host refused it.
NESTED_REFUSAL_RE='"launch_key": *"missing"'

# nested_prepare_rootfs: the suite's cached tree + qemu-system-x86 from the
# suite's own archive (apt in a chroot of a copy; the base tree is untouched),
# cached as rootfs-nested next to it.
nested_prepare_rootfs() {
	local base_key key r
	base_key=$(cat "$ROOTFS.stamp")
	key="$base_key nested=qemu-system-x86"
	NROOTFS="$SCACHE/rootfs-nested"
	if [ -f "$NROOTFS.stamp" ] && [ "$(cat "$NROOTFS.stamp")" = "$key" ] && [ -x "$NROOTFS/usr/bin/qemu-system-x86_64" ]; then
		return 0
	fi
	log "$SUITE: L1 tree for the nested proof: qemu-system-x86 from $SUITE into a copy of the cached tree (~1 min)"
	rm -rf "$NROOTFS" "$NROOTFS.tmp" "$NROOTFS.stamp"
	cp -a "$ROOTFS" "$NROOTFS.tmp"
	r="$NROOTFS.tmp"
	cp -a "$r/etc/resolv.conf" "$r/etc/resolv.conf.vmcred-orig" 2>/dev/null || true
	rm -f "$r/etc/resolv.conf"
	cp /etc/resolv.conf "$r/etc/resolv.conf"
	if ! unshare -m sh -c "mount -t proc proc '$r/proc' &&
		chroot '$r' env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
		chroot '$r' env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86" \
		>"$SCACHE/nested-apt.log" 2>&1; then
		tail -5 "$SCACHE/nested-apt.log" >&2
		return 1
	fi
	rm -f "$r/etc/resolv.conf"
	if [ -e "$r/etc/resolv.conf.vmcred-orig" ] || [ -L "$r/etc/resolv.conf.vmcred-orig" ]; then
		mv "$r/etc/resolv.conf.vmcred-orig" "$r/etc/resolv.conf"
	fi
	rm -rf "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* \
		"$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/locale/*
	mv "$r" "$NROOTFS"
	echo "$key" >"$NROOTFS.stamp"
}

# nested_prepare_modules: vhost_vsock and its dependencies, decompressed,
# from the suite's cached kernel package, into $SCACHE/nested-modules (with
# a load-order file). Only what L1 does not load already.
nested_prepare_modules() {
	NMOD="$SCACHE/nested-modules"
	if [ -f "$NMOD/.complete" ] && [ "$(cat "$NMOD/key")" = "$KV $NESTED_HOST_MODULES vmlinux" ]; then
		return 0
	fi
	local tmp d p m mroot
	rm -rf "$NMOD" "$SCACHE"/nested-modules.tmp.*
	tmp=$(mktemp -d "$SCACHE/nested-modules.tmp.XXXXXX")
	for d in "$SCACHE"/kernel-debs/*.deb; do dpkg-deb -x "$d" "$tmp/root"; done
	mroot=$tmp/root/lib/modules
	[ -d "$mroot/$KV" ] || mroot=$tmp/root/usr/lib/modules
	mkdir -p "$tmp/flat/lib/modules" "$tmp/out"
	mv "$mroot/$KV" "$tmp/flat/lib/modules/"
	depmod -b "$tmp/flat" "$KV" || return 1
	: >"$tmp/out/load-order"
	for m in $NESTED_HOST_MODULES; do
		modprobe -d "$tmp/flat" -S "$KV" --show-depends "$m" || return 1
	done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$tmp/paths"
	while read -r p; do
		m=$(basename "$p")
		case $m in
		*.ko.xz) m=${m%.xz} && xz -dc "$p" >"$tmp/out/$m" ;;
		*.ko.zst) m=${m%.zst} && zstd -qdc "$p" >"$tmp/out/$m" ;;
		*.ko.gz) m=${m%.gz} && gzip -dc "$p" >"$tmp/out/$m" ;;
		*) cp "$p" "$tmp/out/" ;;
		esac
		# L1's initramfs loaded vsock already.
		[ -f "$KDIR/modules/$m" ] && continue
		echo "$m" >>"$tmp/out/load-order"
	done <"$tmp/paths"
	nested_extract_vmlinux "$KDIR/vmlinuz" "$tmp/out/vmlinux" || return 1
	echo "$KV $NESTED_HOST_MODULES vmlinux" >"$tmp/out/key"
	mv "$tmp/out" "$NMOD"
	rm -rf "$tmp"
	touch "$NMOD/.complete"
}

# nested_extract_vmlinux BZIMAGE OUT: the kernel's ELF image, decompressed
# once here: L2 boots it through its PVH entry point (qemu loads an ELF with
# the PVH note directly), so it never runs the bzImage's decompressor, which
# under TCG inside TCG takes minutes (xz, ~60 MB).
nested_extract_vmlinux() {
	local in=$1 out=$2 off
	off=$(LC_ALL=C grep -abo $'\xfd7zXZ\x00' "$in" | head -1 | cut -d: -f1 || true)
	if [ -n "$off" ]; then
		tail -c +$((off + 1)) "$in" | xz -dc >"$out" 2>/dev/null
	else
		off=$(LC_ALL=C grep -abo $'\x28\xb5\x2f\xfd' "$in" | head -1 | cut -d: -f1 || true)
		[ -n "$off" ] || return 1
		tail -c +$((off + 1)) "$in" | zstd -qdc >"$out" 2>/dev/null
	fi
	# Trailing data after the stream makes xz/zstd complain; the ELF is whole.
	[ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || return 1
	readelf -n "$out" 2>/dev/null | grep -q 'Xen.*0x00000012' || {
		log "nested: $in has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY)"
		return 1
	}
}

# nested_l2_initramfs OUT: busybox, nested-init, the L2 modules, the static
# guest agent and its config.
nested_l2_initramfs() {
	local out=$1 st m
	st=$(mktemp -d "$WORK/l2-initramfs.XXXXXX")
	mkdir -p "$st/bin" "$st/dev" "$st/proc" "$st/sys" "$st/modules" "$st/etc/vmcred"
	cp /bin/busybox "$st/bin/busybox"
	install -m 0755 "$HERE/guest/nested-init" "$st/init"
	install -m 0755 "$GUEST_BIN" "$st/bin/vmcred-guest"
	cat >"$st/etc/vmcred/guest.toml" <<'EOF'
# vmcred VM test, nested guest (L2): no units, one credential.
initial_sync_timeout = "30s"

[credentials.API_KEY]
mode = "0400"
EOF
	: >"$st/modules/load-order"
	for m in $NESTED_L2_MODULES; do
		[ -f "$KDIR/modules/$m" ] || continue # built in
		cp "$KDIR/modules/$m" "$st/modules/"
		echo "$m" >>"$st/modules/load-order"
	done
	mknod -m 600 "$st/dev/console" c 5 1
	# Not compressed: inflating it would cost L2 more than reading it.
	(cd "$st" && find . | cpio -o -H newc --quiet) >"$out"
	rm -rf "$st"
}

# nested_build_image IMG: L1's image: the nested tree with the harness's
# probe units (no guest agent in L1), vmcred-host, the probe, L1's vhost
# modules and L2's kernel + initramfs.
nested_build_image() {
	local img=$1 r
	ROOTFS=$NROOTFS
	install_guest_overlay "" || return 1
	r=$ROOTFS
	rm -rf "$r$NL1"
	mkdir -p "$r$NL1/modules"
	cp "$NMOD"/*.ko "$NMOD/load-order" "$r$NL1/modules/"
	install -m 0755 "$HOST_BIN" "$r/usr/local/bin/vmcred-host"
	install -m 0755 "$HOST_BIN-agent" "$r/usr/local/bin/vmcred-host-agent"
	install -m 0755 "$VSOCK_PROBE_BIN" "$r/usr/local/bin/vmcred-vsock-probe"
	cp "$NMOD/vmlinux" "$r$NL1/vmlinux"
	nested_l2_initramfs "$r$NL1/l2-initramfs.img" || return 1
	build_image "$img"
	ROOTFS="$SCACHE/rootfs"
}

# nested_host_caps: the capability bounding set nixos-modules/host.nix gives
# vmcred-host.service for this proof's setup (one AF_VSOCK VM, CID 3 port
# 700), from the unit tests/nix/render-guest-unit.sh renders (or the one in
# VMCRED_VM_RENDERED_UNIT_DIR): NESTED_BSET for setpriv --bounding-set, and
# NESTED_BND, the CapBnd /proc shows for it. L1's agent runs under it, so the
# AF_VSOCK dial from a privileged source port is proven under the module's
# own set, not root's full one.
nested_host_caps() {
	local d="$WORK/nested-rendered" names
	mkdir -p "$d"
	if [ -n "${VMCRED_VM_RENDERED_UNIT_DIR:-}" ] && [ -s "$VMCRED_VM_RENDERED_UNIT_DIR/vmcred-host.service" ]; then
		cp "$VMCRED_VM_RENDERED_UNIT_DIR/vmcred-host.service" "$d/"
	else
		"$REPO/tests/nix/render-guest-unit.sh" "$d" >"$WORK/nested-render.log" 2>&1 || {
			tail -20 "$WORK/nested-render.log" >&2
			return 1
		}
	fi
	names=$(sed -n 's/^CapabilityBoundingSet=//p' "$d/vmcred-host.service" | tr ' ' '\n' | sed '/^$/d')
	[ -n "$names" ] || return 1
	NESTED_BSET="-all$(printf '%s\n' "$names" | sed 's/^CAP_//' | tr '[:upper:]' '[:lower:]' | sed 's/^/,+/' | tr -d '\n')"
	# linux/capability.h's numbers of the capabilities the module may grant.
	NESTED_BND=$(printf '%s\n' "$names" | python3 -c '
import sys
num = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_NET_BIND_SERVICE": 10}
print(format(sum(1 << num[c] for c in sys.stdin.read().split()), "016x"))') || return 1
	log "nested: L1's vmcred-host serve runs under the rendered unit's bounding set $NESTED_BSET (CapBnd $NESTED_BND)"
}

# nested_wait_l1 TAG SECONDS COMMAND [CONSOLE]: run COMMAND in L1 every 5 s
# until it exits 0 (its output in GUEST_OUT); 1 after SECONDS. Every minute
# the last line of the nested guest's console (L2's, or CONSOLE in L1) is
# logged, to show how far it got.
nested_wait_l1() {
	local end=$((SECONDS + $2)) next=$((SECONDS + 60)) o c=${4:-/root/nested/l2-console.log}
	while :; do
		guest_run -t 60 "$3" && return 0
		[ "$SECONDS" -lt "$end" ] || return 1
		kill -0 "$QEMU_PID" 2>/dev/null || return 1
		if [ "$SECONDS" -ge "$next" ]; then
			next=$((SECONDS + 60))
			o=$GUEST_OUT
			guest_run -t 30 'tail -c 2000 '"$c"' | tr -d "\r" | grep -a . | tail -n 1' || true
			log "nested: waiting; ${c##*/} ends with: $GUEST_OUT"
			GUEST_OUT=$o
		fi
		sleep 5
	done
}

# L2's console is a tty: its lines end with \r\n, and the agent's log lines
# carry colours; every output read from it has its \r removed before a check.

# nested_save_logs: L2's console and L1's serve log, into the work directory.
nested_save_logs() {
	guest_run -t 60 'cat /root/nested/l2-console.log' && printf '%s\n' "$GUEST_OUT" >"$WORK/nested-l2-console.log"
	guest_run -t 60 'cat /root/nested/serve.log' && printf '%s\n' "$GUEST_OUT" >"$WORK/nested-serve.log"
	guest_run -t 60 'cat /root/nested/impostor-console.log 2>/dev/null' && printf '%s\n' "$GUEST_OUT" >"$WORK/nested-impostor-console.log"
	true
}

# nested_impostor_test: H1's attack on real AF_VSOCK, after the proof above.
# L2 (vm2, launched with its launch key) is stopped; an impostor boots on
# the same CID 3 from the same kernel and initramfs (the stock agent)
# under a qemu started by hand, as anyone who can open /dev/vhost-vsock
# can: the public bootstrap on fw_cfg, no launch key. The host dials it by
# its CID as before, and a rotation is asked for; the host must push
# nothing (its status names the refusal), and the impostor's credentials
# directory must hold nothing but the bootstrap.
nested_impostor_test() {
	local tag="[nested]" out t_imp rc
	guest_run -t 110 'W=/root/nested N='"$NL1"'
q=$(pgrep -f "^qemu-system-x86_64 -name vmcred-nested-l2" | head -1)
[ -n "$q" ] && kill -TERM $q
for _ in $(seq 300); do kill -0 "$q" 2>/dev/null || break; sleep 0.2; done
if [ -z "$q" ] || kill -0 "$q" 2>/dev/null; then echo "L2 still running (pid ${q:-none})"; exit 1; fi
echo "L2 stopped"
echo "impostor fw_cfg bootstrap: $(cat $W/impostor/vmcred.bootstrap)"
setsid qemu-system-x86_64 -name vmcred-nested-impostor -M microvm -accel tcg -cpu max -smp 1 -m 128M \
	-nodefaults -no-user-config -display none -no-reboot \
	-kernel $N/vmlinux -initrd $N/l2-initramfs.img \
	-append "console=ttyS0 loglevel=7 panic=-1 tsc_early_khz=2000000 pci=off rdinit=/init" \
	-fw_cfg name=opt/io.systemd.credentials/vmcred.bootstrap,file=$W/impostor/vmcred.bootstrap \
	-device vhost-vsock-device,guest-cid=3 \
	-serial file:$W/impostor-console.log >$W/impostor-qemu.log 2>&1 </dev/null &
for _ in $(seq 150); do
	q2=$(pgrep -f "^qemu-system-x86_64 -name vmcred-nested-impostor" | head -1)
	v=
	[ -n "$q2" ] && v=$(for fd in /proc/$q2/fd/*; do [ "$(readlink $fd)" = /dev/vhost-vsock ] && echo "${fd##*/}"; done | head -1)
	[ -n "$v" ] && break
	sleep 0.2
done
echo "impostor qemu pid ${q2:-none}, /dev/vhost-vsock fd ${v:-none}"
tr "\0" "\n" </proc/$q2/cmdline | grep -A1 -x -- -fw_cfg
[ -n "$v" ] || { tail -n 5 $W/impostor-qemu.log; exit 1; }' || true
	out=${GUEST_OUT//$'\r'/}
	t_imp=$(now)
	indent <<<"$out"
	if grep -qx 'L2 stopped' <<<"$out" && grep -q '^impostor qemu pid [0-9]*, /dev/vhost-vsock fd [0-9]' <<<"$out" &&
		grep -q '^impostor fw_cfg bootstrap: vmcred-bootstrap-v1 port=700 pin=[^ ]* host=vsock$' <<<"$out" &&
		[ "$(grep -c '^name=opt/io.systemd.credentials/' <<<"$out")" = 1 ]; then
		pass "$tag the attack: L2 stopped, and an impostor qemu (not through vmcred-host launch) holds CID 3 on /dev/vhost-vsock with the same image, vm2's public bootstrap as its only fw_cfg credential, and no launch key"
	else
		fail "$tag the impostor started on CID 3 after L2 stopped"
		return
	fi

	if nested_wait_l1 "$tag" "$NESTED_BOOT_TIMEOUT" 'grep -a -m1 "listening" /root/nested/impostor-console.log' /root/nested/impostor-console.log; then
		log "nested: the impostor's agent is listening, $(elapsed "$t_imp") s after its qemu started"
	else
		fail "$tag the impostor booted to the agent's listening within ${NESTED_BOOT_TIMEOUT} s"
		return
	fi

	# A new value and a rotation: the host has something to push now.
	guest_run 'W=/root/nested
umask 077
printf "vmcred-test-nested-api-key-c-%s" "$(od -An -N8 -tx1 /dev/urandom | tr -d " \n")" >$W/secrets/api-key.new
mv $W/secrets/api-key.new $W/secrets/api-key
rm -f $W/rotate-impostor.rc
setsid sh -c "vmcred-host rotate --config $W/host.toml vm2 API_KEY --timeout 60s --json >$W/rotate-impostor.json 2>$W/rotate-impostor.err; echo \$? >$W/rotate-impostor.rc" </dev/null >/dev/null 2>&1 &
echo started' || true
	# rotate ends on the ack or after its 60 s; the host has said hello to
	# the impostor by then (it redials every few seconds).
	nested_wait_l1 "$tag" 300 'test -s /root/nested/rotate-impostor.rc' /root/nested/impostor-console.log || true
	if ! nested_wait_l1 "$tag" 120 'vmcred-host status --config /root/nested/host.toml --vm vm2 --json | grep -E -q '"'$NESTED_REFUSAL_RE'"'' /root/nested/impostor-console.log; then
		log "nested: the host's status did not name a launch key refusal within 120 s of rotate's end"
	fi
	guest_run 'W=/root/nested C=$W/impostor-console.log
echo "rotate rc=$(cat $W/rotate-impostor.rc 2>/dev/null)"; cat $W/rotate-impostor.json; echo; cat $W/rotate-impostor.err
vmcred-host status --config $W/host.toml --vm vm2 --json >$W/status-impostor.json; cat $W/status-impostor.json; echo
echo "status lines naming the refusal: $(grep -E -c '"'$NESTED_REFUSAL_RE'"' $W/status-impostor.json)"
echo "host connections: $(grep -a -c "host connected" $C)"
grep -a "host connected" $C | head -n 2
grep -a "^VMCRED-L2 credentials:" $C | tail -n 1
echo "impostor API_KEY lines: $(grep -a -c "^VMCRED-L2 API_KEY" $C)"
echo "impostor apply lines: $(grep -a -c "apply:" $C)"
echo "impostor fw_cfg credentials: $(grep -a -c "^VMCRED-L2 credential from fw_cfg" $C)"
echo "impostor launch key lines: $(grep -a -c "holding the VM.s launch key" $C)"' || true
	out=${GUEST_OUT//$'\r'/}
	indent <<<"$out"
	rc=$(sed -n 's/^rotate rc=//p' <<<"$out")
	if ! grep -q '^status lines naming the refusal: 0$' <<<"$out" && grep -q '^status lines naming the refusal: [0-9]' <<<"$out" && [ -n "$rc" ] && [ "$rc" != 0 ] &&
		! grep -q '"applied": *true' <<<"$out" && ! grep -q '^host connections: 0$' <<<"$out"; then
		pass "$tag the host reached the impostor on CID 3 (TLS, its pinned key) and refused it: status names the launch key, and vmcred-host rotate vm2 exited $rc with nothing applied ($(elapsed "$t_imp") s after the impostor's qemu started)"
	else
		fail "$tag the host refused the impostor (status names the launch key; rotate rc=${rc:-?} must be non-zero, nothing applied)"
	fi
	if grep -qx 'VMCRED-L2 credentials: vmcred.bootstrap' <<<"$out" && grep -qx 'impostor API_KEY lines: 0' <<<"$out" &&
		grep -qx 'impostor apply lines: 0' <<<"$out" && grep -qx 'impostor fw_cfg credentials: 0' <<<"$out" &&
		grep -qx 'impostor launch key lines: 0' <<<"$out"; then
		pass "$tag the impostor's /run/credentials/@system holds vmcred.bootstrap only: no API_KEY (no digest line, its agent logged no apply), no launch key"
	else
		fail "$tag the impostor got none of vm2's credentials"
	fi
}

nested_test() {
	local tag="[nested]" console="$WORK/console-nested.log" t0 t_l2 out digest1 digest2 rc
	use_suite "$NESTED_SUITE"
	KV=$(cat "$KDIR/version")
	T=$(now)
	nested_prepare_rootfs || {
		fail "$tag $SUITE: qemu-system-x86 installed into the L1 tree (see $SCACHE/nested-apt.log)"
		return
	}
	nested_prepare_modules || {
		fail "$tag $SUITE: vhost_vsock and its dependencies from the kernel $KV package"
		return
	}
	nested_host_caps || {
		fail "$tag vmcred-host.service's CapabilityBoundingSet= rendered from nixos-modules/host.nix (tests/nix/render-guest-unit.sh, see $WORK/nested-render.log)"
		return
	}
	IMG="$WORK/img-nested"
	mkdir -p "$IMG"
	cp "$KDIR/vmlinuz" "$IMG/vmlinuz"
	build_initramfs "$IMG/initramfs.img" || die "nested: building L1's initramfs"
	nested_build_image "$IMG/root.img" || die "nested: building L1's image"
	log "nested: L1 tree, modules and image ready ($(elapsed "$T") s)"

	local saved_cid=$GUEST_CID saved_mem=$GUEST_MEM i
	GUEST_CID=$NESTED_L1_CID
	GUEST_MEM=$NESTED_L1_MEM
	vm_boot_prepare "$WORK/nested-l1.vsock"
	qemu_argv microvm "$console"
	GUEST_CID=$saved_cid
	GUEST_MEM=$saved_mem
	for i in "${!QEMU_ARGV[@]}"; do
		[ "${QEMU_ARGV[$i]}" = vmcred-vm1 ] && QEMU_ARGV[i]=vmcred-nested-l1
	done
	t0=$(now)
	start_qemu "$WORK/qemu-nested.log"
	if ! wait_guest_up "$console"; then
		fail "$tag L1 ($SUITE) booted and its command runner answered"
		return
	fi
	log "nested: L1 up after $(elapsed "$t0") s"

	# vhost_vsock in L1; the host config and the first value; serve.
	guest_run -t 110 'set -e
N='"$NL1"'
while read -r m; do /usr/local/lib/vmcred-test/busybox insmod "$N/modules/$m"; done <"$N/modules/load-order"
grep -E "^(vhost|vhost_vsock|vhost_iotlb|vsock) " /proc/modules | cut -d" " -f1 | tr "\n" " "; echo
ls -l /dev/vhost-vsock
qemu-system-x86_64 --version | head -1
W=/root/nested
mkdir -p -m 0700 $W $W/secrets
cat >$W/host.toml <<EOF
state_dir = "$W/state"
control_socket = "$W/control.sock"
launch_socket = "$W/launch.sock"
poll_interval = "0s"
dial_backoff_max = "5s"
rpc_timeout = "300s"

[vms.vm2]
cid = 3
port = 700
launch_key = "'"$NESTED_LAUNCH_KEY"'"

[vms.vm2.credentials.API_KEY]
path = "$W/secrets/api-key"
boot = false
EOF
umask 077
printf "vmcred-test-nested-api-key-a-%s" "$(od -An -N8 -tx1 /dev/urandom | tr -d " \n")" >$W/secrets/api-key
echo "value-a sha256=$(sha256sum <$W/secrets/api-key | cut -c1-64)"
RUST_LOG=debug setsid setpriv --bounding-set '"$NESTED_BSET"' --inh-caps -all --no-new-privs vmcred-host serve --config $W/host.toml >$W/serve.log 2>&1 </dev/null &
for _ in $(seq 300); do [ -e $W/state/host.pin ] && [ -S $W/control.sock ] && break; sleep 0.2; done
P=$(pgrep -x vmcred-host | head -1)
echo "serve: pid $P, pin $(cat $W/state/host.pin)"
echo "serve CapBnd=$(sed -n "s/^CapBnd:[[:space:]]*//p" /proc/$P/status)"
# The launch key serve made for vm2 (its shape only; never its value).
K=$W/state/launch-keys/vm2
for _ in $(seq 50); do [ -s $K ] && break; sleep 0.2; done
echo "launch key file: mode=$(stat -c %a $K) bytes=$(wc -c <$K) hex64=$(grep -c -x "[0-9a-f]\{64\}" $K)"' || true
	out=${GUEST_OUT//$'\r'/}
	indent <<<"$out"
	digest1=$(sed -n 's/^value-a sha256=\([0-9a-f]\{64\}\)$/\1/p' <<<"$out")
	if grep -q '^crw.* /dev/vhost-vsock$' <<<"$out" && grep -qw vhost_vsock <<<"$out" &&
		[ -n "$digest1" ] && grep -q '^serve: pid [0-9]' <<<"$out" && grep -qx "serve CapBnd=$NESTED_BND" <<<"$out"; then
		pass "$tag L1 ($SUITE, kernel $KV) loaded vhost_vsock (/dev/vhost-vsock present) and runs vmcred-host serve for vm2 = AF_VSOCK CID 3 port 700 under the NixOS unit's bounding set ($NESTED_BSET, CapBnd $NESTED_BND)"
	else
		fail "$tag L1: vhost_vsock loaded, vmcred-host serve running"
		return
	fi
	if grep -qx 'launch key file: mode=600 bytes=64 hex64=1' <<<"$out"; then
		pass "$tag vmcred-host serve made vm2's launch key (launch_key = \"required\"): state_dir/launch-keys/vm2, mode 0600, 64 lowercase hex digits, no newline"
	else
		fail "$tag serve made state_dir/launch-keys/vm2 (0600, 64 hex digits) for launch_key = \"required\""
	fi

	# L2 through the real launcher: fw_cfg carrier, qemu with vhost-vsock.
	guest_run -t 110 'W=/root/nested N='"$NL1"'
# What LoadCredential=vmcred.launch-key:<state_dir>/launch-keys/vm2 on the
# VM unit gives the launcher: a 0700 directory with a 0400 copy.
rm -rf $W/launch-creds && mkdir -m 0700 $W/launch-creds
install -m 0400 $W/state/launch-keys/vm2 $W/launch-creds/vmcred.launch-key
CREDENTIALS_DIRECTORY=$W/launch-creds setsid vmcred-host launch --config $W/host.toml --vm vm2 --hypervisor qemu --carrier fw-cfg --runtime-dir $W/launch-runtime -- \
	qemu-system-x86_64 -name vmcred-nested-l2 -M microvm -accel tcg -cpu max -smp 1 -m 128M \
	-nodefaults -no-user-config -display none -no-reboot \
	-kernel $N/vmlinux -initrd $N/l2-initramfs.img \
	-append "console=ttyS0 loglevel=7 panic=-1 tsc_early_khz=2000000 pci=off rdinit=/init" \
	-device vhost-vsock-device,guest-cid=3 \
	-serial file:$W/l2-console.log >$W/launch.log 2>&1 </dev/null &
for _ in $(seq 100); do q=$(pgrep -f "^qemu-system-x86_64 -name vmcred-nested-l2" | head -1); [ -n "$q" ] && break; sleep 0.2; done
echo "l2 qemu pid ${q:-none}"
[ -n "$q" ] || { cat $W/launch.log; exit 1; }
tr "\0" "\n" </proc/$q/cmdline | grep -A1 -x -- -fw_cfg
# The key went as a file, not on the (world-readable) command line.
if grep -a -q -F -f $W/state/launch-keys/vm2 /proc/$q/cmdline; then echo "launch key ON qemu command line"; else echo "launch key not on qemu command line"; fi
kf=$(tr "\0" "\n" </proc/$q/cmdline | sed -n "s|^name=opt/io.systemd.credentials/vmcred.launch-key,file=||p")
[ -n "$kf" ] && echo "launch key fw_cfg file: mode=$(stat -c %a "$kf") dir-mode=$(stat -c %a "$(dirname "$kf")") same=$(cmp -s "$kf" $W/state/launch-keys/vm2 && echo yes || echo no)"
# The bootstrap is public: the impostor below is given a copy of it.
bf=$(tr "\0" "\n" </proc/$q/cmdline | sed -n "s|^name=opt/io.systemd.credentials/vmcred.bootstrap,file=||p")
mkdir -p $W/impostor && cp "$bf" $W/impostor/vmcred.bootstrap && chmod 0644 $W/impostor/vmcred.bootstrap
# qemu opens /dev/vhost-vsock when it realizes the device, a moment after exec.
for _ in $(seq 150); do
	v=$(for fd in /proc/$q/fd/*; do [ "$(readlink $fd)" = /dev/vhost-vsock ] && echo "${fd##*/}"; done | head -1)
	[ -n "$v" ] && break
	kill -0 $q 2>/dev/null || break
	sleep 0.2
done
if [ -n "$v" ]; then echo "qemu fd $v -> /dev/vhost-vsock"; else echo "qemu has no /dev/vhost-vsock open"; tail -n 5 $W/launch.log; fi
true' || true
	out=${GUEST_OUT//$'\r'/}
	t_l2=$(now)
	indent <<<"$out"
	if grep -q '^name=opt/io.systemd.credentials/vmcred.bootstrap,file=' <<<"$out" && grep -q -- '-> /dev/vhost-vsock$' <<<"$out"; then
		pass "$tag L1: vmcred-host launch --carrier fw-cfg started L2's qemu with the bootstrap on fw_cfg, and that qemu holds /dev/vhost-vsock open (guest-cid=3)"
	else
		fail "$tag L1: L2's qemu launched with fw_cfg and /dev/vhost-vsock"
		return
	fi
	if grep -q '^name=opt/io.systemd.credentials/vmcred.launch-key,file=' <<<"$out" &&
		grep -qx 'launch key not on qemu command line' <<<"$out" &&
		grep -qxE 'launch key fw_cfg file: mode=[46]00 dir-mode=700 same=yes' <<<"$out"; then
		pass "$tag vmcred-host launch, given \$CREDENTIALS_DIRECTORY/vmcred.launch-key, put the launch key on L2's qemu as fw_cfg opt/io.systemd.credentials/vmcred.launch-key from a private file (owner-only, in a 0700 directory), not on its command line"
	else
		fail "$tag vmcred-host launch passed vm2's launch key to qemu as a private fw_cfg file"
	fi

	# L2 boots (TCG inside TCG) to the agent's `listening`.
	if nested_wait_l1 "$tag" "$NESTED_BOOT_TIMEOUT" 'grep -a -m1 "listening" /root/nested/l2-console.log'; then
		NESTED_BOOT_S=$(elapsed "$t_l2")
		pass "$tag L2 booted under nested TCG and vmcred-guest is listening, $NESTED_BOOT_S s after L2's qemu started"
		indent <<<"$GUEST_OUT"
	else
		fail "$tag L2 booted to the agent's listening within ${NESTED_BOOT_TIMEOUT} s"
		nested_save_logs
		guest_run 'tail -n 30 /root/nested/l2-console.log; tail -n 5 /root/nested/launch.log' || true
		indent <<<"$GUEST_OUT"
		return
	fi

	# The first credential, and who connected: CID 2 from a port < 1024.
	if nested_wait_l1 "$tag" 600 'grep -a -q "VMCRED-L2 API_KEY sha256='"$digest1"'" /root/nested/l2-console.log'; then
		guest_run 'W=/root/nested
grep -a "^VMCRED-L2 bootstrap" $W/l2-console.log
grep -a "host connected" $W/l2-console.log | head -n 3
grep -a "^VMCRED-L2 API_KEY" $W/l2-console.log
grep -a "^VMCRED-L2 credential from fw_cfg" $W/l2-console.log
grep -a "holding the VM.s launch key" $W/l2-console.log | head -n 1
vmcred-host status --config $W/host.toml
vmcred-host status --config $W/host.toml --vm vm2 --json | grep -o "\"launch_key\": *\"[a-z-]*\""' || true
		out=${GUEST_OUT//$'\r'/}
		indent <<<"$out"
		local port
		port=$(grep -a 'host connected' <<<"$out" | sed -n 's/.*vsock CID 2 port \([0-9]*\).*/\1/p' | head -1 || true)
		if grep -q '^VMCRED-L2 bootstrap from fw_cfg: vmcred-bootstrap-v1 port=700 pin=[^ ]* host=vsock$' <<<"$out" &&
			[ -n "$port" ] && [ "$port" -lt 1024 ] && grep -q "^VMCRED-L2 API_KEY sha256=$digest1 mode=400 mount=ro$" <<<"$out"; then
			pass "$tag L2's agent (bootstrap host=vsock from fw_cfg) admitted the host from CID 2 port $port over virtio-vsock/vhost-vsock, and API_KEY arrived whole (digest equal, mode 0400, mount read-only again) $(elapsed "$t_l2") s after L2's qemu started"
		else
			fail "$tag L2: host admitted from CID 2 and a port < 1024, API_KEY whole"
		fi
		if grep -qx 'VMCRED-L2 credential from fw_cfg: vmcred.launch-key 64 bytes mode=400' <<<"$out" &&
			grep -q "holding the VM's launch key" <<<"$out" && grep -q "^VMCRED-L2 API_KEY sha256=$digest1 " <<<"$out" &&
			grep -qE '^"launch_key": *"verified"$' <<<"$out"; then
			pass "$tag L2 imported vmcred.launch-key from fw_cfg into /run/credentials/@system (64 bytes, 0400), its agent holds it, the host's status says launch_key \"verified\", and the host pushed API_KEY to it"
		else
			fail "$tag L2 got the launch key through fw_cfg and was admitted with it"
		fi
	else
		fail "$tag L2: API_KEY delivered"
		nested_save_logs
		guest_run 'tail -n 30 /root/nested/l2-console.log; tail -n 20 /root/nested/serve.log' || true
		indent <<<"$GUEST_OUT"
		return
	fi

	# One rotation, acknowledged (rotate runs in L1's background: under
	# nested TCG it may outlast one command of the runner).
	guest_run 'W=/root/nested
umask 077
printf "vmcred-test-nested-api-key-b-%s" "$(od -An -N8 -tx1 /dev/urandom | tr -d " \n")" >$W/secrets/api-key.new
mv $W/secrets/api-key.new $W/secrets/api-key
echo "value-b sha256=$(sha256sum <$W/secrets/api-key | cut -c1-64)"
rm -f $W/rotate.rc
setsid sh -c "vmcred-host rotate --config $W/host.toml vm2 API_KEY --timeout 600s --json >$W/rotate.json 2>$W/rotate.err; echo \$? >$W/rotate.rc" </dev/null >/dev/null 2>&1 &
date +%s.%N >$W/rotate.start' || true
	digest2=$(tr -d '\r' <<<"$GUEST_OUT" | sed -n 's/^value-b sha256=\([0-9a-f]\{64\}\)$/\1/p')
	local t_rot
	t_rot=$(now)
	if nested_wait_l1 "$tag" 660 'test -s /root/nested/rotate.rc'; then
		NESTED_ROTATE_S=$(elapsed "$t_rot")
		guest_run 'W=/root/nested
echo "rotate rc=$(cat $W/rotate.rc)"; cat $W/rotate.json; echo; cat $W/rotate.err
# The agent logs the write before it acknowledges (colours removed).
sed "s/\x1b\[[0-9;]*m//g" $W/l2-console.log | grep -a "apply: API_KEY written" | tail -n 1' || true
		out=${GUEST_OUT//$'\r'/}
		indent <<<"$out"
		rc=$(sed -n 's/^rotate rc=//p' <<<"$out")
		local gen
		gen=$(sed -n 's/^ *"generation": *\([0-9]*\),*$/\1/p' <<<"$out" | head -1 || true)
		# L2's digest watcher polls: its line may follow the ack by a moment.
		nested_wait_l1 "$tag" 120 'grep -a -q "^VMCRED-L2 API_KEY sha256='"$digest2"' mode=400 mount=ro" /root/nested/l2-console.log' || true
		if [ -n "$digest2" ] && [ "$rc" = 0 ] && grep -q '"applied": *true' <<<"$out" && [ -n "$gen" ] &&
			grep -q "apply: API_KEY written generation=$gen applied_generation=$gen" <<<"$out" &&
			guest_run 'grep -a -q "^VMCRED-L2 API_KEY sha256='"$digest2"' mode=400 mount=ro" /root/nested/l2-console.log'; then
			pass "$tag vmcred-host rotate vm2 API_KEY in L1 exited 0 after the ack (~$NESTED_ROTATE_S s, polled) for generation $gen, which L2's agent had logged as written; L2 holds the new value (digest equal, read-only mount)"
		else
			fail "$tag rotate acknowledged and the new value in L2 (rotate rc=${rc:-?})"
		fi
	else
		fail "$tag rotate finished in 660 s"
	fi

	# The negative: an unprivileged L1 user dials CID 3 port 700.
	guest_run -t 110 'W=/root/nested
before=$(grep -a -c "refused a connection before TLS" $W/l2-console.log)
setpriv --reuid=65534 --regid=65534 --clear-groups vmcred-vsock-probe flood --cid 3 --port 700 --count 1 --wait 90 2>&1
for _ in $(seq 100); do after=$(grep -a -c "refused a connection before TLS" $W/l2-console.log); [ "$after" -gt "$before" ] && break; sleep 0.5; done
echo "L2 refusals: $((after - before))"
grep -a "refused a connection before TLS" $W/l2-console.log | tail -n 1' || true
	out=${GUEST_OUT//$'\r'/}
	indent <<<"$out"
	local np rp
	np=$(sed -n 's/^flood target=3:700 connected=1 refused-at-connect=0 closed-by-peer=1 still-open=0 bytes-received=0 lowest-source-port=\([0-9]*\)$/\1/p' <<<"$out")
	rp=$(grep -a 'refused a connection before TLS' <<<"$out" | sed -n 's/.*vsock CID 2 port \([0-9]*\).*/\1/p' | tail -1 || true)
	if [ -n "$np" ] && [ "$np" -ge 1024 ] && [ "$rp" = "$np" ] && grep -q '^L2 refusals: 1$' <<<"$out"; then
		pass "$tag a connection by nobody in L1 to CID 3 port 700 (source port $np) was closed by L2's agent without a byte, and the agent logged the refusal before TLS for CID 2 port $np"
	else
		fail "$tag an unprivileged L1 user's connection to L2 is refused before TLS"
	fi

	# The attack (H1, ARCHITECTURE "Known limits"): vm2 stops, and a VM that
	# launch did not start takes its CID 3, with the same image and the
	# stock agent, the public bootstrap on fw_cfg (copied from L2's launch
	# above), and no launch key. The host must push it nothing.
	nested_impostor_test

	# Nothing printed a value: L1 checks its own logs and both consoles
	# against the values it holds, the launch key included (the digests
	# only are reported).
	guest_run 'W=/root/nested
for f in $W/serve.log $W/l2-console.log $W/launch.log $W/rotate.json $W/rotate.err \
	$W/impostor-console.log $W/impostor-qemu.log $W/rotate-impostor.json $W/rotate-impostor.err $W/status-impostor.json; do
	[ -e "$f" ] || { echo "missing $f"; continue; }
	if grep -a -q -F -f <(cat $W/secrets/api-key; printf "\nvmcred-test-nested-api-key\n"; { cat $W/state/launch-keys/vm2 && echo; } 2>/dev/null) "$f"; then echo "leak in $f"; fi
done; echo checked' || true
	indent <<<"$(grep -v '^checked$' <<<"$GUEST_OUT")"
	if grep -q '^checked$' <<<"$GUEST_OUT" && ! grep -q '^leak' <<<"$GUEST_OUT"; then
		pass "$tag no credential value and no launch key in L1's serve log, launch log, rotate outputs, status, qemu's output or either nested guest's console"
	else
		fail "$tag a value in a log: $(grep '^leak' <<<"$GUEST_OUT" | tr '\n' ' ')"
	fi
	nested_save_logs
	guest_run 'pkill -TERM -f "^qemu-system-x86_64 -name vmcred-nested-(l2|impostor)"; true' || true
	guest_poweroff 60 || log "nested: L1 did not power off in 60 s; stopping qemu"
	stop_pid "$QEMU_PID"
	stop_pid "${VDV_PID:-}"
}
