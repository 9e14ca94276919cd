"""Loss memory of the SASRec study's jobs: the peak of live tensor bytes of one loss forward + backward on the
first training batch, each job's model and loss built from its own CLI flags (as `largevocab sasrec` builds them).

    python benchmarks/sasrec_loss_memory.py benchmarks/sasrec_study_jobs.json --only ml_ce_s0,ml_sce_s0 [--out f.csv]

On CPU the peak is read from the torch profiler's allocation events (``live_tensor_peak_bytes``), not from the
process's RSS, which reuses freed pages and so depends on what ran before in the process. The model's own
activations are not counted (hidden states and the item table enter the loss detached).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from datetime import date

import torch
from sasrec_study import DEFAULT_REC, load_jobs

MIB = 2**20


def measure(job: dict, rec_dir: str, device: str) -> dict:
    from largevocab.integrations.sasrec.cli import apply_preset, build_model, build_parser, load_split, loss_options
    from largevocab.integrations.sasrec.data import TrainBatches
    from largevocab.integrations.sasrec.losses import build_loss
    from largevocab.integrations.sasrec.train import measure_loss_peak, set_seed
    from largevocab.profiling import device_name

    args = build_parser().parse_args([a.replace("$REC", rec_dir) for a in job["args"]])
    apply_preset(args)
    split = load_split(args)
    set_seed(args.seed)
    model = build_model(args, split).to(device).train()
    loss_fn = build_loss(args.loss, seed=args.seed, **loss_options(args, split)).to(device)
    batches = TrainBatches(split.train, max_len=args.max_len, batch_size=args.batch_size, seed=args.seed)
    inputs, targets = batches.collate(batches.histories[:args.batch_size])
    peak = measure_loss_peak(model, loss_fn, inputs.to(device), targets.to(device), torch.device(device), False)
    return {"job": job["name"], "loss": args.loss, "items": split.num_items,
            "positions": int((targets != 0).sum()), "loss_peak_MiB": round(peak / MIB, 2),
            "device": device_name(device), "date": date.today().isoformat()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs")
    parser.add_argument("--only", default=None, help="comma-separated job names")
    parser.add_argument("--data-dir", default=DEFAULT_REC)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="CSV to write")
    args = parser.parse_args(argv)
    try:
        jobs = load_jobs(args.jobs, args.only.split(",") if args.only else None)
    except ValueError as exc:
        parser.error(str(exc))
    rows = [measure(job, args.data_dir, args.device) for job in jobs]
    print("| job | loss | items | positions in the batch | loss peak MiB |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['job']} | {r['loss']} | {r['items']:,} | {r['positions']:,} | {r['loss_peak_MiB']:.2f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
