#!/usr/bin/env bash
# The test command: lint, format check, type check, then every test.
#
#   ./scripts/test.sh                 # everything
#   ./scripts/test.sh tests/unit -q   # extra arguments go to pytest
#
# Installs what is missing first:
#   - redis-server, PostgreSQL and chromium from apt when run as root on Debian/Ubuntu (the tests
#     start their own private servers on 127.0.0.1; the system services are never used or
#     started; tests/browser drives chromium headless through Playwright);
#     otherwise prints what to install, and the server tests skip (or fail when CI is set);
#   - a project virtual environment in .venv/ with every extra, refreshed when pyproject.toml
#     changes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh # find_python, ensure_venv (shared with the other scripts)

header() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }

# ------------------------------------------------------------------------------------------------
# system packages

have_redis() { command -v redis-server >/dev/null 2>&1; }

have_postgres() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/postgres" ]]; then return 0; fi
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        if [[ -x "$dir/initdb" && -x "$dir/postgres" ]]; then return 0; fi
    done
    command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1
}

# The browser tests (tests/browser) find it under any of these names (tests/support/browser.py).
have_chromium() {
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 ||
        command -v google-chrome >/dev/null 2>&1
}

POLICY_RC_D=/usr/sbin/policy-rc.d
created_policy_rc_d=0
cleanup() {
    if [[ "$created_policy_rc_d" == 1 ]]; then rm -f "$POLICY_RC_D"; fi
}
trap cleanup EXIT

apt_install() {
    header "Installing system packages: $*"
    # Package scripts must not start services (there may be no init system, and the tests
    # run their own servers): policy-rc.d answering 101 tells invoke-rc.d "not allowed".
    if [[ ! -e "$POLICY_RC_D" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC_D"
        chmod 755 "$POLICY_RC_D"
        created_policy_rc_d=1
    fi
    apt-get -qq update
    DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends "$@" >/dev/null
    cleanup
    created_policy_rc_d=0
}

packages=()
have_redis || packages+=(redis-server)
have_postgres || packages+=(postgresql)
have_chromium || packages+=(chromium)
if [[ ! -x .venv/bin/python ]]; then
    python="$(find_python 2>/dev/null || true)"
    if [[ -z "$python" ]]; then
        packages+=(python3 python3-venv)
    elif ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        packages+=(python3-venv) # Debian ships venv/ensurepip separately from python3
    fi
fi

if ((${#packages[@]})); then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt_install "${packages[@]}"
    else
        header "Missing system packages: ${packages[*]}"
        note "Install them (e.g. sudo apt-get install ${packages[*]}); tests that need a"
        note "missing server are skipped (and fail when CI is set)."
    fi
fi

# ------------------------------------------------------------------------------------------------
# virtual environment

if [[ ! -x .venv/bin/python ]]; then header "Creating .venv"; fi
ensure_venv

# The tests start hundreds of workerkit processes. With PYTHONDONTWRITEBYTECODE=1 in the
# environment (as on the machines we run on, and in our image) nothing writes __pycache__, so each
# of them would compile every module it imports from source: ~14% of the CPU of an end-to-end
# module (2026-12-05). compileall writes the bytecode anyway, as pip does for an install.
header "Compiling bytecode"
.venv/bin/python -m compileall -q -j 0 workerkit tests bench examples >/dev/null ||
    note "compileall failed on a file (ruff and pytest below say which); going on"

# ------------------------------------------------------------------------------------------------
# checks: all run, the first failure's exit code is the script's

failed=()
status=0
step() {
    local name="$1"
    shift
    header "$name"
    local rc=0
    "$@" || rc=$?
    if ((rc != 0)); then
        failed+=("$name (exit $rc)")
        if ((status == 0)); then status=$rc; fi
    fi
}

step "ruff check" .venv/bin/ruff check .
step "ruff format --check" .venv/bin/ruff format --check .
step "mypy" .venv/bin/mypy
# The whole suite runs as two pytest processes at once (about 20 minutes instead of 37 on 2
# cores): most of the end-to-end tests wait on real processes, signals and timeouts rather than
# use the CPU. Each group starts its own servers on free ports, so they share nothing but the
# machine. Group "lifecycle" is tests/e2e but the scheduler (~18.5 min), tests/browser (the
# dashboard in headless chromium, ~0.5-1 min) and tests/chart (the Helm chart rendered, ~0.5
# min); group "rest" is everything else, tests/drill (workerkit drill local on real replicas,
# ~5 min) and tests/docs (the site and its tutorials, ~1.5 min) among it. In fresh-clone runs
# (2026-12-04) rest took 1276-1330 s with tests/chart, lifecycle 1130-1178 s without: move a
# layer between them when one grows.
# With arguments, one pytest runs them as given.
pytest_in_two_groups() {
    local log rc_lifecycle=0 rc_rest=0 pid start=$SECONDS
    log="$(mktemp "${TMPDIR:-/tmp}/workerkit-pytest-lifecycle.XXXXXX")"
    .venv/bin/pytest --durations=10 tests/e2e --ignore-glob='tests/e2e/test_scheduler_*' \
        tests/browser tests/chart >"$log" 2>&1 &
    pid=$!
    .venv/bin/pytest --durations=10 tests/unit tests/integration tests/compat tests/faults \
        tests/drill tests/docs tests/e2e/test_scheduler_*.py || rc_rest=$?
    wait "$pid" || rc_lifecycle=$?
    header "pytest, group lifecycle (e2e but the scheduler, browser, chart), run beside the above"
    cat "$log"
    rm -f "$log"
    note "both groups took $((SECONDS - start)) s (wall clock)"
    if ((rc_rest != 0)); then return "$rc_rest"; fi
    return "$rc_lifecycle"
}

if (($#)); then
    step "pytest" .venv/bin/pytest --durations=15 "$@" # the 15 slowest, then time per layer
else
    step "pytest (two groups at once)" pytest_in_two_groups
fi

if ((${#failed[@]})); then
    header "FAILED: ${failed[*]}"
    exit "$status"
fi
header "All checks passed"
