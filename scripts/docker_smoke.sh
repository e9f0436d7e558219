#!/usr/bin/env bash
# Smoke test of a built ttscale image (CPU or GPU):
#   scripts/docker_smoke.sh [IMAGE]          (default: ttscale-cpu:local)
# Checks that the image's entrypoint serves on 0.0.0.0, then runs it on the host network bound to
# 127.0.0.1 and a free port (the trailing --host/--port override the entrypoint's), waits for
# /health, sends one majority-vote chat completion to ttscale-arith, waits for the image's
# HEALTHCHECK to report healthy, and removes the container. Exits non-zero on any failure.
# Environment: DOCKER (docker CLI), SHM_SIZE (default 2g: vLLM needs more /dev/shm than Docker's
# 64 MiB), HEALTH_TIMEOUT (s, default 600), REQUEST_TIMEOUT (s, default 300),
# DOCKER_RUN_ARGS (extra `docker run` options, e.g. "--gpus all"), SERVE_ARGS (extra serve options).
set -euo pipefail

IMAGE=${1:-ttscale-cpu:local}
DOCKER=${DOCKER:-docker}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
REQUEST_TIMEOUT=${REQUEST_TIMEOUT:-300}
SHM_SIZE=${SHM_SIZE:-2g}
NAME="ttscale-smoke-$$"
PY=$(command -v python3 || command -v python)

log() { printf '[docker_smoke %s] %s\n' "$(date +%T)" "$*"; }
fail() { log "FAIL: $*"; exit 1; }
cleanup() {
    local rc=$?
    if "$DOCKER" container inspect "$NAME" >/dev/null 2>&1; then
        if [ "$rc" -ne 0 ]; then log "container logs (tail):"; "$DOCKER" logs --tail 60 "$NAME" 2>&1 | sed 's/^/    /'; fi
        "$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true
        log "container $NAME removed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. The image's own entrypoint binds 0.0.0.0:8000.
entry=$("$DOCKER" image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE") || fail "no image $IMAGE"
log "entrypoint: $entry"
[ "$entry" = '["ttscale","serve","--host","0.0.0.0","--port","8000"]' ] || fail "unexpected entrypoint"

# 2. Run it on the host network, but on loopback and a free port.
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
# shellcheck disable=SC2086
"$DOCKER" run -d --name "$NAME" --network host --shm-size "$SHM_SIZE" ${DOCKER_RUN_ARGS:-} \
    -e TTSCALE_HEALTHCHECK_URL="$BASE/health" \
    "$IMAGE" --host 127.0.0.1 --port "$PORT" ${SERVE_ARGS:-} >/dev/null
log "started $NAME on $BASE"

start=$(date +%s)
until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$BASE/health" || true)" = 200 ]; do
    [ "$("$DOCKER" inspect --format '{{.State.Running}}' "$NAME")" = true ] || fail "container exited"
    [ $(( $(date +%s) - start )) -lt "$HEALTH_TIMEOUT" ] || fail "/health not 200 after ${HEALTH_TIMEOUT}s"
    sleep 3
done
log "/health 200 after $(( $(date +%s) - start ))s"

# 3. One test-time-scaled request.
body='{"model": "ttscale-arith", "messages": [{"role": "user", "content": "Sara has 78 books. She sells 27. How many books does Sara have now?"}],
       "max_tokens": 64, "ttscale": {"strategy": "majority", "budget": {"samples": 4}}}'
t0=$(date +%s)
resp=$(curl -sS --fail-with-body --max-time "$REQUEST_TIMEOUT" -H 'Content-Type: application/json' \
       -d "$body" "$BASE/v1/chat/completions") || fail "request failed: ${resp:-}"
log "chat completion in $(( $(date +%s) - t0 ))s"
"$PY" - "$resp" <<'EOF' || fail "bad response: $resp"
import json, sys
r = json.loads(sys.argv[1])
assert r.get("choices"), "no choices"
msg = r["choices"][0]["message"]
assert isinstance(r.get("ttscale"), dict), "no ttscale object"
print("    answer:", repr(msg.get("content"))[:200])
print("    usage:", json.dumps(r.get("usage")))
print("    ttscale:", json.dumps(r["ttscale"])[:400])
EOF

# 4. The image's HEALTHCHECK agrees (it runs every 30 s).
deadline=$(( $(date +%s) + 90 ))
while :; do
    hs=$("$DOCKER" inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$NAME")
    [ "$hs" = healthy ] && break
    [ "$hs" != none ] || fail "image has no HEALTHCHECK"
    [ "$(date +%s)" -lt "$deadline" ] || fail "HEALTHCHECK status '$hs' after 90s"
    sleep 3
done
log "HEALTHCHECK: $hs"

"$DOCKER" stop -t 20 "$NAME" >/dev/null
log "PASS ($IMAGE)"
