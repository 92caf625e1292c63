"""Key statistics C = E[k kᵀ] for ROME / MEMIT: their computation (`editors.second_moments`, `editors.sampled_text`),
corpora, cache and Hub sharing (`hub.corpora`, `hub.stats_cache`, `hub.stats_sharing`), and the cached-or-computed
entry point (`editing.statistics.get_second_moments`)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import make_gpt2, make_llama  # noqa: E402
from safetensors import safe_open  # noqa: E402

from hf_edit_patch.editing import statistics  # noqa: E402
from hf_edit_patch.editing.statistics import get_second_moments  # noqa: E402
from hf_edit_patch.editors.sampled_text import model_sampled_texts  # noqa: E402
from hf_edit_patch.editors.second_moments import (  # noqa: E402
    compute_second_moments,
    estimate_second_moments,
    plan_passes,
)
from hf_edit_patch.errors import StatsError, StatsFormatError, StatsUnavailableError  # noqa: E402
from hf_edit_patch.hub import default_model as models  # noqa: E402
from hf_edit_patch.hub import push as hub_push  # noqa: E402
from hf_edit_patch.hub import resolve as hub  # noqa: E402
from hf_edit_patch.hub.corpora import TextSource, load_texts  # noqa: E402
from hf_edit_patch.hub.nullspace import NULLSPACE_DIR, EigenCache  # noqa: E402
from hf_edit_patch.hub.stats_cache import StatsCache, StatsKey  # noqa: E402
from hf_edit_patch.hub.stats_sharing import load_stats_from_hub, push_stats_to_hub  # noqa: E402

BOOLQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "boolq_dev.jsonl"
LLAMA_MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
GPT2_MODULES = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj", "transformer.h.1.mlp.c_fc"]
WORDS = [f"w{i}" for i in range(60)]
MAX_LENGTH = 16  # the texts have 1 to 24 words: some are truncated


def _tokenizer():
    """A word-level tokenizer over 64 ids, matching the tiny models' vocabularies."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<s>", "</s>", "<unk>", "<pad>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _texts(n: int = 13, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 24))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(_texts()) + "\n", encoding="utf-8")
    return path


def _brute_force(model, tokenizer, modules, texts, max_length=MAX_LENGTH) -> tuple[dict[str, torch.Tensor], int]:
    """kᵀk / n in float64 from each text run alone (no batching, no padding, no mask), with plain hooks."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def make_hook(name):
        return lambda module, args: captured[name].append(args[0].reshape(-1, args[0].shape[-1]).double())

    handles = [model.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in modules]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, chunks in captured.items():
        k = torch.cat(chunks)
        result[name] = k.T @ k / k.shape[0]
    return result, k.shape[0]


def _assert_matches_reference(C: torch.Tensor, reference: torch.Tensor) -> None:
    # C sums ~150 float32 outer products of O(1) entries: relative rounding of about sqrt(n)·2⁻²⁴ ≈ 1e-6, worst case
    # n·2⁻²⁴ ≈ 1e-5; batched fp32 forward passes differ from single ones by ~1e-6 too. Near-zero off-diagonal entries
    # are compared on the scale of the matrix.
    assert C.dtype == torch.float32 and C.device.type == "cpu"
    torch.testing.assert_close(C.double(), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def _count_calls(module: torch.nn.Module) -> list[int]:
    """How many times `module`'s forward starts (a pre-hook: a forward stopped inside it counts)."""
    calls = [0]

    def hook(mod, args):
        calls[0] += 1

    module.register_forward_pre_hook(hook)
    return calls


# --------------------------------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_model", "modules", "width"),
    [(make_llama, LLAMA_MODULES, {"down_proj": 48, "up_proj": 32}), (make_gpt2, GPT2_MODULES, {"c_proj": 128})],
    ids=["llama-linear", "gpt2-conv1d"],
)
def test_matches_brute_force_for_several_modules(make_model, modules, width, tokenizer):
    model = make_model()
    texts = _texts()
    reference, _ = _brute_force(model, tokenizer, modules, texts)
    result = compute_second_moments(
        model, tokenizer, modules, texts, max_length=MAX_LENGTH, batch_size=4, show_progress=False
    )
    assert list(result) == modules
    for name in modules:
        expected_width = width.get(name.rsplit(".", 1)[1], 32)
        assert result[name].shape == (expected_width, expected_width)
        _assert_matches_reference(result[name], reference[name])
        assert torch.equal(result[name], result[name].T)
    assert all(not model.get_submodule(name)._forward_pre_hooks for name in modules)  # hooks removed


def test_one_forward_per_batch_for_all_modules_and_early_stop(tokenizer):
    model = make_llama()
    first, last = _count_calls(model.model.layers[0]), _count_calls(model.model.layers[-1])
    head = _count_calls(model.lm_head)
    compute_second_moments(
        model, tokenizer, LLAMA_MODULES, _texts(), max_length=MAX_LENGTH, batch_size=4, show_progress=False
    )
    assert first[0] == 4  # 13 texts in batches of 4: one forward pass each, for all three modules
    assert last[0] == 4 and head[0] == 0  # stopped right after layer 1's down_proj: the LM head never ran

    first[0] = last[0] = 0
    compute_second_moments(
        model, tokenizer, ["model.layers.0.mlp.down_proj"], _texts(), batch_size=4, show_progress=False
    )
    assert first[0] == 4
    assert last[0] == 0  # only layer 0 was needed: the last decoder layer never ran


def test_padding_is_excluded_and_tokens_are_counted_exactly(tokenizer, tmp_path):
    model = make_llama()
    texts = _texts()
    lengths = [len(tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in texts]
    assert len(set(lengths)) > 3 and max(lengths) == MAX_LENGTH  # different lengths, some truncated
    results = [
        compute_second_moments(
            model, tokenizer, LLAMA_MODULES, texts, max_length=MAX_LENGTH, batch_size=size, show_progress=False
        )
        for size in (1, 4, 13)
    ]
    for other in results[1:]:
        for name in LLAMA_MODULES:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-5, atol=1e-6)

    _, count = estimate_second_moments(
        model,
        tokenizer,
        LLAMA_MODULES[:1],
        texts,
        sample_count=1000,
        max_length=MAX_LENGTH,
        batch_size=4,
        show_progress=False,
        max_bytes=2**20,
    )
    assert count == sum(lengths) == _brute_force(model, tokenizer, LLAMA_MODULES[:1], texts)[1]


def test_small_max_bytes_runs_several_passes_with_identical_results(tokenizer):
    model = make_llama()
    texts = _texts()
    one_pass = compute_second_moments(model, tokenizer, LLAMA_MODULES, texts, batch_size=4, show_progress=False)
    calls = _count_calls(model.model.layers[0])
    several = compute_second_moments(
        model, tokenizer, LLAMA_MODULES, texts, batch_size=4, show_progress=False, max_bytes=48 * 48 * 4
    )
    assert calls[0] == 3 * 4  # one module per pass: three passes of four batches
    assert list(several) == LLAMA_MODULES
    assert all(torch.equal(several[name], one_pass[name]) for name in LLAMA_MODULES)
    widths = dict.fromkeys(LLAMA_MODULES[:2], 48) | {LLAMA_MODULES[2]: 32}
    assert plan_passes(model, widths, 2 * 48 * 48 * 4) == [
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"],  # forward order, not the order asked
        ["model.layers.1.mlp.down_proj"],
    ]
    with pytest.raises(StatsError, match=r"max_bytes=1000 cannot hold the 48×48 float32 matrix .* max_bytes >= 9216"):
        compute_second_moments(model, tokenizer, LLAMA_MODULES, texts, max_bytes=1000, show_progress=False)


def test_model_mode_is_restored_and_bad_modules_are_rejected(tokenizer):
    model = make_llama().train()
    compute_second_moments(model, tokenizer, LLAMA_MODULES[:1], _texts(3), show_progress=False)
    assert model.training
    with pytest.raises(StatsError, match="did you mean") as info:
        compute_second_moments(model, tokenizer, ["model.layers.0.mlp.down_prj"], _texts(3), show_progress=False)
    assert isinstance(info.value, ValueError)
    with pytest.raises(StatsError, match="embedding"):
        compute_second_moments(model, tokenizer, ["model.embed_tokens"], _texts(3), show_progress=False)
    with pytest.raises(StatsError, match="duplicates"):
        compute_second_moments(model, tokenizer, LLAMA_MODULES[:1] * 2, _texts(3), show_progress=False)
    with pytest.raises(StatsError, match="no non-blank texts"):
        compute_second_moments(model, tokenizer, LLAMA_MODULES[:1], ["", "  "], show_progress=False)
    with pytest.raises(StatsError, match="batch_size must be a positive integer, got 0"):
        compute_second_moments(model, tokenizer, LLAMA_MODULES[:1], _texts(3), batch_size=0, show_progress=False)


# --------------------------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------------------------


def test_local_txt_json_and_jsonl_files(tmp_path: Path):
    txt = tmp_path / "a.txt"
    txt.write_text("first text\n\n  second text  \n\nthird\n", encoding="utf-8")
    assert load_texts(txt) == ["first text", "second text", "third"]
    assert load_texts(txt, sample_count=2) == ["first text", "second text"]

    strings = tmp_path / "b.json"
    strings.write_text(json.dumps(["one", "", "two"]), encoding="utf-8")
    assert load_texts(strings) == ["one", "two"]
    objects = tmp_path / "c.json"
    objects.write_text(json.dumps([{"passage": "p1", "q": 1}, {"passage": "p2"}]), encoding="utf-8")
    assert load_texts(objects, text_field="passage") == ["p1", "p2"]

    lines = tmp_path / "d.jsonl"
    lines.write_text('{"passage": "x", "answer": true}\n\n{"passage": "y"}\n"z"\n', encoding="utf-8")
    assert load_texts(lines, text_field="passage", sample_count=None) == ["x", "y", "z"]
    with pytest.raises(
        StatsFormatError, match=r"d.jsonl, line 1 has no field 'text' \(fields: \['answer', 'passage'\]"
    ):
        load_texts(lines)

    bad = tmp_path / "e.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(StatsFormatError, match="line 2 is not valid JSON"):
        load_texts(bad)
    mapping = tmp_path / "f.json"
    mapping.write_text(json.dumps({"text": "x"}), encoding="utf-8")
    with pytest.raises(StatsFormatError, match="holds a JSON dict; accepted: a list"):
        load_texts(mapping)
    with pytest.raises(StatsUnavailableError, match="does not exist"):
        load_texts(tmp_path / "missing.jsonl")
    csv = tmp_path / "g.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(StatsFormatError, match=r"suffix '.csv' is not one of \('.txt', '.json', '.jsonl'\)"):
        load_texts(csv)


def test_text_source_fingerprint_follows_content(tmp_path: Path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a"}\n', encoding="utf-8")
    source = TextSource(path)
    first = source.fingerprint()
    assert first.startswith("file:corpus.jsonl@sha256:") and source.is_local and source.key_text_field == "text"
    path.write_text('{"text": "b"}\n', encoding="utf-8")
    assert source.fingerprint() != first
    assert TextSource(tmp_path / "x.txt", text_field="ignored").key_text_field == ""  # no fields in .txt files

    wikitext = TextSource("wikitext")
    assert not wikitext.is_local
    assert wikitext.fingerprint() == "hf-dataset:Salesforce/wikitext:wikitext-103-raw-v1@train"
    saved = TextSource(tmp_path, split="validation")  # a folder: a dataset saved for `datasets.load_dataset`
    assert not saved.is_local and saved.fingerprint() == f"hf-dataset:{tmp_path}@validation"


def test_a_text_source_is_an_iterable_corpus(tokenizer, corpus):
    model = make_llama()
    source = TextSource(corpus)
    assert list(source) == source.take(None) == [t for t in _texts() if t.strip()]
    options = {"max_length": MAX_LENGTH, "batch_size": 4, "show_progress": False, "sample_count": 5}
    from_source = compute_second_moments(model, tokenizer, LLAMA_MODULES[:1], source, **options)
    from_list = compute_second_moments(model, tokenizer, LLAMA_MODULES[:1], _texts()[:5], **options)
    assert torch.equal(from_source[LLAMA_MODULES[0]], from_list[LLAMA_MODULES[0]])
    with pytest.raises(StatsError, match="texts must be an iterable of strings, got str"):
        compute_second_moments(model, tokenizer, LLAMA_MODULES[:1], "w1 w2", show_progress=False)


def test_dataset_id_without_datasets_package_says_what_to_do(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(StatsUnavailableError, match="pip install datasets") as info:
        load_texts("wikitext")
    assert "local .txt/.json/.jsonl file" in str(info.value) and "allow_model_sampled=True" in str(info.value)


def test_cached_statistics_of_a_hub_dataset_need_no_download(tokenizer, tmp_path, monkeypatch):
    """Statistics loaded from the Hub for stats_dataset='wikitext' are used without `datasets` or the Hub."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    cache = StatsCache(tmp_path / "stats")
    dataset = "hf-dataset:Salesforce/wikitext:wikitext-103-raw-v1@train"
    cache.put(StatsKey("tiny/llama", None, LLAMA_MODULES[0], dataset, "text", 1000, 256), torch.eye(48), count=5)
    options = {"stats_dataset": "wikitext", "cache": cache, "model_id": "tiny/llama", "show_progress": False}
    result = get_second_moments(make_llama(), tokenizer, LLAMA_MODULES[:1], **options)
    assert torch.equal(result[LLAMA_MODULES[0]], torch.eye(48))
    with pytest.raises(StatsUnavailableError, match="pip install datasets"):  # layer 1 is not cached
        get_second_moments(make_llama(), tokenizer, LLAMA_MODULES[:2], **options)


def test_model_sampled_texts_are_deterministic_for_a_seed(tokenizer):
    model = make_gpt2()
    rng_before = torch.get_rng_state()
    first = model_sampled_texts(model, tokenizer, 5, max_new_tokens=8, seed=0, show_progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global random state is untouched
    assert (
        len(first) == 5 and all(isinstance(t, str) for t in first) and any(first)
    )  # an EOS first may leave one empty
    assert first == model_sampled_texts(model, tokenizer, 5, max_new_tokens=8, seed=0, show_progress=False)
    assert first != model_sampled_texts(model, tokenizer, 5, max_new_tokens=8, seed=1, show_progress=False)
    prompts = model_sampled_texts(model, tokenizer, 4, max_new_tokens=4, prompts=["w1", "w2"], show_progress=False)
    assert [t.split()[0] for t in prompts] == ["w1", "w2", "w1", "w2"]


# --------------------------------------------------------------------------------------------------------------------
# Keys, the cache and get_second_moments
# --------------------------------------------------------------------------------------------------------------------


def test_keys_differ_whenever_a_field_differs():
    key = StatsKey("org/model", "abc", "model.layers.0.mlp.down_proj", "file:c.txt@sha256:00", "", 1000, 256)
    changes = {
        "model_id": "org/other",
        "revision": None,
        "module": "model.layers.1.mlp.down_proj",
        "dataset": "file:c.txt@sha256:01",
        "text_field": "passage",
        "sample_count": 999,
        "max_length": 128,
    }
    names = {key.filename()} | {dataclasses.replace(key, **{f: v}).filename() for f, v in changes.items()}
    assert len(names) == len(changes) + 1
    assert key.filename() == StatsKey(**key.to_dict()).filename()  # stable
    assert key.filename().startswith("model--model.layers.0.mlp.down_proj--") and key.filename().endswith(
        ".safetensors"
    )
    assert StatsKey.from_dict(key.to_dict()) == key
    with pytest.raises(StatsFormatError, match="needs exactly the fields"):
        StatsKey.from_dict({**key.to_dict(), "extra": 1})
    with pytest.raises(StatsError, match="sample_count must be a positive integer, got 0"):
        dataclasses.replace(key, sample_count=0)
    with pytest.raises(StatsError, match=r"dtype must be one of \('float32',\), got 'float16'"):
        dataclasses.replace(key, dtype="float16")


def test_cache_validates_what_it_stores_and_reads(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_EDIT_PATCH_CACHE", str(tmp_path / "hep"))
    assert StatsCache().cache_dir == tmp_path / "hep" / "stats"  # the hf_edit_patch cache by default
    cache = StatsCache(tmp_path / "stats")
    key = StatsKey("org/model", None, "model.layers.0.mlp.down_proj", "file:c.txt@sha256:00", "", 10, 8)
    other = dataclasses.replace(key, module="model.layers.1.mlp.down_proj")
    assert cache.get(key) is None and cache.entry(key) is None and cache.entries() == []
    with pytest.raises(StatsFormatError, match="non-finite"):
        cache.put(key, torch.full((4, 4), float("nan")), count=3)
    with pytest.raises(StatsFormatError, match=r"non-empty square matrix, not \(4, 3\)"):
        cache.put(key, torch.zeros(4, 3), count=3)
    with pytest.raises(StatsFormatError, match="dtype torch.float64"):
        cache.put(key, torch.eye(4, dtype=torch.float64), count=3)
    with pytest.raises(StatsFormatError, match="positive integer, got 0"):
        cache.put(key, torch.eye(4), count=0)
    assert cache.entries() == []

    entry = cache.put(key, torch.eye(4), count=3, info={"note": "x"})
    assert entry.path == cache.path(key) and torch.equal(cache.get(key), torch.eye(4))
    shutil.copyfile(entry.path, cache.path(other))  # a file under another key's name is not that key's statistics
    with caplog.at_level(logging.WARNING, logger="hf_edit_patch.hub.stats_cache"):
        assert cache.get(other) is None and cache.entry(other) is None
        assert [e.key for e in cache.entries()] == [key]
    assert "holds the statistics of" in caplog.text


def test_eigen_cache_round_trip_and_invalid_files_are_ignored(tmp_path, caplog):
    stats_cache = StatsCache(tmp_path / "stats")
    eigen = EigenCache(stats_cache)
    key = StatsKey("org/model", None, "model.layers.0.mlp.down_proj", "file:c.txt@sha256:00", "", 10, 8)
    other = dataclasses.replace(key, sample_count=11)
    values, vectors = torch.linalg.eigh(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)))
    assert eigen.get(key, 4) is None
    path = eigen.put(key, values, vectors.float())
    assert path == tmp_path / "stats" / NULLSPACE_DIR / key.filename() == eigen.path(key)
    found = eigen.get(key, 4)
    assert torch.equal(found[0], values) and torch.equal(found[1], vectors.float())
    with caplog.at_level(logging.WARNING, logger="hf_edit_patch.hub.nullspace"):
        assert eigen.get(key, 5) is None  # another width: not this module's decomposition
        shutil.copyfile(path, eigen.path(other))
        assert eigen.get(other, 4) is None  # a file under another key's name
        eigen.path(other).write_bytes(b"garbage")
        assert eigen.get(other, 4) is None
    assert "does not hold the eigendecomposition" in caplog.text and "unreadable null-space file" in caplog.text


def test_cache_hit_does_not_recompute_and_files_carry_the_key(tokenizer, corpus, tmp_path, monkeypatch):
    model = make_llama()
    cache = StatsCache(tmp_path / "stats")
    options = {
        "stats_dataset": corpus,
        "cache": cache,
        "model_id": "tiny/llama",
        "max_length": MAX_LENGTH,
        "batch_size": 4,
    }
    first = get_second_moments(model, tokenizer, LLAMA_MODULES, show_progress=False, **options)
    reference, count = _brute_force(model, tokenizer, LLAMA_MODULES, _texts())
    for name in LLAMA_MODULES:
        _assert_matches_reference(first[name], reference[name])

    entries = cache.entries()
    assert sorted(e.key.module for e in entries) == sorted(LLAMA_MODULES)
    for entry in entries:
        assert entry.count == count
        assert entry.key.dataset.startswith("file:corpus.txt@sha256:") and entry.key.model_id == "tiny/llama"
        with safe_open(str(entry.path), framework="pt") as f:  # a plain safetensors file with the key as metadata
            assert list(f.keys()) == ["second_moment"]
            metadata = f.metadata()
        assert json.loads(metadata["key"]) == entry.key.to_dict() and metadata["count"] == str(count)
    assert not [p for p in cache.cache_dir.iterdir() if p.name.startswith(".")]  # no temporary file left

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(statistics, "estimate_second_moments", fail)
    second = get_second_moments(model, tokenizer, LLAMA_MODULES, show_progress=False, **options)
    assert all(torch.equal(second[name], first[name]) for name in LLAMA_MODULES)


def test_only_missing_modules_are_computed(tokenizer, corpus, tmp_path, monkeypatch):
    model = make_llama()
    cache = StatsCache(tmp_path / "stats")
    options = {"stats_dataset": corpus, "cache": cache, "model_id": "tiny/llama", "show_progress": False}
    get_second_moments(model, tokenizer, LLAMA_MODULES[:1], **options)
    computed = []
    real = estimate_second_moments

    def spy(model, tokenizer, module_names, *args, **kwargs):
        computed.append(list(module_names))
        return real(model, tokenizer, module_names, *args, **kwargs)

    monkeypatch.setattr(statistics, "estimate_second_moments", spy)
    result = get_second_moments(model, tokenizer, LLAMA_MODULES, **options)
    assert computed == [LLAMA_MODULES[1:]]  # one pass for the two missing modules
    assert list(result) == LLAMA_MODULES and len(cache.entries()) == 3

    get_second_moments(model, tokenizer, LLAMA_MODULES[:1], sample_count=5, **options)  # another key: computed
    get_second_moments(model, tokenizer, LLAMA_MODULES[:1], max_length=8, **options)
    corpus.write_text("w1 w2 w3\n", encoding="utf-8")  # edited corpus: another key
    get_second_moments(model, tokenizer, LLAMA_MODULES[:1], **options)
    assert computed[1:] == [LLAMA_MODULES[:1]] * 3 and len(cache.entries()) == 6


def test_invalid_cache_file_is_recomputed(tokenizer, corpus, tmp_path, caplog):
    model = make_llama()
    cache = StatsCache(tmp_path / "stats")
    options = {"stats_dataset": corpus, "cache": cache, "model_id": "tiny/llama", "show_progress": False}
    first = get_second_moments(model, tokenizer, LLAMA_MODULES[:1], **options)
    (entry,) = cache.entries()
    entry.path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="hf_edit_patch.hub.stats_cache"):
        again = get_second_moments(model, tokenizer, LLAMA_MODULES[:1], **options)
    assert "ignoring the invalid statistics file" in caplog.text
    assert torch.equal(again[LLAMA_MODULES[0]], first[LLAMA_MODULES[0]])
    assert cache.get(entry.key) is not None


def test_model_without_id_is_not_cached(tokenizer, corpus, tmp_path, caplog):
    cache = StatsCache(tmp_path / "stats")
    with caplog.at_level(logging.WARNING, logger="hf_edit_patch.editing.statistics"):
        result = get_second_moments(
            make_llama(), tokenizer, LLAMA_MODULES[:1], stats_dataset=corpus, cache=cache, show_progress=False
        )
    assert result[LLAMA_MODULES[0]].shape == (48, 48)
    assert "pass model_id=" in caplog.text and cache.entries() == []


def test_no_corpus_fails_fast_and_says_how_to_provide_one(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(
        statistics, "estimate_second_moments", lambda *a, **k: pytest.fail("must fail before computing")
    )
    with pytest.raises(StatsUnavailableError) as info:
        get_second_moments(make_llama(), tokenizer, LLAMA_MODULES, cache=StatsCache(tmp_path), model_id="tiny/llama")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for hint in (
        "stats_dataset='wikitext'",
        ".jsonl",
        "text_field=",
        "allow_model_sampled=True",
        "load_stats_from_hub",
    ):
        assert hint in message


def test_model_sampled_statistics_are_labelled_and_cached(tokenizer, tmp_path):
    model = make_gpt2()
    cache = StatsCache(tmp_path / "stats")
    options = {"cache": cache, "model_id": "tiny/gpt2", "sample_count": 6, "max_length": 12, "show_progress": False}
    result = get_second_moments(model, tokenizer, GPT2_MODULES[:1], allow_model_sampled=True, **options)
    (entry,) = cache.entries()
    assert entry.key.dataset == "model-sampled:0:6" and entry.key.text_field == ""
    texts = model_sampled_texts(model, tokenizer, 6, max_new_tokens=12, seed=0, show_progress=False)
    expected = compute_second_moments(
        model, tokenizer, GPT2_MODULES[:1], texts, sample_count=6, max_length=12, show_progress=False
    )
    assert torch.equal(result[GPT2_MODULES[0]], expected[GPT2_MODULES[0]])


@pytest.mark.skipif(not BOOLQ.is_file(), reason=f"the offline development corpus {BOOLQ} is not there")
def test_boolq_passages_integration(tokenizer, tmp_path):
    model = make_llama()
    cache = StatsCache(tmp_path / "stats")
    result = get_second_moments(
        model,
        tokenizer,
        LLAMA_MODULES[:2],
        stats_dataset=BOOLQ,
        text_field="passage",
        sample_count=6,
        max_length=32,
        cache=cache,
        model_id="tiny/llama",
        show_progress=False,
    )
    passages = load_texts(BOOLQ, text_field="passage", sample_count=6)
    assert len(passages) == 6 and all(len(p) > 100 for p in passages)
    reference, count = _brute_force(model, tokenizer, LLAMA_MODULES[:2], passages, max_length=32)
    for name in LLAMA_MODULES[:2]:
        _assert_matches_reference(result[name], reference[name])
    keys = [e.key for e in cache.entries()]
    assert {k.dataset for k in keys} == {TextSource(BOOLQ).fingerprint()}
    assert {k.text_field for k in keys} == {"passage"} and cache.entries()[0].count == count


# --------------------------------------------------------------------------------------------------------------------
# The Hub, at the HfApi / hf_hub_download boundary
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An `HfApi` whose uploads land in tmp_path/hub/<repo>/<branch>, and an `hf_hub_download` serving them."""
    root = tmp_path / "hub"
    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            (root / repo_id / "main").mkdir(parents=True, exist_ok=True)

        def create_branch(self, repo_id, *, branch, **kwargs):
            calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, **kwargs}))
            shutil.copytree(root / repo_id / "main", root / repo_id / branch, dirs_exist_ok=True)

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", {"repo_id": repo_id, "files": sorted(os.listdir(folder_path)), **kwargs}))
            shutil.copytree(folder_path, root / repo_id / (kwargs.get("revision") or "main"), dirs_exist_ok=True)
            return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")

    def fake_download(repo_id, filename, subfolder=None, revision=None, **kwargs):
        calls.append(("download", {"repo_id": repo_id, "filename": filename, "revision": revision, **kwargs}))
        if not (root / repo_id).is_dir():
            response = SimpleNamespace(headers={}, status_code=404, url=f"https://hub.invalid/{repo_id}", request=None)
            raise hub.RepositoryNotFoundError(f"{repo_id} not found", response=response)
        path = root / repo_id / (revision or "main") / filename
        if not path.is_file():
            raise hub.EntryNotFoundError(f"{filename} not found")
        return str(path)

    monkeypatch.setattr(hub_push, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    return root, calls


def test_push_and_load_stats_through_the_hub(tokenizer, corpus, tmp_path, fake_hub):
    root, calls = fake_hub
    model = make_llama()
    cache = StatsCache(tmp_path / "stats")
    computed = get_second_moments(
        model, tokenizer, LLAMA_MODULES, stats_dataset=corpus, cache=cache, model_id="tiny/llama", show_progress=False
    )
    entries = {e.key.module: e for e in cache.entries()}

    push_stats_to_hub(cache, [entries[LLAMA_MODULES[0]], entries[LLAMA_MODULES[1]].key], "me/stats", private=True)
    uploads = [c for name, c in calls if name == "upload_folder"]
    assert len(uploads) == 1  # one commit
    assert uploads[0]["files"] == sorted(
        ["README.md", "index.json", entries[LLAMA_MODULES[0]].path.name, entries[LLAMA_MODULES[1]].path.name]
    )
    assert [c for name, c in calls if name == "create_repo"][0]["private"] is True

    push_stats_to_hub(cache, [entries[LLAMA_MODULES[2]]], "me/stats", commit_message="add up_proj")
    index = json.loads((root / "me/stats/main/index.json").read_text())
    assert len(index["entries"]) == 3  # the second push kept the entries of the first
    assert [c for name, c in calls if name == "upload_folder"][-1]["commit_message"] == "add up_proj"

    fresh = StatsCache(tmp_path / "fresh")
    loaded = load_stats_from_hub("me/stats", cache=fresh)
    assert sorted(e.key.module for e in loaded) == sorted(LLAMA_MODULES)
    for entry in loaded:
        assert torch.equal(fresh.get(entry.key), computed[entry.key.module])
        assert entry.count == entries[entry.key.module].count
    assert all(c["revision"] is None for name, c in calls if name == "download")

    again = get_second_moments(  # the loaded entries are the ones get_second_moments looks up
        model,
        tokenizer,
        LLAMA_MODULES,
        stats_dataset=corpus,
        cache=fresh,
        model_id="tiny/llama",
        show_progress=False,
    )
    assert all(torch.equal(again[name], computed[name]) for name in LLAMA_MODULES)


def test_load_rejects_tampered_files_before_storing_anything(tokenizer, corpus, tmp_path, fake_hub):
    root, _ = fake_hub
    cache = StatsCache(tmp_path / "stats")
    get_second_moments(
        make_llama(),
        tokenizer,
        LLAMA_MODULES[:2],
        stats_dataset=corpus,
        cache=cache,
        model_id="t/l",
        show_progress=False,
    )
    push_stats_to_hub(cache, cache.entries(), "me/stats")
    target = root / "me/stats/main" / cache.entries()[1].path.name
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    fresh = StatsCache(tmp_path / "fresh")
    with pytest.raises(StatsFormatError, match="does not match the sha256 in its index"):
        load_stats_from_hub("me/stats", cache=fresh)
    assert fresh.entries() == []

    index_path = root / "me/stats/main/index.json"
    index = json.loads(index_path.read_text())
    index["entries"][0]["filename"] = "../../evil.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(StatsFormatError, match="its key belongs in"):
        load_stats_from_hub("me/stats", cache=fresh)
    with pytest.raises(hub.PatchNotFoundError, match="no Hub repo"):
        load_stats_from_hub("me/none", cache=fresh)


def test_push_options_reach_the_branch_the_index_and_the_card(tokenizer, corpus, tmp_path, fake_hub):
    root, calls = fake_hub
    cache = StatsCache(tmp_path / "stats")
    options = {"stats_dataset": corpus, "cache": cache, "model_id": "t/l", "show_progress": False}
    get_second_moments(make_llama(), tokenizer, LLAMA_MODULES[:1], **options)
    push_stats_to_hub(cache, cache.entries(), "me/stats")
    get_second_moments(make_llama(), tokenizer, LLAMA_MODULES[1:2], **options)
    second = [e for e in cache.entries() if e.key.module == LLAMA_MODULES[1]]
    push_stats_to_hub(cache, second, "me/stats", revision="v2", license="apache-2.0")
    upload = [c for name, c in calls if name == "upload_folder"][-1]
    assert upload["revision"] == "v2" and upload["commit_message"].startswith("Upload key statistics of 1 module")
    assert "license: apache-2.0\n" in (root / "me/stats/v2/README.md").read_text()
    assert "license:" not in (root / "me/stats/main/README.md").read_text()
    fresh = StatsCache(tmp_path / "fresh")
    loaded = load_stats_from_hub("me/stats", revision="v2", cache=fresh)
    assert sorted(e.key.module for e in loaded) == sorted(LLAMA_MODULES[:2])  # the branch's index kept main's entry
    assert len(load_stats_from_hub("me/stats", cache=StatsCache(tmp_path / "main"))) == 1
    with pytest.raises(TypeError, match="unknown push option"):
        push_stats_to_hub(cache, second, "me/stats", privat=True)


# --------------------------------------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M), when it is available offline
# --------------------------------------------------------------------------------------------------------------------


def _default_model_available() -> bool:
    converted = models.default_cache_dir() / models.CONVERTED_SUBFOLDER / "config.json"
    return converted.is_file() or models._hub_cached(models.DEFAULT_MODEL_ID, None, None)


@pytest.mark.slow
@pytest.mark.skipif(not _default_model_available(), reason="SmolLM2-135M is neither converted nor in the HF cache")
def test_default_model_down_proj_one_pass_matches_brute_force():
    model, tokenizer = models.load_default_model()
    modules = [f"model.layers.{i}.mlp.down_proj" for i in (3, 4)]
    texts = load_texts(BOOLQ, text_field="passage", sample_count=3) if BOOLQ.is_file() else _texts(3)
    last = _count_calls(model.model.layers[5])
    result = compute_second_moments(model, tokenizer, modules, texts, max_length=48, show_progress=False)
    assert last[0] == 0
    reference, _ = _brute_force(model, tokenizer, modules, texts, max_length=48)
    for name in modules:
        assert result[name].shape == (1536, 1536)
        torch.testing.assert_close(
            result[name].double(), reference[name], rtol=1e-4, atol=1e-5 * float(reference[name].abs().max())
        )
