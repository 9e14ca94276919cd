"""The SASRec reproduction study's table: our runs (results JSON written by collect_sasrec.py) beside the published
numbers they are meant to reproduce, with each run's status (converged by patience, or the epoch it reached).

    python benchmarks/sasrec_repro_table.py benchmarks/results/sasrec_repro_2026-12-01/*.json
    python benchmarks/sasrec_repro_table.py --at-epochs 10,20,40 --runs ml_ce_s0,ml_ce_s1 <results JSON>

``--at-epochs`` adds the validation NDCG@10 of each run at those epochs (the curves side by side: seed spread at
matched epochs, where an approximate loss or a smaller table meets the exact one); ``--runs`` keeps those runs.

Only what the runs recorded is printed; the published numbers and their sources are the constants below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from collect_sasrec import loss_name, options

# (data file, loss) -> (model name and setting, HR@10, NDCG@10, source). Leave-one-out, full-catalogue ranking.
ANTKLEN = "README of antklen/sasrec-bert4rec-recsys23 (Klenitskiy & Vasilev, RecSys 2023)"
GSASREC = "README of asash/gSASRec-pytorch (Petrov & Macdonald, RecSys 2023)"
SCE_PWC = "Papers with Code entry of arXiv 2409.18721 (SCE paper's Table 4 not checked)"
PUBLISHED = {
    ("ml-1m.txt", "ce"): ("SASRec+ (full CE)", 0.3152, 0.1821, ANTKLEN),
    ("ml-1m.txt", "cce"): ("SASRec+ (full CE)", 0.3152, 0.1821, ANTKLEN),
    ("ml-1m.txt", "bce"): ("SASRec (BCE, 1 negative)", 0.2500, 0.1341, ANTKLEN),
    ("ml-1m.txt", "sampled"): ("SASRec+ 3000 (sampled CE, 3000 negatives per sequence)", 0.3159, 0.1857, ANTKLEN),
    ("ml-1m.txt", "gbce"): ("gSASRec (gBCE, 256 negatives, t = 0.75, d = 128)", 0.3003, 0.1726, GSASREC),
    ("beauty_bert4rec.txt", "ce"): ("SASRec+ (full CE)", 0.0533, 0.0327, ANTKLEN),
    ("beauty_bert4rec.txt", "bce"): ("SASRec (BCE, 1 negative)", 0.0246, 0.0126, ANTKLEN),
    ("Beauty_iclrec.txt", "sce"): ("SASRec-SCE", 0.0935, 0.0544, SCE_PWC),
}
STATUS = {"patience": "converged (patience)", "time_budget": "time budget: epoch {epochs} reached",
          "max_epochs": "epoch cap {epochs} reached", "non-finite loss": "diverged (non-finite loss)"}


def data_file(row: dict) -> str:
    argv = row["argv"]
    return os.path.basename(argv[argv.index("--data") + 1]) if "--data" in argv[:-1] else "?"


def status(row: dict) -> str:
    return STATUS.get(row["stopped_by"], row["stopped_by"]).format(epochs=row["epochs_run"])


def table(rows: list[dict]) -> str:
    lines = ["| data | run | loss | options | test NDCG@10 | HR@10 | published NDCG@10 / HR@10 (model) | vs published "
             "| best / run epochs | status | epoch s (mean) | loss peak MiB |",
             "|---|---|---|---|---:|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        data, loss, test = data_file(r), loss_name(r), r["test"]
        published = PUBLISHED.get((data, loss))
        ref = f"{published[2]:.4f} / {published[1]:.4f} ({published[0]})" if published else "-"
        gap = f"{test['ndcg@10'] / published[2] - 1:+.1%}" if published else "-"
        epoch_s = r["epoch_train_time_s"]["mean"] if r.get("epoch_train_time_s") else float("nan")
        lines.append(f"| {data} | {r['run']} | {loss} | {options(r['argv'])} | {test['ndcg@10']:.4f} "
                     f"| {test['hr@10']:.4f} | {ref} | {gap} | {r['best_epoch']} / {r['epochs_run']} | {status(r)} "
                     f"| {epoch_s:.1f} | {r['loss_peak_MiB']} |")
    return "\n".join(lines)


def reference_table(runs: list[dict]) -> str:
    """Runs of a reference repository's own code (collect_gsasrec_reference.py rows), on their own protocol."""
    lines = ["| reference code | commit | config | test NDCG@10 | R@10 | best / run epochs | validation | stopped by "
             "| changes to their code |", "|---|---|---|---:|---:|---:|---|---|---:|"]
    for r in runs:
        test = r["test"] or {}
        ndcg, recall = test.get("nDCG@10", float("nan")), test.get("R@10", float("nan"))
        lines.append(f"| {r['repository']} | {r['commit'][:10]} | {r['config']} | {ndcg:.4f} | {recall:.4f} "
                     f"| {r['best_epoch']} / {r['epochs_run']} | {r['validation']} | {r['stopped_by']} "
                     f"| {len(r['changes'])} (in the row's JSON) |")
    return "\n".join(lines)


def curves_table(rows: list[dict], epochs: list[int]) -> str:
    """Validation NDCG@10 of each run at ``epochs`` ("-" where a run stopped before), and where runs share a loss
    and options but not a seed, their spread at each epoch: (max - min) / mean over the runs that reached it."""
    lines = ["| run | loss | options | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "|---|---|---|" + "---:|" * len(epochs)]
    curves = {}
    for r in rows:
        by_epoch = {h["epoch"]: h["valid_ndcg@10"] for h in r["history"] if h.get("valid_ndcg@10") is not None}
        curves[r["run"]] = by_epoch
        cells = [f"{by_epoch[e]:.4f}" if e in by_epoch else "-" for e in epochs]
        lines.append(f"| {r['run']} | {loss_name(r)} | {options(r['argv'])} | " + " | ".join(cells) + " |")
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        # options() leaves out --seed; a run continued with --resume is the same run.
        same = options([a for a in r["argv"] if a != "--resume"])
        groups.setdefault((data_file(r), loss_name(r), same), []).append(r["run"])
    for (_, loss, opts), runs in groups.items():
        if len(runs) < 2:
            continue
        cells = []
        for e in epochs:
            values = [curves[run][e] for run in runs if e in curves[run]]
            cells.append(f"{(max(values) - min(values)) / (sum(values) / len(values)):.1%} ({len(values)})"
                         if len(values) >= 2 else "-")
        lines.append(f"| spread of {len(runs)} seeds | {loss} | {opts} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sources() -> str:
    return "\n".join(f"- {s}" for s in sorted({p[3] for p in PUBLISHED.values()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results JSON files of collect_sasrec.py (and of "
                        "collect_gsasrec_reference.py)")
    parser.add_argument("--at-epochs", default=None, help="comma-separated epochs: add the curves table")
    parser.add_argument("--runs", default=None, help="comma-separated run names to keep (default: all)")
    args = parser.parse_args(argv)
    try:
        epochs = [int(e) for e in args.at_epochs.split(",")] if args.at_epochs else []
    except ValueError:
        parser.error(f"--at-epochs must be comma-separated integers, got {args.at_epochs!r}")
    keep = set(args.runs.split(",")) if args.runs else None
    rows, references = [], []
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        if "repository" in result:  # a reference code's own run, not one of ours
            references.append(result)
            continue
        for row in result["rows"]:
            rows.append({**row, "run": result.get("run", row["run"])})
    if keep is not None:
        missing = keep - {r["run"] for r in rows}
        if missing:
            parser.error(f"--runs: no results for {sorted(missing)}")
        rows = [r for r in rows if r["run"] in keep]
    print(table(rows))
    if epochs:
        print("\nValidation NDCG@10 by epoch:\n\n" + curves_table(rows, epochs))
    if references:
        print("\nReference code, run here:\n\n" + reference_table(references))
    print("\nPublished numbers:\n" + sources())
    return 0


if __name__ == "__main__":
    sys.exit(main())
