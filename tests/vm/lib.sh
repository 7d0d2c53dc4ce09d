# shellcheck shell=bash disable=SC2034 # globals are read by run.sh and full.sh
# Functions shared by tests/vm/run.sh: host packages, the cached guest
# (kernel, initramfs, Debian rootfs), the VM processes and the command channel
# into the guest. Sourced, not run.
#
# Safety rules kept here: this machine never opens an AF_VSOCK socket (the
# guest's virtio-vsock is backed by vhost-device-vsock's Unix sockets, "hybrid
# vsock"); the guest has no network; downloads live in the cache only.

# Bump to throw away cached guest pieces built by an older harness.
VM_LAYOUT=3
GUEST_SUITE=bookworm
GUEST_PACKAGES=systemd,systemd-sysv,socat,procps
VHOST_DEVICE_VSOCK_VERSION=0.3.0
GUEST_CID=3
GUEST_MEM=512M
# Modules the initramfs loads (with their dependencies, in order).
GUEST_MODULES="vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
virtio_pci virtio_blk crc32c_generic ext4"

log() { printf '[vm-test %s] %s\n' "$(date +%T)" "$*" >&2; }
# die: the harness cannot go on; counts as a failed check.
die() {
	fail "$*"
	summary
	exit 1
}
skip() {
	echo "SKIP: $*"
	exit 77
}
now() { printf '%s\n' "$EPOCHREALTIME"; }
# elapsed START [END]: seconds between two now() values, 2 decimals
elapsed() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.2f", b - a }'; }
indent() { sed 's/^/    | /'; }

# ---------------------------------------------------------------- host side

detect_mirror() {
	if [ -n "${VMCRED_VM_MIRROR:-}" ]; then
		echo "$VMCRED_VM_MIRROR"
		return
	fi
	local u
	u=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
		awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }')
	if [ -z "$u" ]; then
		u=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }')
	fi
	echo "${u:-http://deb.debian.org/debian}"
}

qemu_usable() {
	command -v qemu-system-x86_64 >/dev/null 2>&1 &&
		qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vhost-user-vsock-pci"'
}

# Installs what the test needs on the host. qemu comes from
# bookworm-backports through a private apt configuration (own sources list
# and package lists under the cache), so the system's apt state is untouched:
# bookworm's own qemu-system-x86 7.2 conflicts with a backported qemu-utils.
install_host_packages() {
	local need=() c
	for c in debootstrap mkfs.ext4 debugfs cpio depmod modprobe socat dpkg-deb; do
		command -v "$c" >/dev/null 2>&1 || need+=("$c")
	done
	dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
	if [ "${#need[@]}" -gt 0 ]; then
		log "installing host packages (missing: ${need[*]})"
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq >"$CACHE/apt-update.log" 2>&1 || {
			tail -5 "$CACHE/apt-update.log" >&2
			return 1
		}
		apt-get install -y -qq --no-install-recommends debootstrap busybox-static \
			e2fsprogs cpio kmod socat dpkg >"$CACHE/apt-install.log" 2>&1 || {
			tail -5 "$CACHE/apt-install.log" >&2
			return 1
		}
	fi
	if ! qemu_usable; then
		log "installing qemu-system-x86 from ${GUEST_SUITE}-backports (private apt config under $CACHE/apt)"
		local a="$CACHE/apt"
		mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
		echo "deb $(detect_mirror) ${GUEST_SUITE}-backports main" >"$a/backports.list"
		local opts=(-o "Dir::Etc::SourceList=$a/backports.list"
			-o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache")
		export DEBIAN_FRONTEND=noninteractive
		apt-get "${opts[@]}" update -qq >"$CACHE/apt-update-bpo.log" 2>&1 || {
			tail -5 "$CACHE/apt-update-bpo.log" >&2
			return 1
		}
		apt-get "${opts[@]}" install -y -qq --no-install-recommends \
			-t "${GUEST_SUITE}-backports" qemu-system-x86 qemu-utils \
			>"$CACHE/apt-install-bpo.log" 2>&1 || {
			tail -5 "$CACHE/apt-install-bpo.log" >&2
			return 1
		}
		apt-get "${opts[@]}" clean >/dev/null 2>&1 || true
		qemu_usable || return 1
	fi
}

# vhost-device-vsock (rust-vmm) gives the guest a virtio-vsock device without
# /dev/vhost-vsock; its host side is hybrid vsock on Unix sockets. It is only
# ever started with uds-path (never its AF_VSOCK forwarding backend).
install_vhost_device_vsock() {
	VDV="$CACHE/vhost-device-vsock/bin/vhost-device-vsock"
	if [ -x "$VDV" ] && "$VDV" --version 2>/dev/null | grep -q "$VHOST_DEVICE_VSOCK_VERSION"; then
		return 0
	fi
	log "building vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION (cargo install, ~1 min)"
	env -u CARGO_TARGET_DIR cargo install --locked --quiet vhost-device-vsock --version "$VHOST_DEVICE_VSOCK_VERSION" \
		--root "$CACHE/vhost-device-vsock" >"$CACHE/vhost-device-vsock-install.log" 2>&1 || {
		tail -5 "$CACHE/vhost-device-vsock-install.log" >&2
		return 1
	}
	[ -x "$VDV" ]
}

# ---------------------------------------------------------------- guest pieces

# Debian's kernel (linux-image-amd64's current version), unpacked; only
# vmlinuz and the modules the initramfs loads are kept.
prepare_kernel() {
	KDIR="$CACHE/kernel"
	if [ -f "$KDIR/.complete" ] && [ "$(cat "$KDIR/layout" 2>/dev/null)" = "$VM_LAYOUT" ]; then
		KV=$(cat "$KDIR/version")
		return 0
	fi
	local pkg tmp p
	pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
	if [ -z "$pkg" ]; then
		apt-get update -qq >/dev/null 2>&1 || true
		pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
	fi
	[ -n "$pkg" ] || {
		log "cannot resolve linux-image-amd64"
		return 1
	}
	log "fetching guest kernel $pkg"
	rm -rf "$CACHE"/kernel.tmp.*
	tmp=$(mktemp -d "$CACHE/kernel.tmp.XXXXXX")
	(cd "$tmp" && apt-get download -o APT::Sandbox::User=root "$pkg") >"$tmp/download.log" 2>&1 || {
		tail -3 "$tmp/download.log" >&2
		return 1
	}
	dpkg-deb -x "$tmp"/*.deb "$tmp/root"
	KV=$(ls "$tmp/root/lib/modules")
	depmod -b "$tmp/root" "$KV"
	mkdir -p "$tmp/out/modules"
	cp "$tmp/root/boot/vmlinuz-$KV" "$tmp/out/vmlinuz"
	cp "$tmp/root/lib/modules/$KV/modules.builtin" "$tmp/root/lib/modules/$KV/modules.builtin.modinfo" "$tmp/out/"
	# shellcheck disable=SC2086 # word splitting of the module list is wanted
	for m in $GUEST_MODULES; do
		modprobe -d "$tmp/root" -S "$KV" --show-depends "$m"
	done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$tmp/paths"
	: >"$tmp/out/modules/load-order"
	while read -r p; do
		cp "$p" "$tmp/out/modules/"
		basename "$p" >>"$tmp/out/modules/load-order"
	done <"$tmp/paths"
	echo "$KV" >"$tmp/out/version"
	echo "$VM_LAYOUT" >"$tmp/out/layout"
	rm -rf "$KDIR"
	mv "$tmp/out" "$KDIR"
	rm -rf "$tmp"
	touch "$KDIR/.complete"
}

# A busybox initramfs: insmod the modules, mount /dev/vda, switch_root.
build_initramfs() {
	local out=$1 st
	st=$(mktemp -d "$WORK/initramfs.XXXXXX")
	mkdir -p "$st/bin" "$st/dev" "$st/proc" "$st/sys" "$st/newroot" "$st/modules"
	cp /bin/busybox "$st/bin/busybox"
	install -m 0755 "$HERE/guest/init" "$st/init"
	cp "$KDIR"/modules/* "$st/modules/"
	mknod -m 600 "$st/dev/console" c 5 1
	(cd "$st" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
	rm -rf "$st"
}

# Debian bookworm minbase + systemd, debootstrapped once into the cache.
prepare_rootfs_base() {
	ROOTFS="$CACHE/rootfs"
	local key="layout=$VM_LAYOUT suite=$GUEST_SUITE variant=minbase include=$GUEST_PACKAGES"
	if [ -f "$ROOTFS.stamp" ] && [ "$(cat "$ROOTFS.stamp")" = "$key" ] && [ -x "$ROOTFS/sbin/init" ]; then
		return 0
	fi
	local mirror
	mirror=$(detect_mirror)
	log "debootstrap $GUEST_SUITE (minbase + $GUEST_PACKAGES) from $mirror (~1 min)"
	rm -rf "$ROOTFS" "$ROOTFS.tmp" "$ROOTFS.stamp"
	debootstrap --variant=minbase --include="$GUEST_PACKAGES" "$GUEST_SUITE" "$ROOTFS.tmp" "$mirror" \
		>"$CACHE/debootstrap.log" 2>&1 || {
		tail -5 "$CACHE/debootstrap.log" >&2
		return 1
	}
	local r="$ROOTFS.tmp" u
	echo "/dev/vda / ext4 rw 0 0" >"$r/etc/fstab"
	echo vmcred-vm >"$r/etc/hostname"
	printf '127.0.0.1 localhost\n127.0.1.1 vmcred-vm\n' >"$r/etc/hosts"
	# A fixed machine id: no first-boot logic (systemd-firstboot would prompt).
	echo 5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e >"$r/etc/machine-id"
	for u in systemd-firstboot.service getty@tty1.service serial-getty@ttyS0.service \
		serial-getty@ttyS1.service apt-daily.timer apt-daily-upgrade.timer \
		e2scrub_all.timer e2scrub_reap.service fstrim.timer dpkg-db-backup.timer \
		systemd-timesyncd.service; do
		ln -sf /dev/null "$r/etc/systemd/system/$u"
	done
	mkdir -p "$r/etc/systemd/system.conf.d"
	printf '[Manager]\nDefaultTimeoutStopSec=10s\n' >"$r/etc/systemd/system.conf.d/vmcred-test.conf"
	rm -rf "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* \
		"$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/locale/*
	mv "$ROOTFS.tmp" "$ROOTFS"
	echo "$key" >"$ROOTFS.stamp"
}

# Our files in the guest tree: all under paths this harness owns, removed and
# rewritten on every run, so the cached tree stays the debootstrap result plus
# these. $1: path of the vmcred-guest binary, or "" for the infrastructure run.
install_guest_overlay() {
	local agent=$1 r=$ROOTFS s="$HERE/guest" u
	rm -rf "$r/usr/local/sbin/vmcred-"* "$r/usr/local/bin/vmcred-guest" "$r/usr/local/bin/demo-consumer" \
		"$r/etc/vmcred" "$r/etc/modules-load.d/vsock.conf" "$r/lib/modules"
	# The initramfs's modules, also in the root fs, so that modules-load.d
	# and udev find them (they are loaded already).
	local md="$r/lib/modules/$KV"
	mkdir -p "$md/kernel/vmcred"
	cp "$KDIR"/modules/*.ko "$md/kernel/vmcred/"
	cp "$KDIR/modules.builtin" "$KDIR/modules.builtin.modinfo" "$md/"
	sed 's|^|kernel/vmcred/|' "$KDIR/modules/load-order" >"$md/modules.order"
	depmod -b "$r" "$KV"
	for u in vmcred-probe vmcred-boot-evidence vmcred-guest demo-consumer; do
		rm -f "$r/etc/systemd/system/$u.service" "$r/etc/systemd/system/"*.wants/"$u.service"
	done
	install -m 0755 "$s/vmcred-probe" "$s/vmcred-boot-evidence" "$r/usr/local/sbin/"
	install -m 0755 "$s/demo-consumer" "$r/usr/local/bin/"
	install -D -m 0644 "$s/vsock-modules.conf" "$r/etc/modules-load.d/vsock.conf"
	mkdir -p "$r/etc/systemd/system/sysinit.target.wants" "$r/etc/systemd/system/multi-user.target.wants"
	install -m 0644 "$s/vmcred-probe.service" "$s/vmcred-boot-evidence.service" "$r/etc/systemd/system/"
	ln -s ../vmcred-probe.service "$r/etc/systemd/system/sysinit.target.wants/"
	ln -s ../vmcred-boot-evidence.service "$r/etc/systemd/system/sysinit.target.wants/"
	if [ -n "$agent" ]; then
		install -m 0755 "$agent" "$r/usr/local/bin/vmcred-guest"
		install -D -m 0644 "$s/guest.toml" "$r/etc/vmcred/guest.toml"
		install -m 0644 "$s/vmcred-guest.service" "$s/demo-consumer.service" "$r/etc/systemd/system/"
		ln -s ../vmcred-guest.service "$r/etc/systemd/system/sysinit.target.wants/"
		ln -s ../demo-consumer.service "$r/etc/systemd/system/multi-user.target.wants/"
	fi
}

build_image() {
	local img=$1
	rm -f "$img"
	truncate -s 1G "$img"
	mkfs.ext4 -q -F -L vmcred-root -d "$ROOTFS" "$img" >"$WORK/mkfs.log" 2>&1 || {
		cat "$WORK/mkfs.log" >&2
		return 1
	}
}

# ---------------------------------------------------------------- processes

# Only PIDs this harness started are ever signalled.
OUR_PIDS=()
stop_pid() {
	local pid=$1 i
	[ -n "$pid" ] || return 0
	kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for i in $(seq 50); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}
stop_all() {
	local i
	for ((i = ${#OUR_PIDS[@]} - 1; i >= 0; i--)); do
		stop_pid "${OUR_PIDS[$i]}"
	done
	OUR_PIDS=()
}

wait_for_path() { # PATH SECONDS
	local end=$((SECONDS + $2))
	while [ ! -e "$1" ]; do
		[ "$SECONDS" -lt "$end" ] || return 1
		sleep 0.1
	done
}

# start_vhost_vsock HYBRID_SOCKET: the virtio-vsock backend for CID 3.
start_vhost_vsock() {
	HYBRID_SOCK=$1
	VHOST_USER_SOCK="$WORK/vhost-user-vsock.sock"
	rm -f "$VHOST_USER_SOCK" "$HYBRID_SOCK"
	"$VDV" --vm "guest-cid=$GUEST_CID,socket=$VHOST_USER_SOCK,uds-path=$HYBRID_SOCK" \
		>>"$WORK/vhost-device-vsock.log" 2>&1 &
	VDV_PID=$!
	OUR_PIDS+=("$VDV_PID")
	wait_for_path "$VHOST_USER_SOCK" 10 || die "vhost-device-vsock did not create $VHOST_USER_SOCK"
}

# qemu_argv CONSOLE_LOG: the hypervisor argv (in QEMU_ARGV); no credentials.
qemu_argv() {
	local console=$1
	# shellcheck disable=SC2054 # the commas belong to qemu options
	QEMU_ARGV=(qemu-system-x86_64 -name vmcred-vm1 -accel tcg -cpu max -smp 2
		-object "memory-backend-memfd,id=mem,size=$GUEST_MEM,share=on"
		-machine q35,memory-backend=mem -m "$GUEST_MEM"
		-nodefaults -no-user-config -display none -no-reboot
		-kernel "$WORK/vmlinuz" -initrd "$WORK/initramfs.img"
		-append "console=ttyS0,115200 panic=-1 loglevel=4 systemd.show_status=auto"
		-drive "file=$WORK/root.img,format=raw,if=none,id=root,snapshot=on"
		-device virtio-blk-pci,drive=root
		-chardev "socket,id=vhu,path=$VHOST_USER_SOCK"
		-device vhost-user-vsock-pci,chardev=vhu
		-chardev "file,id=con,path=$console" -serial chardev:con
		-chardev "pipe,id=probe,path=$WORK/probe" -serial chardev:probe)
}

# ---------------------------------------------------------------- guest probe

# The command channel: the guest's /dev/ttyS1 is a qemu pipe chardev
# ($WORK/probe.in / probe.out); tests/vm/guest/vmcred-probe answers there.
probe_open() {
	rm -f "$WORK/probe.in" "$WORK/probe.out"
	mkfifo -m 600 "$WORK/probe.in" "$WORK/probe.out"
	exec {PROBE_W}<>"$WORK/probe.in"
	exec {PROBE_R}<>"$WORK/probe.out"
	PROBE_SEQ=0
}

# probe_wait_ready SECONDS: wait for the guest runner's READY line.
probe_wait_ready() {
	local end=$((SECONDS + $1)) line
	while [ "$SECONDS" -lt "$end" ]; do
		if IFS= read -r -t 5 line <&"$PROBE_R"; then
			case ${line%$'\r'} in READY*) return 0 ;; esac
		else
			# The guest may have missed an earlier READY: ask again.
			printf 'PING\n' >&"$PROBE_W"
		fi
		if [ -n "${QEMU_PID:-}" ] && ! kill -0 "$QEMU_PID" 2>/dev/null; then
			return 1
		fi
	done
	return 1
}

# guest_run [-t SECONDS] COMMAND: run COMMAND (bash) as root in the guest.
# Output (stdout+stderr) in GUEST_OUT; returns the command's exit status,
# or 124 if no answer came in time.
guest_run() {
	local t=60 id line b64="" started=0 remaining end
	if [ "$1" = -t ]; then
		t=$2
		shift 2
	fi
	PROBE_SEQ=$((PROBE_SEQ + 1))
	id="$PROBE_SEQ.$RANDOM"
	printf 'RUN %s %s\n' "$id" "$(printf '%s' "$1" | base64 -w0)" >&"$PROBE_W"
	end=$((SECONDS + t))
	while :; do
		remaining=$((end - SECONDS))
		if [ "$remaining" -le 0 ]; then
			GUEST_OUT="(no answer from the guest in ${t}s)"
			return 124
		fi
		IFS= read -r -t "$remaining" line <&"$PROBE_R" || continue
		line=${line%$'\r'}
		case $line in
		"BEGIN $id") started=1 b64="" ;;
		"END $id "*)
			GUEST_OUT=$(printf '%s' "$b64" | base64 -d 2>/dev/null)
			return "${line##* }"
			;;
		*) [ "$started" = 1 ] && b64+="$line" ;;
		esac
	done
}

# wait_console FILE REGEX SECONDS: print the first matching console line.
wait_console() {
	local f=$1 re=$2 end=$((SECONDS + $3)) l
	while :; do
		if l=$(tr -d '\r' <"$f" 2>/dev/null | grep -a -m1 -E "$re"); then
			printf '%s\n' "$l"
			return 0
		fi
		[ "$SECONDS" -lt "$end" ] || return 1
		sleep 0.2
	done
}
console_lines() { tr -d '\r' <"$1" 2>/dev/null | grep -a -E "$2"; }

# ---------------------------------------------------------------- results

PASSED=0
FAILED=0
SUMMARY_DONE=0
summary() {
	[ "$SUMMARY_DONE" = 1 ] && return 0
	SUMMARY_DONE=1
	echo "$PASSED passed, $FAILED failed"
}
pass() {
	echo "PASS: $*"
	PASSED=$((PASSED + 1))
}
fail() {
	echo "FAIL: $*"
	FAILED=$((FAILED + 1))
}

# non_unix_sockets PID...: sockets of these processes that are neither
# AF_UNIX nor netlink (this machine must never hold an AF_VSOCK socket).
non_unix_sockets() {
	local pid fd l ino known
	known=$(awk 'NR > 1 { print $7 }' /proc/net/unix; awk 'NR > 1 { print $10 }' /proc/net/netlink)
	for pid in "$@"; do
		for fd in /proc/"$pid"/fd/*; do
			l=$(readlink "$fd" 2>/dev/null) || continue
			case $l in socket:\[*\]) ;; *) continue ;; esac
			ino=${l#socket:[}
			ino=${ino%]}
			grep -qx -- "$ino" <<<"$known" || echo "pid $pid ($(cat "/proc/$pid/comm")) fd ${fd##*/}: $l is not AF_UNIX"
		done
	done
}
