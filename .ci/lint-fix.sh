#!/usr/bin/env bash
# Apply ruff's safe automatic fixes and its formatter to the whole tree (config in pyproject.toml),
# then show what is left for a person to fix. Run once after the branches are merged: formatting
# while several branches edit the same files would make every merge conflict.
# Usage: bash .ci/lint-fix.sh [path-to-ruff]   (default: .venv/bin/ruff, else ruff on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF="${1:-}"
if [ -z "$RUFF" ]; then
    if [ -x .venv/bin/ruff ]; then RUFF=.venv/bin/ruff; else RUFF=ruff; fi
fi
PATHS=(src tests benchmarks examples)
# --fix first (import sorting, unused imports, pyupgrade), then the formatter, whose output the
# fixes do not change; the check afterwards lists the findings that need a decision.
"$RUFF" check --fix --silent "${PATHS[@]}" || true
"$RUFF" format --quiet "${PATHS[@]}"
echo "left after the automatic fixes:"
"$RUFF" check --statistics "${PATHS[@]}" || true
