# SPDX-License-Identifier: Apache-2.0
# shellcheck shell=sh
# Sourced by the shell tests (tests/integration/lib.sh, tests/rdma/agents.sh; POSIX sh, as
# the Soft-RoCE VM's busybox runs it). jq -e exits 0 when its input is empty (jq 1.6,
# Debian 12: no value, nothing tested), so a check on a record file left empty would pass.
# With -e, no output fails (status 4, as jq 1.7 does).
jq() {
	case " $* " in
	*" -e "*)
		_jq_out=$(command jq "$@") || return $?
		[ -n "$_jq_out" ] || { echo "jq -e: no input value" >&2; return 4; }
		printf '%s\n' "$_jq_out"
		;;
	*) command jq "$@" ;;
	esac
}
