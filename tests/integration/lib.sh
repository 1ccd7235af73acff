# SPDX-License-Identifier: Apache-2.0
# Shared by the integration tests that drive real ferryd agents with ferryctl
# (test_migrate.sh, test_sched.sh): sourced after ferryd/ferryctl are set. Provides a temp
# dir and cleanup (agents killed, namespaces removed), TAP-style checks, agents started
# from generated configs (optionally inside a network namespace), and waits on VMs and
# migrations. Set FERRY_TEST_KEEP=1 to keep the temp dir.
# shellcheck shell=bash
for tool in jq ip tc; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool missing (deploy/lib/deps.sh)"; exit 77; }
done
[ -c /dev/kvm ] || { echo "SKIP: no /dev/kvm"; exit 77; }

tmp=$(mktemp -d /tmp/ferry-test.XXXXXX)
declare -A pid sock listen
netns=()
cleanup() {
  local p n
  for p in "${pid[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  for n in "${netns[@]}"; do ip netns del "$n" 2>/dev/null; done
  if [ -n "${FERRY_TEST_KEEP:-}" ]; then echo "# kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
exec 3>&1 # for notes from inside checks, whose own output is dropped

fails=0
passes=0
ok() { passes=$((passes + 1)); echo "ok - $*"; }
not_ok() { fails=$((fails + 1)); echo "not ok - $*"; }
check() { local d=$1; shift; if "$@" >/dev/null 2>&1; then ok "$d"; else not_ok "$d"; fi; }

# start_agent NAME LISTEN [NETNS] [extra yaml lines...]; env FERRY_TEST_HOLD is passed on.
start_agent() {
  local name=$1 addr=$2 ns=${3:-}
  shift 3 || shift $#
  mkdir -p "$tmp/$name"
  {
    echo "name: $name"
    echo "log_level: info"
    echo "state_dir: $tmp/$name/state"
    echo "control:"
    echo "  socket: $tmp/$name/api.sock"
    echo "migration:"
    echo "  listen: $addr"
    echo "  streams: 2"
    local l
    for l in "$@"; do echo "$l"; done
  } >"$tmp/$name/ferryd.yaml"
  sock[$name]=$tmp/$name/api.sock
  rm -f "${sock[$name]}"
  if [ -n "$ns" ]; then
    ip netns exec "$ns" "$ferryd" --config "$tmp/$name/ferryd.yaml" >>"$tmp/$name/log" 2>&1 &
  else
    "$ferryd" --config "$tmp/$name/ferryd.yaml" >>"$tmp/$name/log" 2>&1 &
  fi
  pid[$name]=$!
  local i
  for i in $(seq 100); do
    [ -S "${sock[$name]}" ] && ctl "$name" health >/dev/null 2>&1 && break
    sleep 0.1
  done
  listen[$name]=$(ctl "$name" --json health | jq -r .listen)
  if [ -z "${listen[$name]}" ] || [ "${listen[$name]}" = null ]; then
    echo "Bail out! $name did not start"; cat "$tmp/$name/log"; exit 1
  fi
  # A wildcard listener is reached through the namespace's address.
  case ${listen[$name]} in 0.0.0.0:*) listen[$name]=${addr%:*}:${listen[$name]##*:} ;; esac
}
stop_agent() { kill "${pid[$1]}" 2>/dev/null; wait "${pid[$1]}" 2>/dev/null; unset "pid[$1]"; }
ctl() { local n=$1; shift; "$ferryctl" --socket "${sock[$n]}" "$@"; }
vm_json() { ctl "$1" --json vm show "$2" 2>/dev/null; }
passes_of() { local j; j=$(vm_json "$1" "$2") && echo "$j" | jq -r '.stats.passes // 0' || echo 0; }
errors_of() { local j; j=$(vm_json "$1" "$2") && echo "$j" | jq -r '.stats.guest_errors // 0' || echo -1; }
state_of() { local j; j=$(vm_json "$1" "$2") && echo "$j" | jq -r .state || echo absent; }
wait_passes() { # agent vm n [seconds]
  local i
  for i in $(seq $((${4:-120} * 10))); do
    [ "$(passes_of "$1" "$2")" -ge "$3" ] 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
# guest_goes_on AGENT VM: two more memcheck passes, no error, running.
guest_goes_on() {
  local p
  p=$(passes_of "$1" "$2")
  wait_passes "$1" "$2" $((p + 2)) && [ "$(errors_of "$1" "$2")" = 0 ] &&
    [ "$(state_of "$1" "$2")" = running ]
}
absent() { [ "$(state_of "$1" "$2")" = absent ]; }
mig_json() { ctl "$1" --json migration show "$2" 2>/dev/null; }
mig_state() { mig_json "$1" "$2" | jq -r .state; }
wait_mig_state() { # agent id state-regex [seconds]
  local i s
  for i in $(seq $((${4:-60} * 20))); do
    s=$(mig_state "$1" "$2")
    [[ $s =~ ^($3)$ ]] && return 0
    sleep 0.05
  done
  echo "# migration $2 on $1 is $s, not $3"
  return 1
}
no_vms() { [ "$(ctl "$1" --json vm list | jq '.vms | length')" = 0 ]; }
wait_no_vms() { local i; for i in $(seq 100); do no_vms "$1" && return 0; sleep 0.1; done; return 1; }
create_memcheck() { # agent name [extra args]
  local a=$1 n=$2; shift 2
  ctl "$a" vm create "$n" --memory 1G --vcpus 4 --guest memcheck --param wss=2M "$@" >/dev/null
}
migrate_ok() { # from to vm [extra]: migrates with --wait --json, checks the record
  local from=$1 to=$2 vm=$3; shift 3
  local rec
  rec=$(ctl "$from" --json migrate "$vm" --to "${listen[$to]}" --wait "$@")
  local rc=$?
  echo "$rec" >"$tmp/last-record.json"
  echo "# $(echo "$rec" | jq -c '{state,round,bytes_sent,pages_normal,pages_zero,total_time_ms,setup_time_ms,downtime_ms,verified,error}')" >&3
  [ $rc = 0 ] && [ "$(echo "$rec" | jq -r .state)" = completed ]
}


# veth_hosts NS1 NS2 IP1 IP2 RATE: two namespaces joined by a veth pair, each end shaped
# by tbf to RATE (e.g. 1gbit). Returns 1 when namespaces cannot be made here.
veth_hosts() {
  local n1=$1 n2=$2 ip1=$3 ip2=$4 rate=$5 va vb
  va="v${n1: -6}a" vb="v${n1: -6}b"
  ip netns add "$n1" 2>/dev/null && ip netns add "$n2" || return 1
  netns+=("$n1" "$n2")
  ip link add "$va" type veth peer name "$vb" || return 1
  ip link set "$va" netns "$n1" && ip link set "$vb" netns "$n2" || return 1
  ip -n "$n1" addr add "$ip1/24" dev "$va" && ip -n "$n2" addr add "$ip2/24" dev "$vb" || return 1
  ip -n "$n1" link set "$va" up && ip -n "$n2" link set "$vb" up || return 1
  ip -n "$n1" link set lo up && ip -n "$n2" link set lo up || return 1
  ip netns exec "$n1" tc qdisc add dev "$va" root tbf rate "$rate" burst 256kb latency 50ms &&
    ip netns exec "$n2" tc qdisc add dev "$vb" root tbf rate "$rate" burst 256kb latency 50ms
}

# jq -e with no value fails (tests/util/jq-e.sh).
. "$(dirname "${BASH_SOURCE[0]}")/../util/jq-e.sh"
