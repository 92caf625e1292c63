"""Everything that reads or writes folders and the Hub: atomic files (`files.py`), local-or-Hub resolution
(`resolve.py`), one set of push options (`push.py`), model cards from templates (`cards.py`, `templates/`), the
default model's conversion cache (`default_model.py`), key statistics on disk and on the Hub (`stats_cache.py`,
`stats_sharing.py`, `nullspace.py`), corpora (`corpora.py`) and trained MEND editors (`mend.py`).

This layer knows files, not edits: it never imports patches, patched models, editing or evaluation."""
