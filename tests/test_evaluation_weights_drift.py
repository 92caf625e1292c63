"""weight_change_stats and drift: known answers on hand-made weights, dense references, PatchedModel handling."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import LLAMA_TARGETS, assert_state_equal, make_llama, snapshot
from helpers import expected_weights, random_patch

import hf_edit_patch as hep
from hf_edit_patch.evaluation import drift, weight_change_stats
from hf_edit_patch.evaluation import weights as weights_module

# --------------------------------------------------------------------------------------------------------------------
# weight_change_stats
# --------------------------------------------------------------------------------------------------------------------


def _reference_stats(base: dict, edited: dict, thresholds) -> dict:
    """Straightforward dense float64 computation, matrix by matrix."""
    manhattan, counts, n_entries, modules = 0.0, [0] * len(thresholds), 0, []
    for name, b in base.items():
        e = edited.get(name)
        if e is None or b.dim() != 2 or not b.is_floating_point() or e.shape != b.shape or torch.equal(b, e):
            continue
        b64, e64 = b.double(), e.double()
        d = (e64 - b64).abs()
        rel = torch.where(b64 == 0, torch.where(d == 0, 0.0, math.inf), d / b64.abs())
        manhattan += float(d.sum())
        counts = [c + int((rel > t).sum()) for c, t in zip(counts, thresholds, strict=True)]
        n_entries += b.numel()
        modules.append(name)
    return {
        "manhattan": manhattan,
        "frac_rel_change_gt": {t: c / n_entries for t, c in zip(thresholds, counts, strict=True)},
        "n_matrices": len(modules),
        "n_entries": n_entries,
        "modules": sorted(modules),
    }


def _assert_stats_close(got: dict, want: dict) -> None:
    assert got["modules"] == want["modules"]
    assert got["n_matrices"] == want["n_matrices"] > 0
    assert got["n_entries"] == want["n_entries"]
    assert got["manhattan"] == pytest.approx(want["manhattan"], rel=1e-12)
    assert got["frac_rel_change_gt"] == want["frac_rel_change_gt"]


def test_known_answer_small_matrices():
    base = {
        "a": torch.tensor([[1.0, 2.0], [0.0, 4.0]]),
        "same": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),  # unchanged: excluded, does not dilute the fractions
        "bias": torch.tensor([1.0, 2.0]),  # 1-D: excluded even though it changes
        "counts": torch.tensor([[1, 2], [3, 4]]),  # integer: excluded
    }
    edited = {
        "a": torch.tensor([[1.5, 2.0], [0.25, 3.0]]),
        "same": base["same"].clone(),
        "bias": torch.tensor([5.0, 6.0]),
        "counts": torch.tensor([[9, 9], [9, 9]]),
        "only_in_edited": torch.ones(2, 2),
    }
    stats = weight_change_stats(base, edited, thresholds=(0.1, 0.25, 0.5))
    # |ΔW| = [[0.5, 0], [0.25, 1]]; relative change = [[0.5, 0], [inf, 0.25]]
    assert stats["manhattan"] == 1.75
    assert stats["frac_rel_change_gt"] == {0.1: 0.75, 0.25: 0.5, 0.5: 0.25}
    assert stats["n_matrices"] == 1
    assert stats["n_entries"] == 4
    assert stats["modules"] == ["a"]
    assert isinstance(stats["manhattan"], float)


def test_threshold_is_strict():
    base = {"w": torch.tensor([[1.0, 2.0], [4.0, 8.0]])}
    edited = {"w": torch.tensor([[1.5, 3.0], [6.0, 12.0]])}  # every relative change is exactly 0.5
    stats = weight_change_stats(base, edited, thresholds=(0.5, 0.4999, 0.0))
    assert stats["frac_rel_change_gt"] == {0.5: 0.0, 0.4999: 1.0, 0.0: 1.0}
    assert stats["manhattan"] == 7.5


def test_zero_base_entries():
    base = {"w": torch.tensor([[0.0, 0.0, 0.0, 2.0]])}
    edited = {"w": torch.tensor([[0.0, 1e-6, -3.0, 2.0]])}
    stats = weight_change_stats(base, edited, thresholds=(0.0, 1e30))
    # 0 -> 0 is a relative change of 0 (never counted, even at t=0); 0 -> nonzero is +inf (always counted)
    assert stats["frac_rel_change_gt"] == {0.0: 0.5, 1e30: 0.5}
    assert stats["manhattan"] == pytest.approx(3.0 + 1e-6, rel=1e-7)


def test_no_differing_matrix():
    base = {"w": torch.randn(3, 4), "v": torch.randn(2, 2)}
    stats = weight_change_stats(base, {k: v.clone() for k, v in base.items()})
    assert stats == {
        "manhattan": 0.0,
        "frac_rel_change_gt": {0.077: 0.0, 0.171: 0.0},
        "n_matrices": 0,
        "n_entries": 0,
        "modules": [],
    }


def test_inputs_not_modified_float64():
    base = {"w": torch.tensor([[1.0, -2.0]], dtype=torch.float64)}
    edited = {"w": torch.tensor([[3.0, -2.5]], dtype=torch.float64)}
    stats = weight_change_stats(base, edited)
    assert stats["manhattan"] == 2.5
    assert torch.equal(base["w"], torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    assert torch.equal(edited["w"], torch.tensor([[3.0, -2.5]], dtype=torch.float64))


def test_mixed_dtypes_compare_values():
    base = {"w": torch.tensor([[1.0, 2.0]]), "u": torch.tensor([[1.0, 2.0]])}
    edited = {
        "w": torch.tensor([[1.0, 2.0]], dtype=torch.float64),
        "u": torch.tensor([[1.0, 3.0]], dtype=torch.float16),
    }
    stats = weight_change_stats(base, edited, thresholds=(0.4,))
    assert stats["modules"] == ["u"]
    assert stats["frac_rel_change_gt"] == {0.4: 0.5}


def test_two_llamas_one_matrix_modified():
    base, edited = make_llama(seed=0), make_llama(seed=0)
    name = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        w = edited.get_submodule(name).weight
        w[3, :5] += torch.tensor([0.5, -0.01, 0.002, 0.0, 1.0])
        w[0, 0] = 0.0
    thresholds = (0.077, 0.171)
    stats = weight_change_stats(base, edited, thresholds)
    want = _reference_stats(base.state_dict(), edited.state_dict(), thresholds)
    _assert_stats_close(stats, want)
    assert stats["modules"] == [f"{name}.weight"]
    assert stats["n_entries"] == w.numel()
    assert 0 < stats["frac_rel_change_gt"][0.171] <= stats["frac_rel_change_gt"][0.077] < 6 / w.numel() + 1e-12
    # a module against a state dict, either way round, gives the same
    assert weight_change_stats(base.state_dict(), edited) == stats
    assert weight_change_stats(base, edited.state_dict()) == stats


def test_patched_model_matches_dense(monkeypatch):
    model = make_llama(seed=0)
    base_state = snapshot(model)
    patch = random_patch(model, LLAMA_TARGETS, keep_ratio=0.4, scale=0.05)
    pm = hep.PatchedModel(model).add_patch(patch)
    dense = expected_weights(base_state, [patch], model)
    thresholds = (0.0, 0.077, 0.171, 1.0)
    want = _reference_stats(base_state, dense, thresholds)
    assert want["n_matrices"] == len(LLAMA_TARGETS)

    stats = weight_change_stats(base_state, pm, thresholds)
    _assert_stats_close(stats, want)
    assert stats["frac_rel_change_gt"][0.0] == pytest.approx(0.4, abs=0.02)  # keep_ratio of the entries changed
    # the chunked loop gives the same answer with chunks of a few rows (and a partial last chunk)
    monkeypatch.setattr(weights_module, "_CHUNK_ELEMENTS", 100)
    _assert_stats_close(weight_change_stats(base_state, pm, thresholds), want)
    # inside disable_patches() the model is the base again
    with pm.disable_patches():
        assert weight_change_stats(base_state, pm)["n_matrices"] == 0


@pytest.mark.parametrize(
    ("thresholds", "error", "match"),
    [
        ((), ValueError, "must not be empty"),
        ([0.1, -0.1], ValueError, "finite and >= 0"),
        ((float("nan"),), ValueError, "finite and >= 0"),
        ((float("inf"),), ValueError, "finite and >= 0"),
        (0.1, TypeError, "non-empty sequence"),
        ("0.1", TypeError, "non-empty sequence"),
        (("0.1",), TypeError, "real number"),
        ((True,), TypeError, "real number"),
    ],
)
def test_bad_thresholds(thresholds, error, match):
    base = {"w": torch.ones(2, 2)}
    with pytest.raises(error, match=match):
        weight_change_stats(base, {"w": torch.zeros(2, 2)}, thresholds)


def test_bad_inputs():
    good = {"w": torch.ones(2, 2)}
    with pytest.raises(TypeError, match="base must be a state dict"):
        weight_change_stats([torch.ones(2, 2)], good)
    with pytest.raises(TypeError, match="edited must be a state dict"):
        weight_change_stats(good, torch.ones(2, 2))
    with pytest.raises(TypeError, match=r"entry 'w' is a list"):
        weight_change_stats(good, {"w": [[1.0, 2.0]]})
    with pytest.raises(ValueError, match="share no 2-D floating-point weight name"):
        weight_change_stats(good, {"x": torch.ones(2, 2)})
    model = make_llama()
    pm = hep.PatchedModel(make_llama())
    with pytest.raises(ValueError, match="base_model"):  # a PatchedModel's own state dict has a prefix
        weight_change_stats(model, pm.state_dict())


# --------------------------------------------------------------------------------------------------------------------
# drift
# --------------------------------------------------------------------------------------------------------------------

TEXTS = [
    "the cat sat on the mat .",
    "a dog ran in the park and the cat sat",
    "paris is in france",
    "the sun is hot , the moon is cold , the sea is deep and blue .",
    "hello",  # one token: no next-token prediction
]


def _tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    assert len(vocab) <= 64  # the tiny Llama's vocabulary
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _perturbed(seed: int = 0, scale: float = 0.05):
    model = make_llama(seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in LLAMA_TARGETS:
            w = model.get_submodule(name).weight
            w.add_(torch.randn(w.shape, generator=gen) * scale)
    return model


def _reference(base, edited, tokenizer, text: str) -> tuple[float, float, float, int]:
    """KL, base perplexity and edited perplexity on one text, without padding or masking."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(base(ids).logits[0, :-1].double(), -1)
        lq = torch.log_softmax(edited(ids).logits[0, :-1].double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    target = ids[0, 1:].unsqueeze(-1)
    ppl_p = math.exp(float(-lp.gather(-1, target).mean()))
    ppl_q = math.exp(float(-lq.gather(-1, target).mean()))
    return kl, ppl_p, ppl_q, ids.shape[1] - 1


def test_identical_models_no_drift():
    tokenizer = _tokenizer()
    result = drift(make_llama(seed=0), make_llama(seed=0), tokenizer, TEXTS, batch_size=2)
    assert result["kl"] == pytest.approx(0.0, abs=1e-7)
    assert result["ppl_change"] == 0.0
    assert result["ppl_base"] == result["ppl_edited"] > 1.0
    assert result["n_tokens"] == sum(len(t.split()) - 1 for t in TEXTS)
    assert tokenizer.pad_token is None  # the tokenizer was not modified


def test_perturbed_model_matches_reference_on_one_text():
    tokenizer = _tokenizer()
    base, edited = make_llama(seed=0), _perturbed()
    text = TEXTS[3]
    result = drift(base, edited, tokenizer, [text])
    kl, ppl_base, ppl_edited, n = _reference(base, edited, tokenizer, text)
    assert kl > 1e-6
    assert result["n_tokens"] == n
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    assert result["ppl_base"] == pytest.approx(ppl_base, rel=1e-5)
    assert result["ppl_edited"] == pytest.approx(ppl_edited, rel=1e-5)
    assert result["ppl_change"] == pytest.approx(ppl_edited - ppl_base, rel=1e-3, abs=1e-6)
    assert result["ppl_change"] != 0.0


def test_padding_and_batch_size_do_not_matter():
    tokenizer = _tokenizer()
    base, edited = make_llama(seed=0), _perturbed()
    results = [drift(base, edited, tokenizer, TEXTS, batch_size=b) for b in (1, 2, 5)]
    assert results[0]["kl"] > 1e-6
    for r in results[1:]:
        assert r["n_tokens"] == results[0]["n_tokens"]
        assert r["kl"] == pytest.approx(results[0]["kl"], abs=1e-5, rel=1e-4)
        assert r["ppl_base"] == pytest.approx(results[0]["ppl_base"], rel=1e-5)
        assert r["ppl_edited"] == pytest.approx(results[0]["ppl_edited"], rel=1e-5)
    # batched means equal the token-weighted means of the per-text references
    refs = [_reference(base, edited, tokenizer, t) for t in TEXTS if len(t.split()) > 1]
    total = sum(r[3] for r in refs)
    assert results[2]["kl"] == pytest.approx(sum(r[0] * r[3] for r in refs) / total, rel=1e-4)


def test_max_length_truncates():
    tokenizer = _tokenizer()
    result = drift(make_llama(seed=0), _perturbed(), tokenizer, TEXTS, max_length=4)
    assert result["n_tokens"] == sum(min(len(t.split()), 4) - 1 for t in TEXTS)


def test_patched_model_base_none_equals_unpatched_copy():
    tokenizer = _tokenizer()
    model = make_llama(seed=0)
    pm = hep.PatchedModel(model).add_patch(random_patch(model, LLAMA_TARGETS, keep_ratio=0.5, scale=0.1))
    patched_state = snapshot(model)
    via_disable = drift(None, pm, tokenizer, TEXTS, batch_size=2)
    via_copy = drift(make_llama(seed=0), pm, tokenizer, TEXTS, batch_size=2)
    # the model under the PatchedModel has patched weights: it is recognised and the patches are disabled
    via_inner = drift(model, pm, tokenizer, TEXTS, batch_size=2)
    assert via_copy["kl"] > 1e-6
    for r in (via_disable, via_inner):
        assert r["kl"] == pytest.approx(via_copy["kl"], rel=1e-6, abs=1e-9)
        assert r["ppl_base"] == pytest.approx(via_copy["ppl_base"], rel=1e-6)
        assert r["ppl_edited"] == via_copy["ppl_edited"]
        assert r["n_tokens"] == via_copy["n_tokens"]
    assert pm.active_patches == ["default"]
    assert_state_equal(model, patched_state)  # the patches are back on, bit-exactly


def test_drift_bad_inputs():
    tokenizer = _tokenizer()
    base, edited = make_llama(seed=0), make_llama(seed=1)
    with pytest.raises(ValueError, match="texts is empty"):
        drift(base, edited, tokenizer, [])
    with pytest.raises(TypeError, match="sequence of strings"):
        drift(base, edited, tokenizer, "the cat")
    with pytest.raises(TypeError, match="item 1 is a int"):
        drift(base, edited, tokenizer, ["the cat", 3])
    with pytest.raises(ValueError, match="not a PatchedModel"):
        drift(None, edited, tokenizer, TEXTS)
    with pytest.raises(ValueError, match="batch_size"):
        drift(base, edited, tokenizer, TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        drift(base, edited, tokenizer, TEXTS, max_length=1)
    with pytest.raises(ValueError, match="two or more tokens"):
        drift(base, edited, tokenizer, ["hello", "cat"])
    with pytest.raises(TypeError, match="base_model must be"):
        drift("base", edited, tokenizer, TEXTS)


def test_evaluation_import_stays_light():
    code = (
        "import sys, hf_edit_patch.evaluation as e; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert {'drift', 'weight_change_stats', 'metrics'} <= set(e.__all__) and 'drift' in dir(e); "
        "e.metrics.exact_match('a', ['a']); "
        "assert 'torch' not in sys.modules; "
        "f = e.weight_change_stats; assert 'torch' in sys.modules and f.__module__.endswith('weights')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import hf_edit_patch.evaluation as evaluation

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        evaluation.nope  # noqa: B018


def test_drift_stays_the_function_once_the_modules_are_imported():
    import importlib

    import hf_edit_patch.evaluation as evaluation

    for module in ("divergence", "scoring", "edit_runs", "experiment.runner", "probes", "tasks.run", "study"):
        importlib.import_module(f"hf_edit_patch.evaluation.{module}")
    assert callable(evaluation.drift) and evaluation.drift.__name__ == "drift"
    assert callable(evaluation.label_probes) and callable(evaluation.run_general_tasks)
