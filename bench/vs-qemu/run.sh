#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Description: ferry against QEMU, side by side on one host: the same boot-sector guest
#   (bench/vs-qemu/guest.S: 32-bit protected mode, increments one byte in every page of
#   [1 MiB, 1 MiB + RANGE) forever) is live-migrated over TCP on loopback by QEMU (two
#   qemu-system-x86_64 -accel kvm, driven over QMP by qemu_migrate.py) and by ferry (two
#   ferryd, driven by ferryctl), and total time, downtime and bytes sent are compared.
#   Cases (full / --quick):
#     1  1 GiB guest, 100 MiB range            / 256 MiB guest, 32 MiB range
#     2  4 GiB guest, 1 GiB range              / 1 GiB guest, 256 MiB range
#     3  1 GiB guest, 256 MiB range, both capped at 125 MB/s (1 Gbit/s): the range is
#        dirtied faster than the cap, so only throttling makes it converge; QEMU runs with
#        auto-converge on               / 256 MiB guest, 64 MiB range
#   QEMU configurations (--qemu-variants): on cases 1-2 `default` (stock: dirty bitmap,
#   max-bandwidth left at its default), `ring` (dirty-ring-size=65536 on both sides,
#   max-bandwidth unlimited), `ring-multifd` (ring + multifd, 4 channels), `ring-zstd`
#   (ring-multifd with zstd compression) and `ring-postcopy` (ring + postcopy-ram, postcopy
#   started right after migrate); on case 3 `default-ac` (dirty bitmap) and `ring-ac` (dirty
#   ring), both with auto-converge and max-bandwidth=125000000, `ring-zstd-ac` (ring-ac +
#   multifd zstd) and `ring-postcopy`; on request `log-unlimited` (bitmap, unlimited) and
#   `noac` (bitmap, no auto-converge). --qemu-variants applies to every selected case; on case 3
#   every configuration is capped at 125000000.
#   ferry runs with its defaults (tracker auto, 4 streams, downtime target 300 ms, as
#   QEMU's downtime-limit, scheduler throttling on), capped with --bandwidth 125000000 on
#   case 3; only its own migration timeouts are off (QEMU has none), so --timeout bounds
#   both alike.
#   A migration not finished within --timeout is cancelled and reported as "timeout".
#   After each completed migration the destination must run the guest: QEMU's
#   query-status is "running" and the guest's pass counter (dword at 0x600, read with
#   HMP xp) grows; ferry's VM is "running", its console keeps growing and, for guests of
#   at most 1 GiB, the pass counter grows between two `ferryctl vm dump`s.
#   Prints one table (median over --reps of the completed runs) with the ratios
#   ferry / QEMU against the goals total <= 0.5x, downtime <= 0.1x, bytes <= 0.6x, on two
#   bases: "best" (each metric's minimum over the medians of the QEMU configurations that
#   completed at least once) and "ring" (QEMU's `ring`, `ring-ac` in case 3: the dirty
#   ring, bandwidth unlimited), and the same as CSV (every run, then the summary).
# Usage: run.sh [--build DIR] [--quick] [--case N[,N...]] [--reps N] [--timeout SECONDS]
#          [--warmup SECONDS] [--qemu-variants LIST] [--ferry-tracker auto|ring|bitmap]
#          [--systems qemu,ferry] [--ferry-variants LIST] [--ferry-yaml LINE]...
#          [--csv FILE] [--keep]
#   DIR defaults to $FERRY_BUILD, else ./build (built with cmake if ferryd is missing).
#   --timeout defaults to 300 (60 with --quick). Needs root for /dev/kvm and to install
#   qemu-system-x86 with apt when it is missing. --keep keeps the work dir (logs).
#   --ferry-variants: ferry configurations to run, default `default` (ferry's defaults);
#   `postcopy` allows postcopy and starts it with no precopy round (policy allow_postcopy,
#   postcopy_start early, postcopy_precopy_rounds 0): every written page moves once, after
#   the switch-over; the table names it ferry-TRACKER-postcopy. `zstd` and `postcopy-zstd`
#   are those with `migration.compress: on` (zstd on every link, not only capped ones);
#   compare them with QEMU's `ring-zstd` (--qemu-variants).
#   --ferry-yaml adds a line to both agents' ferryd.yaml, right after the migration
#   section's listen line (so "  streams: 8" sets a migration key, "policy:" opens a
#   section); repeat it for several lines.
set -u

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${FERRY_BUILD:-$repo/build}
quick=0
cases=1,2,3
reps=1
timeout=""
warmup=2
qemu_variants=""
ferry_tracker=auto
csv=""
keep=0
systems=qemu,ferry
ferry_yaml=()
ferry_variants=default
usage() { sed -n '/^# Usage:/,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --case | --cases) cases=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --qemu-variants) qemu_variants=$2; shift 2 ;;
    --ferry-tracker) ferry_tracker=$2; shift 2 ;;
    --ferry-yaml) ferry_yaml+=("$2"); shift 2 ;;
    --ferry-variants) ferry_variants=$2; shift 2 ;;
    --csv) csv=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --systems) systems=$2; shift 2 ;;
    -h | --help) usage ;;
    *) echo "vs-qemu: unknown option $1" >&2; usage ;;
  esac
done

# The ferryd.yaml policy lines of a ferry variant (after the timeouts' "policy:").
ferry_variant_policy() {
  case $1 in
    default | zstd) ;;
    postcopy | postcopy-zstd) printf '%s\n' "  allow_postcopy: true" "  postcopy_start: early" "  postcopy_precopy_rounds: 0" ;;
    *) echo "vs-qemu: unknown ferry variant $1 (default, zstd, postcopy, postcopy-zstd)" >&2; exit 2 ;;
  esac
}
# Its migration-section lines (first in ferryd.yaml's migration section).
ferry_variant_migration() {
  case $1 in
    *zstd) echo "  compress: on" ;;
  esac
}

for fv in ${ferry_variants//,/ }; do ferry_variant_policy "$fv" >/dev/null || exit 2; done
[ -n "$timeout" ] || timeout=$([ $quick = 1 ] && echo 60 || echo 300)
say() { echo "# $*" >&2; }
die() { echo "vs-qemu: $*" >&2; exit 1; }

# ---- dependencies: QEMU (installed here if missing: CI starts clean), jq, python3, as/ld
need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v as >/dev/null && command -v ld >/dev/null || need_pkgs+=(binutils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need_pkgs[*]}; run as root to install them with apt"
  say "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null ||
    die "apt-get install ${need_pkgs[*]} failed"
fi
[ -c /dev/kvm ] || die "no /dev/kvm"
if [ ! -x "$build/agent/ferryd" ] || [ ! -x "$build/agent/ferryctl" ]; then
  say "building ferry in $build"
  if [ "$(id -u)" = 0 ]; then
    # shellcheck source=../../deploy/lib/deps.sh
    . "$repo/deploy/lib/deps.sh" && ferry_install_deps
  fi
  { cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null &&
    cmake --build "$build" -j"$(nproc)" --target ferryd ferryctl >/dev/null; } ||
    die "building ferry in $build failed"
fi
ferryd=$(realpath "$build/agent/ferryd")
ferryctl=$(realpath "$build/agent/ferryctl")
qemu=$(command -v qemu-system-x86_64)

tmp=$(mktemp -d /tmp/ferry-vs-qemu.XXXXXX)
results=$tmp/results.jsonl
: >"$results"
declare -A pid sock listen
cleanup() {
  local p
  for p in "${pid[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ $keep = 1 ]; then echo "# kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- cases: memory, range, cap (bytes/s, 0 = none), QEMU variants
case_mem() { case $quick$1 in 01) echo 1G ;; 02) echo 4G ;; 03) echo 1G ;; 11) echo 256M ;; 12) echo 1G ;; 13) echo 256M ;; esac; }
case_range() { case $quick$1 in 01) echo 100M ;; 02) echo 1G ;; 03) echo 256M ;; 11) echo 32M ;; 12) echo 256M ;; 13) echo 64M ;; esac; }
case_cap() { case $1 in 3) echo 125000000 ;; *) echo 0 ;; esac; }
case_variants() {
  if [ -n "$qemu_variants" ]; then echo "${qemu_variants//,/ }"
  elif [ "$1" = 3 ]; then echo default-ac ring-ac ring-zstd-ac ring-postcopy
  else echo default ring ring-multifd ring-zstd ring-postcopy; fi
}
bytes_of() { numfmt --from=iec "$1"; }
for c in ${cases//,/ }; do
  [ -n "$(case_mem "$c")" ] || die "no case $c (cases are 1, 2, 3)"
done

# ---- the guest: assembled once, then one copy per range with RANGE patched in
as --32 -o "$tmp/guest.o" "$here/guest.S" &&
  ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o "$tmp/guest.bin" "$tmp/guest.o" ||
  die "assembling guest.S failed"
[ "$(stat -c %s "$tmp/guest.bin")" = 512 ] || die "guest.bin is not 512 bytes"
make_image() { # RANGE -> path of a boot sector that dirties [1 MiB, 1 MiB + RANGE)
  local out=$tmp/guest-$1.img
  [ -f "$out" ] || python3 - "$tmp/guest.bin" "$out" "$(bytes_of "$1")" <<'EOF' || die "patching the guest failed"
import struct, sys
img = bytearray(open(sys.argv[1], "rb").read())
assert img[0x1f4:0x1f8] == b"RNGE" and img[510:] == b"\x55\xaa", "no RNGE slot"
rng = int(sys.argv[3])
assert 0 < rng <= 0xfff00000 - 0x100000 and rng % 4096 == 0, "bad range"
img[0x1f8:0x1fc] = struct.pack("<I", rng)
open(sys.argv[2], "wb").write(img)
EOF
  echo "$out"
}

# ---- ferry: a fresh pair of agents per run (as bench/migrate-bench.sh)
. "$(dirname "$0")/../lib.sh"
# No timeouts of ferry's own (QEMU has none): --timeout bounds both systems alike.
no_timeouts=(policy: "  completion_timeout_per_gib: 0" "  progress_timeout: 0")
console_len() { ctl "$1" vm console "$2" 2>/dev/null | wc -c; }
wait_console() { # agent vm text seconds
  local end=$(($(now_ms) + $4 * 1000))
  while [ "$(now_ms)" -lt $end ]; do
    ctl "$1" vm console "$2" 2>/dev/null | grep -q "$3" && return 0
    sleep 0.1
  done
  return 1
}
dump_passes() { # agent vm -> the guest's pass counter (dword at 0x600), via a full dump
  local f
  f=$tmp/dump.$$.$RANDOM
  ctl "$1" vm dump "$2" "$f" >/dev/null 2>&1 || { echo -1; return; }
  od -A n -t u4 -j $((0x600)) -N 4 "$f" | tr -d ' '
  rm -f "$f"
}

# ferry_run CASE REP VARIANT -> appends one JSON line to $results
ferry_run() {
  local c=$1 rep=$2 fv=$3 mem range cap img rc rec id state note="" alive=false
  mem=$(case_mem "$c"); range=$(case_range "$c"); cap=$(case_cap "$c")
  img=$(make_image "$range")
  # --ferry-yaml lines first (they start in the migration section); the timeouts join
  # their policy section if they open one.
  local y=() l pol=0 vp=()
  mapfile -t vp < <(ferry_variant_policy "$fv")
  mapfile -t y < <(ferry_variant_migration "$fv")
  for l in "${ferry_yaml[@]}"; do
    y+=("$l")
    [ "$l" = "policy:" ] && { y+=("${no_timeouts[@]:1}" "${vp[@]}"); pol=1; }
  done
  [ $pol = 1 ] || y+=("${no_timeouts[@]}" "${vp[@]}")
  start_agent src "${y[@]}"
  start_agent dst "${y[@]}"
  local vm=vsq
  ctl src vm create "$vm" --memory "$mem" --vcpus 1 --guest "boot:$img" \
    --tracker "$ferry_tracker" >"$tmp/create.out" 2>&1 || {
    note="vm create failed: $(tr '\n' ' ' <"$tmp/create.out")"
    jq -nc --arg c "$c" --arg r "$rep" --arg n "$note" --arg mem "$mem" --arg range "$range" \
      --arg cap "$cap" '{case: ($c|tonumber), rep: ($r|tonumber), memory: $mem, range: $range,
      cap: ($cap|tonumber), system: "ferry", variant: "ferry", result: "failed", note: $n}' >>"$results"
    stop_agent src; stop_agent dst
    return
  }
  local tracker
  tracker=$(ctl src --json vm show "$vm" | jq -r .tracker)
  wait_console src "$vm" AB 60 || note="guest made no pass in 60 s; "
  sleep "$warmup"
  local args=(--json migrate "$vm" --to "${listen[dst]}" --wait)
  [ "$cap" != 0 ] && args+=(--bandwidth "$cap")
  timeout "$timeout" "$ferryctl" --socket "${sock[src]}" "${args[@]}" >"$tmp/ferry.json" 2>"$tmp/ferry.err"
  rc=$?
  if [ $rc = 124 ]; then
    id=$(ctl src --json migration list | jq -r --arg vm "$vm" \
      '[.migrations[] | select(.vm == $vm)] | max_by(.id) | .id')
    ctl src migration cancel "$id" >/dev/null 2>&1
    for _ in $(seq 200); do
      state=$(ctl src --json migration show "$id" 2>/dev/null | jq -r .state)
      case $state in completed | cancelled | failed) break ;; esac
      sleep 0.05
    done
    ctl src --json migration show "$id" | jq -c '. + {timed_out: true}' >"$tmp/ferry.json"
  fi
  rec=$(jq -c . "$tmp/ferry.json" 2>/dev/null) || rec='{}'
  [ -n "$rec" ] || rec='{}'
  # The scheduler's decisions (builds that have them): how hard it throttled the guest.
  local hist
  hist=$(ctl src --json migration history "$(echo "$rec" | jq -r .id)" 2>/dev/null |
    jq -c '{throttle_level_max: ([.history[].throttle_level] | max),
            slowed_pct_max: ([.history[].vcpus[]?.slowed_pct] | max),
            decisions: (.history | length)}' 2>/dev/null) || hist='{}'
  [ -n "$hist" ] || hist='{}'
  state=$(echo "$rec" | jq -r '.state // "failed"')
  local result=$state passes="[]"
  if [ "$state" = completed ]; then
    # The destination must run the guest; the source must no longer have it.
    local s0 s1 p0 p1 vstate
    vstate=$(ctl dst --json vm show "$vm" | jq -r .state)
    s0=$(console_len dst "$vm"); sleep 1.5; s1=$(console_len dst "$vm")
    if [ "$(bytes_of "$mem")" -le $((1 << 30)) ]; then
      p0=$(dump_passes dst "$vm"); sleep 1; p1=$(dump_passes dst "$vm")
      passes="[$p0,$p1]"
    else
      p0=0; p1=1
    fi
    if [ "$vstate" = running ] && [ "$s1" -gt "$s0" ] && [ "$p1" -gt "$p0" ]; then
      alive=true
    else
      note+="destination: state $vstate, console $s0 -> $s1 bytes, passes $passes; "
    fi
    ctl src vm show "$vm" >/dev/null 2>&1 && note+="source still has the VM; "
  elif echo "$rec" | jq -e .timed_out >/dev/null; then
    result=timeout
  else
    note+="$(echo "$rec" | jq -r '.error // empty') $(tr '\n' ' ' <"$tmp/ferry.err")"
  fi
  echo "$rec" | jq -c --arg c "$c" --arg r "$rep" --arg res "$result" --arg n "$note" \
    --argjson alive $alive --argjson passes "$passes" --arg tr "$tracker" \
    --arg mem "$mem" --arg range "$range" --arg cap "$cap" --argjson hist "$hist" --arg fv "$fv" \
    '{case: ($c|tonumber), rep: ($r|tonumber), memory: $mem, range: $range, cap: ($cap|tonumber),
      system: "ferry", variant: ("ferry-" + $tr + (if $fv == "default" then "" else "-" + $fv end)), result: $res, total_ms: .total_time_ms, downtime_ms: (if .downtime_us then .downtime_us / 1000 else .downtime_ms end), setup_ms: .setup_time_ms,
      bytes: .bytes_sent, rounds: .round, dest_running: $alive, dest_passes: $passes,
      throttle: $hist, decision: .decision,
      note: $n, record: .}' >>"$results"
  [ $keep = 1 ] && cp "$tmp/src/log" "$tmp/ferry-c$c-r$rep-src.log" && cp "$tmp/dst/log" "$tmp/ferry-c$c-r$rep-dst.log"
  stop_agent src
  stop_agent dst
}

# qemu_run CASE REP VARIANT -> appends one JSON line to $results
qemu_run() {
  local c=$1 rep=$2 v=$3 mem range cap img opts=() out
  mem=$(case_mem "$c"); range=$(case_range "$c"); cap=$(case_cap "$c")
  img=$(make_image "$range")
  local bw=100000000000 # "unlimited": 100 GB/s
  [ "$cap" != 0 ] && bw=$cap
  case $v in
    default) ;;
    ring) opts=(--dirty-ring 65536 --max-bandwidth "$bw") ;;
    ring-multifd) opts=(--dirty-ring 65536 --max-bandwidth "$bw" --multifd 4) ;;
    log-unlimited) opts=(--max-bandwidth "$bw") ;;
    default-ac) opts=(--max-bandwidth "$bw" --auto-converge) ;;
    ring-ac) opts=(--dirty-ring 65536 --max-bandwidth "$bw" --auto-converge) ;;
    noac) opts=(--max-bandwidth "$bw") ;;
    ring-postcopy) opts=(--dirty-ring 65536 --max-bandwidth "$bw" --postcopy) ;;
    ring-zstd-ac) opts=(--dirty-ring 65536 --max-bandwidth "$bw" --auto-converge --multifd 4 --multifd-compression zstd) ;;
    ring-zstd) opts=(--dirty-ring 65536 --max-bandwidth "$bw" --multifd 4 --multifd-compression zstd) ;;
    *) die "unknown QEMU variant $v (default, ring, ring-multifd, ring-postcopy, ring-zstd, ring-zstd-ac, log-unlimited, default-ac, ring-ac, noac)" ;;
  esac
  out=$(python3 "$here/qemu_migrate.py" --qemu "$qemu" --img "$img" --memory "$mem" \
    --workdir "$tmp/qemu-c$c-r$rep-$v" --variant "$v" --timeout "$timeout" \
    --warmup "$warmup" "${opts[@]}") || out='{"result":"failed","error":"qemu_migrate.py crashed"}'
  echo "$out" | jq -c --arg c "$c" --arg r "$rep" --arg v "$v" \
    --arg mem "$mem" --arg range "$range" --arg cap "$cap" \
    '{case: ($c|tonumber), rep: ($r|tonumber), memory: $mem, range: $range, cap: ($cap|tonumber),
      system: "qemu", variant: $v,
      result: .result, total_ms, downtime_ms, setup_ms, bytes,
      rounds: .query_migrate.ram["dirty-sync-count"], dest_running: (.dest_running // false),
      dest_passes: (.dest_passes // []),
      guest_dirty_MBps,
      throttle_pct: .query_migrate["cpu-throttle-percentage"],
      max_bandwidth: .params["max-bandwidth"],
      note: (.error // ""), record: .query_migrate}' >>"$results"
}

# ---- the machine
{
  src=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$build/CMakeCache.txt" 2>/dev/null)
  if [ -n "$src" ] && git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
    ver="$(git -C "$src" rev-parse --short HEAD)$(git -C "$src" diff --quiet HEAD -- . 2>/dev/null || echo ' + uncommitted changes')"
  else
    ver="not a git checkout"
  fi
  echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), ferry built in $build from ${src:-?} ($ver), $("$qemu" --version | head -n 1)"
  echo "# $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r), KVM modules: $(ls /sys/module | grep '^kvm' | paste -sd, -)"
  echo "# cases ${cases} ($([ $quick = 1 ] && echo quick || echo full)), reps $reps, timeout ${timeout} s, warm-up ${warmup} s, ferry tracker $ferry_tracker"
} | tee "$tmp/header" >&2

for rep in $(seq "$reps"); do
  for c in ${cases//,/ }; do
    mem=$(case_mem "$c"); range=$(case_range "$c"); cap=$(case_cap "$c")
    say "rep $rep case $c: $mem guest, ${range} range$([ "$cap" != 0 ] && echo ", capped at $cap B/s")"
    for v in $(case ",$systems," in *,qemu,*) case_variants "$c" ;; esac); do
      qemu_run "$c" "$rep" "$v"
      tail -n 1 "$results" | jq -r '"#   qemu \(.variant): \(.result) total \(.total_ms // "-") ms, downtime \(.downtime_ms // "-") ms, \((.bytes // 0) / 1048576 | floor) MiB, sync rounds \(.rounds // "-"), guest dirtied \(.guest_dirty_MBps // "-") MB/s on the source\(if .note != "" then ", " + .note else "" end)"' >&2
    done
    case ",$systems," in *,ferry,*) ;; *) continue ;; esac
    for fv in ${ferry_variants//,/ }; do
      ferry_run "$c" "$rep" "$fv"
      tail -n 1 "$results" | jq -r '"#   ferry (\(.variant)): \(.result) total \(.total_ms // "-") ms (setup \(.setup_ms // "-")), downtime \(.downtime_ms // "-") ms, \((.bytes // 0) / 1048576 | floor) MiB, rounds \(.rounds // "-"), dirty rate \(.record.dirty_rate_pps // "-") pages/s, throttled up to \(.throttle.slowed_pct_max // "-")% (level \(.throttle.throttle_level_max // "-")), last decision \(.decision // "-")\(if .note != "" then ", " + .note else "" end)"' >&2
    done
  done
done

echo
cat "$tmp/header"
python3 "$here/report.py" --results "$results" --quick "$quick" --timeout "$timeout" \
  ${csv:+--csv "$csv"}
