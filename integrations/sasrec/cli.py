"""Train and evaluate SASRec from the command line.

    python -m largevocab.integrations.sasrec.cli --data ../shared/data/rec/ml-1m.txt --loss sce --out runs/sce

``--data`` is a SASRec text file (``user item`` per line, leave-one-out split) or a table with user, item and
timestamp columns: CSV/TSV/Parquet (read and validated by :func:`read_interactions`), JSON/JSONL/Arrow files or a
Hugging Face Hub dataset name (``--data-split``, ``--data-config``), both through ``datasets``
(:func:`load_interactions_dataset`). Tables take ``--split loo`` or ``temporal``;
``--min-item-interactions``/``--min-user-interactions`` filter them first. ``--preset`` picks the settings of one
reference code (SCE, SASRec+ or gSASRec) for every model/optimiser flag left unset. Writes ``OUT/best.pt`` (reload
with ``largevocab.integrations.sasrec.load_checkpoint``), ``OUT/metrics.json`` and ``OUT/history.jsonl`` (one line
per epoch); prints the test metrics. Returns 0 on success, 2 on bad arguments or data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .data import (
    SCE_MIN_ITEM_INTERACTIONS,
    SCE_MIN_USER_INTERACTIONS,
    TrainBatches,
    filter_min_interactions,
    leave_one_out,
    load_interactions_dataset,
    read_interactions,
    read_sasrec_txt,
    table_to_sequences,
    temporal_split,
)
from .losses import DEFAULT_GBCE_T, LOSS_NAMES, build_loss
from .model import INITS, POSITIONS, SASRec, SASRecConfig
from .train import TrainConfig, set_seed, train

SAMPLING_CHOICES = ("uniform", "popularity", "in_batch")
# The settings of the three reference codes that differ between them (everything else is shared: 2 blocks, 1 head,
# window 200, residual from the normed input, batch 128, lr 1e-3, early stopping on validation NDCG@10).
# "sce": AIRI-Institute/Scalable-SASRec (pmixer-based); "sasrec+": antklen/sasrec-bert4rec-recsys23 (Klenitskiy &
# Vasilev 2023, SASRec+ = full CE); "gsasrec": asash/gSASRec-pytorch's config_ml1m.py and GSASRec model.
PRESETS = {
    "sce": dict(hidden_dim=64, dropout=0.3, init="xavier", positions="from_end", mask_padding_keys=False,
                scale_embeddings=True, tie_output=True, betas=(0.9, 0.98), epochs=200, patience=10),
    "sasrec+": dict(hidden_dim=64, dropout=0.1, init="normal", positions="from_start", mask_padding_keys=True,
                    scale_embeddings=True, tie_output=True, betas=(0.9, 0.999), epochs=100, patience=10),
    "gsasrec": dict(hidden_dim=128, dropout=0.5, init="torch", positions="from_end", mask_padding_keys=True,
                    scale_embeddings=False, tie_output=False, betas=(0.9, 0.999), epochs=10000, patience=200),
}
DEFAULT_PRESET = "sce"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="largevocab sasrec", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help="SASRec .txt file; a .csv/.tsv/.parquet/.json/.jsonl/.arrow interaction table; or a "
                           "Hugging Face Hub dataset name (through `datasets`, needs internet)")
    data.add_argument("--data-split", default="train", help="Hub dataset: the split to read")
    data.add_argument("--data-config", default=None, help="Hub dataset: its configuration name")
    data.add_argument("--split", choices=("loo", "temporal"), default="loo",
                      help="leave-one-out, or the global temporal split (tables with timestamps only)")
    data.add_argument("--user-col", default="user")
    data.add_argument("--item-col", default="item")
    data.add_argument("--time-col", default="timestamp")
    data.add_argument("--min-item-interactions", type=int, default=0,
                      help=f"tables: drop rarer items first (the SCE paper uses {SCE_MIN_ITEM_INTERACTIONS})")
    data.add_argument("--min-user-interactions", type=int, default=0,
                      help=f"tables: then drop users with fewer (the SCE paper uses {SCE_MIN_USER_INTERACTIONS})")
    data.add_argument("--max-users", type=int, default=None, help="keep only the first N users (quick runs)")

    model = p.add_argument_group("model (flags left unset take the --preset's value)")
    model.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET,
                       help="reference code whose settings fill unset flags: " + "; ".join(
                           f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}"
                           for name, values in PRESETS.items()))
    model.add_argument("--hidden-dim", type=int, default=None)
    model.add_argument("--num-blocks", type=int, default=2)
    model.add_argument("--num-heads", type=int, default=1)
    model.add_argument("--max-len", type=int, default=200)
    model.add_argument("--dropout", type=float, default=None)
    model.add_argument("--init", choices=INITS, default=None, help="weight initialisation (SASRecConfig.init)")
    model.add_argument("--positions", choices=POSITIONS, default=None, help="position numbering")
    model.add_argument("--mask-padding-keys", action=argparse.BooleanOptionalAction, default=None,
                       help="attention never reads padding positions")
    model.add_argument("--scale-embeddings", action=argparse.BooleanOptionalAction, default=None,
                       help="multiply input item embeddings by sqrt(d)")
    model.add_argument("--tie-output", action=argparse.BooleanOptionalAction, default=None,
                       help="score items against the input table (else a separate output table)")
    model.add_argument("--plain-residual", action="store_true",
                       help="textbook pre-LN residuals instead of the reference's residual from the normed input")
    model.add_argument("--mlet-inner-dim", type=int, default=None, help="train the item table as (V,k)@(k,d)")

    loss = p.add_argument_group("loss")
    loss.add_argument("--loss", choices=LOSS_NAMES, default="sce")
    loss.add_argument("--num-negatives", type=int, default=None, help="bce/gbce/sampled: negatives per position")
    loss.add_argument("--sampling", choices=SAMPLING_CHOICES, default="uniform", help="sampled: distribution")
    loss.add_argument("--shared-negatives", action="store_true", help="sampled: one negative set for the batch")
    loss.add_argument("--no-logq", action="store_true", help="sampled: no logQ correction")
    loss.add_argument("--gbce-t", type=float, default=DEFAULT_GBCE_T, help="gbce: calibration parameter t")
    loss.add_argument("--n-buckets", type=int, default=None, help="sce: buckets (default 2 sqrt(rows))")
    loss.add_argument("--bucket-size-x", type=int, default=None, help="sce: rows per bucket (default 2 sqrt(rows))")
    loss.add_argument("--bucket-size-y", type=int, default=None, help="sce: items per bucket (library default)")
    loss.add_argument("--no-mix-x", action="store_true", help="sce: random bucket vectors instead of mixed states")
    loss.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                      help="cce/sce/sampled kernels")

    run = p.add_argument_group("training")
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--drop-last", action="store_true",
                     help="drop each epoch's last incomplete batch (the SCE reference's loader does)")
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--betas", type=float, nargs=2, default=None, metavar=("BETA1", "BETA2"), help="Adam betas")
    run.add_argument("--epochs", type=int, default=None, help="epoch limit")
    run.add_argument("--patience", type=int, default=None, help="evaluations without a better validation NDCG@10")
    run.add_argument("--time-budget", type=float, default=None,
                     help="seconds of wall time for this call; stops resumably (see --resume)")
    run.add_argument("--chunk-epochs", type=int, default=None, help="stop resumably after this many epochs")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out (same flags) from its last epoch, as if it had not stopped")
    run.add_argument("--eval-every", type=int, default=1)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    run.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--no-loss-memory", action="store_true", help="skip the loss peak-memory measurement")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--out", default=None, help="directory for best.pt and metrics.json")
    run.add_argument("--shard-items", action="store_true",
                     help="shard the item table over the ranks of torchrun / accelerate launch (vocabulary "
                          "parallel; cce, sce, sampled; --batch-size is the global batch); see sasrec.sharded_train")
    return p


SASREC_TEXT = (".txt",)
PANDAS_TABLES = (".csv", ".tsv", ".parquet", ".pq")
DATASETS_FILES = (".json", ".jsonl", ".arrow")


def load_table(args):
    """The interaction table named by ``--data``: CSV/Parquet by the validated readers, JSON/Arrow files and Hub
    dataset names through ``datasets``."""
    path = args.data
    columns = dict(user_col=args.user_col, item_col=args.item_col, time_col=args.time_col)
    extension = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and extension in PANDAS_TABLES:
        return read_interactions(path, sep="\t" if extension == ".tsv" else ",", **columns)
    if os.path.isfile(path) and extension in DATASETS_FILES:
        return load_interactions_dataset(path, **columns)
    if os.path.exists(path):
        raise ValueError(f"--data {path!r}: unknown file type; use a SASRec {SASREC_TEXT} file or a table "
                         f"{PANDAS_TABLES + DATASETS_FILES}")
    if extension in SASREC_TEXT + PANDAS_TABLES + DATASETS_FILES:
        raise ValueError(f"--data {path!r} does not exist")
    return load_interactions_dataset(path, split=args.data_split, config=args.data_config, **columns)


def load_split(args):
    path = args.data
    if os.path.isfile(path) and path.endswith(SASREC_TEXT):
        if args.split != "loo":
            raise ValueError("a SASRec .txt file has no timestamps: only --split loo applies")
        data = read_sasrec_txt(path)
        if args.max_users:
            data = data.head(args.max_users)
        return leave_one_out(data)
    table = load_table(args)
    if args.max_users:
        table = table[table["user"].isin(table["user"].drop_duplicates().head(args.max_users))]
    if args.min_item_interactions or args.min_user_interactions:
        table = filter_min_interactions(table, min_item=args.min_item_interactions,
                                        min_user=args.min_user_interactions)
    if args.split == "temporal":
        return temporal_split(table)
    return leave_one_out(table_to_sequences(table))


def loss_options(args, split) -> dict:
    options: dict = {}
    if args.loss in ("cce", "sce", "sampled"):
        options["backend"] = args.backend
    if args.loss in ("bce", "gbce", "sampled") and args.num_negatives is not None:
        options["num_negatives"] = args.num_negatives
    if args.loss == "gbce":
        options["t"] = args.gbce_t
    if args.loss == "sampled":
        options.update(sampling=args.sampling, shared_negatives=args.shared_negatives,
                       logq_correction=not args.no_logq)
        if args.sampling == "popularity":
            options["item_counts"] = split.item_counts()
    if args.loss == "sce":
        options["mix_x"] = not args.no_mix_x
        for name in ("n_buckets", "bucket_size_x", "bucket_size_y"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
    return options


def build_model(args, split) -> SASRec:
    """The model the parsed (preset-filled) flags describe, for ``split``'s catalogue."""
    return SASRec(SASRecConfig(
        num_items=split.num_items, hidden_dim=args.hidden_dim, num_blocks=args.num_blocks, num_heads=args.num_heads,
        max_len=args.max_len, dropout=args.dropout, residual_from_normed=not args.plain_residual,
        mlet_inner_dim=args.mlet_inner_dim, init=args.init, positions=args.positions,
        mask_padding_keys=args.mask_padding_keys, scale_embeddings=args.scale_embeddings, tie_output=args.tie_output))


def apply_preset(args) -> None:
    """Fill every preset-controlled flag the user left unset from ``args.preset``."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_preset(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        split = load_split(args)
        set_seed(args.seed)
        model = build_model(args, split)
        loss_fn = build_loss(args.loss, seed=args.seed, **loss_options(args, split))
        config = TrainConfig(
            batch_size=args.batch_size, drop_last=args.drop_last, lr=args.lr, betas=tuple(args.betas),
            max_epochs=args.epochs, patience=args.patience, time_budget_s=args.time_budget,
            eval_every=args.eval_every, seed=args.seed, device=args.device, amp=not args.no_amp,
            progress=not args.no_progress, out_dir=args.out, measure_loss_memory=not args.no_loss_memory,
            resume=args.resume, chunk_epochs=args.chunk_epochs)
        # The batch settings' own checks (e.g. --drop-last with fewer histories than a batch), before training.
        TrainBatches(split.train, max_len=args.max_len, batch_size=args.batch_size, drop_last=args.drop_last)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.shard_items:
        from .sharded_train import run_cli

        return run_cli(args, split, model, loss_fn, config)
    print(f"data {args.data}: {split.num_items} items, {len(split.train)} training histories, "
          f"{len(split.test_targets)} evaluated users; loss {args.loss}; device {config.device}", file=sys.stderr)
    result = train(model, split, loss_fn, config, log=lambda line: print(line, file=sys.stderr))
    result["data"] = os.path.abspath(args.data)
    result["argv"] = list(sys.argv[1:] if argv is None else argv)
    result["preset"] = args.preset
    if args.out:
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
    test = result["test"]
    print(json.dumps({"loss": args.loss, "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
                      "ndcg@10": round(test["ndcg@10"], 4), "hr@10": round(test["hr@10"], 4),
                      "mean_epoch_train_time_s": result["mean_epoch_train_time_s"],
                      "loss_peak_bytes": result.get("loss_peak_bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
