#!/usr/bin/env bash
# Set up (a .venv in the repo, if missing or stale) and run the whole test suite plus the linter.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
bash scripts/setup.sh dev
if [[ -f scripts/ci_services.sh ]]; then
  # Chromium (browser tests) and PostgreSQL (review store tests); each test skips with a reason
  # when its service could not be installed.
  bash scripts/ci_services.sh || echo "warning: optional test services could not all be set up"
fi
.venv/bin/ruff check cellclf tests scripts
set +e
.venv/bin/python -m pytest -q -rs "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $rc
