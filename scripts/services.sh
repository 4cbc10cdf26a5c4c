#!/usr/bin/env bash
# Make sure the services the test suite talks to answer on loopback.
# Starts a service that is installed but not running; in CI (CI=true) a service that cannot be
# made to answer fails the run. Tests never skip silently.
set -euo pipefail

REDIS_HOST=127.0.0.1
REDIS_PORT=6379

fail_or_warn() {
  echo "services: $1" >&2
  if [ "${CI:-}" = "true" ]; then
    exit 1
  fi
  echo "services: tests that need it will fail with a clear message" >&2
}

redis_answers() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null || true)" = "PONG" ]
  else
    # No client: speak the protocol by hand.
    exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT" 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    local reply
    read -r -t 2 reply <&3 || true
    exec 3>&-
    [[ "$reply" == +PONG* ]]
  fi
}

ensure_redis() {
  if redis_answers; then
    return 0
  fi
  if command -v redis-server >/dev/null 2>&1; then
    echo "services: starting redis-server on $REDIS_HOST:$REDIS_PORT" >&2
    mkdir -p /tmp/stem-redis
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no \
      --dir /tmp/stem-redis --logfile /tmp/stem-redis/redis.log >/dev/null
    for _ in $(seq 1 50); do
      if redis_answers; then
        return 0
      fi
      sleep 0.1
    done
    fail_or_warn "redis-server was started but does not answer on $REDIS_HOST:$REDIS_PORT"
  else
    fail_or_warn "Redis does not answer on $REDIS_HOST:$REDIS_PORT and redis-server is not installed"
  fi
}
