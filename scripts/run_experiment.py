"""Runs the paper's editing experiments and plots them: `hf-edit-patch experiment` (see
`hf_edit_patch.evaluation.experiment`).

Usage (SmolLM2-135M-Instruct, ROME, 30 sequential ZsRE edits, four regularizers at the same budget):
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/run_experiment.py \
        --data ../shared/data/editing/zsre_eval.json --task-data-dir ../shared/data/tasks \
        --drift-texts ../shared/data/tasks/boolq_dev.jsonl --stats-dataset ../shared/data/tasks/boolq_dev.jsonl \
        --stats-text-field passage --hparams '{"mom2_n_samples": 300}' \
        --regularizers none rect:0.4 random:0.4 pca:0.4 --checkpoints 10 20 30 --output-dir out/exp-rome

Rerunning the same command resumes: finished checkpoints are kept and saved patches are re-attached.
"""

import sys

from hf_edit_patch.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
