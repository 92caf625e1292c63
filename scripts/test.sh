#!/usr/bin/env bash
# Lint and the whole test suite, slow integration tests on the real default model included.
# Extra arguments go to pytest (e.g. -m "not slow" for the fast tests only, or -k stack).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1  # before anything imports huggingface_hub: Hub calls fail fast instead of retrying
ruff check .
exec python -m pytest -q "$@"
