#!/usr/bin/env bash
# The GPU checks in one command (issue 32): see scripts/device_check.py for what runs. On the device machine:
#   bash scripts/device_check.sh [--cifar DIR]        (about 8 minutes on one GPU)
# Its CPU half, here:  bash scripts/device_check.sh --device cpu --quick
set -uo pipefail
cd "$(dirname "$0")/.."
test -x .venv/bin/python || make install >&2
exec .venv/bin/python scripts/device_check.py "$@"
