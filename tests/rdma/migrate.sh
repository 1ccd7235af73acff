#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Description: live migration over RDMA between two real ferryd agents inside the
# Soft-RoCE VM: agent a on 10.77.0.1 (rxe_a), agent b on 10.77.0.2 (rxe_b). A running
# memcheck guest (nested KVM) moves a -> b with verify mode and transport auto; the record
# must say rdma (and why), the digests matched, the guest goes on with no error on b and is
# gone from a; then it moves back b -> a with transport rdma requested.
# Run from the host as  tests/rdma/run-vm.sh --bin-dir BUILD_DIR tests/rdma/migrate.sh
bin=${FERRY_BIN:?FERRY_BIN is not set: run this through tests/rdma/run-vm.sh}
work=$(mktemp -d /tmp/ferry-rdma.XXXXXX)
fails=0
. "${FERRY_SRC:?FERRY_SRC is not set: run this through tests/rdma/run-vm.sh}/tests/rdma/agents.sh"

move() { # from to transport
	ctl "$1" --json migrate mc --to "$4:7000" --verify --transport "$3" --wait >"$work/rec.json"
	# No record: the migration was refused; a guest that failed under nested KVM says why.
	[ -s "$work/rec.json" ] ||
		echo "# no migration record; mc on $1: $(ctl "$1" --json vm show mc | jq -c '{state,failure}')"
	echo "# $(jq -c '{state,transport,transport_reason,bytes_sent,total_time_ms,downtime_ms,verified,error}' "$work/rec.json")"
	if jq -e '.state == "completed" and .transport == "rdma" and .verified == true' "$work/rec.json" >/dev/null; then
		ok "$1 -> $2 over rdma ($3), digests matched"
	else
		not_ok "$1 -> $2 over rdma ($3)"
		cat "$work/$1.log" "$work/$2.log"
	fi
	if goes_on "$2" mc; then ok "guest goes on on $2 without error"; else not_ok "guest on $2"; fi
	if ctl "$1" vm show mc >/dev/null 2>&1; then not_ok "$1 still holds mc"; else ok "$1 holds no copy"; fi
}

start a 10.77.0.1
start b 10.77.0.2
ctl a vm create mc --memory 64M --vcpus 2 --guest memcheck --param wss=256K >/dev/null ||
	not_ok "create memcheck"
if wait_passes a mc 1 120; then ok "memcheck runs on a"; else not_ok "memcheck never made a pass"; fi
move a b auto 10.77.0.2
move b a rdma 10.77.0.1
stop a
stop b
rm -rf "$work"
echo "$fails failed"
[ "$fails" = 0 ]
