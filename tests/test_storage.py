from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_TARGETS
from helpers import random_patch
from safetensors.torch import load_file

import hf_edit_patch as hep
from hf_edit_patch.patch import encoding as storage


def _delta(shape, flat, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(len(flat), generator=gen).to(dtype)
    return hep.SparseDelta.from_flat(torch.tensor(flat, dtype=torch.int64), values, shape)


def test_sparse_delta_canonical_order_and_conversions():
    d = hep.SparseDelta(torch.tensor([[2, 0, 1], [1, 3, 0]]), torch.tensor([1.0, 2.0, 3.0]), (3, 4))
    assert d.indices.tolist() == [[0, 1, 2], [3, 0, 1]]
    assert d.values.tolist() == [2.0, 3.0, 1.0]
    assert d.flat_indices.tolist() == [3, 4, 9]
    dense = d.to_dense()
    assert dense.shape == (3, 4) and dense[2, 1] == 1.0 and dense.count_nonzero() == 3
    assert hep.SparseDelta.from_sparse_coo(d.to_sparse_coo()).equal(d)
    assert hep.SparseDelta.from_dense(dense).equal(d)
    assert d.to(dtype=torch.float16).dtype == torch.float16
    assert "nnz=3" in repr(d)


def test_from_sparse_coo_sums_duplicates():
    t = torch.sparse_coo_tensor(
        torch.tensor([[0, 0], [1, 1]]), torch.tensor([1.0, 2.0]), (2, 2), check_invariants=True
    )
    d = hep.SparseDelta.from_sparse_coo(t)
    assert d.nnz == 1 and d.values.item() == 3.0


@pytest.mark.parametrize(
    ("shape", "flat", "expected"),
    [
        ((48, 32), list(range(0, 48 * 32, 2)), "bitmask"),  # dense: a bit per entry wins
        ((32, 4000), [5, 4100, 9000, 70000, 127999], "coo"),  # a handful of entries: 4·rows of csr is too much
        ((8, 70000), list(range(0, 8 * 70000, 997)), "csr"),  # sparse but >rows entries; cols > 65536: int32
        ((16, 512), list(range(0, 16 * 512, 37)), "csr"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_each_encoding_round_trips_exactly(shape, flat, expected, dtype):
    delta = _delta(shape, flat, dtype)
    assert storage.choose_encoding(delta) == expected
    sizes = {enc: storage.encoded_nbytes(delta, enc) for enc in storage.PARTS}
    assert sizes[expected] == min(sizes.values())
    for enc in storage.PARTS:  # every encoding is exact, not only the chosen one
        tensors = storage.encode("m", delta, enc)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == storage.encoded_nbytes(delta, enc)
        rec = hep.ModuleRecord(shape=shape, nnz=delta.nnz, encoding=enc)
        assert storage.decode("m", tensors, rec, dtype).equal(delta)


def test_save_load_round_trip_is_bit_exact(llama, tmp_path):
    patch = random_patch(llama, LLAMA_TARGETS, keep_ratio=0.3)
    patch.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "patch_config.json", "patch_model.safetensors"]
    loaded = hep.EditPatch.from_pretrained(tmp_path)
    assert loaded.target_modules == patch.target_modules
    assert all(loaded.deltas[n].equal(patch.deltas[n]) for n in patch.deltas)
    assert loaded.config == patch.config
    raw = json.loads((tmp_path / "patch_config.json").read_text())
    for key in (
        "base_model_name_or_path",
        "base_model_revision",
        "editor",
        "editor_hparams",
        "regularizer",
        "keep_ratio",
        "requests",
        "parent_patches",
        "value_dtype",
        "library_version",
        "content_hash",
    ):
        assert key in raw
    assert all(rec["fingerprint"].startswith("sha256:") for rec in raw["modules"].values())
    assert {rec["encoding"] for rec in raw["modules"].values()} == {"bitmask"}
    assert set(load_file(tmp_path / "patch_model.safetensors")) == {
        f"{n}.{part}" for n in LLAMA_TARGETS for part in ("mask", "values")
    }


def test_value_dtype_auto_and_explicit(llama):
    name = LLAMA_TARGETS[0]
    w = llama.get_submodule(name).weight
    small = hep.EditPatch.from_deltas({name: torch.randn_like(w) * 1e-2}, llama, keep_ratio=0.5)
    assert small.config.value_dtype == "float16"
    huge = hep.EditPatch.from_deltas({name: torch.randn_like(w) * 1e6}, llama, keep_ratio=0.5)
    assert huge.config.value_dtype == "float32"
    tiny = hep.EditPatch.from_deltas({name: torch.randn_like(w) * 1e-7}, llama, keep_ratio=0.5)
    assert tiny.config.value_dtype == "float32"  # fp16 subnormals would lose most of the precision
    exact = torch.randn_like(w)
    full = hep.EditPatch.from_deltas({name: exact}, llama, value_dtype="float32")
    assert full.config.regularizer is None and full.nnz == w.numel()
    assert torch.equal(full.deltas[name].to_dense(), exact)
    with pytest.raises(ValueError, match="overflows"):
        hep.EditPatch.from_deltas({name: torch.randn_like(w) * 1e6}, llama, keep_ratio=0.5, value_dtype="float16")
    with pytest.raises(ValueError, match="value_dtype must be"):
        hep.EditPatch.from_deltas({name: exact}, llama, value_dtype="int8")


def test_bytes_per_weight_entry_at_keep_0_4_is_under_half_of_dense_fp16(llama):
    patch = random_patch(llama, LLAMA_TARGETS, keep_ratio=0.4)
    numel = sum(d.numel for d in patch.deltas.values())
    assert patch.nbytes() / numel <= 1.0
    assert set(patch.encodings().values()) == {"bitmask"}


def test_content_hash_is_independent_of_encoding_and_sensitive_to_values():
    d = _delta((16, 512), list(range(0, 8192, 37)))
    h = storage.content_hash({"m": d})
    for enc in storage.PARTS:
        rec = hep.ModuleRecord(shape=(16, 512), nnz=d.nnz, encoding=enc)
        assert storage.content_hash({"m": storage.decode("m", storage.encode("m", d, enc), rec, d.dtype)}) == h
    changed = hep.SparseDelta.from_flat(
        d.flat_indices, d.values.clone().index_fill_(0, torch.tensor([3]), 1.0), d.shape
    )
    assert storage.content_hash({"m": changed}) != h


def test_fingerprint_sees_single_bit_and_dtype_changes():
    w = torch.randn(16, 8)
    fp = hep.fingerprint(w)
    w2 = w.clone()
    w2.view(-1).view(torch.int32)[5] ^= 1
    assert hep.fingerprint(w2) != fp
    assert hep.fingerprint(w.to(torch.float64)) != fp
    assert hep.fingerprint(w.reshape(8, 16)) != fp
    assert hep.fingerprint(w.clone()) == fp


def test_config_round_trip_and_newer_keys_warn():
    cfg = hep.PatchConfig(
        editor="rome",
        regularizer="rect",
        keep_ratio=0.4,
        requests=[{"subject": "x"}],
        modules={"a.b": hep.ModuleRecord(shape=(2, 3), nnz=4)},
    )
    assert hep.PatchConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
    data = cfg.to_dict()
    data["from_the_future"] = 1
    data["modules"]["a.b"]["also_new"] = True
    with pytest.warns(UserWarning) as record:
        assert hep.PatchConfig.from_dict(data) == cfg
    messages = [str(w.message) for w in record]
    assert any("from_the_future" in m and "upgrade hf_edit_patch" in m for m in messages)
    assert any("also_new" in m for m in messages)
    for bad, match in [
        ({"keep_ratio": 0}, "keep_ratio"),
        ({"regularizer": "magic"}, "regularizer"),
        ({"value_dtype": "int8"}, "value_dtype"),
        ({"format_version": 99}, "upgrade"),
        ({"patch_type": "LORA"}, "not an edit patch"),
    ]:
        with pytest.raises(ValueError, match=match):
            hep.PatchConfig(**bad)
