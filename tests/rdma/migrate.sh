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
pids=""
ok() { echo "ok - $*"; }
not_ok() { echo "not ok - $*"; fails=$((fails + 1)); }

start() { # name ip
	cat >"$work/$1.yaml" <<EOC
name: $1
log_level: info
state_dir: $work/$1-state
control:
  socket: $work/$1.sock
migration:
  listen: $2:7000
  streams: 2
EOC
	"$bin/agent/ferryd" --config "$work/$1.yaml" >"$work/$1.log" 2>&1 &
	pids="$pids $!"
	i=0
	while [ $i -lt 100 ] && ! "$bin/agent/ferryctl" --socket "$work/$1.sock" health >/dev/null 2>&1; do
		sleep 0.1
		i=$((i + 1))
	done
}
ctl() { n=$1; shift; "$bin/agent/ferryctl" --socket "$work/$n.sock" "$@"; }
passes() { ctl "$1" --json vm show "$2" 2>/dev/null | jq -r '.stats.passes // 0'; }
wait_passes() { # agent vm n seconds
	i=0
	while [ $i -lt $(($4 * 10)) ]; do
		[ "$(passes "$1" "$2")" -ge "$3" ] 2>/dev/null && return 0
		sleep 0.1
		i=$((i + 1))
	done
	return 1
}
goes_on() { # agent vm: one more pass, no guest error, running
	p=$(passes "$1" "$2")
	wait_passes "$1" "$2" $((p + 1)) 120 &&
		[ "$(ctl "$1" --json vm show "$2" | jq -r '.stats.guest_errors')" = 0 ] &&
		[ "$(ctl "$1" --json vm show "$2" | jq -r .state)" = running ]
}
move() { # from to transport
	ctl "$1" --json migrate mc --to "$4:7000" --verify --transport "$3" --wait >"$work/rec.json"
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
kill $pids 2>/dev/null
wait
rm -rf "$work"
echo "$fails failed"
[ "$fails" = 0 ]
