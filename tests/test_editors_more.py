"""AlphaEdit, KN and MEND on tiny random models: the null-space property and its cache, KN's column-sparse edit,
MEND's training and round trip, and every method with every regularizer as an exactly removable patch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_state_equal, snapshot
from test_editors import FAST, MODELS, REQ, gpt2_4, llama4, target_logprob, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.editors import alphaedit, kn, memit, mend, spread
from hf_edit_patch.editors.architectures import get_arch
from hf_edit_patch.editors.hparams import AlphaEditHParams, KNHParams, MemitHParams
from hf_edit_patch.editors.prompts import input_output_at
from hf_edit_patch.hub.mend import CONFIG_NAME, WEIGHTS_NAME, load_mend_editor, save_mend_editor
from hf_edit_patch.hub.nullspace import NULLSPACE_DIR
from hf_edit_patch.hub.stats_cache import StatsCache

REQS = [
    REQ,
    hep.EditRequest(prompt="the capital of {} is", subject="japan", target_new="berlin", target_true="tokyo"),
    hep.EditRequest(prompt="{} is in the city of", subject="the colosseum", target_new="london", target_true="rome"),
]
CORPUS = [
    "the eiffel tower is in paris",
    "the capital of italy is rome",
    "big ben is in london . it is red",
    "the louvre museum is in paris , france",
    "tokyo is the capital of japan",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread. On a busy 2-core machine two threads make these small ops ~100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def width(model, name: str) -> int:
    weight = model.get_submodule(name).weight
    return weight.shape[1] if isinstance(model.get_submodule(name), torch.nn.Linear) else weight.shape[0]


def fake_targets(monkeypatch, module, scale=0.3):
    """Replaces the value optimization by a known shift of the last edited layer's output."""
    targets = {}

    def fake_values(model_, tok_, reqs, block, contexts, hp, edits=None, show_progress=None, desc=""):
        zs = [input_output_at(model_, tok_, block, req.prompt, req.subject)[1] for req in reqs]
        for req, z in zip(reqs, zs, strict=True):
            targets[req.subject] = z + scale * z.norm() / z.numel() ** 0.5
        return torch.stack(zs), torch.stack([targets[req.subject] for req in reqs])

    monkeypatch.setattr(module, "optimize_values", fake_values)
    return targets


# ---------------------------------------------------------------------------------------------------------------------
# AlphaEdit
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MODELS)
def test_alphaedit_update_is_orthogonal_to_the_preserved_keys(arch, tok, monkeypatch):
    model = MODELS[arch](tok)
    base = snapshot(model)
    spec = get_arch(model)
    layers = [1, 2]
    names = [spec.mlp_out.format(i) for i in layers]
    d = width(model, names[0])
    gen = torch.Generator().manual_seed(0)
    preserved = torch.randn(d // 2, d, generator=gen, dtype=torch.float64)  # K₀: half the key space is in use
    c = preserved.T @ preserved / preserved.shape[0] + 1e-2 * torch.eye(d, dtype=torch.float64)
    values, vectors = alphaedit.eigendecompose(c)
    projections = {n: alphaedit.projection(values, vectors, 5e-2) for n in names}
    targets = fake_targets(monkeypatch, spread)
    hp = AlphaEditHParams(layers=layers, l2=1e-4, **{**FAST, "n_context_templates": 0})
    deltas = alphaedit.alphaedit_deltas(model, tok, REQS, hp, spec, projections)
    assert_state_equal(model, base)
    moments = {n: c.float() for n in names}
    memit_deltas = memit.memit_deltas(
        model, tok, REQS, MemitHParams(layers=layers, mom2_update_weight=1.0, **hp_fast()), spec, moments
    )
    probe = torch.randn(5, d // 2, generator=gen, dtype=torch.float64) @ preserved  # keys in the preserved span
    for name in names:
        dense = hep.EditPatch.from_deltas({name: deltas[name]}, model, value_dtype="float32").deltas[name].to_dense()
        other = hep.EditPatch.from_deltas({name: memit_deltas[name]}, model, value_dtype="float32")
        other = other.deltas[name].to_dense()
        if spec.layout == "conv1d":
            dense, other = dense.T, other.T
        # |ΔW k| / (|ΔW| |k|) over keys k in the preserved span: zero up to float32 rounding for AlphaEdit
        ours = (dense.double() @ probe.T).norm(dim=0) / (dense.double().norm() * probe.norm(dim=1))
        theirs = (other.double() @ probe.T).norm(dim=0) / (other.double().norm() * probe.norm(dim=1))
        assert ours.max() < 1e-6 and theirs.min() > 1e3 * ours.max(), (ours.max(), theirs.min())
    # ... and the edit still lands: the null space is half the key space
    pm = hep.PatchedModel.from_pretrained(model, hep.EditPatch.from_deltas(deltas, model, value_dtype="float32"))
    block = f"{spec.layers}.2"
    for req in REQS:
        _, z = input_output_at(pm, tok, block, req.prompt, req.subject)
        with pm.disable_patches():
            _, z0 = input_output_at(pm, tok, block, req.prompt, req.subject)
        gap = (z - targets[req.subject]).norm() / (targets[req.subject] - z0).norm()
        assert gap < 0.1, gap


def hp_fast():
    return {**FAST, "n_context_templates": 0}


def test_alphaedit_previous_keys_are_disturbed_less(tok, monkeypatch):
    model = llama4(tok)
    spec = get_arch(model)
    names = [spec.mlp_out.format(i) for i in (1, 2)]
    projections = {n: torch.eye(96, dtype=torch.float64) for n in names}
    fake_targets(monkeypatch, spread)
    hp = AlphaEditHParams(layers=[1, 2], l2=1.0, **hp_fast())
    plain = alphaedit.alphaedit_deltas(model, tok, REQS[1:], hp, spec, projections)
    kept = alphaedit.alphaedit_deltas(model, tok, REQS[1:], hp, spec, projections, previous=[REQ])
    from hf_edit_patch.editors.prompts import keys_at

    for name in names:
        key = keys_at(model, tok, name, [REQ.prompt], REQ.subject)[0]
        moved = [float((u @ (v.T @ key)).norm()) for u, v in (plain[name], kept[name])]
        assert moved[1] < 0.5 * moved[0], moved


def write_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return str(path)


def test_alphaedit_projection_is_cached_and_reused(tok, tmp_path, monkeypatch):
    model = llama4(tok)
    model.config._name_or_path = "tiny/alphaedit-llama"  # an id: statistics and projections are cached
    cache = StatsCache(tmp_path / "stats")
    calls = []
    original = alphaedit.eigendecompose
    monkeypatch.setattr(alphaedit, "eigendecompose", lambda c: calls.append(1) or original(c))
    args = {"stats_dataset": write_corpus(tmp_path), "stats_cache": cache, "value_dtype": "float32"}
    hp = {**FAST, "layers": [1, 2], "mom2_n_samples": 5, "mom2_max_length": 16}
    first = hep.edit(model, tok, [REQ], method="alphaedit", hparams=hp, **args)
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "stats" / NULLSPACE_DIR).iterdir()) == sorted(
        e.path.name for e in cache.entries()
    )  # next to the second moments, under the same keys
    second = hep.edit(model, tok, [REQ], method="alphaedit", hparams=hp, **args)
    third = hep.edit(model, tok, [REQ], method="alphaedit", hparams={**hp, "nullspace_threshold": 1e-3}, **args)
    assert len(calls) == 2  # the eigendecomposition is threshold-free: nothing recomputed
    assert first.config.editor == "alphaedit" and first.config.editor_hparams["nullspace_threshold"] == 2e-2
    assert first.config.editor_hparams["layers"] == [1, 2]
    assert third.config.editor_hparams["nullspace_threshold"] == 1e-3
    for name in first.deltas:
        assert torch.equal(first.deltas[name].to_dense(), second.deltas[name].to_dense())


def test_alphaedit_empty_null_space_is_a_clear_error():
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="null space is empty.*raise nullspace_threshold"):
        alphaedit.projection(values, torch.eye(2), 0.5, name="m")


def test_alphaedit_sequential_records_parent_requests(tok, tmp_path):
    model = llama4(tok)
    model.config._name_or_path = "tiny/alphaedit-seq"
    base = snapshot(model)
    args = {"stats_dataset": write_corpus(tmp_path), "stats_cache": StatsCache(tmp_path / "s")}
    hp = {**FAST, "layers": [1, 2], "mom2_n_samples": 5, "mom2_max_length": 16}
    pm = hep.PatchedModel(model)
    pm.edit(tok, [REQ], method="alphaedit", hparams=hp, **args)
    second = pm.edit(tok, REQS[1:], method="alphaedit", hparams=hp, **args)
    assert second.config.editor_hparams["preserved_requests"] == 1
    pm.unload()
    assert_state_equal(model, base)


# ---------------------------------------------------------------------------------------------------------------------
# KN
# ---------------------------------------------------------------------------------------------------------------------

KN_REQ = hep.EditRequest(
    prompt="{} is located in the city of",
    subject="the eiffel tower",
    target_new="rome",
    target_true="paris",
    paraphrases=["where is the eiffel tower ? it is in the city of"],
)


@pytest.mark.parametrize("arch", MODELS)
def test_kn_changes_only_the_selected_neurons_and_raises_the_target(arch, tok):
    model = MODELS[arch](tok)
    base = snapshot(model)
    spec = get_arch(model)
    before = target_logprob(model, tok, KN_REQ.text, "rome")
    patch = hep.edit(model, tok, [KN_REQ], method="kn", hparams={"steps": 8}, value_dtype="float32", keep_ratio=None)
    assert_state_equal(model, base)
    neurons = patch.config.editor_hparams["neurons"][0]
    assert neurons and patch.config.editor == "kn"
    for name, delta in patch.deltas.items():
        layer = int(name.split(".")[-3])
        selected = {j for l_, j in neurons if l_ == layer}
        dense = delta.to_dense()
        touched = dense.abs().sum(0 if spec.layout == "linear" else 1).nonzero().flatten().tolist()
        assert set(touched) <= selected and touched, (touched, selected)
    pm = hep.PatchedModel.from_pretrained(model, patch)
    assert target_logprob(pm, tok, KN_REQ.text, "rome") > before + 0.05
    pm.unload()
    assert_state_equal(model, base)


def test_kn_integrated_gradients_are_complete(tok):
    """Completeness of integrated gradients: the attributions of a layer sum to P(y | a) − P(y | 0)."""
    model = llama4(tok)
    name = get_arch(model).mlp_out.format(2)
    y = tok(" paris", add_special_tokens=False).input_ids[0]
    scores, _ = kn.attribution_scores(model, tok, KN_REQ.text, y, [name], steps=200)
    ids = torch.tensor([tok(KN_REQ.text).input_ids])

    def prob(zero: bool) -> float:
        def pre(_m, args):
            x = args[0].clone()
            x[:, -1] = 0 if zero else x[:, -1]
            return (x,)

        handle = model.get_submodule(name).register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                return float(torch.softmax(model(input_ids=ids).logits[0, -1], -1)[y])
        finally:
            handle.remove()

    diff = prob(False) - prob(True)
    assert abs(float(scores.sum()) - diff) < 0.02 * abs(diff) + 1e-6, (float(scores.sum()), diff)


def test_kn_selection_rules(tok, monkeypatch):
    model = llama4(tok)
    modules = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    table = {
        KN_REQ.text: torch.tensor([[1.0, 0.5, 0.1], [0.25, -2.0, 0.0]]),
        KN_REQ.paraphrases[0]: torch.tensor([[0.1, 1.0, 0.0], [0.9, 0.0, 0.0]]),
    }
    monkeypatch.setattr(kn, "attribution_scores", lambda m, t, text, y, mods, steps: (table[text], -torch.ones(2, 3)))
    picked = kn.select_neurons(model, tok, KN_REQ, 5, modules, KNHParams(adaptive_threshold=0.2))
    # above 0.2·max: prompt 1 (0,0) (0,1) (1,0), prompt 2 (0,1) (1,0); in more than half the prompts: (0,1) (1,0),
    # ordered by total attribution (1.5, 1.15)
    assert [(m, j) for m, j, _ in picked] == [(modules[0], 1), (modules[1], 0)]
    assert all(sign == -1.0 for _, _, sign in picked)  # negative activations: the edit is flipped
    capped = kn.select_neurons(model, tok, KN_REQ, 5, modules, KNHParams(adaptive_threshold=0.2, max_neurons=1))
    assert [(m, j) for m, j, _ in capped] == [(modules[0], 1)]  # the larger total attribution (1.5 vs 1.15)


# ---------------------------------------------------------------------------------------------------------------------
# MEND
# ---------------------------------------------------------------------------------------------------------------------

CITIES = ["paris", "rome", "london", "berlin", "tokyo"]
PLACES = ["the eiffel tower", "the colosseum", "big ben", "the louvre museum", "france", "italy", "japan", "germany"]


def mend_records():
    out = []
    for i, place in enumerate(PLACES):
        for j, template in enumerate(["{} is in the city of", "the capital of {} is"]):
            out.append(
                hep.EditRequest(
                    prompt=template,
                    subject=place,
                    target_new=CITIES[(i + j) % len(CITIES)],
                    paraphrases=[f"where is {place} ? it is in"],
                    neighborhood=[f"the {['red', 'blue', 'green'][(i + j) % 3]} river is in"],
                )
            )
    return out[:12], out[12:]


def mean_post_edit_nll(model, tok, editor, reqs) -> float:
    total = 0.0
    for req in reqs:
        patch = hep.edit(
            model, tok, [req], method="mend", hparams={"editor": editor}, value_dtype="float32", keep_ratio=None
        )
        pm = hep.PatchedModel.from_pretrained(model, patch)
        total -= target_logprob(pm, tok, req.text, req.target_new)
        pm.unload()
    return total / len(reqs)


@pytest.fixture(scope="module")
def mend_pair(tok):
    model = llama4(tok)
    base = snapshot(model)
    train_reqs, held_out = mend_records()
    options = {"rank": 32, "lr": 1e-3, "lr_lr": 1e-3, "c_edit": 1.0, "show_progress": False}
    untrained = mend.train(model, tok, train_reqs, max_steps=0, **options)
    trained = mend.train(model, tok, train_reqs, max_steps=40, **options)
    assert_state_equal(model, base)  # the model is frozen: only the editor trains
    return model, untrained, trained, held_out


def test_mend_training_lowers_the_edit_loss_on_held_out_records(tok, mend_pair):
    model, untrained, trained, held_out = mend_pair
    before = mean_post_edit_nll(model, tok, untrained, held_out)
    after = mean_post_edit_nll(model, tok, trained, held_out)
    assert after < before - 0.1, (before, after)
    assert trained.config.training["max_steps"] == 40 and trained.config.training["records"] == 12
    assert trained.config.modules == [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]  # the last three


def test_mend_save_load_round_trip_is_exact(tok, mend_pair, tmp_path):
    model, _, trained, held_out = mend_pair
    save_mend_editor(trained, tmp_path / "editor")
    assert sorted(p.name for p in (tmp_path / "editor").iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    loaded = load_mend_editor(tmp_path / "editor")
    assert loaded.config == trained.config
    state, other = trained.state_dict(), loaded.state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)
    a = hep.edit(model, tok, held_out[:1], method="mend", hparams={"editor": trained}, value_dtype="float32")
    b = hep.edit(
        model, tok, held_out[:1], method="mend", hparams={"editor": str(tmp_path / "editor")}, value_dtype="float32"
    )
    for name in a.deltas:
        assert torch.equal(a.deltas[name].to_dense(), b.deltas[name].to_dense())
    assert b.config.editor_hparams["editor"] == str(tmp_path / "editor")
    assert b.config.editor_hparams["modules"] == trained.config.modules


def test_mend_rejects_a_model_it_was_not_trained_for(tok, mend_pair):
    _, _, trained, held_out = mend_pair
    with pytest.raises(ValueError, match="expects 'transformer.h|does not have"):
        hep.edit(gpt2_4(tok), tok, held_out[:1], method="mend", hparams={"editor": trained})
    with pytest.raises(ValueError, match="needs a trained editor"):
        hep.edit(llama4(tok), tok, held_out[:1], method="mend")


def test_mend_on_gpt2_gives_conv1d_deltas(tok):
    model = gpt2_4(tok)
    train_reqs, held_out = mend_records()
    editor = mend.train(model, tok, train_reqs[:4], max_steps=2, rank=16, layers=[2, 3], show_progress=False)
    patch = hep.edit(model, tok, held_out[:1], method="mend", hparams={"editor": editor}, keep_ratio=0.4)
    for name in ("transformer.h.2.mlp.c_proj", "transformer.h.3.mlp.c_proj"):
        assert patch.deltas[name].shape == tuple(model.get_submodule(name).weight.shape)  # [in, out]


# ---------------------------------------------------------------------------------------------------------------------
# Every method × every regularizer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def method_setup(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("methods")
    corpus = write_corpus(folder)
    setups = {}
    for arch in MODELS:
        model = MODELS[arch](tok)
        model.config._name_or_path = f"tiny/{arch}-methods"
        editor = mend.train(model, tok, mend_records()[0][:4], max_steps=1, rank=8, show_progress=False)
        setups[arch] = {
            "model": model,
            "kn": {"hparams": {"steps": 4, "layers": [1, 2]}},
            "mend": {"hparams": {"editor": editor}},
            "alphaedit": {
                "hparams": {**FAST, "layers": [1, 2], "v_num_grad_steps": 3, "mom2_n_samples": 5},
                "stats_dataset": corpus,
                "stats_cache": StatsCache(folder / "stats"),
            },
        }
    return setups


@pytest.mark.parametrize("method", ["kn", "mend", "alphaedit"])
@pytest.mark.parametrize(
    "arch,regularizer", [("llama", None), ("llama", "rect"), ("llama", "random"), ("llama", "pca"), ("gpt2", "rect")]
)
def test_every_method_with_every_regularizer_is_an_exact_patch(method, arch, regularizer, tok, method_setup, tmp_path):
    setup = method_setup[arch]
    model = setup["model"]
    base = snapshot(model)
    keep = None if regularizer is None else 0.4
    patch = hep.edit(model, tok, [KN_REQ], method=method, keep_ratio=keep, regularizer=regularizer, **setup[method])
    assert patch.config.editor == method and patch.config.regularizer == regularizer
    if keep is not None:
        for delta in patch.deltas.values():
            assert delta.nnz <= round(0.4 * delta.shape[0] * delta.shape[1])
    patch.save_pretrained(tmp_path / "p")
    loaded = hep.EditPatch.from_pretrained(tmp_path / "p")
    json.dumps(loaded.config.editor_hparams)  # JSON-safe provenance
    pm = hep.PatchedModel.from_pretrained(model, loaded)
    assert any(not torch.equal(model.get_submodule(n).weight, base[f"{n}.weight"]) for n in patch.deltas)
    pm.unload()
    assert_state_equal(model, base)
