"""Every JSON file the library reads is checked against its declared schema, bounded before it is parsed.

Unit tests pin the bounded reader and the messages (file, field, value received, what is accepted) on the cases a
fuzzer found; property tests (hypothesis) check, for each file, that valid documents round-trip and that mutated ones
(wrong types, huge numbers, deep nesting, oversize strings and lists, missing and extra keys) raise only the library's
errors and never leave a `PatchedModel` changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_state_equal, make_llama, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import hf_edit_patch as hep
from hf_edit_patch.editors.mend.network import MendConfig, MendEditor
from hf_edit_patch.errors import EvaluationFormatError, PatchError, PatchFormatError, StatsError, StatsFormatError
from hf_edit_patch.evaluation.publish import stage_patch_folder
from hf_edit_patch.evaluation.report import load_evaluation
from hf_edit_patch.evaluation.study.points import load_points
from hf_edit_patch.hub import files
from hf_edit_patch.hub.cards import evaluation_card
from hf_edit_patch.hub.files import JOURNAL_NAME, committed_path
from hf_edit_patch.hub.mend import CONFIG_NAME as MEND_CONFIG
from hf_edit_patch.hub.mend import load_mend_editor, save_mend_editor
from hf_edit_patch.hub.stats_cache import StatsCache, StatsKey, read_stats_file
from hf_edit_patch.hub.stats_sharing import INDEX_FILENAME, load_stats_from_hub
from hf_edit_patch.patch.config import CONFIG_NAME, STACK_NAME, WEIGHTS_NAME, read_stack
from hf_edit_patch.schema import (
    MAX_DEPTH,
    AnyJSON,
    Int,
    List,
    Map,
    Object,
    OutOfRange,
    Str,
    parse_json,
    read_json,
    shorten,
    validate,
)

DOWN0, DOWN1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
KEEP_FOR_ENCODING = {"bitmask": 0.4, "csr": 0.018, "coo": 0.002}  # on a 32×48 weight
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# ---------------------------------------------------------------------------------------------------- fixtures


def _patch(model: torch.nn.Module, keep_ratio: float, seed: int = 0) -> hep.EditPatch:
    gen = torch.Generator().manual_seed(seed)
    w = model.get_submodule(DOWN0).weight
    return hep.EditPatch.from_deltas(
        {DOWN0: torch.randn(w.shape, generator=gen) * 0.05}, model, keep_ratio=keep_ratio, regularizer="rect"
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[str, bytes]]:
    """`{encoding: (config text, weights bytes)}` of a patch on DOWN0 of the tiny Llama, one per encoding."""
    out = {}
    for encoding, keep in KEEP_FOR_ENCODING.items():
        folder = tmp_path_factory.mktemp(encoding)
        patch = _patch(make_llama(), keep)
        assert patch.encodings() == {DOWN0: encoding}
        patch.save_pretrained(folder)
        out[encoding] = ((folder / CONFIG_NAME).read_text(), (folder / WEIGHTS_NAME).read_bytes())
    return out


class Held:
    """A PatchedModel holding one patch, and the weights it must keep whatever a failed load does."""

    def __init__(self) -> None:
        model = make_llama()
        self.pm = hep.PatchedModel(model)
        self.pm.add_patch(_patch(model, 0.4, seed=1), "held")
        self.state = snapshot(model)

    def assert_untouched(self) -> None:
        assert self.pm.active_patches == ["held"]
        assert_state_equal(self.pm.base_model, self.state)


@pytest.fixture(scope="module")
def held() -> Held:
    return Held()


def _write_patch(folder: Path, config_text: str, weights: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(config_text, encoding="utf-8")
    (folder / WEIGHTS_NAME).write_bytes(weights)


def _load_attach_save(folder: Path, held: Held) -> str:
    """'loaded' or 'refused'; anything but the library's errors propagates, and a refused attach changes nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys dropped, fingerprints that differ: warnings by design
        try:
            patch = hep.EditPatch.from_pretrained(folder)
        except PatchError:
            outcome = "refused"
        else:
            outcome = "loaded"
            patch.save_pretrained(folder.parent / "resaved")  # what loads also saves, card included
        try:
            held.pm.load_patch(folder, "fuzzed")
        except PatchError:
            held.assert_untouched()
        else:
            held.pm.remove_patch("fuzzed")
            held.assert_untouched()
    return outcome


# ---------------------------------------------------------------------------------------------------- issue cases

RAW_NUMBERS = {  # JSON text no Python value produces
    "int-5000-digits": "1" * 5000,
    "int-10**400": "1" + "0" * 400,
    "int-10**30": "1" + "0" * 30,
    "int-2**64": str(2**64),
    "float-1e400": "1e400",
    "nan": "NaN",
    "minus-infinity": "-Infinity",
}


def _set(path: list[Any], value: Any):
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


ISSUE_CASES = {
    # id: (mutation, or raw text replacing the value at the path; field named in the message; accepted)
    "format-version-5000-digits": (["format_version"], RAW_NUMBERS["int-5000-digits"], "format_version", "integer"),
    "keep-ratio-10**400": (["keep_ratio"], RAW_NUMBERS["int-10**400"], "keep_ratio", r"number in \(0, 1\]"),
    "keep-ratio-1e400": (["keep_ratio"], RAW_NUMBERS["float-1e400"], "keep_ratio", r"number in \(0, 1\]"),
    "keep-ratio-nan": (["keep_ratio"], RAW_NUMBERS["nan"], "keep_ratio", r"number in \(0, 1\]"),
    "shape-10**30": (
        ["modules", DOWN0, "shape", 0], RAW_NUMBERS["int-10**30"], re.escape(f"['{DOWN0}'].shape[0]"), "integer from 1"
    ),
    "requests-ints": (["requests"], [1, 2], re.escape("requests[0]"), "JSON object"),
    "parent-patches-ints": (["parent_patches"], [1, 2], re.escape("parent_patches[0]"), "JSON object"),
    "format-version-true": (["format_version"], True, "format_version", "integer"),
    "editor-list": (["editor"], ["x"], "editor", "string"),
    "library-version-list": (["library_version"], [1, 2], "library_version", "string"),
    "base-model-dict": (["base_model_name_or_path"], {}, "base_model_name_or_path", "string"),
    "nnz-string": (["modules", DOWN0, "nnz"], "7", re.escape(f"['{DOWN0}'].nnz"), "integer"),
    "request-prompt-int": (["requests"], [{"prompt": 3}], re.escape("requests[0].prompt"), "string"),
    "fingerprint-short": (["modules", DOWN0, "fingerprint"], "sha256:00", "fingerprint", "64"),
    "oversize-string": (["model_type"], "x" * 10_000, "model_type", "at most 256 characters"),
    "oversize-shape": (["modules", DOWN0, "shape"], [32, 48, 1], re.escape(f"['{DOWN0}'].shape"), "exactly 2 items"),
}  # fmt: skip


def _with_raw(doc: dict[str, Any], path: list[Any], value: Any) -> str:
    if isinstance(value, str) and value in RAW_NUMBERS.values():
        _set(path, "@@RAW@@")(doc)
        return json.dumps(doc).replace('"@@RAW@@"', value)
    _set(path, value)(doc)
    return json.dumps(doc)


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_issue_cases_raise_the_format_error_naming_file_field_value_and_accepted(tmp_path, saved, held, case):
    path, value, field, accepted = ISSUE_CASES[case]
    text, weights = saved["bitmask"]
    folder = tmp_path / "p"
    _write_patch(folder, _with_raw(json.loads(text), path, value), weights)
    with pytest.raises(PatchFormatError) as info:
        hep.EditPatch.from_pretrained(folder)
    message = str(info.value)
    assert str(folder / CONFIG_NAME) in message
    assert re.search(field + r" must be .*" + accepted, message), message
    assert ", got " in message and len(message) < 600, message  # the value received, shortened
    with pytest.raises(PatchFormatError):
        held.pm.load_patch(folder, "second")
    held.assert_untouched()


def test_a_config_nested_1000_deep_is_refused_before_parsing(tmp_path, saved, held):
    text, weights = saved["coo"]
    doc = json.loads(text)
    folder = tmp_path / "p"
    _write_patch(folder, json.dumps(doc)[:-1] + ', "editor_hparams": {"x": ' + "[" * 1000 + "]" * 1000 + "}}", weights)
    with pytest.raises(
        PatchFormatError, match=r"nests arrays and objects more than 32 levels deep; accepted: at most 32"
    ):
        hep.EditPatch.from_pretrained(folder)
    with pytest.raises(PatchFormatError, match="levels deep"):
        held.pm.load_patch(folder, "second")
    held.assert_untouched()


def test_a_weight_dtype_that_contradicts_its_fingerprint_is_refused_at_attach(tmp_path, saved):
    text, weights = saved["bitmask"]
    doc = json.loads(text)
    doc["modules"][DOWN0]["weight_dtype"] = "bfloat16"  # the fingerprint (which covers the dtype) is of fp32 weights
    _write_patch(tmp_path / "p", json.dumps(doc), weights)
    hep.EditPatch.from_pretrained(tmp_path / "p")  # consistent on its own: only the weights show the contradiction
    model = make_llama()  # the very weights the patch was computed on: their fingerprint matches
    before = snapshot(model)
    pm = hep.PatchedModel(model)
    with pytest.raises(PatchError, match=r"weight_dtype 'bfloat16'.*float32"):
        pm.load_patch(tmp_path / "p", "second")
    assert pm.active_patches == []
    assert_state_equal(model, before)


def test_a_module_shape_past_int64_is_refused_when_built_in_code():
    with pytest.raises(PatchFormatError, match=r"module shape must be two integers from 1 to 2147483647"):
        hep.ModuleRecord(shape=(10**30, 48))
    with pytest.raises(PatchFormatError, match=r"keep_ratio must be in \(0, 1\]"):
        hep.PatchConfig(keep_ratio=10**400)
    with pytest.raises(PatchFormatError, match="format_version must be a positive integer, got True"):
        hep.PatchConfig(format_version=True)


# ---------------------------------------------------------------------------------------------------- the reader


def test_reader_bounds_size_depth_numbers_and_keys(tmp_path):
    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * 2000 + '"}')
    with pytest.raises(PatchFormatError, match=r"big\.json is over 1,000 bytes; accepted: at most 1,000 bytes"):
        read_json(big, max_bytes=1000)
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, source="s") is not None
    with pytest.raises(PatchFormatError, match="more than 32 levels deep"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), source="s")
    assert parse_json('["' + "[{" * 50 + '"]', source="s") == ["[{" * 50]  # brackets inside strings do not count
    with pytest.raises(PatchFormatError, match=r"s: an object repeats the key 'a'; accepted: each key once"):
        parse_json('{"a": 1, "a": 2}', source="s")
    assert parse_json(str(2**64 - 1), source="s") == 2**64 - 1
    for text in RAW_NUMBERS.values():
        assert isinstance(parse_json(text, source="s"), OutOfRange)
    with pytest.raises(PatchFormatError, match=r"s is not valid JSON \(not UTF-8"):
        parse_json(b"\xff\xfe{}", source="s")


def test_an_unclosed_string_of_escapes_is_scanned_in_linear_time():
    text = "[" * 20 + '"' + '\\"[' * 500_000  # brackets in an unclosed string: a naive scan takes hours here
    start = time.perf_counter()
    with pytest.raises(PatchFormatError, match="not valid JSON"):
        parse_json(text, source="s")
    assert time.perf_counter() - start < 20  # seconds, on a loaded CI machine; quadratic would be ~10⁵ times longer


def test_messages_shorten_values_and_never_build_huge_reprs():
    assert "digits" in shorten(10**5000) and len(shorten(10**5000)) < 60
    assert len(shorten("x" * 10_000)) < 80 and len(shorten(list(range(10_000)))) < 80
    schema = Object({"n": Int(0, 9), "tags": List(Str(max_length=3), max_length=2)}, required=("n",))
    with pytest.raises(PatchFormatError, match=r"^f\.json: n must be an integer from 0 to 9, got int <an integer"):
        validate(schema, {"n": 10**5000}, source="f.json")
    with pytest.raises(PatchFormatError, match=r"^f\.json is missing a required key 'n' \(an integer from 0 to 9\)$"):
        validate(schema, {}, source="f.json")
    with pytest.raises(PatchFormatError, match=r"tags\[1\] must be a string of at most 3 characters, got str 'long'"):
        validate(schema, {"n": 1, "tags": ["a", "long"]}, source="f.json")
    with pytest.raises(StatsFormatError, match=r"f\.json: \['k'\]\[0\] must be .*finite.*got float inf"):
        validate(Map(AnyJSON(), max_length=4), {"k": [float("inf")]}, source="f.json", error=StatsFormatError)


def test_unknown_keys_are_dropped_with_a_warning_or_refused():
    schema = Object({"a": Int(), "inner": Object({"b": Int()})})
    with pytest.warns(UserWarning, match=r"Ignoring keys \['zz'\] in f\.json: inner: .*newer version"):
        assert validate(schema, {"a": 1, "inner": {"b": 2, "zz": 3}}, source="f.json") == {"a": 1, "inner": {"b": 2}}
    with pytest.raises(PatchFormatError, match=r"f\.json has unexpected keys \['zz'\]; accepted: the keys \['a'\]"):
        validate(Object({"a": Int()}, extra="forbid"), {"a": 1, "zz": 2}, source="f.json")


# ---------------------------------------------------------------------------------------------------- mutations

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_JSON_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
_RAW = {
    **RAW_NUMBERS,
    "deep-1000": "[" * 1000 + "]" * 1000,
    "deep-33": '{"a": ' * 33 + "0" + "}" * 33,
    "long-string": json.dumps("x" * 70_000),
    "long-list": json.dumps(["a"] * 10_001),
}


class Raw:
    def __init__(self, name: str) -> None:
        self.name = name


_NASTY = st.one_of(_JSON_VALUES, st.sampled_from(sorted(_RAW)).map(Raw))


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def mutated(data: st.DataObject, doc: Any, rounds: int = 3) -> str:
    """`doc` with 1-`rounds` random mutations, as JSON text: values replaced by wrong types, huge or non-finite
    numbers, deep nesting, oversize strings or lists; keys deleted or added; containers emptied."""
    raws: list[str] = []
    for _ in range(data.draw(st.integers(1, rounds), label="rounds")):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "add-key", "empty"]), label="op")
        value = data.draw(_NASTY, label="value")
        if isinstance(value, Raw):
            raws.append(_RAW[value.name])
            value = f"@@RAW{len(raws) - 1}@@"
        if not path:
            doc = value if op == "replace" else ({} if op == "empty" else doc)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if op == "replace":
            parent[path[-1]] = value
        elif op == "delete":
            del parent[path[-1]]
        elif op == "add-key" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][data.draw(st.text(max_size=8), label="key")] = value
        elif op == "empty" and isinstance(parent[path[-1]], (dict, list)):
            parent[path[-1]] = type(parent[path[-1]])()
    text = json.dumps(doc)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text


# ---------------------------------------------------------------------------------------------------- properties


@st.composite
def valid_configs(draw: st.DrawFn) -> hep.PatchConfig:
    modules = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=12), max_size=3, unique=True)):
        rows, cols = draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1))
        modules[name] = hep.ModuleRecord(
            shape=(rows, cols),
            layout=draw(st.sampled_from(["linear", "conv1d", "embedding"])),
            nnz=draw(st.integers(0, rows * cols)),
            encoding=draw(st.sampled_from(["coo", "bitmask", "csr"])),
            weight_dtype=draw(st.none() | st.sampled_from(["float16", "bfloat16", "float32", "float64"])),
            fingerprint=draw(st.none() | st.text("0123456789abcdef", min_size=64, max_size=64).map("sha256:".__add__)),
        )
    request = st.fixed_dictionaries(
        {"prompt": st.text(max_size=20), "subject": st.text(max_size=10), "target_new": st.text(max_size=10)},
        optional={"target_true": st.none() | st.text(max_size=5), "paraphrases": st.lists(st.text(max_size=5))},
    )
    json_map = st.dictionaries(st.text(max_size=6), _JSON_VALUES.filter(lambda v: "@@" not in repr(v)), max_size=3)
    return hep.PatchConfig(
        base_model_name_or_path=draw(st.none() | st.text(max_size=30)),
        modules=modules,
        editor=draw(st.none() | st.sampled_from(["rome", "memit", "external"])),
        editor_hparams=draw(json_map.filter(lambda d: _in_64_bits(d))),
        regularizer=draw(st.none() | st.sampled_from(["rect", "random", "pca"])),
        keep_ratio=draw(st.none() | st.floats(0, 1, exclude_min=True)),
        requests=draw(st.lists(request, max_size=3)),
        parent_patches=draw(st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=2)),
        value_dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
    )


def _in_64_bits(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_in_64_bits(v) for v in value.values())
    if isinstance(value, list):
        return all(_in_64_bits(v) for v in value)
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**64


@FUZZ
@given(cfg=valid_configs())
def test_valid_patch_configs_round_trip_through_their_schema(cfg):
    text = cfg.to_json_string()
    assert hep.PatchConfig.from_dict(parse_json(text, source=CONFIG_NAME)) == cfg


@FUZZ
@given(data=st.data())
def test_mutated_patch_configs_raise_only_library_errors_and_never_change_the_model(saved, held, data):
    text, weights = saved[data.draw(st.sampled_from(sorted(saved)), label="encoding")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "p"
        _write_patch(folder, mutated(data, json.loads(text)), weights)
        _load_attach_save(folder, held)


@FUZZ
@given(data=st.data())
def test_mutated_stacks_give_names_or_the_format_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / STACK_NAME
        path.write_text(mutated(data, {"patches": ["a", "b.c", "d-1"]}))
        try:
            names = read_stack(path)
        except PatchFormatError:
            return
        assert isinstance(names, list) and all(isinstance(n, str) and 1 <= len(n) <= 128 for n in names)


@FUZZ
@given(data=st.data())
def test_mutated_journals_give_a_path_inside_the_folder_or_the_format_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "x.json").write_text("{}")
        temp = f".x.json.pid{os.getpid()}.abc.tmp"
        (folder / temp).write_text("{}")
        (folder / JOURNAL_NAME).write_text(mutated(data, {"renames": [[temp, "x.json"]]}))
        try:
            found = committed_path(folder, "x.json")
        except PatchFormatError:
            return
        assert os.path.dirname(os.path.realpath(found)) == os.path.realpath(folder)


KEY = StatsKey("tiny/llama", None, DOWN0, "file:c.txt@sha256:" + "0" * 64, "text", 8, 16)


@FUZZ
@given(key=st.builds(
    StatsKey, st.text(min_size=1, max_size=20), st.none() | st.text(max_size=10), st.text(min_size=1, max_size=20),
    st.text(min_size=1, max_size=20), st.text(max_size=5), st.integers(1, 2**40), st.integers(1, 2**24),
))  # fmt: skip
def test_valid_statistics_keys_round_trip_through_their_schema(key):
    text = json.dumps(key.to_dict(), sort_keys=True)
    assert StatsKey.from_dict(parse_json(text, source="key", error=StatsFormatError)) == key


@FUZZ
@given(data=st.data())
def test_mutated_statistics_metadata_gives_the_matrix_or_the_stats_format_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.safetensors"
        key_text = mutated(data, KEY.to_dict())
        count = data.draw(st.sampled_from(["12", "0", "-3", "1" * 5000, "1e3", "x", ""]), label="count")
        metadata = {"format": "hf_edit_patch.stats", "format_version": "1", "key": key_text, "count": count}
        save_file({"second_moment": torch.eye(4)}, str(path), metadata=metadata)
        try:
            matrix, key, n = read_stats_file(path)
        except StatsFormatError:
            return
        assert matrix.shape == (4, 4) and isinstance(key, StatsKey) and n == 12


@pytest.fixture(scope="module")
def stats_repo(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A local folder laid out as a statistics repo on the Hub: one file and its index."""
    folder = tmp_path_factory.mktemp("stats-repo")
    entry = StatsCache(folder / "cache").put(KEY, torch.eye(4), 12)
    shutil.copyfile(entry.path, folder / KEY.filename())
    index = {
        "format": "hf_edit_patch.stats",
        "format_version": 1,
        "entries": [
            {"filename": KEY.filename(), "key": KEY.to_dict(), "count": 12, "sha256": files.file_sha256(entry.path)}
        ],
    }
    return folder, index


@FUZZ
@given(data=st.data())
def test_mutated_statistics_indexes_load_or_raise_library_errors(stats_repo, data):
    folder, index = stats_repo
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(folder, repo, ignore=lambda _, names: [n for n in names if n == "cache"])
        (repo / INDEX_FILENAME).write_text(mutated(data, json.loads(json.dumps(index))))
        try:
            entries = load_stats_from_hub(repo, cache=StatsCache(Path(tmp) / "cache"), local_files_only=True)
        except (StatsError, hep.PatchNotFoundError):
            return
        assert all(e.key == KEY and e.count == 12 for e in entries)


@pytest.fixture(scope="module")
def mend_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mend")
    config = MendConfig(modules=[DOWN0, DOWN1], layout="linear", d_in=48, d_out=32, rank=4)
    save_mend_editor(MendEditor(config), folder)
    return folder


@FUZZ
@given(data=st.data())
def test_mutated_mend_configs_load_or_raise_library_errors(mend_folder, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mend"
        shutil.copytree(mend_folder, folder)
        doc = json.loads((folder / MEND_CONFIG).read_text())
        (folder / MEND_CONFIG).write_text(mutated(data, doc))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                editor = load_mend_editor(folder)
            except PatchError:
                return
        assert isinstance(editor, MendEditor) and editor.config.d_in == 48 and editor.config.d_out == 32


def test_a_mend_config_larger_than_its_weights_is_refused_before_building_the_network(mend_folder, tmp_path):
    folder = tmp_path / "mend"
    shutil.copytree(mend_folder, folder)
    doc = json.loads((folder / MEND_CONFIG).read_text())
    doc.update(d_in=2**20, d_out=2**20, rank=2**20, n_hidden=64)  # 64 × 2⁴² parameters if it were built
    (folder / MEND_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(PatchFormatError, match=r"describes a network of [\d,]+ bytes, but mend_model\.safetensors"):
        load_mend_editor(folder)


EVALUATION = {
    "format": "hf_edit_patch.evaluation",
    "format_version": 1,
    "library_version": "0.1.0",
    "base_model": {"name_or_path": "tiny/llama", "revision": None},
    "patch": {"source": "p", "content_hash": None, "editor": "rome", "regularizer": "rect", "keep_ratio": 0.4,
              "modules": [DOWN0], "nnz": 600, "base_model": "tiny/llama"},
    "settings": {"metric": "accuracy", "requests": 1, "tasks": ["nli"], "task_limit": 8},
    "editing": {"base": {"reliability": 0.25, "locality": 1.0}, "patched": {"reliability": 1.0, "locality": 0.9}},
    "tasks": {"base": {"nli": 0.5}, "patched": {"nli": 0.45}},
    "plots": [["Scores", "scores.png"]],
    "seconds": 1.5,
}  # fmt: skip


@FUZZ
@given(data=st.data())
def test_mutated_evaluations_load_and_render_or_raise_the_format_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval.json"
        path.write_text(mutated(data, json.loads(json.dumps(EVALUATION))))
        try:
            results = load_evaluation(path)
        except EvaluationFormatError:
            return
        assert results == json.loads(path.read_text())  # read back as written
        evaluation_card(results)  # and what loads renders


POINT = {
    "editing": {"reliability": 1.0, "generalization": 0.5, "locality": 0.75},
    "drift": {"kl": 0.01, "ppl_edited": 21.0},
    "tasks": {"nli": 0.5},
    "probes": {"closed_qa": {"adherence": 0.9, "auc": 0.8}},
    "nnz": 600,
}
RESULTS = {
    "config": {"method": "rome", "setting": "sequential", "unit": "instance", "seed": 0},
    "base": {**POINT, "drift": {"kl": 0.0, "ppl_base": 20.0, "ppl_edited": 20.0}},
    "runs": {"rome-rect0.4-seed0": {"regularizer": "rect0.4", "checkpoints": {"1": POINT, "2": POINT}}},
}


@FUZZ
@given(data=st.data())
def test_mutated_experiment_results_give_rows_or_the_format_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.json").write_text(mutated(data, json.loads(json.dumps(RESULTS))))
        try:
            rows = load_points(tmp)
        except EvaluationFormatError:
            return
        assert all(isinstance(r["edits"], int) for r in rows)


# ---------------------------------------------------------------------------------------------------- staging


def test_staging_a_folder_whose_save_was_cut_short_uploads_the_committed_patch(tmp_path, monkeypatch):
    model = make_llama()
    old, new = _patch(model, 0.4, seed=1), _patch(model, 0.4, seed=2)
    folder = tmp_path / "p"
    old.save_pretrained(folder)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):  # the journal's rename is the commit point; die after the first file's rename
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert (folder / JOURNAL_NAME).exists()  # torn on disk: one file renamed, the others still old
    staged = stage_patch_folder(folder, tmp_path / "staged", repo_id="user/p")
    assert not [f for f in staged if f.startswith(".") or f.endswith(".tmp")]
    uploaded = hep.EditPatch.from_pretrained(tmp_path / "staged")
    assert uploaded.config.content_hash == new.config.content_hash
    assert uploaded.deltas[DOWN0].equal(new.deltas[DOWN0])
