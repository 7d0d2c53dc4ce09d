# shellcheck shell=bash disable=SC2034 # globals are read by run.sh and full.sh
# Functions shared by tests/vm/run.sh: host packages, the cached guest
# (kernel, initramfs, Debian rootfs), the VM processes and the command channel
# into the guest. Sourced, not run.
#
# Safety rules kept here: this machine never opens an AF_VSOCK socket (the
# guest's virtio-vsock is backed by vhost-device-vsock's Unix sockets, "hybrid
# vsock"); the guest has no network; downloads live in the cache only.

# Bump to throw away cached guest pieces built by an older harness.
VM_LAYOUT=4
# The guests: Debian suites, each with its own kernel and systemd
# (bookworm 252, trixie 257, sid 262 when this was written).
ALL_SUITES="bookworm trixie sid"
GUEST_PACKAGES=systemd,systemd-sysv,socat,procps
VHOST_DEVICE_VSOCK_VERSION=0.3.0
GUEST_CID=3
GUEST_MEM=512M
# Modules the initramfs loads (with their dependencies, in order); a name
# the suite's kernel has built in or does not know is skipped.
# virtio_mmio: the devices of `-M microvm`; qemu_fw_cfg: fw_cfg credentials
# (/sys/firmware/qemu_fw_cfg, read by PID 1); virtio_console: the harness's
# command channel (a virtio-serial port).
GUEST_MODULES="vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
virtio_pci virtio_mmio virtio_blk virtio_console qemu_fw_cfg crc32c_generic ext4"
# Modules put into the guest's /lib/modules but NOT loaded at boot: the
# admission proof (tests/vm/proofs.sh) loads vsock_loopback itself, so that
# every other check runs on a guest without a local vsock transport.
GUEST_EXTRA_MODULES="vsock_loopback"
# What the cached kernel directory was extracted for.
KERNEL_KEY="$VM_LAYOUT extra=$GUEST_EXTRA_MODULES"

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
	for c in debootstrap mkfs.ext4 debugfs cpio depmod modprobe socat dpkg-deb xz zstd; do
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
			e2fsprogs cpio kmod socat dpkg xz-utils zstd >"$CACHE/apt-install.log" 2>&1 || {
			tail -5 "$CACHE/apt-install.log" >&2
			return 1
		}
	fi
	if ! qemu_usable; then
		log "installing qemu-system-x86 from bookworm-backports (private apt config under $CACHE/apt)"
		local a="$CACHE/apt"
		mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
		echo "deb $(detect_mirror) bookworm-backports main" >"$a/backports.list"
		local opts=(-o "Dir::Etc::SourceList=$a/backports.list"
			-o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache")
		export DEBIAN_FRONTEND=noninteractive
		apt-get "${opts[@]}" update -qq >"$CACHE/apt-update-bpo.log" 2>&1 || {
			tail -5 "$CACHE/apt-update-bpo.log" >&2
			return 1
		}
		apt-get "${opts[@]}" install -y -qq --no-install-recommends \
			-t "bookworm-backports" qemu-system-x86 qemu-utils \
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

# use_suite SUITE: the cache paths of one guest suite.
use_suite() {
	SUITE=$1
	SCACHE="$CACHE/suites/$SUITE"
	KDIR="$SCACHE/kernel"
	ROOTFS="$SCACHE/rootfs"
	mkdir -p "$SCACHE"
}

# suite_apt ARGS...: apt-get/apt-cache against SUITE's own package lists, kept
# under the suite's cache (the system's apt state and sources are untouched).
suite_apt_opts() {
	local a="$SCACHE/apt"
	mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
	[ -f "$a/sources.list" ] ||
		echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(detect_mirror) $SUITE main" >"$a/sources.list"
	SUITE_APT=(-o "Dir::Etc::SourceList=$a/sources.list" -o "Dir::Etc::SourceParts=$a/no-parts"
		-o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache" -o "Dir::State::status=/dev/null"
		-o APT::Sandbox::User=root)
}

# The suite's kernel (linux-image-amd64's current version in SUITE),
# unpacked; only vmlinuz and the modules the initramfs loads are kept,
# those decompressed (busybox insmod reads plain .ko files only).
prepare_kernel() {
	if [ -f "$KDIR/.complete" ] && [ "$(cat "$KDIR/layout" 2>/dev/null)" = "$KERNEL_KEY" ]; then
		KV=$(cat "$KDIR/version")
		return 0
	fi
	local pkg tmp p m
	suite_apt_opts
	apt-get "${SUITE_APT[@]}" update -qq >"$SCACHE/apt-update.log" 2>&1 || {
		tail -5 "$SCACHE/apt-update.log" >&2
		return 1
	}
	pkg=$(apt-cache "${SUITE_APT[@]}" depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
	[ -n "$pkg" ] || {
		log "$SUITE: cannot resolve linux-image-amd64"
		return 1
	}
	log "$SUITE: fetching guest kernel $pkg"
	rm -rf "$SCACHE"/kernel.tmp.*
	tmp=$(mktemp -d "$SCACHE/kernel.tmp.XXXXXX")
	# Newer suites split the kernel: linux-image-VER depends on
	# linux-base-VER, linux-binary-VER (vmlinuz) and linux-modules-VER; take
	# all of them.
	local pkgs=("$pkg") d
	while read -r d; do pkgs+=("$d"); done < <(apt-cache "${SUITE_APT[@]}" depends "$pkg" 2>/dev/null |
		awk '/Depends: linux-(base|binary|modules)-[0-9]/ { print $2 }' | sort -u)
	mkdir -p "$SCACHE/kernel-debs"
	for d in "${pkgs[@]}"; do
		if ! ls "$SCACHE/kernel-debs/${d}_"*.deb >/dev/null 2>&1; then
			(cd "$SCACHE/kernel-debs" && apt-get "${SUITE_APT[@]}" download "$d") >"$tmp/download.log" 2>&1 || {
				tail -3 "$tmp/download.log" >&2
				return 1
			}
		fi
		dpkg-deb -x "$(ls "$SCACHE/kernel-debs/${d}_"*.deb | tail -1)" "$tmp/root"
	done
	# Merged /usr (trixie on) or not: modules are under one of the two.
	local mroot=$tmp/root/lib/modules vmlinuz
	[ -d "$mroot" ] || mroot=$tmp/root/usr/lib/modules
	KV=$(ls "$mroot" 2>/dev/null | head -1)
	# /boot/vmlinuz-VER, or (sid's linux-binary-VER) /usr/lib/modules/VER/vmlinuz
	vmlinuz=$(find "$tmp/root" -type f \( -name "vmlinuz-$KV" -o -path "*/modules/$KV/vmlinuz" \) | head -1)
	if [ -z "$KV" ] || [ -z "$vmlinuz" ]; then
		log "$SUITE: no kernel modules or vmlinuz in ${pkgs[*]}"
		return 1
	fi
	mkdir -p "$tmp/flat/lib/modules"
	mv "$mroot/$KV" "$tmp/flat/lib/modules/"
	depmod -b "$tmp/flat" "$KV" || return 1
	mkdir -p "$tmp/out/modules"
	cp "$vmlinuz" "$tmp/out/vmlinuz" 2>/dev/null || cp "$tmp/flat/lib/modules/$KV/vmlinuz" "$tmp/out/vmlinuz" || return 1
	for m in modules.builtin modules.builtin.modinfo; do
		if [ -f "$tmp/flat/lib/modules/$KV/$m" ]; then cp "$tmp/flat/lib/modules/$KV/$m" "$tmp/out/"; else : >"$tmp/out/$m"; fi
	done
	: >"$tmp/paths"
	# shellcheck disable=SC2086 # word splitting of the module list is wanted
	for m in $GUEST_MODULES; do
		modprobe -d "$tmp/flat" -S "$KV" --show-depends "$m" >>"$tmp/paths" 2>/dev/null ||
			log "$SUITE: kernel $KV has no module $m (built in or gone); skipped"
	done
	awk '$1 == "insmod" && !seen[$2]++ { print $2 }' "$tmp/paths" >"$tmp/insmod"
	: >"$tmp/out/modules/load-order"
	while read -r p; do
		m=$(basename "$p")
		case $m in
		*.ko.xz) m=${m%.xz} && xz -dc "$p" >"$tmp/out/modules/$m" ;;
		*.ko.zst) m=${m%.zst} && zstd -qdc "$p" >"$tmp/out/modules/$m" ;;
		*.ko.gz) m=${m%.gz} && gzip -dc "$p" >"$tmp/out/modules/$m" ;;
		*) cp "$p" "$tmp/out/modules/" ;;
		esac
		echo "$m" >>"$tmp/out/modules/load-order"
	done <"$tmp/insmod"
	# The extra modules (and whatever they need that the initramfs does not
	# load), for the root fs only.
	mkdir -p "$tmp/out/modules-extra"
	: >"$tmp/extra-paths"
	for m in $GUEST_EXTRA_MODULES; do
		modprobe -d "$tmp/flat" -S "$KV" --show-depends "$m" >>"$tmp/extra-paths" 2>/dev/null ||
			log "$SUITE: kernel $KV has no module $m"
	done
	while read -r p; do
		grep -qxF "$p" "$tmp/insmod" && continue
		m=$(basename "$p")
		case $m in
		*.ko.xz) xz -dc "$p" >"$tmp/out/modules-extra/${m%.xz}" ;;
		*.ko.zst) zstd -qdc "$p" >"$tmp/out/modules-extra/${m%.zst}" ;;
		*.ko.gz) gzip -dc "$p" >"$tmp/out/modules-extra/${m%.gz}" ;;
		*) cp "$p" "$tmp/out/modules-extra/" ;;
		esac
	done < <(awk '$1 == "insmod" && !seen[$2]++ { print $2 }' "$tmp/extra-paths")
	echo "$KV" >"$tmp/out/version"
	echo "$KERNEL_KEY" >"$tmp/out/layout"
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

# SUITE's minbase + systemd, debootstrapped once into the suite's cache; the
# downloaded debs stay in the cache too (a rebuild downloads nothing again).
prepare_rootfs_base() {
	local key="layout=$VM_LAYOUT suite=$SUITE variant=minbase include=$GUEST_PACKAGES"
	if [ -f "$ROOTFS.stamp" ] && [ "$(cat "$ROOTFS.stamp")" = "$key" ] && [ -x "$ROOTFS/sbin/init" ]; then
		return 0
	fi
	local mirror
	mirror=$(detect_mirror)
	log "$SUITE: debootstrap (minbase + $GUEST_PACKAGES) from $mirror (~1-2 min)"
	rm -rf "$ROOTFS" "$ROOTFS.tmp" "$ROOTFS.stamp"
	mkdir -p "$SCACHE/debs"
	debootstrap --variant=minbase --cache-dir="$SCACHE/debs" --include="$GUEST_PACKAGES" \
		"$SUITE" "$ROOTFS.tmp" "$mirror" >"$SCACHE/debootstrap.log" 2>&1 || {
		tail -5 "$SCACHE/debootstrap.log" >&2
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

# render_guest_unit DIR: the guest agent's unit exactly as the NixOS module
# renders it, and the guest TOML it renders (tests/nix/render-guest-unit.sh
# evaluates nixos-modules/guest.nix offline), into DIR/vmcred-guest.service
# and DIR/guest.toml. VMCRED_VM_RENDERED_UNIT_DIR names a directory that
# script wrote before, instead.
render_guest_unit() {
	local out=$1 script="$REPO/tests/nix/render-guest-unit.sh"
	mkdir -p "$out"
	if [ -n "${VMCRED_VM_RENDERED_UNIT_DIR:-}" ]; then
		cp -r "$VMCRED_VM_RENDERED_UNIT_DIR/vmcred-guest.service" "$VMCRED_VM_RENDERED_UNIT_DIR/guest.toml" \
			"$VMCRED_VM_RENDERED_UNIT_DIR/vmcred-socket.service.d" "$out/" || return 1
	elif [ -x "$script" ]; then
		"$script" "$out" >"$WORK/render-guest-unit.log" 2>&1 || {
			tail -20 "$WORK/render-guest-unit.log" >&2
			return 1
		}
	else
		log "missing $script: the VM test runs the guest agent only under the unit nixos-modules/guest.nix renders, and that script renders it"
		return 1
	fi
	[ -s "$out/vmcred-guest.service" ] && [ -s "$out/guest.toml" ] &&
		[ -s "$out/vmcred-socket.service.d/vmcred-module.conf" ] &&
		grep -q '^ExecStart=@VMCRED_GUEST@ ' "$out/vmcred-guest.service"
}

# Where the rendered unit's placeholders point in the guest.
GUEST_AGENT_PATH=/usr/local/bin/vmcred-guest
GUEST_CONFIG_PATH=/etc/vmcred/guest.toml

# map_rendered_unit RENDERED OUT: the only change made to the module's unit:
# its two placeholders (@VMCRED_GUEST@, @VMCRED_GUEST_CONFIG@; store paths on
# NixOS) become the agent's and its TOML's paths here. Every other line, the
# sandbox included, stays byte for byte; the function checks that.
map_rendered_unit() {
	local in=$1 out=$2
	sed -e "s|@VMCRED_GUEST@|$GUEST_AGENT_PATH|g" -e "s|@VMCRED_GUEST_CONFIG@|$GUEST_CONFIG_PATH|g" "$in" >"$out"
	if ! diff <(grep -v '^ExecStart=' "$in") <(grep -v '^ExecStart=' "$out") >/dev/null; then
		log "map_rendered_unit: placeholders outside ExecStart= in the rendered unit; refusing to map"
		return 1
	fi
	if grep -q '@VMCRED_' "$out"; then
		log "map_rendered_unit: an unknown placeholder is left in the rendered unit: $(grep -o '@VMCRED_[A-Z_]*@' "$out" | head -1)"
		return 1
	fi
}

# Our files in the guest tree: all under paths this harness owns, removed and
# rewritten on every run, so the cached tree stays the debootstrap result plus
# these. $1: path of the vmcred-guest binary, or "" for the infrastructure run;
# $2: the mapped module unit (map_rendered_unit); $3: the module's guest TOML.
install_guest_overlay() {
	local agent=$1 unit=${2:-} toml=${3:-} r=$ROOTFS s="$HERE/guest" u w
	rm -rf "$r/usr/local/sbin/vmcred-"* "$r/usr/local/bin/vmcred-"* "$r/etc/vmcred" "$r/usr/local/lib/vmcred-test" \
		"$r/etc/modules-load.d/vsock.conf" "$r/lib/modules" "$r/usr/lib/modules"
	# The initramfs's modules, also in the root fs, so that modules-load.d
	# and udev find them (they are loaded already).
	local md="$r/lib/modules/$KV"
	mkdir -p "$md/kernel/vmcred"
	cp "$KDIR"/modules/*.ko "$md/kernel/vmcred/"
	cp "$KDIR"/modules-extra/*.ko "$md/kernel/vmcred/" 2>/dev/null || true
	cp "$KDIR/modules.builtin" "$KDIR/modules.builtin.modinfo" "$md/"
	sed 's|^|kernel/vmcred/|' "$KDIR/modules/load-order" >"$md/modules.order"
	depmod -b "$r" "$KV"
	for u in vmcred-probe vmcred-boot-evidence vmcred-guest vmcred-consumer vmcred-reload \
		vmcred-socket vmcred-socket-denied; do
		rm -rf "$r/etc/systemd/system/$u.service" "$r/etc/systemd/system/$u.service.d" \
			"$r/etc/systemd/system/"*.wants/"$u.service"
	done
	install -m 0755 "$s/vmcred-probe" "$s/vmcred-boot-evidence" "$r/usr/local/sbin/"
	install -m 0755 "$s/vmcred-consumer" "$s/vmcred-reload" "$r/usr/local/bin/"
	install -D -m 0644 "$s/vsock-modules.conf" "$r/etc/modules-load.d/vsock.conf"
	# The initramfs's busybox: the proofs load vsock_loopback with its insmod.
	install -D -m 0755 /bin/busybox "$r/usr/local/lib/vmcred-test/busybox"
	mkdir -p "$r/etc/systemd/system/sysinit.target.wants" "$r/etc/systemd/system/multi-user.target.wants"
	install -m 0644 "$s/vmcred-probe.service" "$s/vmcred-boot-evidence.service" "$r/etc/systemd/system/"
	ln -s ../vmcred-probe.service "$r/etc/systemd/system/sysinit.target.wants/"
	ln -s ../vmcred-boot-evidence.service "$r/etc/systemd/system/sysinit.target.wants/"
	if [ -n "$agent" ]; then
		install -m 0755 "$agent" "$r$GUEST_AGENT_PATH"
		install -D -m 0644 "$toml" "$r$GUEST_CONFIG_PATH"
		install -m 0644 "$unit" "$r/etc/systemd/system/vmcred-guest.service"
		# What `systemctl enable` does with the rendered [Install] WantedBy=
		# (NixOS makes the same links from wantedBy).
		for w in $(sed -n 's/^WantedBy=//p' "$unit"); do
			mkdir -p "$r/etc/systemd/system/$w.wants"
			ln -s ../vmcred-guest.service "$r/etc/systemd/system/$w.wants/"
		done
		install -m 0644 "$s/vmcred-consumer.service" "$s/vmcred-reload.service" \
			"$s/vmcred-socket.service" "$s/vmcred-socket-denied.service" "$r/etc/systemd/system/"
		# The module's socketUnits wiring for vmcred-socket.service, as rendered.
		install -D -m 0644 "$(dirname "$toml")/vmcred-socket.service.d/vmcred-module.conf" \
			"$r/etc/systemd/system/vmcred-socket.service.d/vmcred-module.conf"
		[ -z "${VSOCK_PROBE_BIN:-}" ] || install -m 0755 "$VSOCK_PROBE_BIN" "$r/usr/local/bin/vmcred-vsock-probe"
		ln -s ../vmcred-consumer.service "$r/etc/systemd/system/multi-user.target.wants/"
		ln -s ../vmcred-reload.service "$r/etc/systemd/system/multi-user.target.wants/"
	fi
}

build_image() {
	local img=$1
	rm -f "$img"
	truncate -s 1G "$img"
	local rc=0
	mkfs.ext4 -q -F -L vmcred-root -d "$ROOTFS" "$img" >"$WORK/mkfs.log" 2>&1 || rc=$?
	if [ "$rc" != 0 ]; then
		cat "$WORK/mkfs.log" >&2
		log "mkfs.ext4 -d $ROOTFS $img failed (exit status $rc)"
		return 1
	fi
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

# qemu_argv MACHINE CONSOLE_LOG [APPEND...]: the hypervisor argv (in
# QEMU_ARGV) for the guest in $IMG (vmlinuz, initramfs.img, root.img); no
# credentials. MACHINE: q35 (PCI devices, SMBIOS) or microvm (virtio-mmio
# devices, fw_cfg, no SMBIOS, one serial port: the command channel is a
# virtio-serial port on both). Extra kernel options are appended.
qemu_argv() {
	local machine=$1 console=$2 append
	shift 2
	append="console=ttyS0,115200 panic=-1 loglevel=4 systemd.show_status=auto${*:+ $*}"
	# shellcheck disable=SC2054 # the commas belong to qemu options
	QEMU_ARGV=(qemu-system-x86_64 -name vmcred-vm1 -accel tcg -cpu max -smp 2
		-object "memory-backend-memfd,id=mem,size=$GUEST_MEM,share=on")
	case $machine in
	q35)
		# shellcheck disable=SC2054
		QEMU_ARGV+=(-machine q35,memory-backend=mem -m "$GUEST_MEM"
			-nodefaults -no-user-config -display none -no-reboot
			-kernel "$IMG/vmlinuz" -initrd "$IMG/initramfs.img" -append "$append"
			-drive "file=$IMG/root.img,format=raw,if=none,id=root,snapshot=on"
			-device virtio-blk-pci,drive=root
			-chardev "socket,id=vhu,path=$VHOST_USER_SOCK"
			-device vhost-user-vsock-pci,chardev=vhu
			-chardev "file,id=con,path=$console" -serial chardev:con
			-device virtio-serial-pci,id=vser)
		;;
	microvm)
		# TCG cannot calibrate the TSC against the PIT-less microvm quickly:
		# without tsc_early_khz the guest may hang early.
		# shellcheck disable=SC2054
		QEMU_ARGV+=(-machine microvm,memory-backend=mem -m "$GUEST_MEM"
			-nodefaults -no-user-config -display none -no-reboot
			-kernel "$IMG/vmlinuz" -initrd "$IMG/initramfs.img"
			-append "$append tsc_early_khz=2000000"
			-drive "file=$IMG/root.img,format=raw,if=none,id=root,snapshot=on"
			-device virtio-blk-device,drive=root
			-chardev "socket,id=vhu,path=$VHOST_USER_SOCK"
			-device vhost-user-vsock-device,chardev=vhu
			-chardev "file,id=con,path=$console" -serial chardev:con
			-device virtio-serial-device,id=vser)
		;;
	*) die "qemu_argv: unknown machine $machine" ;;
	esac
	# shellcheck disable=SC2054
	QEMU_ARGV+=(-chardev "pipe,id=probe,path=$WORK/probe"
		-device virtserialport,bus=vser.0,chardev=probe,name=vmcred.probe)
}

# ---------------------------------------------------------------- one boot
# The steps every boot shares (full.sh, matrix.sh).

# start_qemu LOG [ARG...]: QEMU_ARGV (from qemu_argv) plus ARGs in the
# background, its output to LOG; QEMU_PID is it, and the cleanup kills it.
start_qemu() {
	local log=$1
	shift
	"${QEMU_ARGV[@]}" "$@" >"$log" 2>&1 &
	QEMU_PID=$!
	OUR_PIDS+=("$QEMU_PID")
}

# vm_boot_prepare HYBRID_SOCKET: a fresh vsock backend and a fresh command
# channel for the next boot.
vm_boot_prepare() {
	stop_pid "${VDV_PID:-}"
	start_vhost_vsock "$1"
	probe_open
}

# wait_qemu_exec PID LOG [ARGV_FILE]: until PID (`vmcred-host launch`, which
# execs qemu in place, or qemu itself) runs qemu and its argv is readable;
# then that argv, one word a line, goes to ARGV_FILE. On failure the tail of
# LOG is shown. /proc/PID/exe names the new image early in execve, before
# the kernel has copied the argument area into place: in that window
# /proc/PID/cmdline reads empty (seen once in CI), so both are waited for.
wait_qemu_exec() {
	local pid=$1 qlog=$2 argv=${3:-} end=$((SECONDS + 15)) qemu
	qemu=$(readlink -f "$(command -v qemu-system-x86_64)")
	until [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$qemu" ] &&
		[ -n "$(tr -d '\0' <"/proc/$pid/cmdline" 2>/dev/null | head -c 1)" ]; do
		if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$end" ]; then
			tail -20 "$qlog" >&2
			return 1
		fi
		sleep 0.05
	done
	[ -z "$argv" ] || tr '\0' '\n' <"/proc/$pid/cmdline" >"$argv" 2>/dev/null || true
}

# qemu_aborted_itself LOG: qemu stopped on an assertion of its own (its
# "qemu-system-x86_64: FILE:LINE: FUNC: Assertion ... failed." line in
# LOG), as TCG once did in CI before the guest printed anything
# (system/physmem.c iotlb_to_section, sid/smbios): qemu's bug, not
# vmcred's, which a second boot may not meet. Nothing else counts.
qemu_aborted_itself() {
	grep -qE '^qemu-system-[^:]+: [^:]+:[0-9]+: [^:]+: Assertion .* failed\.$' "$1" 2>/dev/null
}

# wait_guest_up CONSOLE [SECONDS]: the guest's command runner answered; if
# not, the console's tail is shown.
wait_guest_up() {
	probe_wait_ready "${2:-300}" && return 0
	tail -40 "$1" >&2 || true
	return 1
}

wait_qemu_exit() { # SECONDS
	local end=$((SECONDS + $1))
	while kill -0 "$QEMU_PID" 2>/dev/null; do
		[ "$SECONDS" -lt "$end" ] || return 1
		sleep 0.1
	done
}

# guest_poweroff SECONDS: ask the guest to power off and wait for qemu to
# exit; 1 if it did not in time (the caller decides what that means).
guest_poweroff() {
	guest_run -t 5 'systemctl poweroff --no-block' || true
	wait_qemu_exit "$1"
}

rand_hex() { od -An -N8 -tx1 /dev/urandom | tr -d ' \n'; }
sha() { printf '%s' "$1" | sha256sum | cut -c1-64; }

# write_secret FILE VALUE: replace a root-only source file atomically.
write_secret() {
	local tmp="$1.tmp.$$"
	(
		umask 077
		printf '%s' "$2" >"$tmp"
	)
	chmod 0400 "$tmp"
	mv -f "$tmp" "$1"
}

# ---------------------------------------------------------------- guest probe

# The command channel: the guest's virtio-serial port vmcred.probe is a qemu
# pipe chardev ($WORK/probe.in / probe.out); tests/vm/guest/vmcred-probe
# answers there.
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
