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

PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
PG_DB=test

pg_answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER"
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null
  fi
}

ensure_postgres() {
  if ! pg_answers; then
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
      local version
      version=$(ls /etc/postgresql | sort -V | tail -n 1)
      echo "services: starting PostgreSQL $version on $PG_HOST:$PG_PORT" >&2
      pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
      for _ in $(seq 1 100); do
        if pg_answers; then
          break
        fi
        sleep 0.1
      done
    fi
  fi
  if ! pg_answers; then
    fail_or_warn "PostgreSQL does not answer on $PG_HOST:$PG_PORT"
    return 0
  fi
  if command -v psql >/dev/null 2>&1; then
    if ! psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" 2>/dev/null | grep -q 1; then
      echo "services: creating database $PG_DB" >&2
      psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -c "CREATE DATABASE $PG_DB" >/dev/null
    fi
    prune_test_schemas
  fi
}

# Every test and bench run works in a schema of its own and leaves it behind (a failed test
# leaves its state to look at). Thousands of them slow every new connection down, so drop the
# ones older than an hour: their names carry their creation time (`t<uuid v7>`,
# `e2ecanvas<uuid v7>`, `bench_<pid>_<unix ns>`). One schema per transaction, so the locks of
# a large clean-up never pile up.
prune_test_schemas() {
  psql -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -v ON_ERROR_STOP=1 >/dev/null 2>&1 <<'SQL' || echo "services: pruning old test schemas failed (not fatal)" >&2
DO $prune$
DECLARE
  victim text;
  cutoff_ms numeric := extract(epoch FROM now()) * 1000 - 3600 * 1000;
BEGIN
  FOR victim IN
    SELECT nspname FROM pg_namespace
    WHERE (nspname ~ '^(t|e2ecanvas)[0-9a-f]{32}$'
           AND ('x' || lpad(substring(nspname FROM '([0-9a-f]{12})[0-9a-f]{20}$'), 16, '0'))::bit(64)::bigint < cutoff_ms)
       OR (nspname ~ '^bench_[0-9]+_[0-9]+$'
           AND split_part(nspname, '_', 3)::numeric < cutoff_ms * 1000000)
  LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', victim);
    COMMIT;
  END LOOP;
END
$prune$;
SQL
}
