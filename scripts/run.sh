#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, then `python -m attnkit` (self-check of every
# op against its reference plus a timing table; GPU if there is one, else CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m attnkit "$@"
