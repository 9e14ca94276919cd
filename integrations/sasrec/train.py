"""Training loop for SASRec with an injected loss: Adam, early stopping on validation NDCG@10, best checkpoint,
test metrics of the best checkpoint, timings and the loss's peak memory.

    model = SASRec(SASRecConfig(num_items=split.num_items))
    result = train(model, split, build_loss("sce"), TrainConfig(max_epochs=50, out_dir="runs/sce"))
    result["test"]["ndcg@10"]
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

from largevocab.profiling import device_name, live_tensor_peak_bytes

from .data import Split, TrainBatches, right_align
from .losses import SASRecLoss
from .metrics import DEFAULT_KS, DEFAULT_USERS_PER_BATCH, rank_metrics
from .model import SASRec, SASRecConfig

SELECTION_METRIC = "ndcg@10"  # early stopping and checkpoint selection, as in the SCE reference
CHECKPOINT_NAME = "best.pt"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.jsonl"
LAST_NAME = "last.pt"  # the state after the latest epoch, for --resume
RESUMABLE = ("time_budget", "chunk")  # stop reasons after which a run can be continued


@dataclass
class TrainConfig:
    """Optimisation and run settings (SCE paper defaults: Adam, lr 1e-3, betas (0.9, 0.98)).

    max_epochs: epoch limit. patience: stop after this many evaluations without a better validation NDCG@10.
    time_budget_s: wall-time budget of this call, None: no limit. The run stops after an epoch when the next one
        would not fit (judged by the last epoch's duration), or mid-epoch (evaluating the partial epoch) once the
        budget is spent.
    device: "auto" (cuda if available), "cpu" or "cuda[:n]". amp: bf16 autocast of the forward and the loss on
    CUDA (ignored on CPU). out_dir: where ``best.pt`` and ``metrics.json`` go (None: best state kept in memory).
    measure_loss_memory: before training, run the loss forward and backward once on the first batch inside
    :func:`largevocab.profiling.live_tensor_peak_bytes` (CUDA allocator peak; on CPU the peak of live tensor bytes
    from the profiler's allocation events; the process's RSS peak, used before, reused freed pages and so
    depended on what ran before in the process).
    resume: continue the run saved in ``out_dir`` (its ``last.pt``: model, optimizer, epoch, best, patience counter,
    history and every random generator's state) as if it had not stopped; a run that finished (patience, epoch
    limit) is refused. The time budget applies to this call; ``metrics.json`` lists the calls in ``chunks``.
    chunk_epochs: stop, resumably (``stopped_by="chunk"``), after this many epochs in this call; None: no limit.
    """

    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    max_epochs: int = 200
    patience: int = 10
    time_budget_s: float | None = None
    eval_every: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    ks: tuple[int, ...] = DEFAULT_KS
    users_per_batch: int = DEFAULT_USERS_PER_BATCH
    drop_last: bool = False
    progress: bool = True
    out_dir: str | None = None
    measure_loss_memory: bool = True
    resume: bool = False
    chunk_epochs: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs", "patience", "eval_every", "users_per_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.chunk_epochs is not None and (isinstance(self.chunk_epochs, bool) or not isinstance(
                self.chunk_epochs, int) or self.chunk_epochs < 1):
            raise ValueError(f"chunk_epochs must be an int >= 1 or None, got {self.chunk_epochs!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {name!r}")
    return device


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: SASRec, inputs: list[np.ndarray], targets, *, ks=DEFAULT_KS,
             users_per_batch: int = DEFAULT_USERS_PER_BATCH, exclude_seen: bool = True, amp: bool = False,
             item_chunk: int | None = None) -> dict:
    """Full-catalogue HR/NDCG/MRR/COV@K of ``model`` (see :mod:`.metrics`); the model is left in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    weight = model.item_weight().float()  # once: for MLET this is the A @ B product

    def scorer(batch):
        seq = right_align(batch, model.config.max_len).to(device)
        with _autocast(device, amp):
            return model.user_embeddings(seq).float()

    return rank_metrics(scorer, weight, inputs, targets, ks=ks, exclude_seen=exclude_seen,
                        users_per_batch=users_per_batch, item_chunk=item_chunk)


def save_checkpoint(path: str, model: SASRec, extra: dict | None = None) -> None:
    """``{"model_config", "state_dict", "extra"}`` written atomically (a crash never leaves a half-written file)."""
    tmp = f"{path}.tmp"
    torch.save({"model_config": model.config.to_dict(), "state_dict": model.state_dict(), "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[SASRec, dict]:
    """The model saved by :func:`save_checkpoint` (in eval mode) and its ``extra`` dict."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    model = SASRec(SASRecConfig(**blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob.get("extra", {})


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def measure_loss_peak(model: SASRec, loss_fn: SASRecLoss, inputs: torch.Tensor, targets: torch.Tensor,
                      device: torch.device, amp: bool) -> int:
    """Peak extra bytes of one loss forward + backward on this batch (hidden states and table detached: the
    model's own activations are not counted)."""
    with torch.no_grad(), _autocast(device, amp):
        hidden = model(inputs)
        weight = model.item_weight()
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    def step():
        with _autocast(device, amp):
            loss = loss_fn(hidden, weight, targets)
        loss.backward()

    return live_tensor_peak_bytes(step, device)


def train(model: SASRec, split: Split, loss_fn: SASRecLoss, config: TrainConfig | None = None,
          log=print) -> dict:
    """Train ``model`` on ``split.train`` with ``loss_fn``; returns a JSON-ready dict (also written to
    ``out_dir/metrics.json``): per-epoch history, best epoch and its validation metrics, test metrics of the best
    checkpoint, timings, the loss's peak memory and the device. The model ends with the best weights loaded."""
    config = config or TrainConfig()
    device = resolve_device(config.device)
    amp = config.amp and device.type == "cuda"
    model.to(device)
    loss_fn.to(device)
    if config.resume and not config.out_dir:
        raise ValueError("resume needs out_dir (the run to continue)")
    last_path = os.path.join(config.out_dir, LAST_NAME) if config.out_dir else None
    if config.out_dir:
        os.makedirs(config.out_dir, exist_ok=True)
        if not config.resume:
            open(os.path.join(config.out_dir, HISTORY_NAME), "w").close()
    ckpt_path = os.path.join(config.out_dir, CHECKPOINT_NAME) if config.out_dir else None
    batches = TrainBatches(split.train, max_len=model.config.max_len, batch_size=config.batch_size,
                           seed=config.seed, drop_last=config.drop_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas))
    result = {
        "model_config": model.config.to_dict(), "train_config": asdict(config), "loss": repr(loss_fn),
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()), "split": dict(split.info),
        "train_histories": len(batches.histories), "batches_per_epoch": len(batches), "history": [], "chunks": [],
    }
    best = {"epoch": -1, SELECTION_METRIC: -math.inf}
    best_state = None
    waited, stopped_by, first_epoch, earlier_time = 0, "max_epochs", 1, 0.0
    if config.resume:
        if not os.path.exists(last_path):
            raise ValueError(f"resume: {last_path} does not exist (nothing to continue)")
        state = torch.load(last_path, map_location=device, weights_only=True)
        if state["finished"]:
            raise ValueError(f"resume: the run in {config.out_dir} already finished (stopped by "
                             f"{state['stopped_by']} at epoch {state['epoch']})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.rng.bit_generator.state = state["batches_rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["loss_rng"] is not None:
            loss_fn.generator(device).set_state(state["loss_rng"].cpu())
        best, waited, first_epoch = state["best"], state["waited"], state["epoch"] + 1
        earlier_time = state["total_time_s"]
        result["history"], result["chunks"] = state["history"], state["chunks"]
        if state.get("loss_peak_bytes") is not None:
            result["loss_peak_bytes"] = state["loss_peak_bytes"]
    elif config.measure_loss_memory:
        inputs, targets = batches.collate(batches.histories[:config.batch_size])
        model.train()
        result["loss_peak_bytes"] = measure_loss_peak(model, loss_fn, inputs.to(device), targets.to(device), device,
                                                      amp)
        loss_fn.reseed(loss_fn.seed)  # training draws do not depend on whether memory was measured
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save_last(epoch: int, finished: bool) -> None:
        if not last_path:
            return
        generator = loss_fn.generator(device) if loss_fn.uses_generator else None
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "finished": finished, "stopped_by": stopped_by, "best": best, "waited": waited,
                 "batches_rng": batches.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "loss_rng": generator.get_state() if generator is not None else None,
                 "history": result["history"], "chunks": result["chunks"] + [chunk(epoch)],
                 "total_time_s": earlier_time + time.perf_counter() - start,
                 "loss_peak_bytes": result.get("loss_peak_bytes")}
        torch.save(state, f"{last_path}.tmp")
        os.replace(f"{last_path}.tmp", last_path)

    def chunk(epoch: int) -> dict:
        return {"first_epoch": first_epoch, "last_epoch": epoch, "time_s": round(time.perf_counter() - start, 3),
                "stopped_by": stopped_by}

    start = time.perf_counter()
    epoch = first_epoch - 1
    for epoch in range(first_epoch, config.max_epochs + 1):
        model.train()
        epoch_start, losses, out_of_time = time.perf_counter(), [], False
        for inputs, targets in _progress(batches, len(batches), config.progress, f"epoch {epoch}"):
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with _autocast(device, amp):
                loss = loss_fn(model(inputs), model.item_weight(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if config.time_budget_s is not None and time.perf_counter() - start > config.time_budget_s:
                out_of_time = True
                break
        train_time = time.perf_counter() - epoch_start
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": len(losses),
                  "train_time_s": round(train_time, 3)}
        if not math.isfinite(record["train_loss"]):
            stopped_by = "non-finite loss"
            result["history"].append(record)
            break
        if epoch % config.eval_every == 0 or out_of_time or epoch == config.max_epochs:
            eval_start = time.perf_counter()
            valid = evaluate(model, split.valid_inputs, split.valid_targets, ks=config.ks,
                             users_per_batch=config.users_per_batch, amp=amp)
            record["eval_time_s"] = round(time.perf_counter() - eval_start, 3)
            record["valid"] = valid
            if valid[SELECTION_METRIC] > best[SELECTION_METRIC]:
                best = {"epoch": epoch, SELECTION_METRIC: valid[SELECTION_METRIC], "valid": valid}
                waited = 0
                if ckpt_path:
                    save_checkpoint(ckpt_path, model, {"epoch": epoch, "valid": valid})
                else:
                    best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
        result["history"].append(record)
        if config.out_dir:  # one line per epoch, so a run that is killed still leaves its curve
            with open(os.path.join(config.out_dir, HISTORY_NAME), "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        if log:
            valid_text = f", valid {SELECTION_METRIC} {record['valid'][SELECTION_METRIC]:.4f}" if "valid" in record \
                else ""
            log(f"epoch {epoch}: loss {record['train_loss']:.4f} ({record['steps']} steps, {train_time:.1f} s)"
                f"{valid_text}")
        elapsed = time.perf_counter() - start
        if waited >= config.patience:
            stopped_by = "patience"
            break
        if out_of_time or (config.time_budget_s is not None and epoch < config.max_epochs
                           and elapsed + (time.perf_counter() - epoch_start) > config.time_budget_s):
            stopped_by = "time_budget"  # spent, or the next epoch (as long as this one) would not fit
            break
        if config.chunk_epochs is not None and epoch - first_epoch + 1 >= config.chunk_epochs \
                and epoch < config.max_epochs:
            stopped_by = "chunk"
            break
        save_last(epoch, finished=False)
    else:
        stopped_by = "max_epochs"
    save_last(epoch, finished=stopped_by not in RESUMABLE)
    total = earlier_time + time.perf_counter() - start
    result["chunks"].append(chunk(epoch))
    if best["epoch"] > 0:
        if ckpt_path:
            model.load_state_dict(torch.load(ckpt_path, map_location=device, weights_only=True)["state_dict"])
        elif best_state is not None:
            model.load_state_dict(best_state)
    epochs = [r for r in result["history"] if r["steps"]]
    result.update({
        "stopped_by": stopped_by, "epochs_run": len(result["history"]), "best_epoch": best["epoch"],
        "best_valid": best.get("valid"), "total_time_s": round(total, 3),
        "mean_epoch_train_time_s": round(float(np.mean([r["train_time_s"] for r in epochs])), 3) if epochs else None,
    })
    if device.type == "cuda":
        result["train_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    result["test"] = evaluate(model, split.test_inputs, split.test_targets, ks=config.ks,
                              users_per_batch=config.users_per_batch, amp=amp)
    if config.out_dir:
        with open(os.path.join(config.out_dir, METRICS_NAME), "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


__all__ = ["TrainConfig", "evaluate", "load_checkpoint", "save_checkpoint", "set_seed", "train"]
