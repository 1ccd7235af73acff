#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Description: the scheduler with real ferryd agents, driven with ferryctl.
#   1. admission: with limits.max_outgoing 1 a second migration waits in the queue (its
#      record shows position 1) and starts when the first ends; a destination at
#      limits.max_incoming makes the source wait (queued) and ask again; all complete;
#   2. throttling: a dirtier guest that dirties faster than a tbf-limited link between two
#      network namespaces carries stalls, gets throttled, converges and meets the downtime
#      target; the decisions are in the history; a cancel lifts the throttle;
#   3. policy: a completion timeout with action abort fails the migration with the reason,
#      the VM runs on the source unthrottled;
#   4. evacuation: 6 VMs leave one of 3 namespace hosts for the two others with limits 2/2;
#      never more than 2 out (or in) at once, and all arrive running.
# Usage: test_sched.sh FERRYD FERRYCTL   (FERRY_TEST_KEEP=1 keeps the temp dir)
set -u
ferryd=$(realpath "$1")
ferryctl=$(realpath "$2")

. "$(dirname "$0")/lib.sh"

dirtier() { # agent name memory [params...]
  local a=$1 n=$2 mem=$3; shift 3
  local p args=()
  for p in "$@"; do args+=(--param "$p"); done
  ctl "$a" vm create "$n" --memory "$mem" --vcpus 2 --guest dirtier "${args[@]}" >/dev/null
}
running() { [ "$(state_of "$1" "$2")" = running ]; }
history_has() { # agent id action
  ctl "$1" --json migration history "$2" |
    jq -e --arg a "$3" '[.history[] | select(.action == $a)] | length > 0'
}
throttle_of() { vm_json "$1" "$2" | jq -r '.stats.throttle_pct'; }
wait_decision() { # agent id action seconds
  local i
  for i in $(seq $(($4 * 10))); do
    [ "$(mig_json "$1" "$2" | jq -r .decision)" = "$3" ] && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- 1. admission
# Each migration holds 3 s in precopy (FERRY_TEST_HOLD), so the first is surely still
# running when the second is asked for: round 1 now sends only written pages and would
# otherwise be over in a moment.
FERRY_TEST_HOLD=precopy:3000 start_agent host-a 127.0.0.1:0 "" "limits:" "  max_outgoing: 1"
start_agent host-b 127.0.0.1:0 ""
dirtier host-a q1 256M wss=8M rate=2000
dirtier host-a q2 256M wss=8M rate=2000
# --compress off: a cap turns compression on (auto), and these pages compress so well
# that the cap would not keep the migration slow.
id1=$(ctl host-a --json migrate q1 --to "${listen[host-b]}" --bandwidth 20M --compress off | jq -r .id)
id2=$(ctl host-a --json migrate q2 --to "${listen[host-b]}" | jq -r .id)
mig_json host-a "$id2" >"$tmp/q2.json"
echo "# second: $(jq -c '{state,queue_position}' "$tmp/q2.json")"
check "admission: second migration queued at position 1" \
  jq -e '.state == "queued" and .queue_position == 1' "$tmp/q2.json"
check "admission: first completes" wait_mig_state host-a "$id1" completed 120
check "admission: second starts after it and completes" wait_mig_state host-a "$id2" completed 120
check "admission: q1 runs on host-b" running host-b q1
check "admission: q2 runs on host-b" running host-b q2
stop_agent host-a
stop_agent host-b

start_agent host-a 127.0.0.1:0 ""
start_agent host-b 127.0.0.1:0 "" "limits:" "  max_incoming: 1"
dirtier host-a b1 256M wss=8M rate=2000
dirtier host-a b2 256M wss=8M rate=2000
id1=$(ctl host-a --json migrate b1 --to "${listen[host-b]}" --bandwidth 10M --compress off | jq -r .id)
wait_mig_state host-a "$id1" precopy 20 >/dev/null
id2=$(ctl host-a --json migrate b2 --to "${listen[host-b]}" | jq -r .id)
check "destination busy: the source shows the second waiting" wait_mig_state host-a "$id2" queued 20
echo "# $(mig_json host-a "$id2" | jq -c '{state,decision_reason}')"
check "destination busy: first completes" wait_mig_state host-a "$id1" completed 120
check "destination busy: second completes after it" wait_mig_state host-a "$id2" completed 120
check "destination busy: b2 runs on host-b" running host-b b2
stop_agent host-a
stop_agent host-b

# ---------------------------------------------------------------- 2. throttling
# 80 Mbit/s (10 MB/s) between two namespaces; the dirtier writes a 16 MiB working set at
# tens of MB/s: precopy alone cannot converge.
ns1=ferry-s1-$$ ns2=ferry-s2-$$
if veth_hosts "$ns1" "$ns2" 10.78.0.1 10.78.0.2 80mbit; then
  start_agent host-a 10.78.0.1:7101 "$ns1"
  start_agent host-b 10.78.0.2:7102 "$ns2"
  dirtier host-a hot 512M wss=8M pattern=random
  wait_passes host-a hot 1 60 >/dev/null
  id=$(ctl host-a --json migrate hot --to "${listen[host-b]}" --downtime 300 | jq -r .id)
  check "throttle: the scheduler throttles the stalled migration" wait_decision host-a "$id" throttle 120
  echo "# $(mig_json host-a "$id" | jq -c '{round,decision,decision_reason,throttle}')"
  check "throttle: the source VM is held back" bash -c "[ \"\$1\" -gt 0 ]" _ "$(throttle_of host-a hot)"
  check "throttle: converges and completes" wait_mig_state host-a "$id" completed 240
  mig_json host-a "$id" >"$tmp/hot.json"
  echo "# $(jq -c '{state,round,total_time_ms,downtime_ms,bytes_sent,error}' "$tmp/hot.json")"
  check "throttle: downtime within the 300 ms target" jq -e '.downtime_ms <= 300' "$tmp/hot.json"
  check "throttle: history holds throttle decisions" history_has host-a "$id" throttle
  check "throttle: history ends in switchover" bash -c \
    "$(printf '%q ' "$ferryctl") --socket $(printf '%q' "${sock[host-a]}") --json migration history $id | jq -e '.history[-1].action == \"switchover\"'"
  check "throttle: the guest runs on host-b" running host-b hot
  # Cancel while throttled: the throttle is lifted on the source.
  id=$(ctl host-b --json migrate hot --to "${listen[host-a]}" --downtime 300 | jq -r .id)
  if wait_decision host-b "$id" throttle 120; then
    ok "throttle (way back): throttled again"
    ctl host-b migration cancel "$id" >/dev/null
    check "throttle: cancelled" wait_mig_state host-b "$id" cancelled 30
    check "throttle: lifted after cancel" bash -c "[ \"\$1\" = 0 ]" _ "$(throttle_of host-b hot)"
    check "throttle: the destination discarded its copy" wait_no_vms host-a
    check "throttle: the guest runs on host-b" running host-b hot
  else
    not_ok "throttle (way back): never throttled"
  fi

  # ------------------------------------------------------------ 3. policy
  # 1 s per GiB (a 512 MiB guest counts as 2 GiB: 2 s), abort: gives up on the first tick.
  id=$(ctl host-b --json migrate hot --to "${listen[host-a]}" --completion-timeout 1 \
    --timeout-action abort | jq -r .id)
  check "policy: completion timeout fails the migration" wait_mig_state host-b "$id" failed 60
  mig_json host-b "$id" >"$tmp/abort.json"
  echo "# $(jq -c '{state,error,decision}' "$tmp/abort.json")"
  check "policy: the error names the timeout" jq -e '.error | test("completion|timeout")' "$tmp/abort.json"
  check "policy: the VM runs on the source, unthrottled" bash -c \
    "[ \"\$1\" = running ] && [ \"\$2\" = 0 ]" _ "$(state_of host-b hot)" "$(throttle_of host-b hot)"
  check "policy: postcopy as action without allowing it is refused" bash -c \
    "! $(printf '%q ' "$ferryctl") --socket $(printf '%q' "${sock[host-b]}") migrate hot --to ${listen[host-a]} --timeout-action postcopy --no-postcopy"
  stop_agent host-a
  stop_agent host-b
else
  not_ok "network namespaces: cannot create them here"
fi

# ---------------------------------------------------------------- 4. evacuation
ns3=ferry-s3-$$ ns4=ferry-s4-$$ ns5=ferry-s5-$$
if veth_hosts "$ns3" "$ns4" 10.79.0.1 10.79.0.2 1gbit && ip link add "e$$x" type veth peer name "e$$y" &&
  ip link set "e$$x" netns "$ns3" && ip netns add "$ns5" && netns+=("$ns5") &&
  ip link set "e$$y" netns "$ns5" && ip -n "$ns3" addr add 10.80.0.1/24 dev "e$$x" &&
  ip -n "$ns5" addr add 10.80.0.2/24 dev "e$$y" && ip -n "$ns3" link set "e$$x" up &&
  ip -n "$ns5" link set "e$$y" up && ip -n "$ns5" link set lo up; then
  start_agent host-a 0.0.0.0:7201 "$ns3"
  start_agent host-b 10.79.0.2:7202 "$ns4"
  start_agent host-c 10.80.0.2:7203 "$ns5"
  for i in 1 2 3 4 5 6; do
    ctl host-a vm create "e$i" --memory 128M --vcpus 1 --guest memcheck --param wss=1M >/dev/null
  done
  wait_passes host-a e6 1 60 >/dev/null
  ctl host-a --json evacuate --to "${listen[host-b]},${listen[host-c]}" >"$tmp/evac.json"
  check "evacuate: 6 migrations started" jq -e '[.evacuation[] | select(.migration != null)] | length == 6' "$tmp/evac.json"
  maxout=0 maxb=0 maxc=0
  for i in $(seq 1200); do
    l=$(ctl host-a --json migration list)
    out=$(echo "$l" | jq '[.migrations[] | select(.state | test("setup|precopy|switchover|committing"))] | length')
    inb=$(ctl host-b --json migration list | jq '[.migrations[] | select(.state | test("setup|receiving|dest_ready"))] | length')
    inc=$(ctl host-c --json migration list | jq '[.migrations[] | select(.state | test("setup|receiving|dest_ready"))] | length')
    [ "$out" -gt "$maxout" ] && maxout=$out
    [ "$inb" -gt "$maxb" ] && maxb=$inb
    [ "$inc" -gt "$maxc" ] && maxc=$inc
    [ "$(echo "$l" | jq '[.migrations[] | select(.state | test("completed|failed|cancelled"))] | length')" = 6 ] && break
    sleep 0.1
  done
  echo "# evacuation: at most $maxout out, $maxb into host-b, $maxc into host-c at once"
  check "evacuate: all 6 completed" bash -c "[ \"\$(echo '$l' | jq '[.migrations[] | select(.state == \"completed\")] | length')\" = 6 ]"
  check "evacuate: never more than 2 outgoing at once" test "$maxout" -le 2
  check "evacuate: never more than 2 incoming at once" test "$maxb" -le 2 -a "$maxc" -le 2
  check "evacuate: host-a is empty" no_vms host-a
  nb=$(ctl host-b --json vm list | jq '[.vms[] | select(.state == "running")] | length')
  nc=$(ctl host-c --json vm list | jq '[.vms[] | select(.state == "running")] | length')
  check "evacuate: all 6 run on host-b and host-c ($nb + $nc)" test $((nb + nc)) = 6
  for i in 1 2 3 4 5 6; do
    h=host-b; absent host-b "e$i" && h=host-c
    check "evacuate: e$i goes on without error on $h" guest_goes_on "$h" "e$i"
  done
else
  not_ok "network namespaces: cannot create three hosts here"
fi

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
