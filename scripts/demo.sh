#!/usr/bin/env bash
# The demo on the default model (SmolLM2-135M-Instruct): build, attach, save, reload, stack and remove patches.
# Extra arguments go to `hf-edit-patch demo` (e.g. --model gpt2 --output-dir out/demo, --no-progress).
# The first run converts the model and computes key statistics (on 2 CPU cores: about 1.5 min idle, up to about
# 20 min when other processes share them; progress bars on stderr); both are cached for later runs.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m hf_edit_patch.cli demo "$@"
