#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# /init of the Soft-RoCE test VM (busybox sh, PID 1). Mounts the pseudo filesystems, loads
# the modules listed in /etc/ferry-modules, mounts the project's source and build trees
# shared by the host over 9p (read-only, at the same absolute paths as on the host), builds
# two "hosts" joined by a veth pair (va 10.77.0.1/24, vb 10.77.0.2/24, with policy routing so
# that traffic between them crosses the veth) with a Soft-RoCE device on each end (rxe_a on
# va, rxe_b on vb) and netns names a and b for both (see below for why), checks
# /dev/kvm, then runs the job that run-vm.sh packed into /ferry/job with FERRY_BIN set and
# prints "FERRY-RDMA-RESULT <token> rc=N" on the console before powering off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
hostname ferry-rdma

# The job: FERRY_JOB_TOKEN, FERRY_JOB_SCRIPT, FERRY_BIN, FERRY_SRC, FERRY_OUT and the
# script's arguments (set -- ...), written by run-vm.sh with every value single-quoted.
. /ferry/job/config

finish() { # rc [reason]
	echo 1 >/proc/sys/kernel/printk
	[ -n "${2:-}" ] && echo "FERRY-RDMA-SETUP-FAILED: $2"
	echo
	echo "FERRY-RDMA-RESULT $FERRY_JOB_TOKEN rc=$1"
	sync
	[ -n "$FERRY_OUT" ] && umount "$FERRY_OUT" 2>/dev/null
	poweroff -f
	echo o >/proc/sysrq-trigger
	sleep 30
}
# Setup failures are failures, never skips: the VM exists to provide these things.
setup_fail() { finish 125 "$*"; }

t0=$(cut -d' ' -f1 /proc/uptime)
echo "ferry-rdma-vm: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"

while read -r ko; do
	[ -n "$ko" ] || continue
	name=$(basename "$ko" .ko)
	grep -q "^$(echo "$name" | tr - _) " /proc/modules && continue
	insmod "$ko" || setup_fail "insmod $ko"
done </etc/ferry-modules

# ---- shared trees ------------------------------------------------------------------------
mount9p() { # tag dir ro|rw
	mkdir -p "$2" 2>/dev/null
	mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,$3" "$1" "$2" ||
		setup_fail "mount 9p $1 on $2"
}
[ -n "$FERRY_SRC" ] && mount9p ferrysrc "$FERRY_SRC" ro
mount9p ferrybin "$FERRY_BIN" ro
[ -n "$FERRY_OUT" ] && mount9p ferryout "$FERRY_OUT" rw

# ---- the two "hosts": va/rxe_a (10.77.0.1) and vb/rxe_b (10.77.0.2) ------------------------
# Soft-RoCE in Linux 6.1 works in the initial network namespace only: its UDP/4791 sockets
# and its route lookups are in init_net, and it refuses to move a device to another
# namespace. With va and vb in namespaces of their own, rdma_cm fails with
# RDMA_CM_EVENT_UNREACHABLE and rxe sends nothing. So both veth ends stay here, and policy
# routing makes traffic between the two addresses cross the veth instead of the loopback
# shortcut: packets to 10.77.0.2 leave by va, packets to 10.77.0.1 leave by vb, and what
# arrives on va or vb is delivered locally (the local table is consulted after our rules).
ip link set lo up || setup_fail "lo up"
# MTU 9000 lets rxe use its largest path MTU (4096): a quarter of the packets of the
# default 1024, and under emulation the cost is per packet.
ip link add va mtu 9000 type veth peer name vb mtu 9000 || setup_fail "veth"
# A veth hands packets to the receive backlog; rxe bursts overflow the default 1000 and
# every drop costs an RC retry timeout.
sysctl -qw net.core.netdev_max_backlog=16384 || setup_fail "sysctl netdev_max_backlog"
for s in all va vb; do
	sysctl -qw net.ipv4.conf.$s.accept_local=1 net.ipv4.conf.$s.rp_filter=0 ||
		setup_fail "sysctl for $s"
done
ip addr add 10.77.0.1/24 dev va && ip link set va up || setup_fail "configure va"
ip addr add 10.77.0.2/24 dev vb && ip link set vb up || setup_fail "configure vb"
{
	ip rule add pref 100 lookup local && ip rule del pref 0 &&
		ip rule add pref 10 iif va lookup local &&
		ip rule add pref 10 iif vb lookup local &&
		ip route add 10.77.0.2 dev va src 10.77.0.1 table 101 &&
		ip route add 10.77.0.1 dev vb src 10.77.0.2 table 102 &&
		ip rule add pref 20 to 10.77.0.2 lookup 101 &&
		ip rule add pref 20 to 10.77.0.1 lookup 102
} || setup_fail "policy routing across the veth"
rdma link add rxe_a type rxe netdev va || setup_fail "rdma link add rxe_a"
rdma link add rxe_b type rxe netdev vb || setup_fail "rdma link add rxe_b"
# Names a and b for scripts written as if each side had a namespace: both are the initial
# namespace (see above), so `ip netns exec a CMD` just runs CMD. They isolate nothing.
mkdir -p /run/netns
ip netns attach a 1 && ip netns attach b 1 || setup_fail "ip netns attach a|b"

[ -c /dev/kvm ] || setup_fail "/dev/kvm is missing (kvm_amd did not come up: is the CPU -cpu max?)"

# Large ibv_reg_mr and io_uring fixed buffers pin memory: no limit here.
ulimit -l unlimited
ulimit -n 65536

t1=$(cut -d' ' -f1 /proc/uptime)
echo "ferry-rdma-vm: ready in ${t1}s since boot (setup $(awk "BEGIN {print $t1 - $t0}")s); running $FERRY_JOB_SCRIPT $*"
echo "FERRY-RDMA-READY"
cd /tmp || setup_fail "cd /tmp"
export FERRY_BIN FERRY_SRC FERRY_OUT FERRY_RDMA_VM=1
export FERRY_RDMA_ADDR_A=10.77.0.1 FERRY_RDMA_DEV_A=rxe_a FERRY_RDMA_NETDEV_A=va
export FERRY_RDMA_ADDR_B=10.77.0.2 FERRY_RDMA_DEV_B=rxe_b FERRY_RDMA_NETDEV_B=vb
/ferry/job/"$FERRY_JOB_SCRIPT" "$@" </dev/null
rc=$?
t2=$(cut -d' ' -f1 /proc/uptime)
echo "ferry-rdma-vm: $FERRY_JOB_SCRIPT exited $rc after $(awk "BEGIN {print $t2 - $t1}")s"
finish $rc
