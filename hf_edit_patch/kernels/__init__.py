"""Triton kernels, each `X.py` beside its pure-torch twin `X_reference.py`, and the dispatch between them."""
