# SPDX-License-Identifier: Apache-2.0
# shellcheck shell=bash
# Sourced by build-vm.sh and run-vm.sh (host side of the Soft-RoCE VM tier): installs, with
# apt, the Debian 12 packages the tier needs on the host when they are missing (CI starts
# from a clean machine), and resolves the shared libraries an ELF file needs so that they
# can be copied into the VM's initramfs. Nothing here touches apt when everything is
# already installed.

rdma_log() { echo "rdma-vm: $*" >&2; }
rdma_die() {
	echo "rdma-vm: error: $*" >&2
	exit 1
}

# ensure_pkgs PACKAGE...: apt-get install whatever of PACKAGE... is not installed. Waits for
# the dpkg lock (another engineer's or CI's apt run) rather than failing on it.
ensure_pkgs() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
			missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || rdma_die "missing packages ${missing[*]}; install them or run as root"
	rdma_log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 ||
		rdma_die "apt-get update failed"
	apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
		"${missing[@]}" >&2 || rdma_die "apt-get install ${missing[*]} failed"
}

# Host tools the tier uses: qemu to run the VM, depmod/modprobe (kmod) to order the kernel
# modules, cpio to pack the initramfs, readelf (binutils) to resolve libraries of files
# that are not for this host, flock/sha256sum/timeout
# (util-linux, coreutils; present on any Debian) for caching and the time limit.
# shellcheck disable=SC2034 # used by the scripts that source this file
RDMA_HOST_PACKAGES=(qemu-system-x86 kmod cpio binutils util-linux coreutils)

# elf_needed FILE: the DT_NEEDED sonames of FILE, one per line (nothing for a non-ELF file).
elf_needed() {
	readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*Shared library: \[\(.*\)\].*/\1/p'
}

# elf_interp FILE: the ELF interpreter (dynamic loader) FILE asks for, if any.
elf_interp() {
	readelf -l "$1" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p'
}

is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

# resolve_libs ROOT FILE...: prints, one per line, the paths (relative to ROOT, starting
# with /) of every shared library FILE... need, transitively, plus their loader, looked up
# in ROOT's standard library directories the way ld.so would for a Debian amd64 system.
# Sonames that cannot be found are reported on stderr and make it return 1.
resolve_libs() {
	local root=$1
	shift
	local dirs=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /lib /usr/lib)
	local -A seen=()
	local queue=("$@") f so d found rc=0 interp
	while [ ${#queue[@]} -gt 0 ]; do
		f=${queue[0]}
		queue=("${queue[@]:1}")
		interp=$(elf_interp "$f")
		if [ -n "$interp" ] && [ -z "${seen[$interp]:-}" ]; then
			seen[$interp]=1
			echo "$interp"
		fi
		for so in $(elf_needed "$f"); do
			[ -n "${seen[$so]:-}" ] && continue
			seen[$so]=1
			found=
			for d in "${dirs[@]}"; do
				if [ -e "$root$d/$so" ]; then
					found=$d/$so
					break
				fi
			done
			if [ -z "$found" ]; then
				echo "rdma-vm: $f needs $so, not found under ${root:-/}" >&2
				rc=1
				continue
			fi
			echo "$found"
			queue+=("$root$found")
		done
	done
	return $rc
}

# copy_with_links ROOT PATH DEST: copies ROOT/PATH to DEST/PATH, following a chain of
# symlinks so that both the link names and the real file exist in DEST (libfoo.so.1 ->
# libfoo.so.1.2.3). On Debian 12 /lib is a symlink to /usr/lib; DEST keeps the same layout
# so both spellings resolve.
copy_with_links() {
	local root=$1 path=$2 dest=$3 target
	while :; do
		mkdir -p "$dest$(dirname "$path")"
		if [ -L "$root$path" ]; then
			target=$(readlink "$root$path")
			ln -sfn "$target" "$dest$path"
			case $target in
			/*) path=$target ;;
			*) path=$(dirname "$path")/$target ;;
			esac
		else
			cp -f "$root$path" "$dest$path"
			return 0
		fi
	done
}
