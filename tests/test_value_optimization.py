"""The value optimization on tiny random models: the suffix forward gives the full forward's logits, requests optimized
together equal requests optimized alone, chunks equal one batch, early stopping stops each request on its own, and
the quasi-Newton solver gets at least as far as Adam in the same number of passes."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_state_equal, snapshot
from test_editors import MODELS, REQ, llama4, target_logprob, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.editors.architectures import get_arch
from hf_edit_patch.editors.hooks import applying, btd
from hf_edit_patch.editors.hparams import HParamsError, MemitHParams, RomeHParams
from hf_edit_patch.editors.prompts import (
    context_templates,
    input_output_at,
    subject_activations,
    subject_key,
    subject_last_index,
)
from hf_edit_patch.editors.value import optimize_value, optimize_values
from hf_edit_patch.editors.value_forward import FullForward, SuffixForward, loss_rows, reference_pass

REQS = [
    REQ,
    hep.EditRequest(prompt="the capital of {} is", subject="japan", target_new="berlin"),
    hep.EditRequest(prompt="where is {} ?", subject="the colosseum", target_new="london"),
]
SMALL = {"n_context_templates": 2, "context_length": 3, "mom2_adjustment": False}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread (on a busy 2-core machine two threads make these small ops far slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def contexts_of(model, tok):
    return context_templates(model, tok, SMALL["n_context_templates"], SMALL["context_length"], 0)


def passes(caplog) -> list[int]:
    """The forward+backward pass counts the value optimization logged, one per chunk."""
    return [int(m) for m in re.findall(r"(\d+) forward\+backward passes", caplog.text)]


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize(("where", "group_cost"), [("mlp_out", 64), ("mlp_out", 0), ("block", 0)])
def test_suffix_forward_gives_the_full_forwards_logits(arch, where, group_cost, tok):
    model = MODELS[arch](tok)
    base = snapshot(model)
    spec = get_arch(model)
    module = spec.mlp_out.format(1) if where == "mlp_out" else f"{spec.layers}.2"
    rows = loss_rows(tok, REQS, contexts_of(model, tok))
    ref = reference_pass(model, rows, module, {}, cache=True)
    suffix = SuffixForward(model, rows, module, {}, ref, group_cost=group_cost)
    assert (len(suffix.groups) > 1) == (group_cost == 0)  # no padding allowed: one group per suffix length
    assert suffix.matches(ref, atol=1e-4)
    full = FullForward(model, rows, module, {}, checkpoint=False)
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(len(rows), ref.values.shape[1], generator=gen) * ref.values.norm(dim=-1, keepdim=True)
    for select in (range(len(rows)), [0, 3, len(rows) - 1]):
        suffix.select(select)
        full.select(select)
        with torch.no_grad(), suffix.session(delta[list(select)]) as run:
            fast = run()
        with torch.no_grad(), full.session(delta[list(select)]) as run:
            slow = run()
        # the same float32 arithmetic on differently shaped batches: rounding differences only (~1e-6 here)
        assert fast.shape == slow.shape and torch.allclose(fast, slow, atol=1e-4), (fast - slow).abs().max()
    assert_state_equal(model, base)
    assert all("forward" not in vars(block) for block in model.get_submodule(spec.layers))


def test_suffix_forward_with_edits_in_progress_moves_only_the_row_with_a_delta(tok):
    model = llama4(tok)
    module = "model.layers.1.mlp.down_proj"
    shift = torch.linspace(-1, 1, 48)
    edits = {module: lambda out, _inputs: out + shift}  # as a previous ROME edit of the same matrix
    rows = loss_rows(tok, REQS, contexts_of(model, tok))
    ref = reference_pass(model, rows, module, edits, cache=True)
    suffix = SuffixForward(model, rows, module, edits, ref)
    assert suffix.matches(ref, atol=1e-4)
    delta = torch.zeros(len(rows), 48)
    with torch.no_grad(), suffix.session(delta) as run:
        still = run()
    delta[1] = 3.0
    with torch.no_grad(), suffix.session(delta) as run:
        fast = run()
    with torch.no_grad(), FullForward(model, rows, module, edits, checkpoint=False).session(delta) as run:
        slow = run()
    assert torch.allclose(fast, slow, atol=1e-4), (fast - slow).abs().max()
    first = len(rows.positions[0])
    moved = torch.zeros(len(fast), dtype=torch.bool)
    moved[first : first + len(rows.positions[1])] = True
    assert torch.allclose(fast[~moved], still[~moved], atol=1e-5)
    assert (fast[moved] - still[moved]).abs().max() > 1e-2


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_batched_requests_equal_requests_optimized_alone(solver, tok):
    model = llama4(tok)
    module = "model.layers.1.mlp.down_proj"
    contexts = contexts_of(model, tok)
    hp = RomeHParams(**SMALL, v_solver=solver, v_num_grad_steps=12)
    v, v_star = optimize_values(model, tok, REQS, module, contexts, hp)
    for i, req in enumerate(REQS):
        v1, v1_star = optimize_value(model, tok, req, module, contexts, hp)
        assert torch.allclose(v[i], v1, atol=1e-5)
        # the same per-request arithmetic in a padded batch: float32 rounding (~1e-6 of ||δ|| here); the bound leaves
        # room for Adam's normalized steps to amplify it where a gradient component is near zero
        err = (v_star[i] - v1_star).norm() / (v1_star - v1).norm()
        assert err < 1e-4, (i, float(err))


def test_token_budget_chunks_give_the_same_values(tok, caplog):
    model = llama4(tok)
    module = "model.layers.2"
    contexts = contexts_of(model, tok)
    together = optimize_values(model, tok, REQS, module, contexts, MemitHParams(**SMALL, v_num_grad_steps=8))
    caplog.set_level("INFO", logger="hf_edit_patch.editors.value")
    alone = optimize_values(
        model, tok, REQS, module, contexts, MemitHParams(**SMALL, v_num_grad_steps=8, v_batch_tokens=1)
    )
    assert len(passes(caplog)) == len(REQS)  # a budget below one request's rows: one chunk per request
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def initial_nll(model, tok, req, contexts) -> float:
    texts = [c.format(req.prompt).format(req.subject) for c in contexts]
    return -sum(target_logprob(model, tok, t, req.target_new) for t in texts) / len(texts)


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_early_stopping_stops_each_request_on_its_own(solver, tok, caplog):
    model = llama4(tok)
    module = "model.layers.1.mlp.down_proj"
    contexts = contexts_of(model, tok)
    nll = [initial_nll(model, tok, r, contexts) for r in REQS]
    low, high = sorted(range(len(REQS)), key=nll.__getitem__)[0], max(range(len(REQS)), key=nll.__getitem__)
    assert nll[high] - nll[low] > 0.1, nll
    caplog.set_level("INFO", logger="hf_edit_patch.editors.value")
    hp = RomeHParams(**SMALL, v_solver=solver, v_num_grad_steps=6, early_stop_loss=(nll[low] + nll[high]) / 2)
    v, v_star = optimize_values(model, tok, REQS, module, contexts, hp)
    assert torch.equal(v_star[low], v[low])  # below the threshold from the start: never moved
    assert not torch.allclose(v_star[high], v[high])
    everyone = RomeHParams(**SMALL, v_solver=solver, v_num_grad_steps=6, early_stop_loss=1e9)
    v, v_star = optimize_values(model, tok, REQS, module, contexts, everyone)
    assert torch.equal(v_star, v) and passes(caplog)[-1] == 0  # all below: not a single backward pass


def objective(model, tok, req, module, contexts, hp, value) -> float:
    """The value optimization's loss with the module's output at the subject set to `value`, computed afresh."""
    v = input_output_at(model, tok, module, req.prompt, req.subject)[1]

    def put_at(index):
        def edit(output, _inputs, index=index):
            out = btd(output, 1).clone()
            out[0, index] = out[0, index] + (value - v).to(out.dtype)
            return out.view(output.shape)

        return edit

    texts = [c.format(req.prompt) for c in contexts]
    nll = 0.0
    for t in texts:
        with applying(model, {module: put_at(subject_last_index(tok, t, req.subject))}):
            nll -= target_logprob(model, tok, t.format(req.subject), req.target_new)
    kl_text = "{} is a"
    ids = torch.tensor([tok(kl_text.format(req.subject)).input_ids])
    j = subject_last_index(tok, kl_text, req.subject)
    with torch.no_grad():
        p0 = torch.log_softmax(model(input_ids=ids).logits[0, j], -1)
        with applying(model, {module: put_at(j)}):
            p1 = torch.log_softmax(model(input_ids=ids).logits[0, j], -1)
    kl = float((p0.exp() * (p0 - p1)).sum())
    decay = float((value - v).pow(2).sum() / v.pow(2).sum())
    return nll / len(texts) + hp.kl_factor * kl + hp.v_weight_decay * decay


def test_lbfgs_gets_at_least_as_far_as_adam_in_as_many_passes(tok):
    model = llama4(tok)
    module = "model.layers.1.mlp.down_proj"
    contexts = contexts_of(model, tok)
    results = {}
    for solver in ("adam", "lbfgs"):
        hp = RomeHParams(**SMALL, v_solver=solver, v_num_grad_steps=15, early_stop_loss=0.0)
        _, v_star = optimize_values(model, tok, REQS, module, contexts, hp)
        results[solver] = [objective(model, tok, r, module, contexts, hp, v_star[i]) for i, r in enumerate(REQS)]
    start = [
        objective(model, tok, r, module, contexts, hp, input_output_at(model, tok, module, r.prompt, r.subject)[1])
        for r in REQS
    ]
    for i in range(len(REQS)):
        assert results["lbfgs"][i] <= results["adam"][i] + 1e-3, (results, start)
        assert results["lbfgs"][i] < start[i] - 0.1, (results, start)


def test_unknown_solver_is_a_clear_error():
    with pytest.raises(HParamsError, match=r"v_solver must be one of \('lbfgs', 'adam'\), got 'sgd'"):
        RomeHParams(v_solver="sgd")
    with pytest.raises(HParamsError, match="v_batch_tokens must be a number > 0"):
        MemitHParams(v_batch_tokens=0)


@pytest.mark.parametrize("arch", MODELS)
def test_subject_activations_match_the_per_request_functions(arch, tok):
    model = MODELS[arch](tok)
    spec = get_arch(model)
    key_module, out_module = spec.mlp_out.format(1), f"{spec.layers}.2"
    contexts = contexts_of(model, tok)
    edits = {key_module: lambda out, _inputs: out * 1.5}
    for batch_tokens in (1, 4096):
        acts = subject_activations(
            model, tok, REQS, contexts, keys=[key_module], outputs=[out_module], edits=edits, batch_tokens=batch_tokens
        )
        for i, req in enumerate(REQS):
            key = subject_key(model, tok, key_module, req, contexts, edits)
            out = input_output_at(model, tok, out_module, req.prompt, req.subject, edits)[1]
            assert torch.allclose(acts[key_module][i], key, atol=1e-5)
            assert torch.allclose(acts[out_module][i], out, atol=1e-5)


def test_requests_with_one_subject_share_one_delta_in_request_order(tok):
    """Two questions about one subject (interleaved with another subject) get one δ, optimized on both prompts; the
    outputs stay in request order, and turning sharing off optimizes each request on its own again."""
    model = llama4(tok)
    module = "model.layers.2"
    contexts = contexts_of(model, tok)
    japan = [REQS[1], hep.EditRequest(prompt="{} has its capital in", subject="japan", target_new="london")]
    reqs = [japan[0], REQS[2], japan[1]]
    hp = MemitHParams(**SMALL, v_num_grad_steps=6)
    v, v_star = optimize_values(model, tok, reqs, module, contexts, hp)
    delta = v_star - v
    assert torch.allclose(delta[0], delta[2], atol=1e-6)
    assert not torch.allclose(v[0], v[2])  # different prompts: different values, one shift
    pair_v, pair_star = optimize_values(model, tok, japan, module, contexts, hp)
    assert torch.allclose(pair_v, v[[0, 2]], atol=1e-5)
    assert torch.allclose(pair_star - pair_v, delta[[0, 2]], atol=1e-4, rtol=1e-4)
    alone_v, alone_star = optimize_value(model, tok, REQS[2], module, contexts, hp)
    assert torch.allclose(alone_star - alone_v, delta[1], atol=1e-4, rtol=1e-4)

    apart = MemitHParams(**SMALL, v_num_grad_steps=6, v_share_subject=False)
    v2, v2_star = optimize_values(model, tok, reqs, module, contexts, apart)
    assert torch.allclose(v2, v, atol=1e-5)
    assert not torch.allclose(v2_star[0] - v2[0], v2_star[2] - v2[2], atol=1e-3)
    for i, req in enumerate(reqs):
        one_v, one_star = optimize_value(model, tok, req, module, contexts, apart)
        assert torch.allclose(v2_star[i] - v2[i], one_star - one_v, atol=1e-4, rtol=1e-4)
