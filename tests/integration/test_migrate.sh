#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Description: live migration between real ferryd processes, driven with ferryctl.
#   1. loopback: a running memcheck guest (4 vCPUs, 1 GiB) moves from host-a to host-b with
#      digest verification; the guest goes on with no error, the source copy is gone; then
#      back and forth three more times; a guest still writing fresh memory during round 1
#      arrives whole (digests);
#   2. two hosts: the same between two network namespaces joined by a veth pair whose
#      link tbf limits to 1 Gbit/s;
#   3. cancel in every state before the commit (setup, precopy round 1, round 2, switch-over):
#      the VM runs on the source, memcheck reports no error, the destination holds nothing;
#   4. the destination refuses (a VM of that name exists, not enough memory, at its
#      incoming limit): the record carries a clear error and the VM is untouched;
#   5. kill -9 of the destination agent mid-precopy, then of the source agent mid-precopy:
#      the VM runs on the source / the destination holds no orphan.
# Usage: test_migrate.sh FERRYD FERRYCTL   (FERRY_TEST_KEEP=1 keeps the temp dir)
set -u
ferryd=$(realpath "$1")
ferryctl=$(realpath "$2")

. "$(dirname "$0")/lib.sh"

# ---------------------------------------------------------------- 1. loopback
start_agent host-a 127.0.0.1:0 ""
start_agent host-b 127.0.0.1:0 ""
create_memcheck host-a mc
check "memcheck runs on host-a" wait_passes host-a mc 2
check "migrate host-a -> host-b (verify)" migrate_ok host-a host-b mc --verify
check "record: downtime (ms and µs), total and setup time, bytes" jq -e \
  '.downtime_ms > 0 and .total_time_ms >= .downtime_ms and .setup_time_ms >= 0 and .bytes_sent > 0 and .verified == true
   and .downtime_us >= .downtime_ms * 1000 and .downtime_us < (.downtime_ms + 1) * 1000' \
  "$tmp/last-record.json"
check "guest goes on on host-b, no error" guest_goes_on host-b mc
check "host-a holds no copy" absent host-a mc
from=host-b to=host-a
for i in 1 2 3; do
  check "back and forth $i: $from -> $to" migrate_ok $from $to mc --verify
  check "back and forth $i: guest goes on, no error" guest_goes_on $to mc
  check "back and forth $i: $from holds no copy" absent $from mc
  t=$from; from=$to; to=$t
done

# Round 1 leaves out pages that are holes in the source's memfd (never written). A guest
# still writing fresh memory while round 1 runs must arrive whole all the same: migrated
# right after it was created, its first pass over 2 x 96 MiB under way, round 1 held to
# 100 MB/s (uncompressed) so the guest writes ahead of the sender, verified by digests.
ctl host-a vm create fresh --memory 512M --vcpus 2 --guest memcheck --param wss=96M >/dev/null
check "fresh pages written during round 1 arrive (verify)" migrate_ok host-a host-b fresh \
  --verify --bandwidth 100M --compress off --downtime 5000
check "fresh pages written during round 1: guest goes on, no error" guest_goes_on host-b fresh
ctl host-b vm delete fresh >/dev/null 2>&1

# ---------------------------------------------------------------- 3. cancel in every state
# host-a holds mc now. Hold the source in each state so the cancel lands there.
cancel_in() { # state-to-hold  description
  local hold=$1 what=$2 id
  stop_agent host-a
  FERRY_TEST_HOLD="$hold:4000" start_agent host-a 127.0.0.1:0 ""
  # host-a restarted: recreate the guest there (its VMs died with it).
  ctl host-a vm delete mc >/dev/null 2>&1
  create_memcheck host-a mc
  wait_passes host-a mc 1 || { not_ok "cancel in $what: guest did not start"; return; }
  id=$(ctl host-a --json migrate mc --to "${listen[host-b]}" --bandwidth 200M | jq -r .id)
  wait_mig_state host-a "$id" "$hold" 30 || { not_ok "cancel in $what: never reached $hold"; return; }
  check "cancel in $what: accepted" ctl host-a migration cancel "$id"
  check "cancel in $what: record says cancelled" wait_mig_state host-a "$id" cancelled 30
  check "cancel in $what: guest goes on on the source" guest_goes_on host-a mc
  check "cancel in $what: destination holds nothing" wait_no_vms host-b
}
# host-b holds mc after the loop above: bring it home first.
migrate_ok host-b host-a mc >/dev/null
cancel_in setup "setup"
cancel_in precopy "precopy round 1"
cancel_in switchover "switch-over before commit"
# Round 2: a guest that dirties faster than a 20 MB/s cap keeps precopy going (uncompressed:
# the dirtier's pages compress so well that auto compression would finish at once).
stop_agent host-a
start_agent host-a 127.0.0.1:0 ""
ctl host-a vm create dz --memory 256M --vcpus 2 --guest dirtier --tracker bitmap >/dev/null
id=$(ctl host-a --json migrate dz --to "${listen[host-b]}" --bandwidth 20M --downtime 1 --compress off | jq -r .id)
for i in $(seq 600); do
  [ "$(mig_json host-a "$id" | jq -r .round)" -ge 2 ] 2>/dev/null && break
  sleep 0.05
done
check "cancel in precopy round 2: accepted" ctl host-a migration cancel "$id"
check "cancel in precopy round 2: cancelled" wait_mig_state host-a "$id" cancelled 30
check "cancel in precopy round 2: dirtier runs on the source" \
  test "$(state_of host-a dz)" = running
check "cancel in precopy round 2: destination holds nothing" wait_no_vms host-b
ctl host-a vm delete dz >/dev/null

# ---------------------------------------------------------------- 4. refusals
refused() { # description needle: migrates mc host-a -> host-c, expects failure with needle
  local what=$1 needle=$2
  ctl host-a --json migrate mc --to "${listen[host-c]}" --wait >"$tmp/refused.json"
  echo "# $(jq -c '{state,error}' "$tmp/refused.json")"
  check "refused ($what): failed with a clear error" \
    jq -e --arg n "$needle" '.state == "failed" and (.error | test($n))' "$tmp/refused.json"
  check "refused ($what): VM untouched on the source" guest_goes_on host-a mc
}
create_memcheck host-a mc
wait_passes host-a mc 1
start_agent host-c 127.0.0.1:0 "" "limits:" "  max_memory: 512M"
refused "out of memory" "512 MiB|exceed"
stop_agent host-c
start_agent host-c 127.0.0.1:0 "" "limits:" "  max_incoming: 0"
refused "at its migration limit" "limit"
stop_agent host-c
start_agent host-c 127.0.0.1:0 ""
ctl host-c vm create mc --memory 64M --vcpus 1 --guest dirtier >/dev/null
refused "name taken" "exists"
stop_agent host-c

# ---------------------------------------------------------------- 5. kill -9
# The source holds 3 s in precopy; the destination dies meanwhile.
stop_agent host-a
FERRY_TEST_HOLD="precopy:3000" start_agent host-a 127.0.0.1:0 ""
create_memcheck host-a mc
wait_passes host-a mc 1
stop_agent host-b
start_agent host-b 127.0.0.1:0 ""
id=$(ctl host-a --json migrate mc --to "${listen[host-b]}" | jq -r .id)
wait_mig_state host-a "$id" precopy 30
kill -9 "${pid[host-b]}"; wait "${pid[host-b]}" 2>/dev/null; unset "pid[host-b]"
check "kill -9 destination mid-precopy: migration fails" wait_mig_state host-a "$id" failed 60
echo "# $(mig_json host-a "$id" | jq -c '{state,error}')"
check "kill -9 destination mid-precopy: guest goes on on the source" guest_goes_on host-a mc

# The source holds in precopy while the destination has the incoming VM; the source dies.
start_agent host-b 127.0.0.1:0 ""
stop_agent host-a
FERRY_TEST_HOLD="precopy:60000" start_agent host-a 127.0.0.1:0 ""
create_memcheck host-a mc2
wait_passes host-a mc2 1
id=$(ctl host-a --json migrate mc2 --to "${listen[host-b]}" | jq -r .id)
wait_mig_state host-a "$id" precopy 30
for i in $(seq 100); do [ "$(state_of host-b mc2)" = incoming ] && break; sleep 0.1; done
check "kill -9 source mid-precopy: destination had the incoming VM" \
  test "$(state_of host-b mc2)" = incoming
kill -9 "${pid[host-a]}"; wait "${pid[host-a]}" 2>/dev/null; unset "pid[host-a]"
check "kill -9 source mid-precopy: destination discards it (no orphan)" wait_no_vms host-b
stop_agent host-b

# SIGTERM on the source mid-precopy: the agent cancels the outgoing migration (the VM is
# never half-migrated), exits 0 promptly, and the destination keeps nothing.
start_agent host-b 127.0.0.1:0 ""
FERRY_TEST_HOLD="precopy:60000" start_agent host-a 127.0.0.1:0 ""
create_memcheck host-a mc3
wait_passes host-a mc3 1
id=$(ctl host-a --json migrate mc3 --to "${listen[host-b]}" | jq -r .id)
wait_mig_state host-a "$id" precopy 30
t0=$(date +%s%N)
kill -TERM "${pid[host-a]}"
wait "${pid[host-a]}"
rc=$?
unset "pid[host-a]"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "# SIGTERM: exit $rc after $ms ms"
check "SIGTERM mid-migration: source exits 0" test "$rc" = 0
check "SIGTERM mid-migration: within 10 s" test "$ms" -lt 10000
check "SIGTERM mid-migration: log says the migration was cancelled" \
  grep -q "migration $id.*cancelled" "$tmp/host-a/log"
check "SIGTERM mid-migration: destination keeps nothing" wait_no_vms host-b
stop_agent host-b

# ---------------------------------------------------------------- 2. two hosts, 1 Gbit/s
ns1=ferry-t$$-1 ns2=ferry-t$$-2
if ip netns add "$ns1" 2>/dev/null && ip netns add "$ns2"; then
  netns+=("$ns1" "$ns2")
  ip link add "v$$a" type veth peer name "v$$b"
  ip link set "v$$a" netns "$ns1"
  ip link set "v$$b" netns "$ns2"
  ip -n "$ns1" addr add 10.77.0.1/24 dev "v$$a"
  ip -n "$ns2" addr add 10.77.0.2/24 dev "v$$b"
  for n in "$ns1" "$ns2"; do ip -n "$n" link set lo up; done
  ip -n "$ns1" link set "v$$a" up
  ip -n "$ns2" link set "v$$b" up
  ip netns exec "$ns1" tc qdisc add dev "v$$a" root tbf rate 1gbit burst 256kb latency 50ms
  ip netns exec "$ns2" tc qdisc add dev "v$$b" root tbf rate 1gbit burst 256kb latency 50ms
  start_agent h1 10.77.0.1:7000 "$ns1"
  start_agent h2 10.77.0.2:7000 "$ns2"
  create_memcheck h1 mc
  check "two hosts: memcheck runs on h1" wait_passes h1 mc 2
  check "two hosts: migrate h1 -> h2 over 1 Gbit/s (verify)" migrate_ok h1 h2 mc --verify
  check "two hosts: rate stayed under the link" jq -e '.bytes_sent / (.total_time_ms / 1000) < 140000000' "$tmp/last-record.json"
  check "two hosts: guest goes on on h2, no error" guest_goes_on h2 mc
  check "two hosts: h1 holds no copy" absent h1 mc
  check "two hosts: migrate back h2 -> h1" migrate_ok h2 h1 mc --verify
  check "two hosts: guest goes on on h1" guest_goes_on h1 mc
else
  not_ok "two hosts: cannot create network namespaces"
fi

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
