#!/usr/bin/env bash
# The whole test suite: unit, contract (every adapter), end-to-end, UI (trybuild) and doc tests.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
. scripts/services.sh
ensure_redis
ensure_postgres
cargo test --workspace --all-features "$@"
