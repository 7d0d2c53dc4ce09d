# shellcheck shell=bash disable=SC2016 # guest commands are single-quoted on purpose
# The carrier × systemd matrix of tests/vm/run.sh (sourced after lib.sh and
# full.sh): one boot per (suite, carrier) with focused checks: the bootstrap
# arrived through that carrier, the agent listens under the NixOS module's
# unit, the first credential is delivered, one rotation is acknowledged with a
# real systemctl unit action; on systemd >= 260 also a reload-only refresh
# (RefreshOnReload=credentials). In the first carrier's boot of each suite,
# the proofs of proofs.sh (AF_VSOCK admission rule, credential socket,
# systemd-analyze security). Test values are compared by digest only.

# carrier_machine CARRIER: the qemu machine that carrier is proven on.
carrier_machine() {
	case $1 in
	smbios) echo q35 ;;
	fw-cfg | cmdline) echo microvm ;;
	esac
}

launcher_has_carrier() { "$HOST_BIN" launch --help 2>&1 | grep -q -- '--carrier'; }

matrix_write_config() {
	{
		echo '# vmcred VM test host config for the carrier matrix (tests/vm/matrix.sh)'
		vm1_host_config "$MWORK" false
		cat <<EOF2

# deliver = "socket" in the guest: vmcred-socket.service takes it from
# /run/vmcred/creds.sock (proofs.sh).
[vms.vm1.credentials.SOCKET_TOKEN]
path = "$MWORK/secrets/socket-token"
boot = false
EOF2
	} >"$MCFG"
}

matrix_start_serve() { serve_in "$MCFG" "$MWORK" MSERVE_PID; }

m_status() { "$HOST_BIN" status --config "$MCFG" --json 2>&1; }

# The bootstrap the guest must end up with (public: a port, the host key's
# pin, the host side's transport), in proto::bootstrap's text form.
expected_bootstrap() {
	printf 'vmcred-bootstrap-v1 port=700 pin=%s host=hybrid' "$(tr -d '\n' <"$MWORK/host-state/host.pin")"
}

# matrix_launch SUITE CARRIER CONSOLE: qemu for that carrier, through
# `vmcred-host launch --carrier` when the launcher has it. A launcher without
# --carrier is a failed check, and the harness then adds the bootstrap itself
# so that the guest side of the carrier is still proven.
matrix_launch() {
	local suite=$1 carrier=$2 console=$3 machine rt bs
	machine=$(carrier_machine "$carrier")
	rt="$MWORK/launch-runtime-$suite-$carrier"
	M_BOOTSTRAP=$(expected_bootstrap)
	if launcher_has_carrier; then
		qemu_argv "$machine" "$console"
		M_VIA=launcher
		"$HOST_BIN" launch --config "$MCFG" --vm vm1 --hypervisor qemu --carrier "$carrier" \
			--runtime-dir "$rt" -- "${QEMU_ARGV[@]}" >>"$MWORK/qemu-$suite-$carrier.log" 2>&1 &
	else
		M_VIA=harness
		case $carrier in
		smbios)
			qemu_argv "$machine" "$console"
			M_VIA=launcher-auto
			"$HOST_BIN" launch --config "$MCFG" --vm vm1 --hypervisor qemu \
				--runtime-dir "$rt" -- "${QEMU_ARGV[@]}" >>"$MWORK/qemu-$suite-$carrier.log" 2>&1 &
			;;
		fw-cfg)
			mkdir -p -m 0700 "$rt"
			printf '%s' "$M_BOOTSTRAP" >"$rt/vmcred.bootstrap"
			qemu_argv "$machine" "$console"
			QEMU_ARGV+=(-fw_cfg "name=opt/io.systemd.credentials/vmcred.bootstrap,file=$rt/vmcred.bootstrap")
			"${QEMU_ARGV[@]}" >>"$MWORK/qemu-$suite-$carrier.log" 2>&1 &
			;;
		cmdline)
			bs="\"systemd.set_credential=vmcred.bootstrap:$M_BOOTSTRAP\""
			qemu_argv "$machine" "$console" "$bs"
			"${QEMU_ARGV[@]}" >>"$MWORK/qemu-$suite-$carrier.log" 2>&1 &
			;;
		esac
	fi
	QEMU_PID=$!
	OUR_PIDS+=("$QEMU_PID")
	wait_qemu_exec "$QEMU_PID" "$MWORK/qemu-$suite-$carrier.log" "$MWORK/qemu-cmdline-$suite-$carrier.txt"
}

# matrix_carrier_on_argv CARRIER FILE: the argv carries the bootstrap in the
# carrier's form, and in no other.
matrix_carrier_on_argv() {
	local c=$1 f=$2 smb=0 fwc=0 cml=0
	grep -qx -- -smbios "$f" && grep -A1 -x -- -smbios "$f" | grep -q 'vmcred.bootstrap' && smb=1
	grep -q '^name=opt/io.systemd.credentials/vmcred.bootstrap,file=' "$f" && fwc=1
	grep -q '"systemd.set_credential=vmcred.bootstrap:vmcred-bootstrap-v1 [^"]*"' "$f" && cml=1
	case $c in
	smbios) [ "$smb$fwc$cml" = 100 ] ;;
	fw-cfg) [ "$smb$fwc$cml" = 010 ] ;;
	cmdline) [ "$smb$fwc$cml" = 001 ] ;;
	esac
}

# matrix_boot SUITE CARRIER: one boot, focused checks.
matrix_boot() {
	local suite=$1 carrier=$2 tag="[$1/$2]" console="$MWORK/console-$1-$2.log" out line rc t0 a b
	local sysv pid_before pid_after ra rb sa sb c
	a="vmcred-test-api-key-$suite-$carrier-a-$(rand_hex)"
	b="vmcred-test-api-key-$suite-$carrier-b-$(rand_hex)"
	ra="vmcred-test-reloaded-$suite-$carrier-a-$(rand_hex)"
	rb="vmcred-test-reloaded-$suite-$carrier-b-$(rand_hex)"
	sa="vmcred-test-socket-token-$suite-$carrier-a-$(rand_hex)"
	sb="vmcred-test-socket-token-$suite-$carrier-b-$(rand_hex)"
	c="vmcred-test-api-key-$suite-$carrier-c-$(rand_hex)"
	M_VALUES+=("$a" "$b" "$ra" "$rb" "$sa" "$sb" "$c")
	M_CONSOLE=$console
	M_SUITE=$suite
	write_secret "$MWORK/secrets/api-key" "$a"
	write_secret "$MWORK/secrets/reloaded" "$ra"
	write_secret "$MWORK/secrets/socket-token" "$sa"
	local attempt qlog="$MWORK/qemu-$suite-$carrier.log"
	for attempt in 1 2; do
		vm_boot_prepare "$MWORK/vm1.vsock"
		t0=$(now)
		if ! matrix_launch "$suite" "$carrier" "$console"; then
			fail "$tag qemu started (see $qlog)"
			return
		fi
		if [ "$attempt" = 2 ]; then
			:
		elif [ "$M_VIA" = launcher ] || { [ "$M_VIA" = launcher-auto ] && [ "$carrier" = smbios ]; }; then
			if matrix_carrier_on_argv "$carrier" "$MWORK/qemu-cmdline-$suite-$carrier.txt"; then
				pass "$tag vmcred-host launch put the bootstrap on qemu's argv as $carrier (and in no other form) on -M $(carrier_machine "$carrier")"
			else
				fail "$tag vmcred-host launch: the argv does not carry the bootstrap as $carrier alone"
				grep -E 'smbios|fw_cfg|fw-cfg|set_credential|^-machine|^microvm|^q35' "$MWORK/qemu-cmdline-$suite-$carrier.txt" | indent
			fi
		else
			fail "$tag vmcred-host launch has no --carrier: qemu was started by the harness with the bootstrap as $carrier (the guest side below is still checked)"
		fi
		wait_guest_up "$console" && break
		stop_pid "$QEMU_PID"
		if [ "$attempt" = 1 ] && qemu_aborted_itself "$qlog"; then
			log "RETRY: $tag qemu aborted on its own assertion before the guest was up ($(grep -m1 -E 'Assertion .* failed' "$qlog")); qemu's bug, not vmcred's: booting once more"
			: >"$console"
			continue
		fi
		fail "$tag guest booted (no answer from its command runner)"
		return
	done
	local t_up
	t_up=$(elapsed "$t0")

	# Bootstrap imported by PID 1 through this carrier.
	wait_console "$console" 'VMCRED-EVIDENCE boot mount' 60 >/dev/null || true
	guest_run 'd=/run/credentials/@system
echo "systemd: $(systemctl --version | head -1)"
echo "kernel: $(uname -r)"
if [ -f $d/vmcred.bootstrap ]; then echo "bootstrap: $(cat $d/vmcred.bootstrap)"; else echo "bootstrap: absent"; fi
if [ -e /sys/firmware/qemu_fw_cfg/by_name/opt/io.systemd.credentials/vmcred.bootstrap ]; then echo "fw_cfg: vmcred.bootstrap"; else echo "fw_cfg: none"; fi
if ls /sys/firmware/dmi/entries/11-* >/dev/null 2>&1; then echo "smbios type 11: present"; else echo "smbios type 11: none"; fi
if grep -q "systemd.set_credential=vmcred.bootstrap:" /proc/cmdline; then echo "cmdline: vmcred.bootstrap"; else echo "cmdline: none"; fi' || true
	out=$GUEST_OUT
	sysv=$(sed -n 's/^systemd: systemd \([0-9]*\).*/\1/p' <<<"$out")
	local src_ok=0
	case $carrier in
	smbios) grep -q '^smbios type 11: present' <<<"$out" && grep -q '^fw_cfg: none' <<<"$out" && grep -q '^cmdline: none' <<<"$out" && src_ok=1 ;;
	fw-cfg) grep -q '^fw_cfg: vmcred.bootstrap' <<<"$out" && grep -q '^smbios type 11: none' <<<"$out" && grep -q '^cmdline: none' <<<"$out" && src_ok=1 ;;
	cmdline) grep -q '^cmdline: vmcred.bootstrap' <<<"$out" && grep -q '^fw_cfg: none' <<<"$out" && grep -q '^smbios type 11: none' <<<"$out" && src_ok=1 ;;
	esac
	if [ "$src_ok" = 1 ] && [ -n "$M_BOOTSTRAP" ] && grep -qxF "bootstrap: $M_BOOTSTRAP" <<<"$out"; then
		pass "$tag systemd ${sysv:-?} imported vmcred.bootstrap from $carrier into /run/credentials/@system, whole (up in ${t_up} s)"
	else
		fail "$tag vmcred.bootstrap imported through $carrier, whole"
	fi
	indent <<<"$out"
	M_ROW_SYSTEMD[$suite]=${sysv:-?}

	# The agent listens, under the module's unit, without restarts.
	# Type=notify: "activating" until the first sync with the host (or the
	# initial sync timeout). Wait until it is active, or has restarted, or
	# 60 s of guest time passed.
	guest_run -t 100 'end=$((SECONDS + 60))
while [ "$SECONDS" -lt "$end" ] && [ "$(systemctl is-active vmcred-guest.service)" != active ] &&
	[ "$(systemctl show -p NRestarts --value vmcred-guest.service)" = 0 ]; do sleep 0.5; done
echo "active: $(systemctl is-active vmcred-guest.service)"
echo "restarts: $(systemctl show -p NRestarts --value vmcred-guest.service)"
echo "unit sha256: $(sha256sum < /etc/systemd/system/vmcred-guest.service | cut -c1-64)"
systemctl show -p CapabilityBoundingSet -p NoNewPrivileges -p RestrictAddressFamilies vmcred-guest.service
journalctl -b -o cat --no-pager -u vmcred-guest.service | grep -E -m 3 "listening|cannot listen"
journalctl -b -o cat --no-pager -u vmcred-guest.service | grep -v "^$" | tail -n 6' || true
	out=$GUEST_OUT
	if grep -q '^active: active' <<<"$out" && grep -q '^restarts: 0$' <<<"$out" &&
		grep -q "^unit sha256: $(sha256sum <"$MAPPED_UNIT" | cut -c1-64)" <<<"$out" && grep -qi 'listening' <<<"$out"; then
		pass "$tag vmcred-guest.service (the module's rendered unit, sandbox unchanged) is active, listening, never restarted"
	else
		fail "$tag vmcred-guest.service under the module's unit: not active and listening without restarts"
	fi
	indent <<<"$out"

	# First credential delivered.
	line=$(wait_console "$console" 'VMCRED-EVIDENCE consumer .* API_KEY sha256=' 120 || true)
	local t_first
	t_first=$(elapsed "$t0")
	guest_run 'sha256sum < /run/credentials/@system/API_KEY | cut -c1-64' || true
	if [ "$GUEST_OUT" = "$(sha "$a")" ] && grep -q "sha256=$(sha "$a")" <<<"$line"; then
		pass "$tag first credential delivered over vsock; vmcred-consumer read it (launch to consumer ${t_first} s)"
		M_ROW_FIRST["$suite/$carrier"]=$t_first
	else
		fail "$tag first credential delivered (consumer: ${line:-nothing})"
		M_ROW_FIRST["$suite/$carrier"]=never
	fi

	# One rotation, acknowledged after a real systemctl unit action.
	guest_run 'systemctl show -p MainPID --value vmcred-reload.service' || true
	pid_before=$GUEST_OUT
	write_secret "$MWORK/secrets/api-key" "$b"
	write_secret "$MWORK/secrets/reloaded" "$rb"
	local t1
	t1=$(now)
	rc=0
	out=$("$HOST_BIN" rotate --config "$MCFG" vm1 API_KEY RELOADED --timeout 60s 2>&1) || rc=$?
	M_ROW_ROTATE["$suite/$carrier"]=$(elapsed "$t1")
	guest_run 'sha256sum < /run/credentials/@system/API_KEY | cut -c1-64' || true
	line=$(wait_console "$console" "VMCRED-EVIDENCE consumer .* API_KEY sha256=$(sha "$b")" 10 || true)
	if [ "$rc" = 0 ] && [ "$GUEST_OUT" = "$(sha "$b")" ] && [ -n "$line" ]; then
		pass "$tag rotation acknowledged (${M_ROW_ROTATE["$suite/$carrier"]} s) after systemctl try-restart vmcred-consumer.service, which read the new value"
	else
		fail "$tag rotation (rotate rc=$rc, consumer: ${line:-no line with the new digest})"
		indent <<<"$out"
	fi

	# systemd >= 260: the reload unit sees the new value without a restart.
	if [ "${sysv:-0}" -ge 260 ]; then
		guest_run 'systemctl show -p MainPID --value vmcred-reload.service; systemctl show -p NRestarts --value vmcred-reload.service' || true
		pid_after=$(head -1 <<<"$GUEST_OUT")
		line=$(wait_console "$console" "VMCRED-EVIDENCE vmcred-reload pid=$pid_before reload RELOADED sha256=$(sha "$rb")" 10 || true)
		if [ -n "$pid_before" ] && [ "$pid_before" != 0 ] && [ "$pid_before" = "$pid_after" ] && [ -n "$line" ]; then
			pass "$tag RefreshOnReload=credentials: vmcred-reload.service (reload_units) read the rotated RELOADED from its \$CREDENTIALS_DIRECTORY after a reload, same MainPID $pid_before"
		else
			fail "$tag RefreshOnReload=credentials reload (MainPID ${pid_before:-?} -> ${pid_after:-?})"
			console_lines "$console" 'vmcred-reload' | indent
		fi
	fi

	if [ "$carrier" = "$M_PROOF_CARRIER" ]; then
		proof_vsock_rule "$tag"
		proof_vsock_flood "$tag" "$c"
		proof_creds_socket "$tag" "${sysv:-0}" "$sa" "$sb"
		proof_security "$tag" "$suite" "${sysv:-?}"
		guest_run -t 120 'journalctl -b --no-pager -o short-monotonic' || true
		printf '%s\n' "$GUEST_OUT" >"$MWORK/guest-journal-$suite-$carrier.txt"
	fi

	guest_poweroff 60 || log "$tag guest did not power off in 60 s; stopping qemu"
	stop_pid "$QEMU_PID"
	M_ROW_BOOT["$suite/$carrier"]=$t_up
}

declare -A M_ROW_SYSTEMD M_ROW_FIRST M_ROW_ROTATE M_ROW_BOOT
M_VALUES=()

# matrix_test SUITES CARRIERS
matrix_test() {
	local suites=$1 carriers=$2 s c
	# The proofs run once per suite, in the boot of the first carrier listed.
	M_PROOF_CARRIER=${carriers%% *}
	MWORK="$WORK/matrix"
	MCFG="$MWORK/host.toml"
	mkdir -p -m 0700 "$MWORK" "$MWORK/secrets"
	matrix_write_config
	write_secret "$MWORK/secrets/api-key" "vmcred-test-api-key-initial-$(rand_hex)"
	write_secret "$MWORK/secrets/reloaded" "vmcred-test-reloaded-initial-$(rand_hex)"
	write_secret "$MWORK/secrets/socket-token" "vmcred-test-socket-token-initial-$(rand_hex)"
	M_ENV="vmcred-test-environment-$(rand_hex)"
	M_VALUES+=("$M_ENV")
	write_secret "$MWORK/secrets/environment" "$M_ENV"
	matrix_start_serve || die "vmcred-host serve (matrix) did not start (see $MWORK/serve.log)"
	for s in $suites; do
		use_suite "$s"
		KV=$(cat "$KDIR/version")
		IMG="$WORK/img-$s"
		for c in $carriers; do
			log "boot $s ($(cat "$KDIR/version")) with the bootstrap as $c"
			matrix_boot "$s" "$c"
		done
	done
	stop_pid "$MSERVE_PID"
	local leaks=0 v f
	for f in "$MWORK"/serve.log "$MWORK"/console-*.log "$MWORK"/qemu-*.log "$MWORK"/guest-journal-*.txt "$MWORK"/creds-socket-denied-*.txt; do
		[ -f "$f" ] || continue
		for v in "${M_VALUES[@]}"; do
			grep -qF -- "$v" "$f" && leaks=$((leaks + 1))
		done
	done
	if [ "$leaks" = 0 ]; then
		pass "[matrix] no secret value in the host agent's debug log, the consoles, qemu's output or the proof boots' guest journals"
	else
		fail "[matrix] $leaks secret value(s) found in logs"
	fi
	for s in $suites; do
		for c in $carriers; do
			echo "TIMING: $s (systemd ${M_ROW_SYSTEMD[$s]:-?}) $c: guest up ${M_ROW_BOOT["$s/$c"]:-?} s, launch to first credential used ${M_ROW_FIRST["$s/$c"]:-?} s, rotation ${M_ROW_ROTATE["$s/$c"]:-?} s"
		done
		echo "SECURITY: $s (systemd ${M_ROW_SYSTEMD[$s]:-?}): systemd-analyze security vmcred-guest.service exposure ${M_SECURITY[$s]:-?}"
	done
}
