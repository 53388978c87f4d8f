#!/usr/bin/env bash
# blip2 serve as a real process, driven with curl: health, a plain and a streamed completion (the same answer as
# `blip2 ask`), errors in OpenAI's shape, an oversize body, a busy port refused, the listen backlog, SIGTERM
# draining a running request before exit, --drain-timeout bounding the drain, and a second SIGTERM ending a
# drain that waits on a running request.
# Usage: server_curl.sh BLIP2_CLI FIXTURES_DIR
set -euo pipefail
cli=$1
images=$2/images
tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; echo "--- server stderr:" >&2; cat "$tmp/err" >&2; exit 1; }

"$cli" serve --port 0 --max-body-mb 1 --max-tokens 4000 2> "$tmp/err" &
pid=$!
for _ in $(seq 1 400); do grep -q "listening on" "$tmp/err" && break; sleep 0.05; done
port=$(grep -o '127\.0\.0\.1:[0-9]*' "$tmp/err" | head -1 | cut -d: -f2)
[ -n "$port" ] || fail "server did not start"
url="http://127.0.0.1:$port"

# request FILE -> "STATUS BODY" on one line pair: status in $code, body in $body
request() {
  local out
  out=$(curl -sS -w '\n%{http_code}' -H 'Content-Type: application/json' "$@" "$url/v1/chat/completions")
  code=${out##*$'\n'}
  body=${out%$'\n'*}
}

# (the whole response first: grep -q stopping early would make curl fail under pipefail)
get() { curl -sSf "$url$1"; }
grep -q '"status":"ok"' <<< "$(get /health)" || fail "health"
grep -q '"object":"list"' <<< "$(get /v1/models)" || fail "models"
grep -q '^blip2_queue_length 0$' <<< "$(get /metrics)" || fail "metrics"
grep -q '<title>BLIP-2</title>' <<< "$(get /)" || fail "page"

img=$(base64 -w0 "$images/chelsea.png")
ask() {  # ask QUESTION MAX_TOKENS [EXTRA_JSON_FIELDS]
  printf '{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,%s"}},{"type":"text","text":"%s"}]}],"max_tokens":%s%s}' \
    "$img" "$1" "$2" "${3:-}" > "$tmp/req.json"
}

want=$("$cli" ask "$images/chelsea.png" "what is this?" --max-new-tokens 8)
ask "what is this?" 8
request -d @"$tmp/req.json"
[ "$code" = 200 ] || fail "plain completion: $code $body"
grep -qF "\"content\":\"$want\"" <<< "$body" || fail "plain completion: want '$want' in $body"

ask "what is this?" 8 ',"stream":true'
curl -sSN -H 'Content-Type: application/json' -d @"$tmp/req.json" "$url/v1/chat/completions" > "$tmp/stream"
grep -q '"object":"chat.completion.chunk"' "$tmp/stream" || fail "stream chunks"
[ "$(grep -c '^data: ' "$tmp/stream")" -ge 5 ] || fail "stream has too few events"
[ "$(grep '^data: ' "$tmp/stream" | tail -1)" = "data: [DONE]" ] || fail "stream does not end with [DONE]"
streamed=$(grep -o '"delta":{"content":"[^"]*"' "$tmp/stream" | sed 's/^"delta":{"content":"//; s/"$//' | tr -d '\n')
[ "$streamed" = "$want" ] || fail "streamed text '$streamed' != '$want'"

request -d '{"messages": [}'
[ "$code" = 400 ] && grep -q '"error":{"code":"invalid_json"' <<< "$body" || fail "malformed JSON: $code $body"
request -d '{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,@@@@"}}]}]}'
[ "$code" = 400 ] && grep -q '"invalid_base64"' <<< "$body" || fail "bad base64: $code $body"
head -c 1500000 /dev/zero | tr '\0' ' ' > "$tmp/big.json"
request --data-binary @"$tmp/big.json"
[ "$code" = 413 ] && grep -q '"error"' <<< "$body" || fail "oversize body: $code $body"
code=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Content-Type: text/plain' -d '{}' "$url/v1/chat/completions")
[ "$code" = 415 ] || fail "wrong content type: $code"

# A second server on the same port is refused (httplib's SO_REUSEPORT let it share the port silently).
status=0
timeout 20 "$cli" serve --port "$port" 2> "$tmp/err2" || status=$?
[ "$status" = 2 ] && grep -q "address in use" "$tmp/err2" || fail "second server on a busy port: status $status, $(cat "$tmp/err2")"

# The listen backlog (ss's Send-Q of a listening socket) is kListenBacklog (1024) or the kernel's cap, not 5.
backlog=$(ss -ltnH "sport = :$port" | awk '{print $3}')
want_backlog=$(( $(cat /proc/sys/net/core/somaxconn) < 1024 ? $(cat /proc/sys/net/core/somaxconn) : 1024 ))
[ "$backlog" = "$want_backlog" ] || fail "listen backlog $backlog, want $want_backlog"

# SIGTERM while a long request streams: it finishes, then the server exits with status 0.
ask "tell me everything" 1000 ',"min_tokens":1000,"stream":true'
curl -sSN -H 'Content-Type: application/json' -d @"$tmp/req.json" "$url/v1/chat/completions" > "$tmp/long" &
curl_pid=$!
for _ in $(seq 1 400); do [ -s "$tmp/long" ] && break; sleep 0.01; done
[ -s "$tmp/long" ] || fail "long request did not start"
kill -TERM "$pid"
wait "$curl_pid" || fail "the running request failed during shutdown"
status=0
wait "$pid" || status=$?
pid=
[ "$status" = 0 ] || fail "server exit status $status after SIGTERM"
grep -q '"finish_reason":"length"' "$tmp/long" || fail "running request was cut short: $(tail -c 300 "$tmp/long")"
[ "$(grep '^data: ' "$tmp/long" | tail -1)" = "data: [DONE]" ] || fail "running request did not end with [DONE]"
grep -q "finishing running requests" "$tmp/err" || fail "no drain message"

start_server() {  # start_server ARGS...: blip2 serve on a free port; sets pid, port, url
  "$cli" serve --port 0 --max-tokens 4000 "$@" 2> "$tmp/err" &
  pid=$!
  for _ in $(seq 1 400); do grep -q "listening on" "$tmp/err" && break; sleep 0.05; done
  port=$(grep -o '127\.0\.0\.1:[0-9]*' "$tmp/err" | head -1 | cut -d: -f2)
  [ -n "$port" ] || fail "server did not start"
  url="http://127.0.0.1:$port"
}
start_long_request() {  # a streamed request of 4000 tokens over 8 beams, running when this returns
  ask "tell me everything" 4000 ',"min_tokens":4000,"num_beams":8,"stream":true'
  curl -sSN -H 'Content-Type: application/json' -d @"$tmp/req.json" "$url/v1/chat/completions" > "$tmp/long" &
  curl_pid=$!
  for _ in $(seq 1 400); do grep -q '^blip2_running_requests 1$' <<< "$(get /metrics)" && break; sleep 0.01; done
}

# --drain-timeout bounds the whole drain: a request still running at the deadline ends with a 503
# (shutting_down) in its stream, and a client that sent half its headers does not hold the exit up (it did for
# httplib's 30 s read timeout: --drain-timeout 1 took 14.8 s).
start_server --drain-timeout 1
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n' >&3
start_long_request
start=$(date +%s%N)
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
exec 3>&-
wait "$curl_pid" || true
[ "$status" = 0 ] || fail "server exit status $status after SIGTERM with --drain-timeout 1"
echo "server_curl: SIGTERM with --drain-timeout 1 exited after $elapsed_ms ms"
[ "$elapsed_ms" -ge 900 ] && [ "$elapsed_ms" -lt 2500 ] || fail "--drain-timeout 1 took $elapsed_ms ms"
grep -q '"finish_reason":"length"' "$tmp/long" || grep -q '"shutting_down"' "$tmp/long" ||
  fail "the request cut by the drain timeout did not say so: $(tail -c 300 "$tmp/long")"

# A drain that waits on a running request (default --drain-timeout 60 s): a second SIGTERM exits at once,
# with status 128 + 15.
start_server
start_long_request
kill -TERM "$pid"
sleep 1
kill -0 "$pid" 2>/dev/null || fail "the drain did not wait for the running request (nothing left to test)"
start=$(date +%s%N)
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
wait "$curl_pid" || true
[ "$status" = 143 ] || fail "exit status $status after a second SIGTERM, want 143"
[ "$elapsed_ms" -lt 3000 ] || fail "a second SIGTERM took $elapsed_ms ms to exit"
grep -q "second signal: exiting without draining" "$tmp/err" || fail "no message for the second signal"
echo "server_curl: all checks passed"
