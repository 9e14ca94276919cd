"""Collect SASRec runs (`largevocab sasrec --out DIR`) into one results JSON and a Markdown table.

    python benchmarks/collect_sasrec.py RUN_DIR [RUN_DIR ...] --out results.json [--meta key=value ...]

Each RUN_DIR holds the ``metrics.json`` the CLI writes. The JSON gets one row per run (its argv, configs, test
metrics at every K, per-epoch history, epoch times, loss memory) plus the ``--meta`` entries; the table, printed on
stdout, has the columns the quality study reports. Nothing is computed here that the run did not record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

MIB = 2**20
# argv entries every run of a study shares: left out of the table's "options" column.
COMMON_FLAGS = {"--data", "--max-len", "--epochs", "--patience", "--seed", "--device", "--threads", "--out",
                "--time-budget", "--no-progress", "--loss"}
VALUELESS_FLAGS = {"--no-progress"}


def load_run(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no metrics.json (not a finished `largevocab sasrec --out` run)")
    with open(path) as f:
        metrics = json.load(f)
    train_times = [epoch["train_time_s"] for epoch in metrics["history"]]
    return {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "loss": metrics["loss"],
        "argv": metrics["argv"],
        "model_config": metrics["model_config"],
        "train_config": metrics["train_config"],
        "parameters": metrics["parameters"],
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics["best_epoch"],
        "stopped_by": metrics["stopped_by"],
        "valid_ndcg@10_best": metrics["best_valid"]["ndcg@10"],
        "test": metrics["test"],
        "epoch_train_time_s": {"mean": round(statistics.fmean(train_times), 3),
                               "min": round(min(train_times), 3)} if train_times else None,
        "loss_peak_MiB": round(metrics["loss_peak_bytes"] / MIB, 1) if metrics.get("loss_peak_bytes") else None,
        "total_time_s": metrics["total_time_s"],
        "device_name": metrics["device_name"],
        "torch": metrics["torch"],
        "history": [{"epoch": e["epoch"], "train_loss": e["train_loss"], "valid_ndcg@10": e["valid"]["ndcg@10"]}
                    for e in metrics["history"]],
    }


def loss_name(row: dict) -> str:
    """The CLI's name for the run's loss (``--loss``), else its class name."""
    argv = row["argv"]
    if "--loss" in argv[:-1]:
        return argv[argv.index("--loss") + 1]
    return row["loss"].split("(")[0]


def options(argv: list[str]) -> str:
    """The run's own flags (those not shared by the study), e.g. ``--bucket-size-y 1024``."""
    kept, i = [], 0
    while i < len(argv):
        if argv[i] in COMMON_FLAGS:
            i += 1 if argv[i] in VALUELESS_FLAGS else 2
            continue
        kept.append(argv[i])
        i += 1
    return " ".join(kept) or "defaults"


def table(rows: list[dict]) -> str:
    head = ("| run | loss | options | test NDCG@10 | HR@10 | MRR@10 | COV@10 | best / run epochs | stopped by "
            "| epoch s (mean / min) | loss peak MiB |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 4 + "---:|---|---:|---:|"]
    for r in rows:
        t, times = r["test"], r["epoch_train_time_s"] or {"mean": float("nan"), "min": float("nan")}
        lines.append(
            f"| {r['run']} | {loss_name(r)} | {options(r['argv'])} | {t['ndcg@10']:.4f} | {t['hr@10']:.4f} "
            f"| {t['mrr@10']:.4f} | {t['cov@10']:.3f} | {r['best_epoch']} / {r['epochs_run']} | {r['stopped_by']} "
            f"| {times['mean']:.1f} / {times['min']:.1f} | {r['loss_peak_MiB']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.json)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                        help="study-wide facts to store beside the rows (protocol, budget, ...)")
    args = parser.parse_args(argv)
    meta = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--meta wants KEY=VALUE, got {item!r}")
        meta[key] = value
    rows = [load_run(d) for d in args.runs]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
            f.write("\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
