"""`EditPatch`: a set of sparse ΔW matrices with their config, saved as safetensors + JSON.

Example:
    ```python
    import torch
    import hf_edit_patch as hep

    dense = {"model.layers.5.mlp.down_proj": torch.outer(u, v)}          # any ΔW, in the module's own layout
    patch = hep.EditPatch.from_deltas(dense, model, keep_ratio=0.4, regularizer="rect")
    patch.save_pretrained("out/eiffel")                                  # patch_config.json, .safetensors, README
    patch = hep.EditPatch.from_pretrained("out/eiffel")                  # or "user/edit-patch" on the Hub
    patch.to_peft("out/eiffel-shira")                                    # a PEFT SHiRA adapter (see shira.py)
    patch = hep.EditPatch.from_peft("out/eiffel-shira")                  # and back, exactly
    ```
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PatchError, PatchFormatError
from ..hub.cards import card_with_marker, keeps_existing_card, patch_card
from ..hub.files import FileData, atomic_write_files, file_sha256
from ..hub.push import PushOptions, push_folder
from ..hub.resolve import resolve_file
from ..interop import peft as shira
from ..modules import model_source, resolve_weight, unwrap_peft
from ..progress import progress_bar
from . import encoding as storage
from .config import CONFIG_NAME, WEIGHTS_NAME, ModuleRecord, PatchConfig
from .sparse import SparseDelta
from .sparsifiers import sparsify

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..hub.push import PushKwargs

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("native", "peft")
_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# "auto" stores values in float16 when that keeps ΔW to within this relative (Frobenius) error, else float32.
AUTO_FP16_TOLERANCE = 2.0**-10


def _choose_value_dtype(values: list[torch.Tensor], requested: str | torch.dtype) -> torch.dtype:
    if isinstance(requested, torch.dtype):
        requested = storage.dtype_name(requested)
    if requested != "auto":
        if requested not in _VALUE_DTYPES:
            raise PatchError(f"value_dtype must be 'auto' or one of {sorted(_VALUE_DTYPES)}, got {requested!r}")
        return _VALUE_DTYPES[requested]
    err = ref = 0.0
    for v in values:
        v32 = v.to(torch.float32)
        if v32.numel() and float(v32.abs().max()) > torch.finfo(torch.float16).max:
            return torch.float32
        err += float((v32.to(torch.float16).to(torch.float32) - v32).square().sum())
        ref += float(v32.square().sum())
    return torch.float16 if err <= (AUTO_FP16_TOLERANCE**2) * ref else torch.float32


def _as_dense(delta: Any, name: str) -> torch.Tensor:
    if isinstance(delta, SparseDelta):
        return delta.to_dense()
    if isinstance(delta, torch.Tensor) and delta.layout == torch.sparse_coo:
        return delta.to_dense()
    if isinstance(delta, torch.Tensor):
        return delta
    if isinstance(delta, (tuple, list)) and len(delta) == 2 and all(isinstance(t, torch.Tensor) for t in delta):
        u, v = (t if t.dim() == 2 else t.unsqueeze(1) for t in delta)
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
            raise PatchError(
                f"factored delta for {name!r}: u and v must be [m, r] and [n, r] (or 1-D) with the same rank r, "
                f"got {list(delta[0].shape)} and {list(delta[1].shape)}"
            )
        return u @ v.T
    raise TypeError(
        f"delta for {name!r} must be a dense tensor, a torch sparse COO tensor, a SparseDelta or a factored "
        f"(u, v) pair with ΔW = u @ v.T; got {type(delta).__name__}"
    )


class EditPatch:
    """A portable edit: `deltas` (`{module_name: SparseDelta}`) and its `config` (`PatchConfig`).

    Build one with `EditPatch.from_deltas` (or an editor), save it with `save_pretrained`, load it with
    `from_pretrained`, and attach it to a model with `PatchedModel`.
    """

    def __init__(self, deltas: Mapping[str, SparseDelta], config: PatchConfig) -> None:
        if not isinstance(config, PatchConfig):
            raise TypeError(f"config must be a PatchConfig, got {type(config).__name__}")
        deltas = dict(deltas)
        if set(deltas) != set(config.modules):
            raise PatchFormatError(
                f"the config lists modules {sorted(config.modules)} but the patch holds deltas for {sorted(deltas)}"
            )
        value_dtype = _VALUE_DTYPES[config.value_dtype]
        for name, delta in deltas.items():
            if not isinstance(delta, SparseDelta):
                raise TypeError(f"deltas[{name!r}] must be a SparseDelta, got {type(delta).__name__}")
            rec = config.modules[name]
            if delta.shape != rec.shape or delta.nnz != rec.nnz or delta.dtype != value_dtype:
                raise PatchFormatError(
                    f"module {name!r}: the config says shape {rec.shape}, nnz {rec.nnz}, values {config.value_dtype}"
                    f" but the delta has shape {delta.shape}, nnz {delta.nnz}, values {delta.dtype}"
                )
        self.deltas: dict[str, SparseDelta] = deltas
        self.config = config
        if config.content_hash is None:
            config.content_hash = storage.content_hash(deltas)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_deltas(
        cls,
        deltas: Mapping[str, Any],
        model: torch.nn.Module,
        *,
        keep_ratio: float | None = None,
        regularizer: str | None = "rect",
        value_dtype: str | torch.dtype = "auto",
        regularizer_kwargs: dict[str, Any] | None = None,
        editor: str = "external",
        editor_hparams: dict[str, Any] | None = None,
        requests: list[Any] | None = None,
        base_model_name_or_path: str | None = None,
        base_model_revision: str | None = None,
        show_progress: bool | None = None,
    ) -> EditPatch:
        """Wraps ΔW matrices computed elsewhere into a patch, sparsified by a regularizer.

        Args:
            deltas: `{module_name: ΔW}` with ΔW a dense tensor, a torch sparse COO tensor, a `SparseDelta` or a
                factored `(u, v)` pair (ΔW = u @ vᵀ), in the module's own weight layout.
            model: the model the deltas were computed on (a `PatchedModel` records its active patches as
                parents). It is read, never modified: fingerprints of the target weights are taken here.
            keep_ratio: fraction of each ΔW's entries to keep, in (0, 1]; None keeps every nonzero entry (unless
                `regularizer_kwargs` holds a RECT `norm_budget`).
            regularizer: "rect" (top-k by |ΔW/W|), "random" or "pca"; ignored when `keep_ratio` is None.
            value_dtype: "auto" (float16 when it keeps ΔW within 2⁻¹⁰ relative error, else float32), "float16",
                "bfloat16" or "float32". Values are cast once, here, so saving and loading are exact.
            regularizer_kwargs: e.g. `{"seed": 1}` for random-k, `{"rank": 4}` for PCA-k, or `{"norm_budget": 0.9}`
                for RECT keeping the fewest entries that carry 90% of each ΔW's squared norm (with keep_ratio None).
            editor, editor_hparams, requests: provenance recorded in the config.

        Example:
            ```python
            >>> patch = EditPatch.from_deltas({"transformer.h.0.mlp.c_proj": dw}, model, keep_ratio=0.4)
            ```
        """
        parents: list[dict[str, Any]] = []
        if getattr(model, "is_patched_model", False):  # a PatchedModel: its active patches are the parents
            parents = [{"name": n, "content_hash": p.config.content_hash} for n, p in model.patches.items()]
            model = model.base_model
        model = unwrap_peft(model)  # a PeftModel: names and fingerprints are those of the base weights
        if not isinstance(deltas, Mapping) or not deltas:
            raise PatchError("deltas must be a non-empty mapping of module name to ΔW")
        norm_budget = (regularizer_kwargs or {}).get("norm_budget")
        regularizer = regularizer if (keep_ratio is not None or norm_budget is not None) else None
        model_id, revision = model_source(model)
        records: dict[str, ModuleRecord] = {}
        sparse: dict[str, SparseDelta] = {}
        items = progress_bar(
            deltas.items(), desc="Sparsifying ΔW", unit="module", show_progress=show_progress, min_items=8
        )
        for name, delta in items:
            _, weight, layout = resolve_weight(model, name)
            dense = _as_dense(delta, name).detach()
            if tuple(dense.shape) != tuple(weight.shape):
                raise PatchError(
                    f"ΔW for {name!r} has shape {list(dense.shape)} but the weight is {list(weight.shape)} "
                    f"(layout {layout!r}: give ΔW in the module's own weight layout)"
                )
            sparse[name] = sparsify(
                dense.to(weight.device),
                weight.detach(),
                regularizer,
                keep_ratio,
                name=name,
                **(regularizer_kwargs or {}),
            )
            records[name] = ModuleRecord(
                shape=tuple(weight.shape),
                layout=layout,
                nnz=sparse[name].nnz,
                encoding=storage.choose_encoding(sparse[name]),
                weight_dtype=storage.dtype_name(weight.dtype),
                fingerprint=storage.fingerprint(weight),
            )
        vdtype = _choose_value_dtype([d.values for d in sparse.values()], value_dtype)
        for name, d in sparse.items():
            cast = d.to("cpu", vdtype)
            if not bool(torch.isfinite(cast.values).all()):
                raise PatchError(f"ΔW for {name!r} overflows {vdtype}; use value_dtype='float32'")
            sparse[name] = cast
        config = PatchConfig(
            base_model_name_or_path=base_model_name_or_path or model_id,
            base_model_revision=base_model_revision or revision,
            model_type=getattr(getattr(model, "config", None), "model_type", None),
            modules=records,
            editor=editor,
            editor_hparams=dict(editor_hparams or {}),
            regularizer=regularizer,
            keep_ratio=keep_ratio,
            regularizer_kwargs=dict(regularizer_kwargs or {}),
            requests=[r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in (requests or [])],
            parent_patches=parents,
            value_dtype=storage.dtype_name(vdtype),
        )
        return cls(sparse, config)

    # ------------------------------------------------------------------ inspection
    @property
    def target_modules(self) -> list[str]:
        return list(self.deltas)

    @property
    def nnz(self) -> int:
        """Stored entries over all modules."""
        return sum(d.nnz for d in self.deltas.values())

    def encodings(self) -> dict[str, str]:
        """The encoding `save_pretrained` uses for each module (the smallest exact one)."""
        return {name: storage.choose_encoding(d) for name, d in self.deltas.items()}

    def nbytes(self) -> int:
        """Bytes of tensor data on disk (headers excluded)."""
        return sum(storage.encoded_nbytes(d, storage.choose_encoding(d)) for d in self.deltas.values())

    def __repr__(self) -> str:
        cfg = self.config
        reg = f"{cfg.regularizer}@{cfg.keep_ratio}" if cfg.regularizer else "none"
        return (
            f"EditPatch(modules={len(self.deltas)}, nnz={self.nnz}, editor={cfg.editor!r}, regularizer={reg}, "
            f"base={cfg.base_model_name_or_path!r})"
        )

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        format: str = "native",
        overwrite_card: bool = False,
        license: str | None = None,
        card_repo_id: str | None = None,
        **peft_kwargs: Any,
    ) -> str:
        """Writes `patch_config.json`, `patch_model.safetensors` and a `README.md` card as one atomic set.

        A kill at any instant leaves the folder's previous patch or this one, each loading exactly (see
        `hf_edit_patch.hub.files`).

        With `format="peft"`, writes a PEFT SHiRA adapter instead (see `to_peft`, which takes `peft_kwargs`).
        An existing README.md that a person edited is kept unless `overwrite_card=True`; the card
        (`hf_edit_patch.hub.cards.patch_card`) records `license` (a Hub license id) and shows `card_repo_id` in its
        usage snippet. Returns the folder path.
        """
        if format not in SAVE_FORMATS:
            raise PatchError(
                f"format must be one of {SAVE_FORMATS} ('native': hf_edit_patch's own files; 'peft': a PEFT SHiRA "
                f"adapter), got {format!r}"
            )
        if format == "peft":
            return self.to_peft(save_directory, **peft_kwargs)
        if peft_kwargs:
            raise TypeError(f"{sorted(peft_kwargs)} apply to format='peft' only")
        save_directory = os.fspath(save_directory)
        atomic_write_files(
            self.files_to_save(
                save_directory, overwrite_card=overwrite_card, license=license, card_repo_id=card_repo_id
            )
        )
        return save_directory

    def files_to_save(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite_card: bool = False,
        license: str | None = None,
        card_repo_id: str | None = None,
    ) -> dict[str, FileData]:
        """`{path: writer}` of the native save (weights, config, card) for `hub.files.atomic_write_files`.

        The writers run in order: the config records the hash of the weights just written, and becomes this
        patch's `config` (with the storage encodings chosen). A README.md that a person edited is left out.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise PatchError(f"save_directory {save_directory!r} is a file; give a folder path")
        tensors: dict[str, torch.Tensor] = {}
        modules = {}
        for name, delta in self.deltas.items():
            encoding = storage.choose_encoding(delta)
            tensors.update(storage.encode(name, delta, encoding))
            modules[name] = replace(self.config.modules[name], encoding=encoding)
        config = self.config

        def write_weights(tmp: str) -> None:
            nonlocal config
            save_file(tensors, tmp, metadata={"format": "pt", "hf_edit_patch_format": str(config.format_version)})
            config = replace(config, modules=modules, tensors_sha256=file_sha256(tmp))

        def write_config(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(config.to_json_string())
            self.config = config

        def write_readme(tmp: str) -> None:
            card = patch_card(self, repo_id=card_repo_id or save_directory, license=license)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(card_with_marker(str(card)))

        files: dict[str, FileData] = {
            os.path.join(save_directory, WEIGHTS_NAME): write_weights,
            os.path.join(save_directory, CONFIG_NAME): write_config,
        }
        readme = os.path.join(save_directory, "README.md")
        if not keeps_existing_card(readme, overwrite=overwrite_card):
            files[readme] = write_readme
        return files

    def to_peft(
        self, save_directory: str | os.PathLike, *, r: int | None = None, task_type: str | None = "CAUSAL_LM"
    ) -> str:
        """Writes the patch as a PEFT SHiRA adapter (`adapter_config.json` + `adapter_model.safetensors`).

        `peft.PeftModel.from_pretrained(base, save_directory)` loads it without hf_edit_patch, and gives the logits
        of this patch attached with `PatchedModel` (`merge_and_unload()` gives the same weights). SHiRA holds
        exactly r·(m+n) entries per m×n module, one r for the whole adapter: every module is padded with explicit
        zero-valued entries (at the first row-major positions it lacks), never cut. The patch's config is kept in
        the safetensors metadata, so `EditPatch.from_peft` gives this very patch back.

        Args:
            save_directory: the folder to write (created if needed); both files are written atomically.
            r: SHiRA's r; None picks the smallest that holds every module's entries.
            task_type: PEFT's task type, which picks the `PeftModel` class ("CAUSAL_LM"), or None.

        Raises:
            PatchError: for a module that is not an `nn.Linear` (GPT-2 `Conv1D`: SHiRA supports nn.Linear only;
                save the native format or merge instead), or a patch too dense for r·(m+n) entries per module.

        Example:
            ```python
            >>> patch.to_peft("out/eiffel-shira")
            >>> peft_model = peft.PeftModel.from_pretrained(base, "out/eiffel-shira")   # no hf_edit_patch needed
            ```
        """
        return shira.write_shira(save_directory, self.deltas, self.config, r=r, task_type=task_type)

    def push_to_hub(
        self,
        repo_id: str,
        **options: Unpack[PushKwargs],
    ) -> Any:
        """Creates `repo_id` if needed and uploads the saved patch in one commit. Returns the `CommitInfo`.

        The patch is saved (`save_pretrained`, card included) into a temporary folder that `HfApi.upload_folder`
        sends as one commit, as `huggingface_hub`'s `push_to_hub` does.

        Args:
            repo_id: `"namespace/name"`; created if it does not exist.
            options: `private`, `revision`, `create_pr`, `commit_message`, `token`, `license`
                (`hf_edit_patch.hub.push.PushOptions`).

        Example:
            ```python
            >>> patch.push_to_hub("user/eiffel-rome-rect", private=True)
            ```
        """
        push = PushOptions.from_kwargs(options)
        push = replace(push, commit_message=push.commit_message or "Upload edit patch")
        return push_folder(
            lambda folder: self.save_pretrained(folder, license=push.license, card_repo_id=repo_id), repo_id, push
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> EditPatch:
        """Loads a patch from a local folder or a Hub repo id (safetensors and JSON only: nothing is unpickled).

        Every tensor is validated against the config (shapes, dtypes, index ranges, duplicates, finiteness)
        before the patch is returned.

        Raises:
            PatchNotFoundError: (an `OSError`) when the folder or repo has no patch.
            PatchFormatError: (a `ValueError`) when a file is corrupt, truncated or disagrees with the config.
        """
        kwargs = {
            "subfolder": subfolder,
            "revision": revision,
            "cache_dir": cache_dir,
            "token": token,
            "local_files_only": local_files_only,
            "force_download": force_download,
        }
        config_path = resolve_file(path_or_repo_id, CONFIG_NAME, **kwargs)
        weights_path = resolve_file(path_or_repo_id, WEIGHTS_NAME, **kwargs)
        config = PatchConfig.from_json_file(config_path)
        if config.tensors_sha256 is not None and file_sha256(weights_path) != config.tensors_sha256:
            raise PatchFormatError(
                f"{weights_path} does not match {CONFIG_NAME} (sha256 differs): the file is corrupt, truncated, or "
                "comes from another save"
            )
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise PatchFormatError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
        value_dtype = _VALUE_DTYPES[config.value_dtype]
        deltas = {name: storage.decode(name, tensors, rec, value_dtype) for name, rec in config.modules.items()}
        expected = {f"{name}.{part}" for name, rec in config.modules.items() for part in storage.PARTS[rec.encoding]}
        extra = sorted(set(tensors) - expected)
        if extra:
            raise PatchFormatError(f"{weights_path} holds tensors the config does not describe: {extra[:5]}")
        patch = cls(deltas, replace(config, content_hash=None))
        if config.content_hash is not None and patch.config.content_hash != config.content_hash:
            raise PatchFormatError(
                f"the tensors in {weights_path} do not match the content_hash in {CONFIG_NAME}: the config "
                "describes another patch"
            )
        return patch

    @classmethod
    def from_peft(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        model: torch.nn.Module | None = None,
        keep_zeros: bool = False,
        use_metadata: bool = True,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> EditPatch:
        """Reads a PEFT SHiRA adapter (a local folder or a Hub repo id) as an edit patch.

        An adapter written by `to_peft` gives back the exported patch exactly (same entries, values and config;
        the padding is dropped, the content hash checked). Any other SHiRA adapter (safetensors only) becomes a
        patch with the same ΔW, recorded as `editor="peft-shira"` with its source; SHiRA does not store weight
        shapes, so `model` (the base model, or a PeftModel of it) is needed, and no fingerprints are recorded.

        Args:
            model: the base model, for the shapes of an adapter not written by hf_edit_patch.
            keep_zeros: keep zero-valued entries of such an adapter (they change nothing in ΔW); by default they are
                dropped, as the padding of our own exports is.
            use_metadata: False ignores the patch recorded by `to_peft` and reads the tensors as anyone's adapter.
            revision, subfolder, cache_dir, token, local_files_only, force_download: as in `from_pretrained`.

        Example:
            ```python
            >>> patch = EditPatch.from_peft("out/eiffel-shira")
            >>> patch = EditPatch.from_peft("user/shira-adapter", model=base)
            ```
        """
        deltas, config = shira.read_shira(
            path_or_repo_id,
            model=model,
            keep_zeros=keep_zeros,
            use_metadata=use_metadata,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        return cls(deltas, config)
