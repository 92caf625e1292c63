"""Pushes a saved patch folder and its evaluation to the Hub in one commit; the same as `hf-edit-patch push`.

Usage:
    hf-edit-patch edit --prompt "{} is located in the city of" --subject "The Eiffel Tower" --target-new Rome \
        --stats-dataset corpus.txt -o out/eiffel
    hf-edit-patch eval out/eiffel --tasks nli sentiment --task-limit 50 --task-data-dir ../shared/data/tasks
    python scripts/push_patch.py out/eiffel user/eiffel-rome-rect --private     # --dry-run DIR to preview

The repo gets the patch files, `evaluation/` (eval.json, scores.png, its card) and a README.md patch card whose
`model-index` holds the evaluation. See `hf_edit_patch.evaluation.publish.push_patch_folder`.
"""

import sys

from hf_edit_patch.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
