#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Description: runs bench/rdma-throughput inside the Soft-RoCE VM (RDMA from rxe_a at
# 10.77.0.1 to rxe_b at 10.77.0.2, TCP over the same veth) and prints its table. Arguments
# go to rdma-throughput. From the host:
#   tests/rdma/run-vm.sh --bin-dir BUILD_DIR tests/rdma/bench.sh [--mib 64] [--qps 1,4]
bin=${FERRY_BIN:?FERRY_BIN is not set: run this through tests/rdma/run-vm.sh}/bench/rdma-throughput
[ -x "$bin" ] || {
	echo "bench.sh: $bin not built" >&2
	exit 1
}
exec "$bin" --src-ip 10.77.0.1 --dst-ip 10.77.0.2 "$@"
