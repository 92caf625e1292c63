"""One stack per model: weight-changing calls from threads serialize, and a second wrapper joins the first's stack."""

from __future__ import annotations

import copy
import pickle
import sys
import threading

import pytest
import torch
from conftest import LLAMA_TARGETS, assert_state_equal, make_llama, snapshot
from helpers import expected_weights, random_patch

import hf_edit_patch as hep

pytestmark = pytest.mark.filterwarnings("ignore:the weights of")  # patches computed on the base: expected

ROUNDS = 25


@pytest.fixture
def fast_switching():
    """Switch threads as often as possible, so that a missing lock shows up within a few rounds."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _race(*calls):
    """Runs each call in its own thread, all released at once; re-raises the first error."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call):
        barrier.wait()
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _setup():
    model = make_llama(intermediate_size=256)
    base = snapshot(model)
    a = random_patch(model, LLAMA_TARGETS, keep_ratio=0.6, seed=1)
    b = random_patch(model, LLAMA_TARGETS, keep_ratio=0.6, seed=2)  # overlaps a on most entries
    return model, base, a, b


def test_concurrent_add_patch_gives_some_serial_order(fast_switching):
    model, base, a, b = _setup()
    bad = 0
    for _ in range(ROUNDS):
        pm = hep.PatchedModel(model)
        _race(lambda pm=pm: pm.add_patch(a, "a"), lambda pm=pm: pm.add_patch(b, "b"))
        order = pm.active_patches
        assert sorted(order) == ["a", "b"]
        want = expected_weights(base, [{"a": a, "b": b}[n] for n in order], model)
        state = model.state_dict()
        wrong = any(not torch.equal(state[k], want[k]) for k in want)
        pm.unload()
        bad += wrong or any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())
        model.load_state_dict(base)  # the next round starts from the base even if this one went wrong
    assert bad == 0, f"{bad} of {ROUNDS} rounds left weights that no serial order gives"


def test_add_racing_remove_gives_some_serial_order(fast_switching):
    model, base, a, b = _setup()
    bad = 0
    for _ in range(ROUNDS):
        pm = hep.PatchedModel(model).add_patch(a, "a")
        _race(lambda pm=pm: pm.remove_patch("a"), lambda pm=pm: pm.add_patch(b, "b"))
        assert pm.active_patches == ["b"]
        want = expected_weights(base, [b], model)
        state = model.state_dict()
        wrong = any(not torch.equal(state[k], want[k]) for k in want)
        pm.unload()
        bad += wrong or any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())
        model.load_state_dict(base)
    assert bad == 0, f"{bad} of {ROUNDS} rounds left weights that no serial order gives"


def test_many_threads_mixed_operations_end_exact(fast_switching):
    model, base, a, b = _setup()
    c = random_patch(model, LLAMA_TARGETS[1:], keep_ratio=0.5, seed=3)
    pm = hep.PatchedModel(model)
    seen_inside: list[bool] = []

    def disabled_look():
        with pm.disable_patches():
            seen_inside.append(all(torch.equal(v, base[k]) for k, v in model.state_dict().items()))

    for _ in range(5):
        _race(
            lambda: pm.add_patch(a, "a"),
            lambda: pm.add_patch(b, "b"),
            lambda: pm.add_patch(c, "c"),
            disabled_look,
        )
        order = pm.active_patches
        assert_state_equal(model, expected_weights(base, [{"a": a, "b": b, "c": c}[n] for n in order], model))
        _race(lambda: pm.remove_patch("b"), disabled_look, lambda: pm.remove_patch("a"))
        assert pm.active_patches == ["c"]
        assert_state_equal(model, expected_weights(base, [c], model))
        pm.unload()
        assert_state_equal(model, base)
    assert seen_inside and all(seen_inside), "disable_patches() showed patched weights inside the block"


def test_second_wrapper_joins_the_same_stack():
    model, base, a, b = _setup()
    pm1 = hep.PatchedModel(model)
    pm2 = hep.PatchedModel(model)
    pm1.add_patch(a, "a")
    pm2.add_patch(b, "b")
    assert pm1.active_patches == pm2.active_patches == ["a", "b"]
    assert_state_equal(model, expected_weights(base, [a, b], model))
    with pytest.raises(hep.PatchError, match="'a'"):  # one namespace of names for the model
        pm2.add_patch(b, "a")
    pm2.remove_patch("a")
    assert pm1.active_patches == ["b"]
    assert_state_equal(model, expected_weights(base, [b], model))
    assert pm1.unload() is model
    assert pm2.active_patches == []
    assert_state_equal(model, base)


def test_unload_in_attach_order_through_two_wrappers_is_exact():
    model, base, a, b = _setup()
    pm1, pm2 = hep.PatchedModel(model), hep.PatchedModel(model)
    pm1.add_patch(a, "a")
    pm2.add_patch(b, "b")
    pm1.unload()
    pm2.unload()
    assert_state_equal(model, base)


def test_inside_disable_another_wrapper_sees_the_block():
    model, base, a, _ = _setup()
    pm1 = hep.PatchedModel(model).add_patch(a, "a")
    pm2 = hep.PatchedModel(model)
    with pm1.disable_patches():
        assert_state_equal(model, base)
        with pytest.raises(hep.PatchError, match="disable_patches"):
            pm2.add_patch(a, "other")
    assert_state_equal(model, expected_weights(base, [a], model))


def test_copies_of_a_patched_model_carry_their_own_stack():
    model, base, a, _ = _setup()
    pm = hep.PatchedModel(model).add_patch(a, "a")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        other = hep.PatchedModel(clone)
        assert other.active_patches == ["a"]
        other.unload()
        assert_state_equal(clone, base)
    assert pm.active_patches == ["a"]  # the original is untouched
    assert_state_equal(model, expected_weights(base, [a], model))
    with pm.disable_patches():
        inside = copy.deepcopy(model)  # a copy taken with the patches off has the base weights and no patches
    assert hep.PatchedModel(inside).active_patches == []
    assert_state_equal(inside, base)
