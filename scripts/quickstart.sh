#!/usr/bin/env bash
# The main job: a workerkit worker on the embedded default (SQLite, no server), under the
# supervisor. It checks the timing budget, creates the schema, enqueues a batch of jobs and runs
# them. Watch http://127.0.0.1:8080/metrics; press Ctrl-C to watch a graceful drain.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv

export WORKERKIT_CONFIG=examples/quickstart/workerkit.toml
APP=examples.quickstart.app:app

.venv/bin/workerkit check --app "$APP"
.venv/bin/workerkit db upgrade
.venv/bin/python -m examples.quickstart.enqueue "${QUICKSTART_ORDERS:-10}"
echo "metrics: curl -s http://127.0.0.1:8080/metrics | grep workerkit_ ; press Ctrl-C to drain"
exec .venv/bin/workerkit run sql --app "$APP"
