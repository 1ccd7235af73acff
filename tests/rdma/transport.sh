#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Description: runs the RDMA transport's test binary (tests/unit/test_rdma.c) inside the
# Soft-RoCE VM: the source on rxe_a (10.77.0.1), the destination on rxe_b (10.77.0.2), in
# one process (both addresses live in the VM's one network namespace; see vm-init.sh).
# Run from the host as
#   tests/rdma/run-vm.sh --bin-dir BUILD_DIR tests/rdma/transport.sh [FILTER]
# FILTER, a cmocka glob ("dst_*"), runs only the matching tests.
# FERRY_BIN (set by the VM's init) is that build dir. A skip (77) inside the VM is a
# failure: the VM exists to provide RDMA, so this exits 1 for it.
bin=${FERRY_BIN:?FERRY_BIN is not set: run this through tests/rdma/run-vm.sh}/tests/unit/test_rdma
[ -x "$bin" ] || {
	echo "transport.sh: $bin not built" >&2
	exit 1
}
echo "# rdma devices"
ibv_devices
[ -n "${1:-}" ] && export FERRY_TEST_FILTER="$1"
FERRY_RDMA_SRC_IP=10.77.0.1 FERRY_RDMA_DST_IP=10.77.0.2 "$bin"
rc=$?
if [ $rc -eq 77 ]; then
	echo "transport.sh: test_rdma skipped inside the RDMA VM: that is a failure" >&2
	exit 1
fi
exit $rc
