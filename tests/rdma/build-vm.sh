#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the Soft-RoCE test VM into OUTDIR: Debian 12's stock kernel (OUTDIR/vmlinuz) and an
# initramfs (OUTDIR/initramfs.img) holding busybox, dash, bash, iproute2, rdma-core's
# verbs/rdmacm libraries with the rxe provider, rping/ibv_* tools, perftest, strace, and the
# kernel modules for Soft-RoCE (rdma_rxe and the IB core), veth, nested KVM (kvm_amd) and 9p
# over virtio. Everything comes from Debian packages fetched with `apt-get download` and
# unpacked with dpkg-deb; nothing is installed on the host but the tools to build and run the
# VM. The result is cached: when OUTDIR/stamp matches the inputs (these scripts and the
# package list) nothing is done: the first run costs 15-30 s, later ones nothing.
# Usage: build-vm.sh OUTDIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

[ $# -eq 1 ] || rdma_die "usage: build-vm.sh OUTDIR"
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Debian packages unpacked into the staging tree; their dependency closure is added below.
# linux-image-amd64 is the metapackage: it names the current 6.1 kernel package. (Not
# rdma-core: its udev rules and daemons are of no use here, and it pulls in systemd.)
VM_PACKAGES=(busybox-static dash bash iproute2 ibverbs-providers libibverbs1
	librdmacm1 ibverbs-utils rdmacm-utils perftest strace jq libjq1 libonig5)
# Binaries copied from the staging tree into the image (busybox supplies the rest):
# iproute2 (ip, rdma, ss, tc), rdma-core's examples, perftest for baseline figures, strace.
VM_BINARIES=(/bin/dash /usr/bin/dash /bin/bash /usr/bin/bash /bin/ip /sbin/ip /usr/bin/ip
	/sbin/rdma /usr/bin/rdma /bin/ss /sbin/tc
	/usr/bin/rping /usr/bin/ucmatose /usr/bin/udaddy /usr/bin/rdma_server /usr/bin/rdma_client
	/usr/bin/ib_acme /usr/bin/ibv_devices /usr/bin/ibv_devinfo /usr/bin/ibv_rc_pingpong
	/usr/bin/ibv_ud_pingpong /usr/bin/ibv_srq_pingpong /usr/bin/ibv_uc_pingpong
	/usr/bin/ib_write_bw /usr/bin/ib_write_lat /usr/bin/ib_read_bw /usr/bin/ib_read_lat
	/usr/bin/ib_send_bw /usr/bin/ib_send_lat /usr/bin/strace /usr/bin/jq)
# Modules loaded at boot, in this order (each with its dependencies first). crc32_generic
# must precede rdma_rxe: rxe asks the crypto API for "crc32" at device creation, which is no
# symbol dependency that depmod could see.
VM_MODULES=(crc32_generic rdma_rxe ib_uverbs rdma_ucm veth kvm_amd virtio_pci 9pnet_virtio 9p)

inputs_hash() {
	{
		cat "$here/build-vm.sh" "$here/lib.sh" "$here/vm-init.sh"
		printf '%s\n' "${VM_PACKAGES[@]}" "${VM_MODULES[@]}"
	} | sha256sum | cut -d' ' -f1
}

# One builder at a time per OUTDIR (ctest -j may start several VM tests at once).
exec 8>"$out/.lock"
flock 8
want=$(inputs_hash)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$want" ] &&
	[ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.img" ]; then
	exit 0
fi

ensure_pkgs "${RDMA_HOST_PACKAGES[@]}"
t0=$(date +%s)
rm -f "$out/stamp"
work="$out/work"
rm -rf "$work"
mkdir -p "$work/debs" "$work/stage" "$work/kernel"

# ---- fetch the .debs ---------------------------------------------------------------------
rdma_log "fetching Debian packages"
apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || rdma_die "apt-get update failed"
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kpkg" ] || rdma_die "cannot tell which kernel linux-image-amd64 depends on"
closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
	--no-breaks --no-replaces --no-enhances "${VM_PACKAGES[@]}" |
	grep -v '^ ' | grep -v '^<' | sort -u)
# apt-get download writes into the current directory; as root it warns that the _apt user
# cannot write there, which is harmless. $closure is a list of names: split it.
# shellcheck disable=SC2086
(cd "$work/debs" && apt-get download "$kpkg" $closure >/dev/null 2>"$work/download.log") ||
	{
		cat "$work/download.log" >&2
		rdma_die "apt-get download failed"
	}
for deb in "$work/debs"/*.deb; do
	case $(basename "$deb") in
	linux-image-*) dpkg-deb -x "$deb" "$work/kernel" ;;
	*) dpkg-deb -x "$deb" "$work/stage" ;;
	esac
done

# ---- kernel and modules --------------------------------------------------------------------
kver=$(ls "$work/kernel/lib/modules")
[ -f "$work/kernel/boot/vmlinuz-$kver" ] || rdma_die "no vmlinuz in $kpkg"
depmod -b "$work/kernel" "$kver"
root="$work/root"
mkdir -p "$root"
# Merged-/usr layout as on Debian 12, so both /lib/... and /usr/lib/... paths resolve.
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/lib64"
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
mkdir -p "$root"/{dev,proc,sys,tmp,run,etc,mnt,root,var} "$root/lib/modules/$kver"
ln -s ../run "$root/var/run"
: >"$root/etc/ferry-modules"
declare -A have_mod=()
for m in "${VM_MODULES[@]}"; do
	while read -r _ ko _; do
		rel=${ko#"$work/kernel"}
		[ -n "${have_mod[$rel]:-}" ] && continue
		have_mod[$rel]=1
		mkdir -p "$root$(dirname "$rel")"
		cp "$ko" "$root$rel"
		echo "$rel" >>"$root/etc/ferry-modules"
	done < <(modprobe -d "$work/kernel" -S "$kver" --show-depends "$m" | grep '^insmod ')
done
cp "$work/kernel/lib/modules/$kver"/modules.{order,builtin} "$root/lib/modules/$kver/" 2>/dev/null || true

# ---- userspace ---------------------------------------------------------------------------
cp "$work/stage/bin/busybox" "$root/usr/bin/busybox"
for b in $("$root/usr/bin/busybox" --list); do
	[ -e "$root/usr/bin/$b" ] || ln -s busybox "$root/usr/bin/$b"
done
elves=()
for b in "${VM_BINARIES[@]}"; do
	[ -f "$work/stage$b" ] && [ ! -L "$work/stage$b" ] || continue
	# iproute2's ip and rdma replace busybox's applets of the same name.
	rm -f "$root/usr/bin/$(basename "$b")"
	cp "$work/stage$b" "$root/usr/bin/"
	elves+=("$work/stage$b")
done
# /bin/sh is dash, not busybox: Debian's static busybox runs its own applets in preference
# to PATH, so under its sh `ip` would be busybox's (no netns) instead of iproute2's.
ln -sfn dash "$root/usr/bin/sh"
for need in dash ip rdma rping ibv_devices bash jq; do
	[ -f "$root/usr/bin/$need" ] && [ ! -L "$root/usr/bin/$need" ] ||
		rdma_die "$need is missing from the staged packages"
done
# The rxe verbs provider: libibverbs dlopen()s it by the name in /etc/libibverbs.d.
mkdir -p "$root/etc/libibverbs.d"
cp "$work/stage/etc/libibverbs.d/rxe.driver" "$root/etc/libibverbs.d/"
for p in "$work/stage"/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so; do
	copy_with_links "$work/stage" "${p#"$work/stage"}" "$root"
	elves+=("$p")
done
# Libraries: librdmacm is dlopen()ed by nothing we copy but linked by rping; resolve_libs
# follows DT_NEEDED only, so everything is named explicitly or reached through it.
libs=$(resolve_libs "$work/stage" "${elves[@]}") || rdma_die "unresolved libraries (above)"
for l in $libs; do
	copy_with_links "$work/stage" "$l" "$root"
done
# iproute2 reads these tables; rdma tool needs none. A passwd so that tools printing user
# names do not complain.
mkdir -p "$root/etc/iproute2"
cp -r "$work/stage/usr/share/iproute2/." "$root/etc/iproute2/" 2>/dev/null || true
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
printf '127.0.0.1 localhost\n10.77.0.1 node-a\n10.77.0.2 node-b\n' >"$root/etc/hosts"

install -m 0755 "$here/vm-init.sh" "$root/init"
echo "$kver" >"$root/etc/ferry-kernel"

# ---- pack ----------------------------------------------------------------------------------
# Uncompressed (20 MB): run-vm.sh appends the job's own cpio, and the kernel does not find
# the start of an archive that follows a zstd-compressed one.
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
	cpio --null -o -H newc --quiet --reproducible 2>/dev/null) >"$out/initramfs.img.new"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initramfs.img.new" "$out/initramfs.img"
echo "$kver" >"$out/kernel-version"
rm -rf "$work"
echo "$want" >"$out/stamp"
rdma_log "built $out (kernel $kver, initramfs $(du -h "$out/initramfs.img" | cut -f1)) in $(($(date +%s) - t0))s"
