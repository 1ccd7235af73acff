#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Description: smoke test of the Soft-RoCE VM tier, run inside the VM by run-vm.sh. Proves
# what the RDMA transport's tests rely on: both rxe devices exist and are ACTIVE, an RDMA
# connection from rxe_a (10.77.0.1) to rxe_b (10.77.0.2) moves data across the veth (rping
# with payload verification; the devices' counters and the veth's show it really went from
# one device to the other), a plain verbs RC exchange works (ibv_rc_pingpong over
# rxe_a/rxe_b), memory can be pinned without limit, and nested KVM runs a real ferry guest
# (ferry-vm with a dirtier guest and the dirty ring). Exits non-zero on any failure.
fails=0
ok() { echo "ok - $*"; }
notok() {
	echo "not ok - $*"
	fails=$((fails + 1))
}
check() { # description command...
	d=$1
	shift
	if "$@"; then ok "$d"; else notok "$d"; fi
}

echo "# rdma devices"
rdma link show
ibv_devices | tee /tmp/devs
check "ibv_devices lists rxe_a" grep -qw rxe_a /tmp/devs
check "ibv_devices lists rxe_b" grep -qw rxe_b /tmp/devs
rdma system show
for d in rxe_a rxe_b; do
	check "$d port is ACTIVE" sh -c "ibv_devinfo -d $d | grep -q PORT_ACTIVE"
done
check "RLIMIT_MEMLOCK is unlimited" test "$(ulimit -l)" = unlimited
# counter DEV NAME: a per-port counter of a Soft-RoCE device (sent_pkts, rcvd_pkts, ...).
counter() {
	rdma statistic show link "$1/1" | tr ' ' '\n' | grep -A1 -x "$2" | tail -n 1
}
b_rcvd0=$(counter rxe_b rcvd_pkts)
a_rcvd0=$(counter rxe_a rcvd_pkts)
va_tx0=$(cat /sys/class/net/va/statistics/tx_packets)

echo "# rping: server on 10.77.0.2 (rxe_b), client from 10.77.0.1 (rxe_a)"
ip netns exec b rping -s -a 10.77.0.2 -C 3 -v >/tmp/rping-s.log 2>&1 &
srv=$!
sleep 1
ip netns exec a timeout 60 rping -c -a 10.77.0.2 -C 3 -v -V >/tmp/rping-c.log 2>&1
crc=$?
# The server exits by itself after 3 iterations; do not wait forever if it did not.
i=0
while kill -0 $srv 2>/dev/null && [ $i -lt 20 ]; do
	sleep 0.5
	i=$((i + 1))
done
kill $srv 2>/dev/null
wait $srv
src=$?
sed 's/^/  client: /' /tmp/rping-c.log
sed 's/^/  server: /' /tmp/rping-s.log
check "rping client exits 0" test $crc -eq 0
check "rping server exits 0" test $src -eq 0
check "rping client saw 3 verified pings" test "$(grep -c 'ping data' /tmp/rping-c.log)" -ge 3
# Two devices, one wire: rxe_b received what rxe_a sent and the other way round, and the
# packets went through va (not the loopback shortcut of a single device).
check "rxe_b received packets" test "$(counter rxe_b rcvd_pkts)" -gt "${b_rcvd0:-0}"
check "rxe_a received packets" test "$(counter rxe_a rcvd_pkts)" -gt "${a_rcvd0:-0}"
check "the packets crossed the veth" test "$(cat /sys/class/net/va/statistics/tx_packets)" -gt "$((va_tx0 + 10))"

echo "# ibv_rc_pingpong: verbs RC QP, server on rxe_b, client on rxe_a, 50 x 64 KiB"
ip netns exec b timeout 60 ibv_rc_pingpong -d rxe_b -g 1 -n 50 -s 65536 >/tmp/pp-s.log 2>&1 &
srv=$!
sleep 1
ip netns exec a timeout 60 ibv_rc_pingpong -d rxe_a -g 1 -n 50 -s 65536 10.77.0.2 >/tmp/pp-c.log 2>&1
crc=$?
wait $srv
src=$?
sed 's/^/  client: /' /tmp/pp-c.log
sed 's/^/  server: /' /tmp/pp-s.log
check "ibv_rc_pingpong client exits 0" test $crc -eq 0
check "ibv_rc_pingpong server exits 0" test $src -eq 0

echo "# nested KVM"
check "/dev/kvm can be opened" sh -c 'exec 3<>/dev/kvm'
vmbin=
for c in "$FERRY_BIN/agent/ferry-vm" "$FERRY_BIN/ferry-vm"; do
	[ -x "$c" ] && vmbin=$c && break
done
if [ -z "$vmbin" ]; then
	notok "ferry-vm not found under FERRY_BIN=$FERRY_BIN"
else
	timeout 120 "$vmbin" --guest dirtier --memory 64M --vcpus 1 --param wss=4M \
		--param rate=2000 --seconds 2 --quiet-console >/tmp/fvm.log 2>&1
	rc=$?
	sed 's/^/  ferry-vm: /' /tmp/fvm.log
	check "ferry-vm runs a dirtier guest and exits 0" test $rc -eq 0
	check "ferry-vm stopped cleanly" grep -q "VM stopped cleanly" /tmp/fvm.log
	check "the dirty ring saw the guest's writes" \
		sh -c "grep 'dirty rate' /tmp/fvm.log | grep -vq 'dirtied 0 pages'"
fi

echo "# smoke: $fails failed"
[ $fails -eq 0 ]
