#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# ferry quickstart for a fresh Debian 12 machine, as root: installs the build dependencies
# with apt, builds ferry, then starts a VM running the built-in "dirtier" guest with ferry's
# VMM, shows its console and the dirty tracker's live dirty rate for a few seconds, and
# stops it cleanly. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib/deps.sh
ferry_need_root
ferry_install_deps
ferry_check_kvm

echo "ferry: building (build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target ferry-vm >build/quickstart-build.log 2>&1 \
  || { cat build/quickstart-build.log; exit 1; }

cat <<'MSG'

ferry: starting a VM: 2 vCPUs, 512 MiB, built-in guest "dirtier" (each vCPU rewrites its
       own 64 MiB working set at 20,000 pages/s, sequentially). The dirty tracker is the
       KVM dirty ring; every half second ferry harvests it and prints the live dirty rate.
       Expect about 2 x 20,000 = 40,000 pages/s.

MSG
build/agent/ferry-vm --guest dirtier --memory 512M --vcpus 2 \
  --param wss=64M --param pattern=seq --param rate=20000 --seconds 6
echo
echo "ferry: done. Next: tests/run.sh runs the whole test suite."
