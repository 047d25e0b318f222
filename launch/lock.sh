#!/usr/bin/env bash
# Refresh the tested set of versions, deliberately: a fresh venv gets the newest versions pyproject.toml allows
# (LATEST=1 bash launch/install.sh test), and launch/requirements.lock becomes exactly what it holds.
#
#   bash launch/lock.sh            # then run the suite (bash .ci/run) and commit the lock with what it changed
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
VENV="$tmp/venv" LATEST=1 bash launch/install.sh test
"$tmp/venv/bin/python" launch/lockfile.py write launch/requirements.lock
