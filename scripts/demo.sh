#!/usr/bin/env bash
# The demo on the default model (SmolLM2-135M-Instruct): build, attach, save, reload, stack and remove patches.
# Extra arguments go to `hf-edit-patch demo` (e.g. --model gpt2 --output-dir out/demo).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m hf_edit_patch.cli demo "$@"
