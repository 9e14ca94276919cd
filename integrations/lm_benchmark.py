"""The main job: train a small causal LM with full cross-entropy and with each largevocab loss, side by side.

    largevocab                      # defaults: embedded GPT-2 tokenizer + tiny-shakespeare, a few minutes on a CPU
    largevocab lm --tokenizer ../shared/data/tokenizers/qwen --losses ce,cce --steps 100 --processes 2

For every loss the same model (a Llama-style decoder built from a config, no downloads, same seed, same batches)
trains for ``--steps`` steps through ``accelerate`` in a fresh process (so each peak memory is its own; with
``--processes N`` under ``accelerate launch``, DDP), then is evaluated with exact cross-entropy on held-out text.
``ce`` is transformers' own loss on materialised logits; the others patch the model with
``largevocab.integrations.hf.patch``. Prints a table (peak memory, step time, tokens/s, final train and validation
loss) and writes ``summary.csv``, ``curves.csv`` and ``lm_benchmark.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import date

import torch

from largevocab.profiling import STABLE_RSS_ENV, PeakMemory, device_name

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TOKENIZER = os.path.join(DATA_DIR, "gpt2")
DEFAULT_TEXT = os.path.join(DATA_DIR, "tinyshakespeare.txt.gz")
LOSSES = ("ce", "cce", "sce", "sampled")
# Options of each kit loss in this job: SCE with the reference grid's middle bucket size, sampled softmax with
# 512 uniform negatives per token and logQ correction (the CCE- paper's LM setting is in this range).
LOSS_OPTIONS = {"cce": {}, "sce": {"bucket_size_y": 256}, "sampled": {"num_negatives": 512}}
VALIDATION_FRACTION = 0.1
VALIDATION_BATCHES = 8
CURVE_SMOOTHING = 10  # the "final train loss" is the mean of the last steps' losses


@dataclass
class JobConfig:
    tokenizer: str = DEFAULT_TOKENIZER
    text: str = DEFAULT_TEXT
    losses: str = ",".join(LOSSES)
    steps: int = 50
    batch_size: int = 8
    seq_len: int = 128
    dim: int = 128
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    family: str = "llama"
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    processes: int = 1
    out: str = "largevocab_lm_results"


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def load_tokens(cfg: JobConfig):
    """(train ids, validation ids, vocabulary size): the last 10% of the text is held out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    tokenizer.model_max_length = sys.maxsize  # the whole text is encoded once, then cut into windows
    ids = torch.tensor(tokenizer(read_text(cfg.text))["input_ids"], dtype=torch.long)
    split = int(len(ids) * (1 - VALIDATION_FRACTION))
    if split < cfg.seq_len + 1 or len(ids) - split < cfg.seq_len + 1:
        raise ValueError(f"{cfg.text} has {len(ids)} tokens: too few for --seq-len {cfg.seq_len}")
    return ids[:split], ids[split:], len(tokenizer)


# Model families the job can build (any canonical causal LM works with the patch; these are the benchmark shapes:
# Llama 3.2 style, and Gemma 2 style with its final-logit soft cap).
FAMILY_CONFIG = {"llama": {}, "gemma2": {"final_logit_softcapping": 30.0, "head_dim": None}}


def build_model(vocab: int, cfg: JobConfig):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(FAMILY_CONFIG[cfg.family])
    if "head_dim" in extra:
        extra["head_dim"] = cfg.dim // cfg.heads
    config = AutoConfig.for_model(
        cfg.family, vocab_size=vocab, hidden_size=cfg.dim, intermediate_size=4 * cfg.dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len, tie_word_embeddings=True, **extra)
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config)


def windows(ids: torch.Tensor, count: int, cfg: JobConfig, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - cfg.seq_len, (count,), generator=generator)
    return torch.stack([ids[s:s + cfg.seq_len] for s in starts.tolist()])


def train_one(loss: str, cfg: JobConfig) -> dict | None:
    """Train and evaluate one loss in this process (under accelerate); rank 0 returns the result row."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .hf import patch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if cfg.precision == "bf16" else "no")
    train_ids, val_ids, vocab = load_tokens(cfg)
    model = build_model(vocab, cfg)
    if loss != "ce":
        patch(model, loss=loss, **LOSS_OPTIONS[loss])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Same batches for every loss; each process draws its own shard of them.
    generator = torch.Generator().manual_seed(cfg.seed + 1 + accelerator.process_index)
    curve, step_seconds = [], []

    def train_step() -> None:
        batch = windows(train_ids, cfg.batch_size, cfg, generator).to(accelerator.device)
        start = time.perf_counter()
        value = model(input_ids=batch, labels=batch).loss
        accelerator.backward(value)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(value.item())
        step_seconds.append(time.perf_counter() - start)
        progress.set_postfix(loss=f"{curve[-1]:.3f}")

    model.train()
    progress = tqdm(total=cfg.steps, desc=f"{loss:>8}", disable=not accelerator.is_main_process)
    # Memory is the peak over all of training above what the model and data held before it (the optimizer state,
    # the same for every loss, included): a warm-up step outside the measurement would leave freed blocks in the
    # CPU allocator that later steps reuse without raising the RSS. Time skips the first step (warm-up).
    with PeakMemory(accelerator.device) as memory:
        for _ in range(cfg.steps):
            train_step()
            progress.update()
    progress.close()
    model.eval()
    val_generator = torch.Generator().manual_seed(cfg.seed + 12345)
    with torch.no_grad():
        val = [model(input_ids=b[None].to(accelerator.device), labels=b[None].to(accelerator.device)).loss.item()
               for b in windows(val_ids, VALIDATION_BATCHES, cfg, val_generator)]
    if not accelerator.is_main_process:
        return None
    measured = sorted(step_seconds[1:] or step_seconds)
    step_s = measured[len(measured) // 2]
    tail = curve[-CURVE_SMOOTHING:]
    return {"loss": loss, "family": cfg.family, "device": device_name(accelerator.device),
            "processes": accelerator.num_processes,
            "vocab": vocab, "tokens_per_step": cfg.batch_size * cfg.seq_len * accelerator.num_processes,
            "step_ms": step_s * 1e3, "tokens_per_s": cfg.batch_size * cfg.seq_len * accelerator.num_processes / step_s,
            "peak_extra_mib": memory.extra_bytes / 2**20, "train_loss": sum(tail) / len(tail),
            "val_loss": sum(val) / len(val), "curve": curve}


def _worker_command(loss: str, cfg: JobConfig) -> list[str]:
    args = ["-m", "largevocab.integrations.lm_benchmark", "--worker", loss]
    for field in fields(JobConfig):
        if field.name not in ("losses", "out", "processes"):
            args += [f"--{field.name.replace('_', '-')}", str(getattr(cfg, field.name))]
    if cfg.processes > 1:
        # --multi_gpu selects accelerate's torchrun launcher (one process per rank); on a CPU the worker's
        # Accelerator(cpu=True) then runs DDP over gloo. (--cpu would select the single-process launcher.)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(cfg.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        return launch + args
    return [sys.executable, *args]


def write_outputs(rows: list[dict], cfg: JobConfig) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k != "curve"} | {"date": date.today().isoformat()} for r in rows]
    with open(os.path.join(cfg.out, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    with open(os.path.join(cfg.out, "curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["loss", "step", "train_loss"])
        for r in rows:
            writer.writerows([r["loss"], step, value] for step, value in enumerate(r["curve"]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'largevocab[bench]')")
        return
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        curves.plot(r["curve"], label=r["loss"])
    curves.set(xlabel="step", ylabel="train loss (the loss each run optimises)", title="training curves")
    curves.legend()
    bars.bar([r["loss"] for r in rows], [r["peak_extra_mib"] for r in rows], color="tab:blue")
    bars.set(ylabel="peak extra memory during training (MiB)", title=f"memory, vocabulary {rows[0]['vocab']:,}")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "lm_benchmark.png"), dpi=100)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r["loss"] == "ce"), None)
    print(f"\n{'loss':>8} {'peak MiB':>9} {'vs ce':>6} {'step ms':>8} {'tokens/s':>9} {'train':>7} {'val CE':>7}")
    for r in rows:
        rel = f"{r['peak_extra_mib'] / base['peak_extra_mib']:.0%}" if base and base["peak_extra_mib"] else "-"
        print(f"{r['loss']:>8} {r['peak_extra_mib']:9.1f} {rel:>6} {r['step_ms']:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['train_loss']:7.3f} {r['val_loss']:7.3f}")
    print("train = the loss each run optimises (sce/sampled are approximations); val CE = exact CE on held-out text")


def parse(argv) -> tuple[JobConfig, str | None]:
    parser = argparse.ArgumentParser(prog="largevocab lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = JobConfig()
    for field in fields(JobConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    parser.add_argument("--worker", choices=LOSSES, help=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    worker = args.pop("worker")
    cfg = JobConfig(**args)
    unknown = [x for x in cfg.losses.split(",") if x not in LOSSES]
    if unknown:
        parser.error(f"unknown loss(es) {unknown}; choose from {LOSSES}")
    if cfg.family not in FAMILY_CONFIG:
        parser.error(f"--family must be one of {tuple(FAMILY_CONFIG)}, got {cfg.family}")
    if cfg.precision not in ("fp32", "bf16"):
        parser.error(f"--precision must be fp32 or bf16, got {cfg.precision}")
    return cfg, worker


def main(argv: list[str] | None = None) -> int:
    cfg, worker = parse(sys.argv[1:] if argv is None else argv)
    if worker:
        row = train_one(worker, cfg)
        if row is not None:
            print(json.dumps(row))
        return 0
    print(f"Training a {cfg.layers}-layer, d={cfg.dim} causal LM for {cfg.steps} steps of "
          f"{cfg.batch_size}x{cfg.seq_len} tokens per loss ({cfg.losses}); results in {cfg.out}/")
    rows = []
    for loss in cfg.losses.split(","):
        proc = subprocess.run(_worker_command(loss, cfg), stdout=subprocess.PIPE, text=True, check=False,
                              env={**os.environ, **STABLE_RSS_ENV})
        if proc.returncode:
            print(f"{loss}: the run failed (exit {proc.returncode}); see the messages above", file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print_table(rows)
    write_outputs(rows, cfg)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
