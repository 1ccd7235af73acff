# SPDX-License-Identifier: Apache-2.0
# shellcheck shell=sh
# Sourced inside the Soft-RoCE VM by the tier's scripts that run ferryd agents (migrate.sh,
# postcopy.sh): TAP-ish reporting, agents on the two RDMA addresses, ferryctl, and waiting on
# a guest's passes. The caller sets $bin (FERRY_BIN) and $work (a temporary directory) and
# counts failures in $fails.

ok() { echo "ok - $*"; }
not_ok() { echo "not ok - $*"; fails=$((fails + 1)); }
check() { # description command...
	d=$1
	shift
	if "$@" >/dev/null 2>&1; then ok "$d"; else not_ok "$d"; fi
}

# start NAME IP [ENV_ASSIGNMENT [YAML_LINE...]]: ferryd NAME listening on IP:7000 (2 streams);
# YAML_LINEs follow the migration section ("policy:" opens another). Its pid in $pid_NAME.
start() {
	n=$1 ip=$2 env=${3:-FERRY_NOTHING=1}
	shift 2
	[ $# -gt 0 ] && shift
	{
		echo "name: $n"
		echo "log_level: info"
		echo "state_dir: $work/$n-state"
		echo "control:"
		echo "  socket: $work/$n.sock"
		echo "migration:"
		echo "  listen: $ip:7000"
		echo "  streams: 2"
		for l in "$@"; do echo "$l"; done
	} >"$work/$n.yaml"
	env "$env" "$bin/agent/ferryd" --config "$work/$n.yaml" >>"$work/$n.log" 2>&1 &
	eval "pid_$n=$!"
	i=0
	while [ $i -lt 100 ] && ! "$bin/agent/ferryctl" --socket "$work/$n.sock" health >/dev/null 2>&1; do
		sleep 0.1
		i=$((i + 1))
	done
}

# stop NAME: SIGTERM; an agent that has not exited 20 s later is a failure (its threads'
# kernel stacks are printed, then it gets -9).
stop() {
	eval "p=\$pid_$1"
	[ -n "$p" ] || return 0
	kill "$p" 2>/dev/null || return 0
	j=0
	while kill -0 "$p" 2>/dev/null && [ $j -lt 200 ]; do sleep 0.1; j=$((j + 1)); done
	if kill -0 "$p" 2>/dev/null; then
		not_ok "$1 exits on SIGTERM"
		for t in /proc/$p/task/*; do
			echo "# $1 thread $(cat "$t/comm") $(cut -d' ' -f3 "$t/stat") $(cat "$t/wchan" 2>/dev/null)"
			sed 's/^/#     /' "$t/stack" 2>/dev/null | head -8
		done
		kill -9 "$p" 2>/dev/null
	fi
	wait "$p" 2>/dev/null
}

ctl() { n=$1; shift; "$bin/agent/ferryctl" --socket "$work/$n.sock" "$@"; }
passes() { ctl "$1" --json vm show "$2" 2>/dev/null | jq -r '.stats.passes // 0'; }
# wait_passes AGENT VM N SECONDS: wall-clock seconds (a ferryctl call is slow under TCG).
wait_passes() {
	end=$(($(date +%s) + $4))
	while [ "$(date +%s)" -lt $end ]; do
		[ "$(passes "$1" "$2")" -ge "$3" ] 2>/dev/null && return 0
		sleep 0.2
	done
	return 1
}
# goes_on AGENT VM: one more pass, no guest error, running. When not, says what the VM is
# and what its console last printed (a failed VM's reason is there).
goes_on() {
	p=$(passes "$1" "$2")
	if wait_passes "$1" "$2" $((p + 1)) 120 &&
		[ "$(ctl "$1" --json vm show "$2" | jq -r '.stats.guest_errors')" = 0 ] &&
		[ "$(ctl "$1" --json vm show "$2" | jq -r .state)" = running ]; then
		return 0
	fi
	echo "# $2 on $1: $(ctl "$1" --json vm show "$2" 2>&1 | jq -c '{state,failure,stats}' 2>/dev/null)"
	ctl "$1" vm console "$2" 2>/dev/null | tail -n 5 | sed 's/^/#   console: /'
	return 1
}

# jq -e with no value fails (tests/util/jq-e.sh).
. "$FERRY_SRC/tests/util/jq-e.sh"
