"""A run of gSASRec's own training script (asash/gSASRec-pytorch, ``train_gsasrec.py``) as one JSON row of the
reproduction study: its per-epoch training loss and validation metrics parsed from its output, and the test
metrics of its best checkpoint if ``evaluate_gsasrec.py`` was run on it.

    python benchmarks/collect_gsasrec_reference.py RUN_DIR --commit SHA --change "..." --out results/x.json

``RUN_DIR`` holds the script's stdout (``train_stdout.txt``: "Epoch N evaluation result: {nDCG@10: ...}"), its
stderr (``train_stderr.txt``: tqdm's "Epoch N loss: L" descriptions, the last of each epoch being the epoch's mean)
and, optionally, ``test_stdout.txt`` (evaluate_gsasrec.py's printed dict). Their epochs count from 0; the row
numbers them from 1 like ours. Their validation set is 512 random users (ours: every user).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import date

from largevocab.profiling import device_name

EVAL_LINE = re.compile(r"^Epoch (\d+) evaluation result: \{(.*)\}\s*$")
LOSS_TEXT = re.compile(r"Epoch (\d+) loss: ([0-9.eE+-]+)")
METRIC = re.compile(r"(\w+@\d+): ([0-9.eE+-]+)")


def parse_metrics(text: str) -> dict:
    """``{"nDCG@10": 0.1, ...}`` from ir_measures' printed dict ``{nDCG@10: 0.1, R@1: 0.0}``."""
    return {name: float(value) for name, value in METRIC.findall(text)}


def epoch_losses(stderr: str) -> dict[int, float]:
    losses: dict[int, float] = {}
    for epoch, value in LOSS_TEXT.findall(stderr):
        losses[int(epoch)] = float(value)  # the last description of an epoch is its mean over all its batches
    return losses


def collect(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "train_stdout.txt")) as f:
        stdout = f.read()
    with open(os.path.join(run_dir, "train_stderr.txt"), errors="replace") as f:
        losses = epoch_losses(f.read())
    history = []
    for line in stdout.splitlines():
        match = EVAL_LINE.match(line)
        if match:
            epoch = int(match.group(1))
            history.append({"epoch": epoch + 1, "train_loss": losses.get(epoch),
                            "valid": parse_metrics(match.group(2))})
    if not history:
        raise ValueError(f"no 'Epoch N evaluation result' line in {run_dir}/train_stdout.txt")
    best = max(history, key=lambda r: r["valid"]["nDCG@10"])
    test_path = os.path.join(run_dir, "test_stdout.txt")
    test = None
    if os.path.exists(test_path):
        with open(test_path) as f:
            test = parse_metrics(f.read().strip().splitlines()[-1])
    return {"epochs_run": len(history), "best_epoch": best["epoch"], "best_valid": best["valid"], "test": test,
            "history": history}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--commit", required=True, help="the asash/gSASRec-pytorch commit that was run")
    parser.add_argument("--config", default="config_ml1m.py")
    parser.add_argument("--change", action="append", default=[], help="a change made to their code (repeatable)")
    parser.add_argument("--stopped-by", default="time limit", help="what ended the run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    row = {"run": "gSASRec reference code", "repository": "asash/gSASRec-pytorch", "commit": args.commit,
           "config": args.config, "changes": args.change, "stopped_by": args.stopped_by,
           "validation": "their 512 random validation users", "date": date.today().isoformat(),
           "device": device_name("cpu"), **collect(args.run_dir)}
    with open(args.out, "w") as f:
        json.dump(row, f, indent=1)
    print(f"{args.out}: {row['epochs_run']} epochs, best validation nDCG@10 {row['best_valid']['nDCG@10']:.4f} at "
          f"epoch {row['best_epoch']}, test {row['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
