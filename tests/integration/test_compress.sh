#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Description: compressed page data (zstd, protocol v2) between real ferryd processes.
#   1. a running memcheck guest moves host-a -> host-b with --compress on --verify: it
#      completes, the digests match, both records say compression zstd, and fewer bytes
#      went on the wire than the raw page bytes (bytes_sent < pages_normal * 4096, and
#      < bytes_uncompressed); the guest goes on without an error;
#   2. back with --compress off: compression none, reason "compress off", no saving;
#   3. compress auto (the default) without a bandwidth cap: none, reason "no bandwidth
#      cap"; with --bandwidth: zstd;
#   4. optional, with FERRY_V1_FERRYD set to a ferryd that speaks only protocol 1: a v2
#      source asking for compression migrates to it uncompressed (reason names protocol 1),
#      and back from it.
# Usage: test_compress.sh FERRYD FERRYCTL   (FERRY_TEST_KEEP=1 keeps the temp dir)
set -u
ferryd=$(realpath "$1")
ferryctl=$(realpath "$2")

. "$(dirname "$0")/lib.sh"

# The incoming record of the last migration on agent $1.
incoming_record() {
  ctl "$1" --json migration list | jq '[.migrations[] | select(.direction == "incoming")] | max_by(.id)'
}

start_agent host-a 127.0.0.1:0 ""
start_agent host-b 127.0.0.1:0 ""
create_memcheck host-a mc
check "memcheck runs on host-a" wait_passes host-a mc 2

# ---------------------------------------------------------------- 1. on
check "compress on: migrate host-a -> host-b (verify)" migrate_ok host-a host-b mc --compress on --verify
cp "$tmp/last-record.json" "$tmp/on.json"
echo "# $(jq -c '{compression,compression_reason,bytes_sent,bytes_uncompressed,pages_normal}' "$tmp/on.json")"
check "compress on: record says zstd, verified" jq -e '.compression == "zstd" and .verified == true' "$tmp/on.json"
check "compress on: fewer wire bytes than raw page bytes" jq -e \
  '.bytes_sent > 0 and .bytes_sent < .pages_normal * 4096 and .bytes_sent < .bytes_uncompressed' "$tmp/on.json"
incoming_record host-b >"$tmp/in.json"
check "compress on: destination record says zstd" jq -e \
  '.compression == "zstd" and .state == "completed"' "$tmp/in.json"
check "compress on: guest goes on on host-b, no error" guest_goes_on host-b mc
check "compress on: host-a holds no copy" absent host-a mc

# ---------------------------------------------------------------- 2. off
check "compress off: migrate host-b -> host-a (verify)" migrate_ok host-b host-a mc --compress off --verify
cp "$tmp/last-record.json" "$tmp/off.json"
echo "# $(jq -c '{compression,compression_reason,bytes_sent,bytes_uncompressed,pages_normal}' "$tmp/off.json")"
check "compress off: record says none (off requested)" jq -e \
  '.compression == "none" and (.compression_reason | test("compress off")) and .verified == true' "$tmp/off.json"
check "compress off: wire bytes at least the raw page bytes" jq -e \
  '.bytes_sent >= .pages_normal * 4096 and .bytes_sent == .bytes_uncompressed' "$tmp/off.json"
check "compress off: guest goes on on host-a" guest_goes_on host-a mc

# ---------------------------------------------------------------- 3. auto
check "compress auto, no cap: migrate host-a -> host-b" migrate_ok host-a host-b mc
check "compress auto, no cap: none, no bandwidth cap" jq -e \
  '.compression == "none" and (.compression_reason | test("no bandwidth cap"))' "$tmp/last-record.json"
check "compress auto, capped: migrate host-b -> host-a" migrate_ok host-b host-a mc --bandwidth 400M --verify
check "compress auto, capped: zstd, bandwidth capped" jq -e \
  '.compression == "zstd" and (.compression_reason | test("bandwidth capped")) and .verified == true' \
  "$tmp/last-record.json"
check "compress auto, capped: guest goes on" guest_goes_on host-a mc

# ---------------------------------------------------------------- 4. a protocol-1 peer
if [ -n "${FERRY_V1_FERRYD:-}" ]; then
  ferryd_v2=$ferryd
  ferryd=$(realpath "$FERRY_V1_FERRYD")
  start_agent host-v1 127.0.0.1:0 ""
  ferryd=$ferryd_v2
  check "v1 peer: migrate host-a -> host-v1 with --compress on" migrate_ok host-a host-v1 mc --compress on --verify
  check "v1 peer: none, the destination speaks protocol 1" jq -e \
    '.compression == "none" and (.compression_reason | test("protocol 1"))' "$tmp/last-record.json"
  check "v1 peer: guest goes on on host-v1" guest_goes_on host-v1 mc
  rec=$(ctl host-v1 --json migrate mc --to "${listen[host-a]}" --wait --verify)
  check "v1 peer: migrate back host-v1 -> host-a" test "$(echo "$rec" | jq -r .state)" = completed
  incoming_record host-a >"$tmp/in.json"
  check "v1 peer: host-a's record says none" jq -e \
    '.compression == "none" and (.compression_reason | test("protocol 1"))' "$tmp/in.json"
  check "v1 peer: guest goes on on host-a" guest_goes_on host-a mc
else
  echo "# skipping the protocol-1 peer (set FERRY_V1_FERRYD to a v1 ferryd)"
fi

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
