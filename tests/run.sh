#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs ferry's whole test suite on a fresh Debian 12 machine, as root: installs what it
# needs with apt, builds with -Werror, runs every test with ctest, then builds again with
# AddressSanitizer + UndefinedBehaviorSanitizer and runs the suite there too.
# Under CI (CI=true) a skipped test is a failure: CI must provide what tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
. deploy/lib/deps.sh
ferry_need_root
ferry_install_deps
ferry_check_kvm

jobs=$(nproc)
logdir="$top/build/test-logs"

run_suite() { # name builddir ctest-label-exclude cmake-args...
  local name=$1 dir=$2 exclude=$3
  shift 3
  echo "==== [$name] configure and build in $dir"
  cmake -S "$top" -B "$dir" -DFERRY_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j"$jobs" >"$dir.build.log" 2>&1 || { cat "$dir.build.log"; return 1; }
  echo "==== [$name] ctest"
  mkdir -p "$logdir"
  local rc=0
  ctest --test-dir "$dir" --output-on-failure --timeout 900 ${exclude:+-LE "$exclude"} 2>&1 |
    tee "$logdir/$name.log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "==== [$name] FAILED"
    return "$rc"
  fi
  if [ "${CI:-}" = "true" ] && grep -q '(Skipped)\|\*\*\*Skipped' "$logdir/$name.log"; then
    echo "==== [$name] tests were skipped under CI: CI must install what they need" >&2
    return 1
  fi
}

start=$(date +%s)
run_suite release "$top/build" "" -DCMAKE_BUILD_TYPE=RelWithDebInfo
# The Soft-RoCE VM tier (label rdma) runs once, with the release build: under software
# emulation the sanitised binaries would only slow it past its time limits.
run_suite asan "$top/build-asan" rdma -DCMAKE_BUILD_TYPE=Debug -DFERRY_SANITIZE=ON
echo "==== all suites passed in $(( $(date +%s) - start ))s"
