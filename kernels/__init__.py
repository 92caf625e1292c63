"""Triton kernels with a pure-torch reference twin each; installed as `hf_edit_patch.kernels`."""
