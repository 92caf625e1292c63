"""The edit patch as data: `SparseDelta` (one module's kept entries), the storage encodings and fingerprints
(`encoding.py`), `PatchConfig` with its provenance (`config.py`), and `EditPatch` (`edit_patch.py`), which saves,
loads and pushes itself through `hf_edit_patch.hub`. Regularizers are looked up by name (`sparsifiers.py`); this
layer never computes an edit and never imports a regularizer."""
