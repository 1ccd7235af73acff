#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# ferry quickstart for a fresh Debian 12 machine, as root: installs the build dependencies
# with apt, builds ferry, starts two agents (ferryd) on loopback, creates a VM running the
# built-in memcheck guest (it verifies its own memory) on the first, live-migrates it to
# the second with ferryctl while it runs — progress bar on a terminal — and prints what
# happened: total time, downtime, bytes, and that the guest found every page intact.
# Safe to run again; everything it starts it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
. deploy/lib/deps.sh
ferry_need_root
ferry_install_deps
ferry_check_kvm

echo "ferry: building (build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target ferryd ferryctl >build/quickstart-build.log 2>&1 \
  || { cat build/quickstart-build.log; exit 1; }

run=$(mktemp -d /tmp/ferry-quickstart.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT
ctl() { local h=$1; shift; "$top/build/agent/ferryctl" --socket "$run/$h.sock" "$@"; }

for h in host-a host-b; do
  cat >"$run/$h.yaml" <<YAML
name: $h
state_dir: $run/$h-state
control:
  socket: $run/$h.sock
migration:
  listen: 127.0.0.1:0
YAML
  "$top/build/agent/ferryd" --config "$run/$h.yaml" 2>"$run/$h.log" &
  pids+=($!)
done
for i in $(seq 100); do
  ctl host-a health >/dev/null 2>&1 && ctl host-b health >/dev/null 2>&1 && break
  sleep 0.1
done
dest=$(ctl host-b --json health | sed -n 's/.*"listen": *"\([^"]*\)".*/\1/p')
echo "ferry: two agents up: host-a and host-b (migration listener $dest)"
echo
echo "ferry: host-a creates VM 'demo': 1 GiB, 2 vCPUs, guest memcheck (each vCPU keeps"
echo "       rewriting and re-verifying 8 MiB of pages; any stale or torn page is reported)"
ctl host-a vm create demo --memory 1G --vcpus 2 --guest memcheck --param wss=8M
for i in $(seq 300); do
  ctl host-a --json vm show demo | grep -q '"passes": *[1-9]' && break
  sleep 0.1
done
ctl host-a vm list
echo
echo "ferry: live-migrating demo from host-a to host-b (verify: SHA-256 of memory on both sides)"
ctl host-a migrate demo --to "$dest" --verify --wait
echo
sleep 3
echo "ferry: on host-b now:"
ctl host-b vm list
echo
echo "ferry: host-a holds: $(ctl host-a --json vm list | tr -d '\n ' )  (empty: the source copy is gone)"
before=$(ctl host-b --json vm show demo | sed -n 's/.*"passes": *\([0-9]*\).*/\1/p')
sleep 3
ctl host-b --json vm show demo | sed -n 's/.*"passes": *\([0-9]*\).*/\1/p;s/.*"guest_errors": *\([0-9]*\).*/\1/p' \
  | { read -r after; read -r errs; echo "ferry: memcheck on host-b: pass $before -> $after in 3 s, $errs errors reported by the guest"; }
echo
echo "ferry: done; both agents stop now. Next: tests/run.sh runs the whole test suite."
