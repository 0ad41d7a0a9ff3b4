# Sourced by the scripts: the project-local virtual environment, created and kept in step with
# pyproject.toml (reinstalled only when pyproject.toml changed since the last install).
# shellcheck shell=bash

find_python() {
  local candidate
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "workerkit needs Python 3.11 or newer (python3.11 or python3 on PATH)" >&2
  return 1
}

ensure_venv() {
  local python stamp want
  if [ ! -x .venv/bin/python ]; then
    python=$(find_python)
    "$python" -m venv .venv
  fi
  stamp=.venv/.workerkit-installed
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "== installing Python dependencies into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[redis,rq,celery,postgres,plot,dashboard,dev]'
    echo "$want" >"$stamp"
  fi
}
