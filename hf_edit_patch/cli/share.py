"""`push` (a patch folder and its evaluation → a Hub repo, one commit) and `stats` (compute, list, push and pull
the key statistics ROME and MEMIT need)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import EXIT_OK, CLIError, add_model_args, json_object, load_model, print_json, say, show_progress


def add_parsers(sub: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "push",
        parents=[common],
        epilog=epilog,
        formatter_class=fmt,
        help="upload a patch folder and its evaluation to the Hub in one commit",
        description="Upload a patch folder (or a stack) to a Hub repo in one commit: the patch files, its evaluation "
        "(FOLDER/evaluation or --evaluation) under evaluation/, and a README.md card with the evaluation as "
        "model-index. The repo is created if needed.",
    )
    p.add_argument("folder", metavar="FOLDER", help="a folder written by save_pretrained or `hf-edit-patch edit`")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, namespace/name")
    p.add_argument("--evaluation", default=None, help="evaluation folder (default: FOLDER/evaluation if present)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN)")
    p.add_argument("--license", default=None, help="license id for the card (default: the base model's if known)")
    p.add_argument("--overwrite-card", action="store_true", help="replace a README.md a person edited")
    p.add_argument(
        "--dry-run", metavar="DIR", default=None, help="write what would be uploaded to DIR; upload nothing"
    )
    p.set_defaults(func=run_push)

    p = sub.add_parser(
        "stats",
        epilog=epilog,
        formatter_class=fmt,
        help="compute, list, push or pull key statistics for ROME and MEMIT",
        description="The second moments C = E[k kᵀ] of the edited layers' inputs, which ROME and MEMIT need, kept\n"
        "in a cache keyed by model, module, corpus, sample count and length (default: ~/.cache/hf_edit_patch/stats).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser(
        "compute", parents=[common], help="compute (or find cached) the statistics an edit will need"
    )
    add_model_args(c)
    c.add_argument("--stats-dataset", default=None, help="corpus: a datasets id or a .txt/.json/.jsonl file")
    c.add_argument("--stats-text-field", default="text", help="text field of a JSON corpus (default: text)")
    c.add_argument(
        "--model-sampled-stats",
        "--model-sampled",
        dest="model_sampled",
        action="store_true",
        help="without a corpus: text the model samples itself",
    )
    c.add_argument("--method", choices=("rome", "memit"), default="rome", help="whose layers (default: rome)")
    c.add_argument("--hparams", default=None, help="method hyperparameters as JSON or @file.json (layers, mom2_*)")
    c.add_argument("--layers", type=int, nargs="+", default=None, help="layers to compute (default: the method's)")
    c.add_argument("--samples", type=int, default=None, help="texts to use (default: the method's mom2_n_samples)")
    c.add_argument("--max-length", type=int, default=None, help="tokens per text (default: mom2_max_length)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--cache-dir", default=None, help="statistics cache folder")
    c.add_argument(
        "--device",
        default=None,
        help="where the model runs (default: the CPU; under torchrun with CUDA, this process's GPU LOCAL_RANK)",
    )
    c.set_defaults(func=run_stats_compute)

    ls = actions.add_parser("list", parents=[common], help="list the cached statistics")
    ls.add_argument("--cache-dir", default=None, help="statistics cache folder")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=run_stats_list)

    push = actions.add_parser("push", parents=[common], help="upload cached statistics to a Hub repo")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--cache-dir", default=None, help="statistics cache folder")
    push.add_argument("--model", default=None, help="only the statistics of this model id or folder")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None)
    push.add_argument("--commit-message", default=None)
    push.set_defaults(func=run_stats_push)

    pull = actions.add_parser("pull", parents=[common], help="download shared statistics into the cache")
    pull.add_argument("repo_id", metavar="REPO_ID", help="a Hub repo id or a folder with index.json")
    pull.add_argument("--cache-dir", default=None, help="statistics cache folder")
    pull.add_argument("--revision", default=None)
    pull.add_argument("--token", default=None)
    pull.add_argument("--local-files-only", action="store_true")
    pull.set_defaults(func=run_stats_pull)


# ---------------------------------------------------------------------------------------------------------- push
def _commit_url(info: Any) -> str:
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)


def run_push(args: argparse.Namespace) -> int:
    from ..evaluation.publish import push_patch_folder, stage_patch_folder

    if not os.path.isdir(args.folder):
        raise CLIError(f"{args.folder!r} is not a folder; give the folder a patch was saved to")
    if args.evaluation is not None and not os.path.exists(args.evaluation):
        raise CLIError(f"--evaluation {args.evaluation!r} does not exist")
    options = {"evaluation": args.evaluation, "license": args.license, "overwrite_card": args.overwrite_card}
    if args.dry_run is not None:
        files = stage_patch_folder(args.folder, args.dry_run, repo_id=args.repo_id, **options)
        say(f"Dry run: {len(files)} file(s) would be uploaded to {args.repo_id} (staged in {args.dry_run}):")
        for name in files:
            say(f"  {name}")
        return EXIT_OK
    info = push_patch_folder(
        args.folder,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        token=args.token,
        **options,
    )
    say(f"Pushed {args.folder} to {args.repo_id}: {_commit_url(info)}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------- stats
def _cache(args: argparse.Namespace) -> Any:
    from ..hub.stats_cache import StatsCache

    return StatsCache(args.cache_dir)


def run_stats_compute(args: argparse.Namespace) -> int:
    """One process, or several under `torchrun --nproc_per_node N -m hf_edit_patch.cli stats compute ...` (or
    `accelerate launch`): each runs its share of the batches, rank 0 writes the cache and reports."""
    from ..distributed import launched

    with launched() as procs:
        return _stats_compute(args, procs)


def _stats_compute(args: argparse.Namespace, procs: Any) -> int:
    import torch

    from ..editing.statistics import get_second_moments
    from ..editors import memit, rome
    from ..editors.architectures import get_arch
    from ..editors.hparams import MemitHParams, RomeHParams
    from ..hub.corpora import CLI_OPTION_NAMES, corpus_option_names

    hparams = json_object(args.hparams, "--hparams")
    if args.layers is not None:
        if args.method == "rome" and len(args.layers) != 1:
            raise CLIError(f"ROME edits one layer; give one --layers value, got {args.layers}")
        hparams.update({"layer": args.layers[0]} if args.method == "rome" else {"layers": args.layers})
    if args.stats_dataset is None and not args.model_sampled:
        raise CLIError(
            "give a corpus with --stats-dataset FILE_OR_ID, or --model-sampled-stats for model-sampled text"
        )
    if args.stats_dataset is not None and args.model_sampled:
        raise CLIError("give either --stats-dataset or --model-sampled-stats, not both")
    if args.device is not None and args.device_map is not None:
        raise CLIError(f"give either --device {args.device} or --device-map {args.device_map}, not both")
    hp = (RomeHParams if args.method == "rome" else MemitHParams).from_any(hparams or None)
    model, tokenizer = load_model(args)
    device = args.device
    if device is None and args.device_map is None and procs is not None and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    if device is not None:
        model.to(device)
    modules = (rome if args.method == "rome" else memit).target_modules(model, hp, get_arch(model))
    cache = _cache(args)
    with corpus_option_names(CLI_OPTION_NAMES):
        moments = get_second_moments(
            model,
            tokenizer,
            modules,
            stats_dataset=args.stats_dataset,
            text_field=args.stats_text_field,
            sample_count=args.samples or hp.mom2_n_samples,
            max_length=args.max_length or hp.mom2_max_length,
            batch_size=args.batch_size,
            cache=cache,
            allow_model_sampled=args.model_sampled,
            show_progress=show_progress(args),
            distributed=procs is not None,
        )
    if procs is not None and not procs.is_main:
        return EXIT_OK
    processes = f" ({procs.world} processes)" if procs is not None else ""
    say(f"Key statistics of {len(moments)} module(s) in {cache.cache_dir}{processes}:")
    for name, matrix in moments.items():
        say(f"  {name}: {matrix.shape[0]}×{matrix.shape[1]}")
    return EXIT_OK


def run_stats_list(args: argparse.Namespace) -> int:
    entries = _cache(args).entries()
    if args.json:
        print_json([{**e.key.to_dict(), "count": e.count, "path": str(e.path)} for e in entries])
        return EXIT_OK
    say(f"{len(entries)} cached statistics in {_cache(args).cache_dir}")
    for e in entries:
        k = e.key
        say(f"  {k.model_id} {k.module} corpus={k.dataset} texts={k.sample_count} len={k.max_length} tokens={e.count}")
    return EXIT_OK


def run_stats_push(args: argparse.Namespace) -> int:
    from ..hub.stats_sharing import push_stats_to_hub

    cache = _cache(args)
    entries = [e for e in cache.entries() if args.model is None or e.key.model_id == args.model]
    if not entries:
        which = f" of {args.model!r}" if args.model else ""
        raise CLIError(f"no cached statistics{which} in {cache.cache_dir} (compute them with `stats compute`)")
    info = push_stats_to_hub(
        cache,
        entries,
        args.repo_id,
        private=args.private or None,
        token=args.token,
        commit_message=args.commit_message,
    )
    say(f"Pushed {len(entries)} statistics file(s) to {args.repo_id}: {_commit_url(info)}")
    return EXIT_OK


def run_stats_pull(args: argparse.Namespace) -> int:
    from ..hub.stats_sharing import load_stats_from_hub

    cache = _cache(args)
    entries = load_stats_from_hub(
        args.repo_id,
        revision=args.revision,
        token=args.token,
        cache=cache,
        local_files_only=args.local_files_only,
        show_progress=show_progress(args),
    )
    say(f"Loaded {len(entries)} statistics file(s) from {args.repo_id} into {cache.cache_dir}")
    return EXIT_OK
