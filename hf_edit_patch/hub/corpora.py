"""Corpora for key statistics: texts read from a local file or a Hugging Face `datasets` id.

A corpus ([`TextSource`], [`load_texts`]) is a local `.txt` file (one text per line; blank lines are skipped), a
`.json` file (a list of strings or of objects holding `text_field`), a `.jsonl` file (one string or object per line),
or a Hugging Face `datasets` id (`"wikitext"` is short for `Salesforce/wikitext`, config `wikitext-103-raw-v1`, as in
ROME). The first `sample_count` non-blank texts are used, in file order; shuffle the file beforehand for a random
sample. A [`TextSource`] also says how it enters a statistics cache key ([`TextSource.fingerprint`]): a local file by
its name and content hash, so that an edited file gets new statistics and no local path is ever recorded.

Error messages name the options of the function the user called ([`OptionNames`]): `text_field=` for the functions
here, `stats_text_field=` for `hf_edit_patch.edit`, `--stats-text-field` on the command line.

Example:
    ```python
    >>> from hf_edit_patch.hub.corpora import load_texts
    >>> load_texts("corpus.jsonl", text_field="passage", sample_count=3)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import StatsError, StatsFormatError, StatsUnavailableError
from .files import file_sha256

__all__ = [
    "CLI_OPTION_NAMES",
    "DATASET_ALIASES",
    "EDIT_OPTION_NAMES",
    "FUNCTION_OPTION_NAMES",
    "TEXT_SUFFIXES",
    "OptionNames",
    "TextSource",
    "corpus_option_names",
    "current_option_names",
    "load_texts",
]

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")
DATASET_ALIASES = {"wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1")}
"""Short names of Hugging Face datasets: name -> (dataset id, config)."""
DATASETS_INSTALL_HINT = "pip install datasets (or the eval extra: pip install 'hf-edit-patch[eval]')"


@dataclass(frozen=True)
class OptionNames:
    """
    How the function a user called names the corpus options, so that an error says what to pass to *it*.

    Args:
        dataset: the corpus option (`stats_dataset`, `--stats-dataset`).
        text_field: the text-field option (`text_field`, `stats_text_field`, `--stats-text-field`).
        model_sampled: the switch for statistics from model-sampled text (`allow_model_sampled`, ...).
        flags: command-line flags (`--name VALUE`) instead of Python keywords (`name=VALUE`).

    Example:

    ```python
    >>> from hf_edit_patch.hub.corpora import EDIT_OPTION_NAMES
    >>> EDIT_OPTION_NAMES.setting("text_field", "passage")
    "stats_text_field='passage'"
    ```
    """

    dataset: str = "stats_dataset"
    text_field: str = "text_field"
    model_sampled: str = "allow_model_sampled"
    flags: bool = False

    def setting(self, option: str, value: Any = True) -> str:
        """`option` (`"dataset"`, `"text_field"` or `"model_sampled"`) set to `value`, as the user would write it."""
        name = getattr(self, option)
        if self.flags:
            return name if value is True else f"{name} {value}"
        return f"{name}={value!r}"

    def settings(self, *pairs: tuple[str, Any]) -> str:
        """Several settings together, as they are written in a call (`a=1, b=2`) or on a command line (`--a 1 --b 2`).

        Example:

        ```python
        >>> from hf_edit_patch.hub.corpora import CLI_OPTION_NAMES
        >>> CLI_OPTION_NAMES.settings(("dataset", "corpus.jsonl"), ("text_field", "passage"))
        '--stats-dataset corpus.jsonl --stats-text-field passage'
        ```
        """
        return (" " if self.flags else ", ").join(self.setting(option, value) for option, value in pairs)


FUNCTION_OPTION_NAMES = OptionNames()
"""The names of `get_second_moments`, `TextSource` and `load_texts`."""
EDIT_OPTION_NAMES = OptionNames("stats_dataset", "stats_text_field", "allow_model_sampled_stats")
"""The names of `hf_edit_patch.edit`, `compute_update` and `PatchedModel.edit`."""
CLI_OPTION_NAMES = OptionNames("--stats-dataset", "--stats-text-field", "--model-sampled-stats", flags=True)
"""The flags of `hf-edit-patch edit` and `hf-edit-patch stats compute`."""

_OPTION_NAMES: contextvars.ContextVar[OptionNames | None] = contextvars.ContextVar(
    "hf_edit_patch_corpus_option_names", default=None
)


def current_option_names() -> OptionNames:
    """The option names error messages use now: those of the outermost [`corpus_option_names`] block, if any."""
    return _OPTION_NAMES.get() or FUNCTION_OPTION_NAMES


@contextlib.contextmanager
def corpus_option_names(names: OptionNames) -> Iterator[OptionNames]:
    """
    Inside this block, corpus errors name the options as `names` does, unless an outer block already chose names
    (the outermost caller, the one the user called, wins).

    Example:

    ```python
    >>> from hf_edit_patch.hub.corpora import CLI_OPTION_NAMES, corpus_option_names, current_option_names
    >>> with corpus_option_names(CLI_OPTION_NAMES):
    ...     current_option_names().setting("text_field", "passage")
    '--stats-text-field passage'
    ```
    """
    token = _OPTION_NAMES.set(names) if _OPTION_NAMES.get() is None else None
    try:
        yield current_option_names()
    finally:
        if token is not None:
            _OPTION_NAMES.reset(token)


@dataclass(frozen=True)
class TextSource:
    """
    A corpus of texts (an iterable of strings): a local `.txt`/`.json`/`.jsonl` file or a Hugging Face `datasets` id.

    Local files: `.txt` holds one text per line (blank lines are skipped); `.json` holds a list of strings, or of
    objects whose `text_field` is the text; `.jsonl` holds one string or object per line. Texts that are empty or only
    whitespace are skipped everywhere. A string that names an existing file, ends in one of these suffixes, or can
    only be a path is a local file; anything else is a dataset id, loaded lazily with `datasets.load_dataset` (which
    must be installed, and can only download when the Hub can be reached).

    Args:
        dataset (`str` or `os.PathLike`):
            A file path, a dataset id, or `"wikitext"` (short for `Salesforce/wikitext`, `wikitext-103-raw-v1`).
        text_field (`str`, *optional*, defaults to `"text"`):
            The field holding the text (not used for `.txt` files or lists of strings).
        split (`str`, *optional*, defaults to `"train"`):
            The dataset split (not used for local files).
        config (`str`, *optional*):
            The dataset configuration name (not used for local files).

    Example:

    ```python
    >>> from hf_edit_patch.hub.corpora import TextSource
    >>> source = TextSource("../shared/data/tasks/boolq_dev.jsonl", text_field="passage")  # doctest: +SKIP
    >>> source.fingerprint()  # doctest: +SKIP
    'file:boolq_dev.jsonl@sha256:6e3c...'
    >>> len(source.take(100))  # doctest: +SKIP
    100
    ```
    """

    dataset: str
    text_field: str = "text"
    split: str = "train"
    config: str | None = None
    _local: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        dataset = self.dataset
        if isinstance(dataset, os.PathLike):
            dataset = os.fspath(dataset)
        if not isinstance(dataset, str) or not dataset.strip():
            raise StatsError(f"a corpus must be a file path or a dataset id, got {self.dataset!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise StatsError(f"text_field must be a non-empty string, got {self.text_field!r}")
        expanded = os.path.expanduser(dataset)
        if os.path.isfile(expanded) or (_looks_local(dataset) and not os.path.isdir(expanded)):
            dataset = os.path.abspath(expanded)
            object.__setattr__(self, "_local", True)
        elif os.path.isdir(expanded):  # a dataset saved in a local folder, for `datasets.load_dataset`
            dataset = os.path.abspath(expanded)
        elif dataset in DATASET_ALIASES and self.config is None:
            dataset, config = DATASET_ALIASES[dataset]
            object.__setattr__(self, "config", config)
        object.__setattr__(self, "dataset", dataset)

    @property
    def is_local(self) -> bool:
        """Whether the corpus is a local file (else a Hugging Face dataset)."""
        return self._local

    @property
    def key_text_field(self) -> str:
        """The text field as it enters a [`StatsKey`]: `""` for `.txt` files, where it plays no part."""
        return "" if self.is_local and self.dataset.lower().endswith(".txt") else self.text_field

    def fingerprint(self) -> str:
        """
        The corpus as it enters a [`StatsKey`]: for local files their name and sha256 (read now), so that an edited
        file gets new statistics; for datasets their id, configuration and split.

        Raises:
            `StatsUnavailableError`: if a local file does not exist.
        """
        if self.is_local:
            self._check_file()
            return f"file:{os.path.basename(self.dataset)}@{file_sha256(self.dataset)}"
        config = f":{self.config}" if self.config else ""
        return f"hf-dataset:{self.dataset}{config}@{self.split}"

    def iter_texts(self) -> Iterator[str]:
        """The non-blank texts of the corpus, in order, read lazily."""
        texts = self._iter_file() if self.is_local else self._iter_dataset()
        for text in texts:
            if text.strip():
                yield text

    def __iter__(self) -> Iterator[str]:
        """The non-blank texts, as [`TextSource.iter_texts`]: a `TextSource` is an iterable of strings."""
        return self.iter_texts()

    def take(self, n: int | None) -> list[str]:
        """The first `n` non-blank texts (all of them if `n` is `None`)."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise StatsError(f"sample_count must be a positive integer or None, got {n!r}")
        return list(itertools.islice(self.iter_texts(), n))

    def _check_file(self) -> None:
        if not os.path.isfile(self.dataset):
            raise StatsUnavailableError(
                f"the corpus file {self.dataset} does not exist; accepted corpora ({current_option_names().dataset}): "
                f"a local {'/'.join(TEXT_SUFFIXES)} file or a Hugging Face dataset id"
            )

    def _iter_file(self) -> Iterator[str]:
        self._check_file()
        suffix = os.path.splitext(self.dataset)[1].lower()
        if suffix not in TEXT_SUFFIXES:
            raise StatsFormatError(
                f"cannot read texts from {self.dataset}: suffix {suffix or '(none)'!r} is not one of {TEXT_SUFFIXES}"
            )
        with open(self.dataset, encoding="utf-8") as f:
            if suffix == ".txt":
                for line in f:
                    yield line.strip()
            elif suffix == ".jsonl":
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield self._text_of(_json_line(line, self.dataset, number), f"{self.dataset}, line {number}")
            else:
                try:
                    items = json.load(f)
                except ValueError as exc:
                    raise StatsFormatError(f"{self.dataset} is not valid JSON: {exc}") from None
                if not isinstance(items, list):
                    raise StatsFormatError(
                        f"{self.dataset} holds a JSON {type(items).__name__}; accepted: a list of strings or of "
                        f"objects with a {self.text_field!r} field"
                    )
                for index, item in enumerate(items):
                    yield self._text_of(item, f"{self.dataset}, item {index}")

    def _text_of(self, item: Any, where: str) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict):
            if self.text_field not in item:
                raise StatsFormatError(
                    f"{where} has no field {self.text_field!r} (fields: {sorted(item)}); pass "
                    f"{current_option_names().setting('text_field', _example_field(item))}"
                )
            value = item[self.text_field]
            if value is None:
                return ""
            if isinstance(value, str):
                return value
            raise StatsFormatError(f"{where}: field {self.text_field!r} is a {type(value).__name__}, not a string")
        raise StatsFormatError(f"{where} is a {type(item).__name__}; accepted: a string or an object")

    def _iter_dataset(self) -> Iterator[str]:
        names = current_option_names()
        hint = (
            f"or use a local {'/'.join(TEXT_SUFFIXES)} file "
            f"({names.settings(('dataset', 'corpus.jsonl'), ('text_field', 'text'))}), or "
            f"{names.setting('model_sampled')} for statistics from text the model samples itself"
        )
        try:
            import datasets
        except ImportError as exc:
            raise StatsUnavailableError(
                f"{self.dataset!r} is not a local file, and loading it as a Hugging Face dataset needs the `datasets` "
                f"package, which is not installed: {DATASETS_INSTALL_HINT}, {hint}"
            ) from exc
        try:
            data = datasets.load_dataset(self.dataset, self.config, split=self.split)
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise StatsUnavailableError(
                f"could not load the Hugging Face dataset {self.dataset!r} (config {self.config!r}, split "
                f"{self.split!r}): {exc}. Offline, only datasets already in the datasets cache can be loaded; {hint}"
            ) from exc
        if self.text_field not in data.column_names:
            raise StatsFormatError(
                f"the dataset {self.dataset!r} has no column {self.text_field!r} (columns: {data.column_names}); "
                f"pass {current_option_names().setting('text_field', _example_field(data.column_names))}"
            )
        for index, row in enumerate(data.select_columns([self.text_field])):
            yield self._text_of(row, f"{self.dataset!r}, row {index}")


def _example_field(fields: Any) -> str:
    """A field worth suggesting: the first one holding text by its name, else the first one."""
    names = [str(f) for f in fields]
    for name in names:
        if any(word in name.lower() for word in ("text", "passage", "content", "document", "sentence")):
            return name
    return names[0] if names else "text"


def _looks_local(dataset: str) -> bool:
    """Whether `dataset` can only be a file path: a text-file suffix, or a path that no dataset id looks like."""
    return (
        dataset.lower().endswith(TEXT_SUFFIXES)
        or os.path.isabs(dataset)
        or dataset.startswith((".", "~"))
        or os.sep in dataset.replace("/", "")
    )


def _json_line(line: str, path: str, number: int) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise StatsFormatError(f"{path}, line {number} is not valid JSON: {exc}") from None


def load_texts(
    dataset: str | os.PathLike,
    *,
    text_field: str = "text",
    split: str = "train",
    sample_count: int | None = 1000,
) -> list[str]:
    """
    The first `sample_count` non-blank texts of a local file or a Hugging Face dataset (see [`TextSource`]).

    Args:
        dataset (`str` or `os.PathLike`):
            A `.txt` file (one text per line), a `.json` file (a list of strings or objects), a `.jsonl` file (one
            string or object per line), or a Hugging Face dataset id (`"wikitext"` for WikiText-103, as in ROME).
        text_field (`str`, *optional*, defaults to `"text"`):
            The field holding the text in objects and dataset rows.
        split (`str`, *optional*, defaults to `"train"`):
            The split of a Hugging Face dataset.
        sample_count (`int`, *optional*, defaults to 1000):
            How many texts to return; `None` for all.

    Returns:
        `list[str]`: the texts, in corpus order.

    Raises:
        `StatsUnavailableError`: if the file does not exist, or a dataset cannot be loaded (`datasets` not installed,
        offline).
        `StatsFormatError`: if the file is malformed or an object lacks `text_field`.

    Example:

    ```python
    >>> from hf_edit_patch.hub.corpora import load_texts
    >>> texts = load_texts("../shared/data/tasks/boolq_dev.jsonl", text_field="passage", sample_count=3)  # doctest: +SKIP
    >>> texts[0][:40]  # doctest: +SKIP
    'All biomass goes through at least some o'
    ```
    """  # noqa: E501
    return TextSource(dataset, text_field=text_field, split=split).take(sample_count)
