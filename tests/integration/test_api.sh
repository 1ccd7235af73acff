#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Description: ferryd's control API and ferryctl against real agents. Starts two ferryd
# (host-a with the unix socket and the TLS listener, host-b as a migration destination) in
# a temporary directory and
#   1. runs every example of docs/api.md in order and checks each answer against the page
#      (rules at the end of docs/api.md), so a doc example that stops working fails here;
#   2. throws bad input at the API: malformed JSON, wrong types, unknown and missing fields,
#      huge bodies, unknown VMs and routes, wrong methods, bad query values, bad migration
#      requests, many concurrent event feeds; the agent must answer each with the right
#      status and code and stay healthy;
#   3. drives ferryctl (create/list/show/console/pause/resume/dump/delete/events, --json
#      output parses, exit codes 1 and 2);
#   4. checks ferryd --check-config, command-line overrides, stale and live sockets;
#   5. SIGTERM with an events feed open: the feed ends with agent.shutdown, ferryd exits 0
#      within seconds and removes its socket.
# Usage: test_api.sh FERRYD FERRYCTL DOCS/API.MD   (FERRY_TEST_KEEP=1 keeps the temp dir)
set -u
ferryd=$(realpath "$1")
ferryctl=$(realpath "$2")
doc=$(realpath "$3")

for tool in curl jq openssl; do
  if ! command -v "$tool" >/dev/null; then
    echo "SKIP: $tool is not installed (deploy/lib/deps.sh installs it)"
    exit 77
  fi
done
if [ ! -c /dev/kvm ] || ! { exec 9<>/dev/kvm; } 2>/dev/null; then
  echo "SKIP: /dev/kvm is missing or not accessible"
  exit 77
fi
exec 9>&-

tmp=$(mktemp -d /tmp/ferry-api.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ -n "${FERRY_TEST_KEEP:-}" ]; then echo "# kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
mkdir -p "$tmp/dumps" "$tmp/tls" "$tmp/bin" "$tmp/ex"
ln -s "$ferryctl" "$tmp/bin/ferryctl"

fails=0
passes=0
ok() { passes=$((passes + 1)); echo "ok - $*"; }
not_ok() { fails=$((fails + 1)); echo "not ok - $*"; }
check() { # description, command...: passes when the command succeeds (its output is dropped)
  local d=$1; shift
  if "$@" >/dev/null; then ok "$d"; else not_ok "$d"; fi
}

# ---------------------------------------------------------------- agents

# TLS material: a CA, host-a's server certificate (for 127.0.0.1) and a client certificate.
(
  cd "$tmp/tls" || exit 1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=ferry test CA" -keyout ca.key -out ca.pem
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=host-a" -keyout server.key -out server.csr
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile server.ext -out server.pem
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=orchestrator" -keyout client.key -out client.csr
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -out client.pem
) >"$tmp/tls/openssl.log" 2>&1 || { cat "$tmp/tls/openssl.log"; echo "Bail out! openssl"; exit 1; }

cat >"$tmp/host-a.yaml" <<EOF
name: host-a
log_level: info
control:
  socket: $tmp/run/host-a.sock
  tcp: 127.0.0.1:0
migration:
  listen: 127.0.0.1:0
tls:
  cert: $tmp/tls/server.pem
  key: $tmp/tls/server.key
  ca: $tmp/tls/ca.pem
EOF

# start_agent LOG ARGS...: starts ferryd, waits for its "ready" line; sets $agent_pid.
start_agent() {
  local log=$1; shift
  "$ferryd" "$@" 2>"$log" &
  agent_pid=$!
  pids+=("$agent_pid")
  local i
  for i in $(seq 100); do
    grep -q '^ferryd: ready:' "$log" 2>/dev/null && return 0
    kill -0 "$agent_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "ferryd did not start:"; cat "$log"
  return 1
}
ready_field() { grep -o "$2=[^ ]*" "$1" | head -n 1 | cut -d= -f2-; }

start_agent "$tmp/host-a.log" --config "$tmp/host-a.yaml" || { echo "Bail out!"; exit 1; }
A_PID=$agent_pid
# host-b from flags alone: the overrides are part of what is tested.
start_agent "$tmp/host-b.log" --name host-b --socket "$tmp/run/host-b.sock" \
  --listen 127.0.0.1:0 --log-level debug || { echo "Bail out!"; exit 1; }
B_PID=$agent_pid
SOCK_A=$tmp/run/host-a.sock
SOCK_B=$tmp/run/host-b.sock
A_LISTEN=$(ready_field "$tmp/host-a.log" migration)
B_LISTEN=$(ready_field "$tmp/host-b.log" migration)
TLS_ADDR=$(ready_field "$tmp/host-a.log" api | sed -n 's/.*tls:\(.*\)/\1/p')
echo "# host-a: socket $SOCK_A, migrations $A_LISTEN, TLS $TLS_ADDR"
echo "# host-b: socket $SOCK_B, migrations $B_LISTEN"
check "host-a printed its socket and listen address" test -n "$A_LISTEN" -a -n "$TLS_ADDR"
check "unix socket has mode 0660" test "$(stat -c %a "$SOCK_A")" = 660

# api METHOD PATH [BODY] [curl args...]: one request to host-a; sets $status, body in
# $tmp/body, headers in $tmp/hdrs.
api() {
  local method=$1 path=$2 body=${3-}
  shift 2; [ $# -gt 0 ] && shift
  local args=(-s -S -X "$method" --unix-socket "$SOCK_A" -D "$tmp/hdrs" -o "$tmp/body"
              -w '%{http_code}' -H 'Expect:')
  [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data-binary "$body")
  status=$(curl "${args[@]}" "$@" "http://localhost$path" 2>"$tmp/curl.err")
}

# ---------------------------------------------------------------- comparison rules

# The doc's placeholders become this run's values.
subst() {
  sed -e "s#/run/ferry/ferryd.sock#$SOCK_A#g" -e "s#host-b:7000#$B_LISTEN#g" \
      -e "s#10.0.0.1:7000#$A_LISTEN#g" -e "s#host-a:7443#$TLS_ADDR#g" \
      -e "s#/var/lib/ferry/dumps/#$tmp/dumps/#g"
}

# JSON documents match when they have the same fields, recursively, of the same types;
# null matches anything; error codes must be equal. Prints the differences.
JQ_SHAPE='
def diff($e; $a; $p):
  if $e == null or $a == null then empty
  elif ($e|type) != ($a|type) then "\($p): documented \($e|type), got \($a|type)"
  elif ($e|type) == "object" then
    ((($e|keys) - ($a|keys))[] | "\($p).\(.): documented but missing"),
    ((($a|keys) - ($e|keys))[] | "\($p).\(.): present but not documented"),
    (($e|keys)[] as $k | select($a|has($k)) | diff($e[$k]; $a[$k]; "\($p).\($k)"))
  elif ($e|type) == "array" then
    range(0; [($e|length), ($a|length)] | min) as $i | diff($e[$i]; $a[$i]; "\($p)[\($i)]")
  else empty end;
def code($d): $d | objects | .error | objects | .code;
'
json_diff() { # expected-file actual-file
  jq -r -n --slurpfile e "$1" --slurpfile a "$2" "$JQ_SHAPE"'
    if ($e|length) != 1 or ($a|length) != 1 then "not one JSON document"
    else diff($e[0]; $a[0]; ""),
      (if code($e[0]) != null and code($e[0]) != code($a[0])
       then "error.code: documented \(code($e[0])), got \(code($a[0]))" else empty end)
    end' 2>&1
}

# Each documented event must match, by type and fields, an event that arrived.
ndjson_diff() {
  jq -r -n --slurpfile e "$1" --slurpfile a "$2" "$JQ_SHAPE"'
    $e[] as $ev
    | if any($a[]; .type == $ev.type and ([diff($ev; .; "")] | length) == 0) then empty
      else "no event like \($ev | tojson)" end' 2>&1
}

# Prometheus text: every documented # line appears; every documented series exists with
# the same label names.
prom_diff() {
  local line name labels found al
  while IFS= read -r line; do
    [ -z "$line" ] && continue
    if [ "${line:0:1}" = "#" ]; then
      grep -Fxq -- "$line" "$2" || echo "missing line: $line"
      continue
    fi
    name=${line%%[{ ]*}
    labels=$(grep -o '[a-z_]*="' <<<"${line%% [0-9]*}" | tr -d '="' | tr '\n' ,)
    found=0
    while IFS= read -r al; do
      [ "${al%%[{ ]*}" = "$name" ] || continue
      [ "$(grep -o '[a-z_]*="' <<<"${al%% [0-9]*}" | tr -d '="' | tr '\n' ,)" = "$labels" ] &&
        { found=1; break; }
    done <"$2"
    [ $found = 1 ] || echo "no series $name{$labels}"
  done <"$1"
}

# Text: whitespace runs count as one space; "..." in a line matches any text; a line of
# just "..." allows any number of other lines. Each documented line must match a line of
# the output (in any order: guest vCPUs print concurrently).
text_diff() {
  local el al pat n_e=0 n_a found any=0
  mapfile -t act < <(sed -e 's/[[:space:]]\+/ /g' -e 's/ $//' "$2" | sed -e '/./,$!d')
  while IFS= read -r el; do
    if [ "$el" = "..." ]; then any=1; continue; fi
    n_e=$((n_e + 1))
    pat=${el//\\/\\\\}; pat=${pat//\*/\\*}; pat=${pat//\?/\\?}; pat=${pat//\[/\\[}
    pat=${pat//.../*}
    found=0
    for al in "${act[@]}"; do
      # shellcheck disable=SC2053 # $pat is a pattern on purpose
      if [[ $al == $pat ]]; then found=1; break; fi
    done
    [ $found = 1 ] || echo "no output line like: $el"
  done < <(sed -e 's/[[:space:]]\+/ /g' -e 's/ $//' "$1" | sed -e '/./,$!d')
  n_a=${#act[@]}
  if [ $any = 0 ] && [ "$n_a" != "$n_e" ]; then
    echo "documented $n_e lines, got $n_a"
  fi
}

body_diff() { # content-type expected-file actual-file
  case "$1" in
    application/json*) json_diff "$2" "$3" ;;
    application/x-ndjson*) ndjson_diff "$2" "$3" ;;
    *version=0.0.4*) prom_diff "$2" "$3" ;;
    *) text_diff "$2" "$3" ;;
  esac
}

# ---------------------------------------------------------------- 1. docs/api.md

# Split the page into its fenced http and console blocks, in order.
awk -v dir="$tmp/ex" '
  /^```/ {
    if (state) { if (state == 1) close(out); state = 0; next }
    lang = substr($0, 4)
    if (lang == "http" || lang == "console") {
      n++; out = sprintf("%s/%03d.%s", dir, n, lang); printf "" > out; state = 1
    } else state = 2
    next
  }
  state == 1 { print > out }' "$doc"

# run_http REQUEST-FILE RESPONSE-FILE
run_http() {
  local req=$1 resp=$2 method path line hdrs=() ctype="" estatus d
  subst <"$req" >"$tmp/req"
  subst <"$resp" >"$tmp/resp"
  read -r method path _ <"$tmp/req"
  # request headers up to the blank line, then the body
  while IFS= read -r line; do
    [ -z "$line" ] && break
    hdrs+=(-H "$line")
  done < <(tail -n +2 "$tmp/req")
  awk 'f; /^$/ && !f { f = 1 }' "$tmp/req" >"$tmp/req.body"
  estatus=$(awk 'NR == 1 { print $2 }' "$tmp/resp")
  awk 'NR > 1 && /^$/ { exit } NR > 1' "$tmp/resp" >"$tmp/resp.hdrs"
  awk 'f; /^$/ && !f { f = 1 }' "$tmp/resp" >"$tmp/resp.body"
  ctype=$(grep -i '^content-type:' "$tmp/resp.hdrs" | cut -d: -f2- | sed 's/^ *//')
  local args=(-s -S -X "$method" --unix-socket "$SOCK_A" -D "$tmp/got.hdrs"
              -o "$tmp/got.body" -w '%{http_code}' -H 'Expect:' "${hdrs[@]}")
  [ -s "$tmp/req.body" ] && args+=(--data-binary "@$tmp/req.body")
  [[ $ctype == application/x-ndjson* ]] && args+=(--max-time 3)
  # A GET is retried for a while: what it reads (a console line, a state) may lag.
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local got
    got=$(curl "${args[@]}" "http://localhost$path" 2>"$tmp/curl.err")
    d=""
    [ "$got" = "$estatus" ] || d="status: documented $estatus, got $got"
    while IFS= read -r line; do
      [ -z "$line" ] && continue
      local hn=${line%%:*} hv
      hv=$(sed 's/^[^:]*: *//' <<<"$line")
      local gv
      gv=$(grep -i "^$hn:" "$tmp/got.hdrs" | head -n 1 | sed -e 's/^[^:]*: *//' -e 's/\r$//')
      if [[ $hv =~ ^[0-9]+$ ]]; then
        [[ $gv =~ ^[0-9]+$ ]] || d+=$'\n'"header $hn: documented a number, got '$gv'"
      elif [ "$gv" != "$hv" ]; then
        d+=$'\n'"header $hn: documented '$hv', got '$gv'"
      fi
    done <"$tmp/resp.hdrs"
    if [[ $ctype == application/x-ndjson* ]] && [ -n "$(tail -c 1 "$tmp/got.body")" ]; then
      sed -i '$d' "$tmp/got.body" # the cut-off last line
    fi
    if [ -s "$tmp/resp.body" ] || [ -s "$tmp/got.body" ]; then
      local bd
      bd=$(body_diff "$ctype" "$tmp/resp.body" "$tmp/got.body")
      [ -n "$bd" ] && d+=$'\n'"$bd"
    fi
    [ -z "$d" ] && break
    [ "$method" = GET ] && [[ $ctype != application/x-ndjson* ]] || break
    sleep 0.3
  done
  if [ -z "$d" ]; then
    ok "docs/api.md: $method $path -> $estatus"
  else
    not_ok "docs/api.md: $method $path"
    sed -e '/^$/d' -e 's/^/#   /' <<<"$d"
    echo "#   got:"; head -c 2000 "$tmp/got.body" | sed 's/^/#   | /'
  fi
}

# run_console FILE: "$ command" lines, each followed by its expected output.
run_console() {
  local n=0 cmd="" line
  : >"$tmp/con.exp"
  run_one() {
    [ -z "$cmd" ] && return
    local rc d
    (cd "$tmp/tls" && PATH="$tmp/bin:$PATH" FERRY_SOCKET="$SOCK_A" bash -c "$cmd") \
      >"$tmp/con.out" 2>&1
    rc=$?
    d=""
    [ $rc = 0 ] || d="exit status $rc"
    if jq -e . "$tmp/con.exp" >/dev/null 2>&1 && [ -s "$tmp/con.exp" ]; then
      d+=$(json_diff "$tmp/con.exp" "$tmp/con.out")
    else
      d+=$(text_diff "$tmp/con.exp" "$tmp/con.out")
    fi
    if [ -z "$d" ]; then
      ok "docs/api.md: \$ $cmd"
    else
      not_ok "docs/api.md: \$ $cmd"
      sed -e '/^$/d' -e 's/^/#   /' <<<"$d"
      echo "#   got:"; head -c 2000 "$tmp/con.out" | sed 's/^/#   | /'
    fi
    : >"$tmp/con.exp"
  }
  while IFS= read -r line; do
    if [ "${line:0:2}" = '$ ' ]; then
      run_one
      cmd=${line:2}
      n=$((n + 1))
    else
      printf '%s\n' "$line" >>"$tmp/con.exp"
    fi
  done < <(subst <"$1")
  run_one
}

examples=("$tmp"/ex/*)
check "docs/api.md has examples" test "${#examples[@]}" -gt 20
i=0
while [ $i -lt ${#examples[@]} ]; do
  f=${examples[$i]}
  case "$f" in
    *.console) run_console "$f"; i=$((i + 1)) ;;
    *.http)
      nxt=${examples[$((i + 1))]:-}
      if [[ $nxt != *.http ]] || ! head -n 1 "$nxt" | grep -q '^HTTP/1.1 '; then
        not_ok "docs/api.md: request block $(basename "$f") has no response block after it"
        i=$((i + 1))
      else
        run_http "$f" "$nxt"
        i=$((i + 2))
      fi ;;
  esac
done

# ---------------------------------------------------------------- 2. bad input

expect() { # description, status, code, method, path, [body], [curl args]
  local d=$1 st=$2 code=$3; shift 3
  api "$@"
  local got
  got=$(jq -r '.error.code // empty' "$tmp/body" 2>/dev/null)
  if [ "$status" = "$st" ] && [ "$got" = "$code" ]; then
    ok "$d -> $st $code"
  else
    not_ok "$d: expected $st $code, got $status $got"
    head -c 500 "$tmp/body" | sed 's/^/#   /'
  fi
}

vm='"name":"t1","memory":"64M","guest":"dirtier"'
expect "malformed JSON" 400 invalid_argument POST /v1/vms '{"name":'
expect "binary garbage body" 400 invalid_argument POST /v1/vms $'\x01\x02\xff\xfe'
expect "body is an array" 400 invalid_argument POST /v1/vms '[1,2]'
expect "deeply nested JSON" 400 invalid_argument POST /v1/vms "$(printf '%.0s[' $(seq 3000))"
expect "missing body" 400 invalid_argument POST /v1/vms
expect "missing field (guest)" 400 invalid_argument POST /v1/vms '{"name":"t1","memory":"64M"}'
expect "unknown field" 400 invalid_argument POST /v1/vms "{$vm,\"colour\":\"red\"}"
expect "duplicate key" 400 invalid_argument POST /v1/vms "{$vm,\"name\":\"t2\"}"
expect "vcpus of the wrong type" 400 invalid_argument POST /v1/vms "{$vm,\"vcpus\":\"two\"}"
expect "fractional vcpus" 400 invalid_argument POST /v1/vms "{$vm,\"vcpus\":1.5}"
expect "negative vcpus" 400 invalid_argument POST /v1/vms "{$vm,\"vcpus\":-1}"
expect "huge vcpus" 400 invalid_argument POST /v1/vms "{$vm,\"vcpus\":99999999999999}"
expect "memory of the wrong type" 400 invalid_argument POST /v1/vms \
  '{"name":"t1","memory":true,"guest":"dirtier"}'
expect "unparsable memory" 400 invalid_argument POST /v1/vms \
  '{"name":"t1","memory":"lots","guest":"dirtier"}'
expect "paused of the wrong type" 400 invalid_argument POST /v1/vms "{$vm,\"paused\":\"yes\"}"
expect "params of the wrong type" 400 invalid_argument POST /v1/vms "{$vm,\"params\":5}"
expect "params entry without =" 400 invalid_argument POST /v1/vms "{$vm,\"params\":[\"rate\"]}"
expect "unknown guest parameter" 400 invalid_argument POST /v1/vms \
  "{$vm,\"params\":{\"colour\":\"blue\"}}"
expect "bad tracker" 400 invalid_argument POST /v1/vms "{$vm,\"tracker\":\"magic\"}"
expect "bad guest" 400 invalid_argument POST /v1/vms \
  '{"name":"t1","memory":"64M","guest":"nosuch"}'
expect "relative image path" 400 invalid_argument POST /v1/vms \
  '{"name":"t1","memory":"64M","guest":"flat:guest.img"}'
expect "missing image file" 400 invalid_argument POST /v1/vms \
  "{\"name\":\"t1\",\"memory\":\"64M\",\"guest\":\"boot:$tmp/none.img\"}"
expect "0 vCPUs" 400 invalid_argument POST /v1/vms "{$vm,\"vcpus\":0}"
expect "unaligned memory" 400 invalid_argument POST /v1/vms \
  '{"name":"t1","memory":1000,"guest":"dirtier"}'
expect "invalid VM name" 400 invalid_argument POST /v1/vms \
  '{"name":"../etc","memory":"64M","guest":"dirtier"}'
expect "name too long" 400 invalid_argument POST /v1/vms \
  "{\"name\":\"$(printf 'x%.0s' $(seq 100))\",\"memory\":\"64M\",\"guest\":\"dirtier\"}"
expect "more memory than the host" 422 resource_exhausted POST /v1/vms \
  '{"name":"t1","memory":"64T","guest":"dirtier"}'
expect "evacuate without destinations" 400 invalid_argument POST /v1/evacuate '{"to":[]}'
expect "evacuate to a bad address" 400 invalid_argument POST /v1/evacuate '{"to":["nohost"]}'
expect "evacuate an unknown VM" 404 not_found POST /v1/evacuate \
  '{"to":["127.0.0.1:9"],"vms":["nope"]}'
expect "evacuate with a bad setting" 400 invalid_argument POST /v1/evacuate \
  '{"to":["127.0.0.1:9"],"timeout_action":"explode"}'
expect "history of an unknown migration" 404 not_found GET /v1/migrations/999999/history
expect "migration with postcopy action but postcopy off" 400 invalid_argument POST /v1/migrations \
  '{"vm":"web1","to":"127.0.0.1:9","timeout_action":"postcopy","allow_postcopy":false}'
expect "migration with a bad priority" 400 invalid_argument POST /v1/migrations \
  '{"vm":"web1","to":"127.0.0.1:9","priority":101}'
expect "early postcopy with postcopy off" 400 invalid_argument POST /v1/migrations \
  '{"vm":"web1","to":"127.0.0.1:9","postcopy_after_rounds":0,"allow_postcopy":false}'
expect "postcopy_after_rounds out of range" 400 invalid_argument POST /v1/migrations \
  '{"vm":"web1","to":"127.0.0.1:9","postcopy_after_rounds":-2,"allow_postcopy":true}'
expect "postcopy_after_rounds not a number" 400 invalid_argument POST /v1/migrations \
  '{"vm":"web1","to":"127.0.0.1:9","postcopy_after_rounds":"soon","allow_postcopy":true}'
expect "migration with a bad compress" 400 invalid_argument POST /v1/migrations \
  '{"vm":"web1","to":"127.0.0.1:9","compress":"fast"}'
expect "duplicate VM" 409 already_exists POST /v1/vms \
  '{"name":"web1","memory":"64M","guest":"dirtier"}'
head -c 1048576 /dev/zero >"$tmp/big"
expect "1 MiB body" 413 too_large POST /v1/vms "" --data-binary "@$tmp/big"
head -c 200000 /dev/zero >"$tmp/big"
expect "200 KB chunked body" 413 too_large POST /v1/vms "" --data-binary "@$tmp/big" \
  -H 'Transfer-Encoding: chunked'
expect "unknown VM" 404 not_found GET /v1/vms/nope
expect "delete unknown VM" 404 not_found DELETE /v1/vms/nope
expect "pause unknown VM" 404 not_found POST /v1/vms/nope/pause
expect "console of unknown VM" 404 not_found GET /v1/vms/nope/console
expect "dump unknown VM" 404 not_found POST /v1/vms/nope/dump "{\"path\":\"$tmp/dumps/x\"}"
expect "dump to a relative path" 400 invalid_argument POST /v1/vms/web1/dump '{"path":"x.mem"}'
expect "dump over an existing file" 409 already_exists POST /v1/vms/web1/dump \
  "{\"path\":\"$tmp/dumps/web1.mem\"}"
expect "body on pause" 400 invalid_argument POST /v1/vms/web1/pause '{"now":true}'
expect "bad console offset" 400 invalid_argument GET '/v1/vms/web1/console?offset=-1'
expect "bad events since" 400 invalid_argument GET '/v1/events?since=abc'
expect "bad events heartbeat" 400 invalid_argument GET '/v1/events?heartbeat=0'
expect "unknown route" 404 not_found GET /v1/nothing
expect "unknown version" 404 not_found GET /v2/health
expect "root" 404 not_found GET /
expect "too deep a path" 404 not_found GET /v1/vms/web1/console/more/parts
expect "long URL" 404 not_found GET "/v1/$(printf 'a%.0s' $(seq 2000))"
expect "wrong method on a VM" 405 method_not_allowed POST /v1/vms/web1
expect "wrong method on health" 405 method_not_allowed DELETE /v1/health
check "405 carries Allow" grep -qi '^Allow: GET, HEAD' "$tmp/hdrs"
expect "wrong method on metrics" 405 method_not_allowed POST /metrics
# Migration routes, error paths.
expect "migrate unknown VM" 404 not_found POST /v1/migrations \
  "{\"vm\":\"nope\",\"to\":\"$B_LISTEN\"}"
expect "migrate to a bad address" 400 invalid_argument POST /v1/migrations \
  '{"vm":"web1","to":"no port here"}'
expect "migrate to port 0" 400 invalid_argument POST /v1/migrations \
  '{"vm":"web1","to":"127.0.0.1:0"}'
expect "migrate with a bad rate" 400 invalid_argument POST /v1/migrations \
  "{\"vm\":\"web1\",\"to\":\"$B_LISTEN\",\"bandwidth\":\"1Gb\"}"
expect "migrate with a negative rate" 400 invalid_argument POST /v1/migrations \
  "{\"vm\":\"web1\",\"to\":\"$B_LISTEN\",\"bandwidth\":-1}"
expect "migrate with 0 streams" 400 invalid_argument POST /v1/migrations \
  "{\"vm\":\"web1\",\"to\":\"$B_LISTEN\",\"streams\":0}"
expect "migrate with a long downtime" 400 invalid_argument POST /v1/migrations \
  "{\"vm\":\"web1\",\"to\":\"$B_LISTEN\",\"downtime_ms\":600000}"
expect "migrate with verify of the wrong type" 400 invalid_argument POST /v1/migrations \
  "{\"vm\":\"web1\",\"to\":\"$B_LISTEN\",\"verify\":\"yes\"}"
expect "migrate with a bad transport" 400 invalid_argument POST /v1/migrations \
  "{\"vm\":\"web1\",\"to\":\"$B_LISTEN\",\"transport\":\"pigeon\"}"
expect "migrate with an unknown field" 400 invalid_argument POST /v1/migrations \
  "{\"vm\":\"web1\",\"to\":\"$B_LISTEN\",\"speed\":1}"
expect "migrate without to" 400 invalid_argument POST /v1/migrations '{"vm":"web1"}'
expect "unknown migration" 404 not_found GET /v1/migrations/999
expect "cancel unknown migration" 404 not_found DELETE /v1/migrations/999
expect "switchover unknown migration" 404 not_found POST /v1/migrations/999/switchover
expect "migration id not a number" 400 invalid_argument GET /v1/migrations/abc
expect "migration id overflow" 400 invalid_argument GET /v1/migrations/99999999999999999999999

# HEAD works where GET does, without a body.
api HEAD /v1/health "" -I
check "HEAD /v1/health -> 200" test "$status" = 200

# Event feeds hold their connection's thread only: 20 of them open, the API still answers.
for n in $(seq 20); do
  curl -s -N --unix-socket "$SOCK_A" --max-time 30 "http://localhost/v1/events" \
    >"$tmp/feed.$n" 2>/dev/null &
  pids+=($!)
done
sleep 0.5
api GET /v1/health
check "API answers with 20 event feeds open" test "$status" = 200
api POST /v1/vms '{"name":"feedcheck","memory":"16M","guest":"dirtier","paused":true}'
check "a new VM is created with the feeds open" test "$status" = 201
sleep 0.3
check "the open feeds saw the new VM" grep -q '"vm.created","vm":"feedcheck"' "$tmp/feed.20"
api DELETE /v1/vms/feedcheck
# A client that hangs up mid-request does not bother the agent.
curl -s --unix-socket "$SOCK_A" --max-time 0.2 "http://localhost/v1/events?heartbeat=1" \
  >/dev/null 2>&1
head -c 30000 /dev/zero | curl -s --unix-socket "$SOCK_A" --max-time 0.2 --limit-rate 10K \
  -H 'Content-Type: application/json' --data-binary @- http://localhost/v1/vms >/dev/null 2>&1

# ---------------------------------------------------------------- 3. ferryctl

ctl() { "$ferryctl" --socket "$SOCK_A" "$@"; }
ctl_json() { # description, ferryctl args...: succeeds and prints valid JSON
  local d=$1; shift
  if ctl "$@" >"$tmp/ctl.out" 2>"$tmp/ctl.err" && jq -e . "$tmp/ctl.out" >/dev/null; then
    ok "ferryctl $d --json parses"
  else
    not_ok "ferryctl $d --json"; cat "$tmp/ctl.out" "$tmp/ctl.err" | sed 's/^/#   /'
  fi
}
ctl_exit() { # description, expected status, needle, ferryctl args...
  local d=$1 want=$2 needle=$3; shift 3
  ctl "$@" >"$tmp/ctl.out" 2>&1
  local rc=$?
  if [ $rc = "$want" ] && grep -qi -- "$needle" "$tmp/ctl.out"; then
    ok "ferryctl $d exits $want"
  else
    not_ok "ferryctl $d: exit $rc (want $want)"; sed 's/^/#   /' "$tmp/ctl.out"
  fi
}

check "ferryctl vm create" ctl vm create c1 --memory 32M --vcpus 2 --guest memcheck \
  --param wss=8M --tracker auto
ctl_json "vm create" vm create c2 --memory 16M --guest dirtier --paused --json
check "vm create --paused made a paused VM" test "$(jq -r .state "$tmp/ctl.out")" = paused
check "ferryctl vm list shows c1" bash -c "'$ferryctl' --socket '$SOCK_A' vm list | grep -q '^c1 '"
ctl_json "vm list" vm list --json
check "vm list --json lists c1 and c2" \
  test "$(jq -r '[.vms[].name] | map(select(. == "c1" or . == "c2")) | length' "$tmp/ctl.out")" = 2
check "ferryctl vm show" bash -c "'$ferryctl' --socket '$SOCK_A' vm show c1 | grep -q '^guest: *memcheck'"
ctl_json "vm show" vm show c1 --json
sleep 0.3
check "ferryctl vm console" bash -c "'$ferryctl' --socket '$SOCK_A' vm console c1 | grep -q memcheck"
ctl_json "vm console" vm console c1 --json
check "console --json has the text" grep -q memcheck "$tmp/ctl.out"
check "ferryctl vm pause" bash -c "'$ferryctl' --socket '$SOCK_A' vm pause c1 | grep -q 'c1: paused'"
ctl_json "vm resume" vm resume c1 --json
check "vm resume --json says running" test "$(jq -r .state "$tmp/ctl.out")" = running
(cd "$tmp/dumps" && "$ferryctl" --socket "$SOCK_A" vm dump c1 c1.mem >/dev/null)
check "ferryctl vm dump with a relative FILE writes it" \
  test "$(stat -c %s "$tmp/dumps/c1.mem" 2>/dev/null)" = 33554432
ctl_json "vm dump" vm dump c2 "$tmp/dumps/c2.mem" --json
ctl_json "health" health --json
ctl_json "migration list" migration list --json
check "ferryctl vm delete" ctl vm delete c2
ctl_json "vm delete" vm delete c1 --json
FERRY_SOCKET=$SOCK_A "$ferryctl" vm list >/dev/null
check "ferryctl takes FERRY_SOCKET" test $? = 0
ctl_exit "vm show of an unknown VM" 1 "no VM named 'nope'" vm show nope
ctl_exit "vm create of a bad guest" 1 "unknown guest" vm create x --memory 16M --guest nosuch
ctl_exit "vm create with 0 vCPUs" 1 "at least 1 vCPU" vm create x --memory 16M --vcpus 0 \
  --guest dirtier
ctl_exit "migrate of an unknown VM" 1 "no VM named" migrate nope --to "$B_LISTEN"
ctl_exit "migrate to a bad address" 1 "HOST:PORT" migrate web1 --to nowhere
ctl_exit "migrate with a bad rate" 1 "bandwidth" migrate web1 --to "$B_LISTEN" --bandwidth 3Q
ctl_exit "migration show of an unknown id" 1 "no migration" migration show 999
ctl_exit "without a command" 2 "no command"
ctl_exit "an unknown command" 2 "unknown command" frobnicate
ctl_exit "an option of another command" 2 "does not apply" vm list --to x
ctl_exit "a missing argument" 2 "takes 1 argument" vm show
ctl_exit "vm create without --memory" 2 "needs --memory" vm create x --guest dirtier
ctl_exit "a bad migration id" 2 "not a number" migration show abc
"$ferryctl" --socket "$tmp/nothing.sock" health >"$tmp/ctl.out" 2>&1
rc=$?
check "ferryctl without an agent exits 1 and says so" \
  bash -c "[ $rc = 1 ] && grep -q 'is ferryd running' '$tmp/ctl.out'"
timeout 2 "$ferryctl" --socket "$SOCK_A" events --since 0 >"$tmp/ctl.events" 2>/dev/null
check "ferryctl events prints the feed" grep -q 'vm.created vm=web1' "$tmp/ctl.events"
timeout 2 "$ferryctl" --socket "$SOCK_A" events --since 0 --json >"$tmp/ctl.events" 2>/dev/null
check "ferryctl events --json prints JSON lines" jq -e -s 'length > 3' "$tmp/ctl.events"

# ---------------------------------------------------------------- 4. configuration

"$ferryd" --check-config "$tmp/host-a.yaml" >"$tmp/check.out" 2>&1
check "--check-config accepts a good file" test $? = 0
printf 'migration:\n  bandwith: 1G\n' >"$tmp/bad.yaml"
"$ferryd" --check-config "$tmp/bad.yaml" >"$tmp/check.out" 2>&1
rc=$?
check "--check-config refuses a bad file with its line" \
  bash -c "[ $rc = 1 ] && grep -q 'bad.yaml:2:3: unknown key' '$tmp/check.out'"
"$ferryd" --check-config "$tmp/none.yaml" >"$tmp/check.out" 2>&1
check "--check-config refuses a missing file" test $? = 1
"$ferryd" --config "$tmp/bad.yaml" >"$tmp/check.out" 2>&1
check "ferryd refuses to start with a bad file" test $? = 1
"$ferryd" --listen nowhere >"$tmp/check.out" 2>&1
check "ferryd refuses a bad --listen" test $? = 2
"$ferryd" --bogus >"$tmp/check.out" 2>&1
check "ferryd refuses an unknown option" test $? = 2
"$ferryd" --socket "$SOCK_A" --listen 127.0.0.1:0 >"$tmp/check.out" 2>&1
rc=$?
check "a second ferryd does not steal a live socket" \
  bash -c "[ $rc = 1 ] && grep -q 'another process' '$tmp/check.out'"
# A socket left behind by a killed agent is replaced.
start_agent "$tmp/host-c.log" --name host-c --socket "$tmp/run/c.sock" --listen 127.0.0.1:0
kill -9 "$agent_pid"; wait "$agent_pid" 2>/dev/null
check "a killed agent leaves its socket" test -S "$tmp/run/c.sock"
start_agent "$tmp/host-c2.log" --name host-c --socket "$tmp/run/c.sock" --listen 127.0.0.1:0
C_PID=$agent_pid
check "a new agent replaces the stale socket" \
  bash -c "curl -sf --unix-socket '$tmp/run/c.sock' http://localhost/v1/health | grep -q host-c"
kill -TERM "$C_PID"; wait "$C_PID" 2>/dev/null

# ---------------------------------------------------------------- 5. still alive, then stop

api GET /v1/health
check "host-a is healthy after all of it" test "$status" = 200 -a "$(jq -r .status "$tmp/body")" = ok
check "host-a is still running" kill -0 "$A_PID"

curl -s -N --unix-socket "$SOCK_A" "http://localhost/v1/events" >"$tmp/last.feed" 2>&1 &
feed_pid=$!
sleep 0.3
start=$(date +%s%N)
kill -TERM "$A_PID"
wait "$A_PID"
rc=$?
ms=$((($(date +%s%N) - start) / 1000000))
check "SIGTERM: ferryd exits 0 (got $rc)" test "$rc" = 0
check "SIGTERM: within 5 s (took $ms ms)" test "$ms" -lt 5000
wait "$feed_pid"
check "the events feed ended cleanly (curl exit $?)" test $? = 0
check "the feed's last event is agent.shutdown" \
  bash -c "tail -n 1 '$tmp/last.feed' | jq -e '.type == \"agent.shutdown\"' >/dev/null"
check "ferryd removed its socket" test ! -e "$SOCK_A"
kill -TERM "$B_PID"; wait "$B_PID"
check "host-b exits 0 on SIGTERM" test $? = 0

echo "# $passes passed, $fails failed"
[ "$fails" -eq 0 ]
