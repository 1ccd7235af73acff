#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Description: ferry-vm as an operator runs it: a dirtier guest at a set rate shows a live
# dirty rate near that rate and stops cleanly (exit 0); bad input (unknown guest, bad size,
# bad parameter, impossible shape, malformed image file) exits non-zero with a clear message.
set -u
bin=$1
fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

check() { # description, command...
  local d=$1; shift
  if "$@"; then echo "ok - $d"; else echo "not ok - $d"; fails=$((fails + 1)); fi
}

# 2 vCPUs x 5000 pages/s: the harvested rate should settle near 10000 pages/s.
"$bin" --guest dirtier --memory 128M --vcpus 2 --param rate=5000 --param wss=16M \
  --seconds 3 --quiet-console >"$tmp/out" 2>&1
rc=$?
cat "$tmp/out"
check "dirtier run exits 0" test "$rc" -eq 0
check "stopped cleanly" grep -q "VM stopped cleanly" "$tmp/out"
rate=$(grep -o 'dirty rate *[0-9]*' "$tmp/out" | tail -n 1 | grep -o '[0-9]*$')
echo "last dirty rate: ${rate:-none} pages/s"
check "dirty rate near 10000 pages/s" test "${rate:-0}" -ge 5000 -a "${rate:-0}" -le 15000

expect_fail() { # description, needle, args...
  local d=$1 needle=$2; shift 2
  "$bin" "$@" --seconds 1 >"$tmp/bad" 2>&1
  local r=$?
  if [ "$r" -ne 0 ] && grep -qi -- "$needle" "$tmp/bad"; then
    echo "ok - $d"
  else
    echo "not ok - $d (exit $r)"; cat "$tmp/bad"; fails=$((fails + 1))
  fi
}
expect_fail "unknown guest" "no built-in guest" --guest nosuch
expect_fail "bad memory size" "not a size" --memory 12Q
expect_fail "unknown guest parameter" "wss" --guest dirtier --param colour=blue
expect_fail "0 vCPUs" "at least 1 vCPU" --vcpus 0
expect_fail "unaligned memory" "not a multiple" --memory 1000
printf 'garbage' >"$tmp/img"
expect_fail "malformed flat image" "shorter than" --guest "flat:$tmp/img"
expect_fail "missing image file" "No such file" --guest "boot:$tmp/none"
head -c 4096 /dev/zero >"$tmp/big"
expect_fail "oversized boot sector" "exactly 512" --guest "boot:$tmp/big" --vcpus 1


[ "$fails" -eq 0 ]
