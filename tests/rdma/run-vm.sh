#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs SCRIPT inside the Soft-RoCE test VM and exits with its exit code. The VM (built and
# cached by build-vm.sh under BIN_DIR/rdma-vm) is QEMU with software emulation (-accel tcg
# -cpu max, so no RDMA or KVM is needed on the host): Debian 12's kernel with Soft-RoCE and
# nested KVM, two network namespaces a (va 10.77.0.1, rxe_a) and b (vb 10.77.0.2, rxe_b)
# joined by a veth pair. BIN_DIR (a cmake build dir) and the project's source tree are
# shared read-only over 9p at their host paths; the shared libraries of every executable in
# BIN_DIR are copied into the VM. Inside, SCRIPT runs as root with FERRY_BIN=BIN_DIR (and
# FERRY_SRC, FERRY_OUT) in its environment. The console is streamed to stdout; on timeout,
# or if the VM dies without reporting a result, this exits non-zero with a message. If the
# VM's own kernel gets stuck (soft lockup, RCU stall: nested KVM under TCG does that now and
# then), the VM is stopped at once and booted once more; stuck twice fails.
#
# Usage: run-vm.sh --bin-dir DIR [--timeout SECONDS] [--mem MB] [--smp N] [--out-dir DIR]
#                  SCRIPT [ARGS...]
#   --bin-dir DIR   cmake build dir with ferryd, ferryctl, ferry-vm, tests (required)
#   --timeout S     kill the VM after S seconds (default 540)
#   --mem MB        VM memory (default 2048)
#   --smp N         VM vCPUs (default 2)
#   --out-dir DIR   a host directory shared read-write, FERRY_OUT inside (logs, results)
# Environment: FERRY_RDMA_VM_DIR overrides where the VM image is built/cached.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

usage() {
	sed -n 's/^# \{0,1\}//; /^Usage:/,/^Environment/p' "$0" | sed '/^set /d' >&2
	exit 2
}

bin_dir='' timeout_s=540 mem=2048 smp=2 out_dir=''
while [ $# -gt 0 ]; do
	case $1 in
	--bin-dir) bin_dir=${2:?}; shift 2 ;;
	--timeout) timeout_s=${2:?}; shift 2 ;;
	--mem) mem=${2:?}; shift 2 ;;
	--smp) smp=${2:?}; shift 2 ;;
	--out-dir) out_dir=${2:?}; shift 2 ;;
	-h | --help) usage ;;
	--) shift; break ;;
	-*) echo "run-vm.sh: unknown option $1" >&2; usage ;;
	*) break ;;
	esac
done
[ -n "$bin_dir" ] && [ $# -ge 1 ] || usage
[ -d "$bin_dir" ] || rdma_die "--bin-dir $bin_dir: not a directory"
[[ $timeout_s =~ ^[0-9]+$ && $mem =~ ^[0-9]+$ && $smp =~ ^[0-9]+$ ]] ||
	rdma_die "--timeout, --mem and --smp take whole numbers"
script=$1
shift
[ -f "$script" ] || rdma_die "$script: no such file"
bin_dir=$(cd "$bin_dir" && pwd)
src_dir=$(cd "$here/../.." && pwd)
if [ -n "$out_dir" ]; then
	mkdir -p "$out_dir"
	out_dir=$(cd "$out_dir" && pwd)
fi

start=$(date +%s)
vm_dir=${FERRY_RDMA_VM_DIR:-$bin_dir/rdma-vm}
"$here/build-vm.sh" "$vm_dir"
ensure_pkgs "${RDMA_HOST_PACKAGES[@]}"

job=$(mktemp -d "${TMPDIR:-/tmp}/ferry-rdma-job.XXXXXX")
trap 'rm -rf "$job"' EXIT

# ---- the job archive: config, the script, the libraries of BIN_DIR's executables ---------
sq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
token=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
name=$(basename "$script")
mkdir -p "$job/root/ferry/job"
install -m 0755 "$script" "$job/root/ferry/job/$name"
{
	echo "FERRY_JOB_TOKEN=$token"
	echo "FERRY_JOB_SCRIPT=$(sq "$name")"
	echo "FERRY_BIN=$(sq "$bin_dir")"
	echo "FERRY_SRC=$(sq "$src_dir")"
	echo "FERRY_OUT=$(sq "$out_dir")"
	printf 'set --'
	for a in "$@"; do printf ' %s' "$(sq "$a")"; done
	echo
} >"$job/root/ferry/job/config"

# ldd (not readelf) because these binaries are for this host: it honours their RUNPATH and
# finds exactly the libraries they run with here. Libraries inside BIN_DIR itself reach the
# VM through the 9p share. Later cpio members overwrite the image's, so these libraries
# (the host's) win over the image's copies of the same files.
mkdir -p "$job/root/usr/lib" "$job/root/usr/lib64"
ln -s usr/lib "$job/root/lib"
ln -s usr/lib64 "$job/root/lib64"
declare -A lib_seen=()
while IFS= read -r -d '' f; do
	is_elf "$f" || continue
	while read -r l; do
		[ -n "$l" ] && [ -z "${lib_seen[$l]:-}" ] || continue
		lib_seen[$l]=1
		case $l in "$bin_dir"/*) continue ;; esac
		copy_with_links "" "$l" "$job/root"
	done < <(ldd "$f" 2>/dev/null | awk '/=> \// {print $3} /^\t\/[^ ]* \(/ {print $1}')
done < <(find "$bin_dir" -path "$vm_dir" -prune -o -type f -perm -u+x -size -200M -print0)
# The merged-/usr symlinks must not replace the image's: drop them from the archive.
rm -f "$job/root/lib" "$job/root/lib64"
(cd "$job/root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --null -o -H newc --quiet 2>/dev/null) >"$job/job.cpio"
cat "$vm_dir/initramfs.img" "$job/job.cpio" >"$job/initrd"

# ---- boot ------------------------------------------------------------------------------
virtfs=(-virtfs "local,path=$bin_dir,mount_tag=ferrybin,security_model=none,readonly=on"
	-virtfs "local,path=$src_dir,mount_tag=ferrysrc,security_model=none,readonly=on")
[ -n "$out_dir" ] &&
	virtfs+=(-virtfs "local,path=$out_dir,mount_tag=ferryout,security_model=none")
console="$job/console.log"
# The VM's own kernel stuck (a soft lockup or an RCU stall): no user program can cause
# that, but nested KVM under TCG's emulated SVM now and then does (a vCPU thread of the
# nested guest stuck in KVM_RUN): about one run of the tier in five, in any of its tests.
stuck_re='soft lockup - CPU|rcu: INFO: rcu_[a-z]* (self-)?detected stall'

# boot SECONDS: runs the VM once; sets qrc and stuck (1 when the VM's kernel got stuck,
# and the VM was stopped at once for it).
boot() {
	: >"$console"
	stuck=0
	# loglevel=5: a soft lockup's stack trace (KERN_DEFAULT) reaches the console.
	timeout --kill-after=10 "$1" \
		qemu-system-x86_64 -accel tcg -cpu max -smp "$smp" -m "${mem}M" \
		-nodefaults -no-reboot -display none -monitor none -serial stdio -nic none \
		-kernel "$vm_dir/vmlinuz" -initrd "$job/initrd" \
		-append "console=ttyS0 panic=-1 loglevel=5 mitigations=off" \
		"${virtfs[@]}" </dev/null >"$console" 2>&1 &
	qpid=$!
	# qemu runs in the background so that a signal to this script (ctest's own timeout,
	# ^C) stops the VM at once instead of after run-vm's timeout; tail streams the console.
	tail -n +1 -f --pid="$qpid" "$console" &
	tpid=$!
	trap 'kill -TERM "$qpid" 2>/dev/null; wait "$qpid"; kill "$tpid" 2>/dev/null; exit 130' INT TERM HUP
	while kill -0 "$qpid" 2>/dev/null; do
		if grep -aqE "$stuck_re" "$console"; then
			sleep 5 # let the trace reach the console
			stuck=1
			kill -TERM "$qpid" 2>/dev/null || true
			break
		fi
		sleep 2
	done
	qrc=0
	wait "$qpid" || qrc=$?
	wait "$tpid" 2>/dev/null || true
	trap - INT TERM HUP
}

rdma_log "booting $(cat "$vm_dir/kernel-version") (tcg, $smp vCPUs, ${mem}M) for $name $*; timeout ${timeout_s}s"
boot "$timeout_s"
if [ "$stuck" = 1 ]; then
	# Once, in what time is left: the same fault twice fails the test.
	left=$((timeout_s - ($(date +%s) - start)))
	echo >&2
	echo "run-vm.sh: the VM's kernel got stuck (nested KVM under TCG: $(tr -d '\r' <"$console" | grep -aoE "$stuck_re" | head -n 1)); that run is void, booting once more (${left}s left)" >&2
	[ "$left" -gt 60 ] || { echo "run-vm.sh: FAILED: no time left for another run" >&2; exit 124; }
	rdma_log "booting again for $name $*; timeout ${left}s"
	boot "$left"
	if [ "$stuck" = 1 ]; then
		echo >&2; echo "run-vm.sh: FAILED: the VM's kernel got stuck again" >&2
		exit 124
	fi
fi
elapsed=$(($(date +%s) - start))

line=$(tr -d '\r' <"$console" | grep -ao "FERRY-RDMA-RESULT $token rc=[0-9]*" | tail -n 1 || true)
if [ -z "$line" ]; then
	if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
		echo >&2; echo "run-vm.sh: TIMEOUT: $name did not finish within ${timeout_s}s; the VM was killed" >&2
	else
		echo >&2; echo "run-vm.sh: FAILED: the VM exited (qemu rc=$qrc) without reporting a result for $name" >&2
	fi
	exit 124
fi
rc=${line##*rc=}
if grep -aq 'FERRY-RDMA-SETUP-FAILED' "$console"; then
	echo "run-vm.sh: FAILED: VM setup failed: $(tr -d '\r' <"$console" | grep -a 'FERRY-RDMA-SETUP-FAILED' | tail -n 1)" >&2
fi
echo "run-vm.sh: $name exited $rc (${elapsed}s including boot)" >&2
exit "$rc"
