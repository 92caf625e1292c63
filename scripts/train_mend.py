"""Trains a MEND editor on ZsRE records and measures it on records it never saw.

The editor trains on records [train_start, train_end) of the file; reliability, generalization and locality are
measured with `hf_edit_patch.evaluation.evaluate_edits` (ZsRE token accuracy, one edit at a time) on the disjoint
records [eval_start, eval_end), for the untrained editor (the identity network: a normalized gradient step) and for
the trained one. The trained editor is saved with `hf_edit_patch.hub.mend.save_mend_editor` (and can be pushed with
`--push-to-hub`).

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_mend.py --data ../shared/data/editing/zsre_eval.json \
        --train 0:200 --eval 800:900 --steps 400 --output out/mend-smollm2
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def _range(text: str) -> tuple[int, int]:
    start, _, end = text.partition(":")
    if not start.isdigit() or not end.isdigit() or int(start) >= int(end):
        raise argparse.ArgumentTypeError(f"expected START:END with START < END, got {text!r}")
    return int(start), int(end)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", required=True, help="ZsRE records (a JSON list), e.g. ../shared/data/editing/zsre_eval.json"
    )
    p.add_argument("--train", type=_range, default=(0, 200), help="training records START:END (default 0:200)")
    p.add_argument("--eval", type=_range, default=(800, 900), help="evaluation records START:END (default 800:900)")
    p.add_argument("--model", default=None, help="model id or folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the editor network")
    p.add_argument("--lr-lr", type=float, default=1e-4, help="Adam learning rate of the per-layer step sizes")
    p.add_argument("--edit-lr", type=float, default=1e-4, help="starting step size α")
    p.add_argument("--c-edit", type=float, default=0.1, help="weight of the edit loss (MEND: 0.1)")
    p.add_argument("--c-loc", type=float, default=1.0, help="weight of the locality loss (MEND: 1.0)")
    p.add_argument("--rank", type=int, default=1920, help="rank of the editor network (MEND: 1920)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="edited layers (default: the last three)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-ratio", type=float, default=None, help="also evaluate with RECT at this keep ratio")
    p.add_argument("--output", default=None, help="folder to save the trained editor in")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the editor to this Hub repo")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    import torch

    import hf_edit_patch as hep
    from hf_edit_patch.editors import mend
    from hf_edit_patch.evaluation import evaluate_edits
    from hf_edit_patch.hub.mend import push_mend_editor, save_mend_editor

    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.data, encoding="utf-8") as f:
        records = json.load(f)
    (a, b), (c, d) = args.train, args.eval
    if max(a, c) < min(b, d):
        p.error(f"--train {a}:{b} and --eval {c}:{d} overlap; MEND must be measured on records it never saw")
    if max(b, d) > len(records):
        p.error(f"{args.data} has {len(records)} records; asked for up to {max(b, d)}")
    train_records, eval_requests = records[a:b], [hep.EditRequest.from_zsre(r) for r in records[c:d]]

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = hep.load_default_model()
    model.eval()
    options = {
        "lr": args.lr,
        "lr_lr": args.lr_lr,
        "edit_lr": args.edit_lr,
        "c_edit": args.c_edit,
        "c_loc": args.c_loc,
        "rank": args.rank,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    rows = []
    for label, steps in (("untrained", 0), ("trained", args.steps)):
        start = time.time()
        editor = mend.train(model, tokenizer, train_records, max_steps=steps, **options)
        trained_s = time.time() - start
        for keep in [None, args.keep_ratio] if args.keep_ratio else [None]:
            start = time.time()
            scores = evaluate_edits(
                model, tokenizer, eval_requests, method="mend", hparams={"editor": editor}, keep_ratio=keep
            )
            rows.append(
                (label, steps, "none" if keep is None else f"rect@{keep}", scores, trained_s, time.time() - start)
            )
    print(
        f"\nMEND trained on {len(train_records)} records ({a}:{b}), evaluated on {len(eval_requests)} others ({c}:{d})"
    )
    print("| editor | steps | regularizer | reliability | generalization | locality | train s | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, steps, reg, s, t_train, t_eval in rows:
        cells = " | ".join(
            "n/a" if s[k] is None else f"{s[k]:.3f}" for k in ("reliability", "generalization", "locality")
        )
        print(f"| {label} | {steps} | {reg} | {cells} | {t_train:.0f} | {t_eval:.0f} |")
    if args.output:
        save_mend_editor(editor, args.output)
        print(f"\nsaved the trained editor to {args.output}")
    if args.push_to_hub:
        push_mend_editor(editor, args.push_to_hub)
        print(f"pushed the trained editor to {args.push_to_hub}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
