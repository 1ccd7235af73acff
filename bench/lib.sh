# SPDX-License-Identifier: Apache-2.0
# Sourced by the benchmark harnesses that run real ferryd agents on loopback
# (bench/migrate-bench.sh, bench/vs-qemu/run.sh). The caller sets $tmp (a work dir),
# $ferryd and $ferryctl, and declares the associative arrays sock, pid and listen.
# shellcheck shell=bash

now_ms() { date +%s%3N; }
ctl() { local n=$1; shift; "$ferryctl" --socket "${sock[$n]}" "$@"; }

# start_agent NAME [YAML LINES...]: a fresh agent (own state dir) with its migration
# listener on loopback. The lines are appended right after "migration:\n  listen: ...", so
# "  streams: 4" continues that section and "policy:" starts another. Exits on failure.
start_agent() {
  local name=$1 i l
  shift
  rm -rf "${tmp:?}/$name"
  mkdir -p "$tmp/$name"
  {
    echo "name: $name"
    echo "log_level: info"
    echo "state_dir: $tmp/$name/state"
    echo "control:"
    echo "  socket: $tmp/$name/api.sock"
    echo "migration:"
    echo "  listen: 127.0.0.1:0"
    for l in "$@"; do echo "$l"; done
  } >"$tmp/$name/ferryd.yaml"
  sock[$name]=$tmp/$name/api.sock
  "$ferryd" --config "$tmp/$name/ferryd.yaml" >>"$tmp/$name/log" 2>&1 &
  pid[$name]=$!
  for i in $(seq 100); do
    [ -S "${sock[$name]}" ] && ctl "$name" health >/dev/null 2>&1 && break
    sleep 0.1
  done
  listen[$name]=$(ctl "$name" --json health 2>/dev/null | jq -r .listen)
  if [ -z "${listen[$name]}" ] || [ "${listen[$name]}" = null ]; then
    echo "bench: agent $name did not start:" >&2
    cat "$tmp/$name/log" >&2
    exit 1
  fi
}

stop_agent() {
  [ -n "${pid[$1]:-}" ] || return 0
  kill "${pid[$1]}" 2>/dev/null
  wait "${pid[$1]}" 2>/dev/null
  unset "pid[$1]"
}
