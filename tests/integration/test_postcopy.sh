#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Description: postcopy between real ferryd agents, driven with ferryctl.
#   1. a memcheck guest whose working set is too hot for a 1.5 MB/s cap to converge (and
#      throttling off) is migrated with postcopy allowed: the scheduler chooses postcopy,
#      the VM runs on the destination while its missing pages are fetched and pushed, the
#      migration completes, memcheck goes on there with no error, the source copy is gone;
#   2. postcopy chosen early (policy postcopy_after_rounds 0, then 1) with no cap: each
#      completes, memcheck goes on with no error, only the written pages travel;
#   3. the source agent is killed during postcopy: the destination reports the loss
#      clearly (pages missing, the VM cannot go on) and keeps no half VM.
# Usage: test_postcopy.sh FERRYD FERRYCTL   (FERRY_TEST_KEEP=1 keeps the temp dir)
set -u
ferryd=$(realpath "$1")
ferryctl=$(realpath "$2")

. "$(dirname "$0")/lib.sh"

hot() { # agent: a memcheck guest dirtying ~16 MiB over and over
  ctl "$1" vm create hot --memory 128M --vcpus 2 --guest memcheck --param wss=8M >/dev/null
}
history_actions() { ctl "$1" --json migration history "$2" | jq -r '[.history[].action] | join(",")'; }

# ---------------------------------------------------------------- 1. completes in postcopy
start_agent host-a 127.0.0.1:0 "" "policy:" "  throttle: false"
start_agent host-b 127.0.0.1:0 ""
hot host-a
check "memcheck runs on host-a" wait_passes host-a hot 1 120
# --compress off here and below: a cap turns compression on (auto), and memcheck's pages
# compress so well that the cap would slow nothing.
id=$(ctl host-a --json migrate hot --to "${listen[host-b]}" --bandwidth 1500K --postcopy --compress off | jq -r .id)
check "postcopy: reaches postcopy" wait_mig_state host-a "$id" "postcopy|completed" 240
check "postcopy: completes" wait_mig_state host-a "$id" completed 240
mig_json host-a "$id" >"$tmp/pc.json"
echo "# $(jq -c '{state,round,total_time_ms,downtime_ms,bytes_sent,decision,error}' "$tmp/pc.json")"
echo "# decisions: $(history_actions host-a "$id")"
check "postcopy: the scheduler chose postcopy" bash -c "[[ \"\$1\" == *postcopy ]]" _ "$(history_actions host-a "$id")"
check "postcopy: downtime measured" jq -e '.downtime_ms > 0 and .total_time_ms >= .downtime_ms' "$tmp/pc.json"
check "postcopy: memcheck goes on on host-b with no error" guest_goes_on host-b hot
check "postcopy: host-a holds no copy" absent host-a hot
ctl host-b --json migration list >"$tmp/pcb.json"
check "postcopy: the destination's record is completed" \
  jq -e '[.migrations[] | select(.state == "completed")] | length == 1' "$tmp/pcb.json"
stop_agent host-a
stop_agent host-b

# ------------------------------------------------ 2. early postcopy: after 0 and 1 rounds
# With postcopy_after_rounds the scheduler goes to postcopy on purpose: 0 runs no precopy
# round at all (every page the guest ever wrote is fetched or pushed after the switch), 1
# after the first full copy. Capped at 5 MB/s, so that round 1 leaves more than the
# downtime target can send (else precopy converges first and switches over).
start_agent host-a 127.0.0.1:0 ""
start_agent host-b 127.0.0.1:0 ""
hot host-a
check "early: memcheck runs on host-a" wait_passes host-a hot 1 120
for after in 0 1; do
  from=$([ $after = 0 ] && echo host-a || echo host-b)
  to=$([ $after = 0 ] && echo host-b || echo host-a)
  id=$(ctl $from --json migrate hot --to "${listen[$to]}" --postcopy --postcopy-after $after \
    --bandwidth 5M --compress off | jq -r .id)
  check "early $after: completes" wait_mig_state $from "$id" completed 240
  mig_json $from "$id" >"$tmp/early.json"
  echo "# $(jq -c '{state,round,total_time_ms,downtime_ms,bytes_sent,decision_reason}' "$tmp/early.json")"
  check "early $after: decided by postcopy_after_rounds after $after round(s)" \
    jq -e --argjson n $after '.decision == "postcopy" and .round == $n and
      (.decision_reason | test("postcopy_after_rounds"))' "$tmp/early.json"
  # 128 MiB guest, ~16 MiB written plus the program: far less than the guest goes.
  check "early $after: only written pages travel" \
    jq -e '.bytes_sent > 8388608 and .bytes_sent < 100663296' "$tmp/early.json"
  check "early $after: memcheck goes on on $to with no error" guest_goes_on $to hot
  check "early $after: $from holds no copy" absent $from hot
done
stop_agent host-a
stop_agent host-b

# ---------------------------------------------------------------- 3. source lost in postcopy
start_agent host-a 127.0.0.1:0 "" "policy:" "  throttle: false"
start_agent host-b 127.0.0.1:0 ""
hot host-a
wait_passes host-a hot 1 120 >/dev/null
# 1 MB/s: the pushed pages take long enough to kill the source in the middle.
id=$(ctl host-a --json migrate hot --to "${listen[host-b]}" --bandwidth 1M --postcopy --compress off | jq -r .id)
if wait_mig_state host-a "$id" postcopy 300; then
  ok "lost source: in postcopy"
  kill -9 "${pid[host-a]}"
  wait "${pid[host-a]}" 2>/dev/null
  unset "pid[host-a]"
  for i in $(seq 300); do
    st=$(ctl host-b --json migration list | jq -r '.migrations[0].state')
    [ "$st" = failed ] && break
    sleep 0.1
  done
  ctl host-b --json migration list | jq '.migrations[0]' >"$tmp/lost.json"
  echo "# $(jq -c '{state,error}' "$tmp/lost.json")"
  check "lost source: the destination fails the migration" jq -e '.state == "failed"' "$tmp/lost.json"
  check "lost source: the error says postcopy lost the source, pages missing" \
    jq -e '.error | test("postcopy") and test("missing")' "$tmp/lost.json"
  check "lost source: the destination keeps no half VM" wait_no_vms host-b
else
  not_ok "lost source: never reached postcopy ($(mig_json host-a "$id" | jq -c "{state,error,decision_reason}"))"
fi

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
