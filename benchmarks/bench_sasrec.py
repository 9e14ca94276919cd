"""SASRec training steps per loss across catalogue sizes: peak memory and step time (the SCE paper's comparison).

    python benchmarks/bench_sasrec.py --catalogues ml-1m,beauty,100000,1000000 --losses ce,cce,sce,sampled,bce,gbce
    python benchmarks/bench_sasrec.py --catalogues 1000000 --losses cce,sce --processes 2   # DDP via accelerate

A catalogue is a real dataset from ``../shared/data/rec`` (``ml-1m``, ``beauty`` = the 54k-item BERT4Rec Amazon
Beauty, ``video``, ...), whose users' histories feed the batches, or an integer: a synthetic catalogue of that many
items with sequences drawn from a Zipf popularity law. Each (catalogue, loss) runs in its own process through
``accelerate`` (``--processes N`` launches N ranks, DDP; gloo on CPU): a few training steps of the SCE paper's
SASRec (d=64, 2 blocks) with Adam, reporting the median step time after a warm-up and the peak memory over the
steps above the model, optimizer state and data. Quality (NDCG@10 after a fixed budget) comes from the training
CLI, ``largevocab sasrec``; see benchmarks/results/sasrec_summary_*.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date

import numpy as np
import torch

from largevocab.profiling import PeakMemory

from harness import append_csv, device_name, run_worker, versions

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "rec")
REAL = {"ml-1m": "ml-1m.txt", "beauty": "beauty_bert4rec.txt", "video": "Video.txt",
        "beauty-5core": "Beauty_iclrec.txt", "toys": "Toys_and_Games_iclrec.txt"}
LOSSES = ("ce", "cce", "sce", "sampled", "bce", "gbce")
ZIPF_EXPONENT = 1.0
SEED = 0


def histories(catalogue: str, max_len: int, batch: int, steps: int) -> tuple[int, list[np.ndarray]]:
    """(number of items, one history per sequence needed), real or synthetic."""
    from largevocab.integrations.sasrec import read_sasrec_txt

    rng = np.random.default_rng(SEED)
    needed = batch * (steps + 1)
    if catalogue in REAL:
        data = read_sasrec_txt(os.path.join(DATA, REAL[catalogue]))
        picked = rng.choice(len(data.sequences), size=needed, replace=len(data.sequences) < needed)
        return data.num_items, [np.asarray(data.sequences[i])[-(max_len + 1):] for i in picked]
    num_items = int(catalogue)
    popularity = 1.0 / np.arange(1, num_items + 1) ** ZIPF_EXPONENT
    items = rng.choice(num_items, size=(needed, max_len + 1), p=popularity / popularity.sum()) + 1
    return num_items, list(items)


def worker(args) -> dict | None:
    from accelerate import Accelerator

    from largevocab.integrations.sasrec import SASRec, SASRecConfig, build_loss
    from largevocab.integrations.sasrec.data import right_align

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(cpu=device == "cpu")
    num_items, seqs = histories(args.catalogue, args.max_len, args.batch_size, args.steps)
    torch.manual_seed(SEED)
    model = SASRec(SASRecConfig(num_items=num_items, hidden_dim=args.dim, max_len=args.max_len))
    loss_fn = build_loss(args.provider, seed=SEED + accelerator.process_index)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    shard = seqs[accelerator.process_index::accelerator.num_processes]
    batches = [right_align(shard[i:i + args.batch_size], args.max_len + 1)
               for i in range(0, args.batch_size * (args.steps + 1), args.batch_size)][: args.steps + 1]

    def step(batch):
        batch = batch.to(accelerator.device)
        hidden = model(batch[:, :-1])
        loss = loss_fn(hidden, inner.item_weight(), batch[:, 1:])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(batches[0])  # warm-up: Adam's state is allocated here, before the memory measurement starts
    times = []
    with PeakMemory(accelerator.device) as memory:
        for batch in batches[1:]:
            start = time.perf_counter()
            value = step(batch)
            times.append((time.perf_counter() - start) * 1e3)
    if not accelerator.is_main_process:
        return None
    return {"provider": args.provider, "catalogue": args.catalogue, "num_items": num_items,
            "processes": accelerator.num_processes, "ms": float(np.median(times)),
            "peak_extra_bytes": memory.extra_bytes, "loss": value}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--catalogues", default="ml-1m,beauty,100000")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--out", default=None, help="CSV to append to")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--catalogue", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.provider:
        row = worker(args)
        if row is not None:
            print(json.dumps(row))
        return 0

    rows = []
    for catalogue in args.catalogues.split(","):
        for loss in args.losses.split(","):
            worker_args = ["--device", args.device, "--batch-size", str(args.batch_size), "--max-len",
                           str(args.max_len), "--dim", str(args.dim), "--steps", str(args.steps),
                           "--provider", loss, "--catalogue", catalogue]
            script = os.path.abspath(__file__)
            if args.processes > 1:  # accelerate's torchrun launcher; the worker's Accelerator picks gloo on CPU
                script, worker_args = "-m", ["accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                             str(args.processes), "--num_machines", "1", "--mixed_precision", "no",
                                             "--dynamo_backend", "no", os.path.abspath(__file__), *worker_args]
            result, reason = run_worker(script, worker_args)
            if result is None:
                print(f"{catalogue:>10} {loss:>8}  skipped: {reason}", flush=True)
                continue
            row = {"date": date.today().isoformat(), "device": device_name(
                "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"),
                "batch_size": args.batch_size, "max_len": args.max_len, "d": args.dim,
                "versions": json.dumps(versions()), **result}
            rows.append(row)
            print(f"{catalogue:>10} ({result['num_items']:>9} items) {loss:>8}  {result['ms']:9.1f} ms  "
                  f"peak extra {result['peak_extra_bytes'] / 2**20:8.1f} MiB", flush=True)
    append_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
