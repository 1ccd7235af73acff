#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Measures guest progress under each dirty-tracking backend when the guest makes K stores
# per page (K = 1, 2, 8): pages written in a fixed time and ring-full exits. On the
# development host (kvm_pvm, shadow paging) the ring needs several ring-full exits per page
# and nearly stalls at K >= 8, while the bitmap backend keeps going; see
# docs/architecture.md. Usage: bench/ring-stall/run.sh [build-dir] [seconds]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../../build}
secs=${2:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-4s %-8s %12s %16s\n' K backend pages ring_full_exits
for k in 1 2 8; do
  gcc -c -DK=$k -o "$tmp/g$k.o" "$here/stores.S"
  objcopy -O binary -j .text "$tmp/g$k.o" "$tmp/g$k.img"
  for b in ring bitmap legacy; do
    "$build/agent/ferry-vm" --guest "flat:$tmp/g$k.img" --memory 16M --vcpus 1 \
      --seconds "$secs" --tracker "$b" >"$tmp/out" 2>&1 || true
    dots=$(grep -v '^\[\|^ferry' "$tmp/out" | tr -cd '.' | wc -c)
    rf=$(grep -o 'ring-full exits [0-9]*' "$tmp/out" | tail -n 1 | grep -o '[0-9]*$' || echo 0)
    printf '%-4s %-8s %12s %16s\n' "$k" "$b" "$((dots * 256))" "$rf"
  done
done
