#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Description: live migration benchmark between two real ferryd processes on loopback,
#   driven with ferryctl, next to plain loopback TCP throughput (bench/tcp-throughput).
#   Cases, each on a fresh pair of agents:
#     idle   4 GiB guest, 1 vCPU, every page written once (dirtier pattern=seq passes=1:
#            one sequential pass over 4 GiB - 4 MiB, then no more stores), then migrated;
#     dirty  1 GiB guest, 1 vCPU, dirtier wss=256M pattern=random at each --rates value;
#            a migration that has not completed within --timeout is cancelled and reported
#            as "did not converge".
#   Prints one table: total time, downtime, setup time, MiB sent, rounds, effective
#   throughput = bytes_sent / (total_time - setup_time), that throughput as a share of the
#   TCP probe's (of_tcp) and of the same probe writing into a fresh memfd (of_mem: what a
#   destination can absorb into new guest memory; see docs/benchmarks.md), CPU seconds the
#   two agents used during the migration, and the time spent in each round. The probes run
#   right before the idle migration, so the ratios come from one run.
# Usage: migrate-bench.sh [--build DIR] [--cases idle,dirty] [--streams N]
#          [--rates 5000,20000,50000] [--timeout SECONDS] [--tcp-bytes SIZE]
#   DIR defaults to $FERRY_BUILD, else ./build; it must hold agent/ferryd, agent/ferryctl
#   and bench/tcp-throughput. --streams (default 4) goes to every migration (ferryctl migrate
#   --streams) and to the TCP probe. FERRY_BENCH_KEEP=1 keeps the temp dir (agent logs).
set -u

build=${FERRY_BUILD:-build}
cases=idle,dirty
streams=4
rates=5000,20000,50000
timeout=60
tcp_bytes=4G
usage() { sed -n '/^# Usage:/,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --cases) cases=$2; shift 2 ;;
    --streams) streams=$2; shift 2 ;;
    --rates) rates=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --tcp-bytes) tcp_bytes=$2; shift 2 ;;
    -h | --help) usage ;;
    *) echo "migrate-bench: unknown option $1" >&2; usage ;;
  esac
done
ferryd=$(realpath "$build/agent/ferryd")
ferryctl=$(realpath "$build/agent/ferryctl")
tcpprobe=$(realpath "$build/bench/tcp-throughput" 2>/dev/null || echo "$build/bench/tcp-throughput")
for f in "$ferryd" "$ferryctl"; do
  [ -x "$f" ] || { echo "migrate-bench: $f missing (build ferryd and ferryctl)" >&2; exit 1; }
done
command -v jq >/dev/null || { echo "migrate-bench: jq missing (deploy/lib/deps.sh)" >&2; exit 1; }
[ -c /dev/kvm ] || { echo "migrate-bench: no /dev/kvm" >&2; exit 1; }

tmp=$(mktemp -d /tmp/ferry-bench.XXXXXX)
declare -A pid sock listen
cleanup() {
  local p
  for p in "${pid[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ -n "${FERRY_BENCH_KEEP:-}" ]; then echo "# kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

. "$(dirname "$0")/lib.sh"
stop_agents() { stop_agent src; stop_agent dst; }

passes_of() { ctl "$1" --json vm show "$2" 2>/dev/null | jq -r '.stats.passes // 0'; }
wait_passes() { # agent vm n seconds
  local end=$(($(now_ms) + $4 * 1000))
  while [ "$(now_ms)" -lt $end ]; do
    [ "$(passes_of "$1" "$2")" -ge "$3" ] 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

# migrate VM LABEL: starts the migration src -> dst, polls its record every 50 ms (noting
# when each round starts), cancels it after $timeout s. Leaves the final record in
# $tmp/LABEL.json and the round log ("ms_since_start round state bytes_sent") in
# $tmp/LABEL.rounds.
migrate() {
  local vm=$1 label=$2 rec id t0 t s r last="" end c0s c0d
  c0s=$(cpu_ticks "${pid[src]}") c0d=$(cpu_ticks "${pid[dst]}")
  rec=$(ctl src --json migrate "$vm" --to "${listen[dst]}" --streams "$streams") || {
    echo "migrate-bench: $label: migrate refused: $rec" >&2
    echo '{"state":"refused"}' >"$tmp/$label.json"
    return 1
  }
  id=$(echo "$rec" | jq -r .id)
  t0=$(now_ms)
  end=$((t0 + timeout * 1000))
  : >"$tmp/$label.rounds"
  while :; do
    rec=$(ctl src --json migration show "$id" 2>/dev/null) || { sleep 0.05; continue; }
    t=$(now_ms)
    s=$(echo "$rec" | jq -r .state)
    r=$(echo "$rec" | jq -r .round)
    if [ "$r/$s" != "$last" ]; then
      echo "$((t - t0)) $r $s $(echo "$rec" | jq -r .bytes_sent)" >>"$tmp/$label.rounds"
      last=$r/$s
    fi
    case $s in completed | cancelled | failed) break ;; esac
    if [ "$t" -ge $end ]; then
      ctl src migration cancel "$id" >/dev/null 2>&1
      local i
      for i in $(seq 200); do
        s=$(ctl src --json migration show "$id" 2>/dev/null | jq -r .state)
        case $s in completed | cancelled | failed) break ;; esac
        sleep 0.05
      done
      rec=$(ctl src --json migration show "$id")
      rec=$(echo "$rec" | jq -c '. + {timed_out: true}')
      break
    fi
    sleep 0.05
  done
  local hz
  hz=$(getconf CLK_TCK)
  rec=$(echo "$rec" | jq -c --argjson s "$(( $(cpu_ticks "${pid[src]}") - c0s ))" \
    --argjson d "$(( $(cpu_ticks "${pid[dst]}") - c0d ))" --argjson hz "$hz" \
    '. + {cpu_src_s: ($s / $hz), cpu_dst_s: ($d / $hz)}')
  echo "$rec" >"$tmp/$label.json"
}

results=() # one "label|json" per case
add_result() { results+=("$1|$(jq -c . "$tmp/$1.json")"); }

tcp_bps="" mem_bps=""
# probe: the plain TCP yardstick and the same into a fresh memfd (sets tcp_bps, mem_bps).
probe() {
  local j
  if [ ! -x "$tcpprobe" ]; then
    echo "# $tcpprobe missing: no TCP baseline (build the tcp-throughput target)"
    return
  fi
  echo "# tcp-throughput --bytes $tcp_bytes --streams $streams [--into-memfd]"
  j=$("$tcpprobe" --bytes "$tcp_bytes" --streams "$streams" --json) || j=""
  tcp_bps=$(echo "$j" | jq -r .bytes_per_sec)
  sleep 1
  j=$("$tcpprobe" --bytes "$tcp_bytes" --streams "$streams" --into-memfd --json) || j=""
  mem_bps=$(echo "$j" | jq -r .bytes_per_sec)
  echo "# tcp loopback: $(awk -v b="$tcp_bps" 'BEGIN { printf "%.0f MiB/s (%.2f Gbit/s)", b / 1048576, b * 8 / 1e9 }')," \
    "into a fresh memfd: $(awk -v b="$mem_bps" 'BEGIN { printf "%.0f MiB/s", b / 1048576 }')"
}
# cpu_ticks PID: user + system clock ticks the process used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

case ",$cases," in *,idle,*)
  echo "# idle: 4 GiB, 1 vCPU, dirtier wss=4092M pattern=seq passes=1"
  start_agent src "  streams: $streams"
  start_agent dst "  streams: $streams"
  ctl src vm create idle --memory 4G --vcpus 1 --guest dirtier \
    --param wss=4092M --param pattern=seq --param passes=1 >/dev/null || exit 1
  t=$(now_ms)
  if wait_passes src idle 1 300; then
    echo "# idle: first pass over 4 GiB took $(($(now_ms) - t)) ms"
    probe
    sleep 5 # let the probe's freed memory go back to the host, as it was for the probe
    migrate idle idle
    add_result idle
    sed 's/^/#   round log (ms round state bytes_sent): /' "$tmp/idle.rounds"
  else
    echo "migrate-bench: idle guest made no pass in 300 s" >&2
  fi
  stop_agents
  ;;
esac

case ",$cases," in *,dirty,*)
  for rate in ${rates//,/ }; do
    echo "# dirty-$rate: 1 GiB, 1 vCPU, dirtier wss=256M pattern=random rate=$rate"
    start_agent src "  streams: $streams"
    start_agent dst "  streams: $streams"
    ctl src vm create "dirty" --memory 1G --vcpus 1 --guest dirtier \
      --param wss=256M --param pattern=random --param rate="$rate" >/dev/null || exit 1
    sleep 3 # let it reach its rate
    migrate dirty "dirty-$rate"
    add_result "dirty-$rate"
    sed 's/^/#   round log (ms round state bytes_sent): /' "$tmp/dirty-$rate.rounds"
    stop_agents
  done
  ;;
esac

echo
printf '%-12s %-17s %8s %8s %8s %8s %6s %7s %6s %6s %11s\n' case result total_ms down_ms \
  setup_ms sent_MiB rounds MiB/s of_tcp of_mem cpu_src/dst
for row in "${results[@]}"; do
  label=${row%%|*}
  j=${row#*|}
  echo "$j" | jq -r --arg lbl "$label" --arg tcp "${tcp_bps:-0}" --arg mem "${mem_bps:-0}" '
    def n: if . == null then "-" else tostring end;
    (if .state == "completed" then "completed"
     elif .timed_out then "did not converge"
     else .state end) as $res
    | ((.total_time_ms // 0) - (.setup_time_ms // 0)) as $xfer
    | (if $xfer > 0 then .bytes_sent / ($xfer / 1000) else 0 end) as $bps
    | [$lbl, $res, (.total_time_ms | n), (.downtime_ms | n), (.setup_time_ms | n),
       ((.bytes_sent // 0) / 1048576 | . * 10 | round / 10 | tostring), (.round | n),
       ($bps / 1048576 | round | tostring),
       (if ($tcp | tonumber) > 0 and .state == "completed"
        then ($bps / ($tcp | tonumber) * 100 | round | tostring) + "%" else "-" end),
       (if ($mem | tonumber) > 0 and .state == "completed"
        then ($bps / ($mem | tonumber) * 100 | round | tostring) + "%" else "-" end),
       "\(.cpu_src_s // "-")/\(.cpu_dst_s // "-")"]
    | @tsv' | awk -F'\t' '{ printf "%-12s %-17s %8s %8s %8s %8s %6s %7s %6s %6s %11s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 }'
done
for row in "${results[@]}"; do
  label=${row%%|*}
  echo "${row#*|}" | jq -r --arg l "$label" \
    '"# \($l): pages_normal \(.pages_normal), pages_zero \(.pages_zero), streams '"$streams"', transport \(.transport)\(if .error then ", error: \(.error)" else "" end)"'
done
[ -n "$tcp_bps" ] && awk -v b="$tcp_bps" -v m="${mem_bps:-0}" -v s="$streams" \
  'BEGIN { printf "# tcp loopback baseline: %.0f MiB/s with %d stream(s), %.0f MiB/s into a fresh memfd\n", b / 1048576, s, m / 1048576 }'
exit 0
