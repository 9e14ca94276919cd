"""Training, checkpoints and the command line of SASRec with a sharded item catalogue (layout: :mod:`.sharded`).

    torchrun --nproc_per_node 2 -m largevocab sasrec --data ml-1m.txt --loss sce --shard-items --out runs/sce2
    accelerate launch --multi_gpu --num_processes 2 -m largevocab sasrec --data ml-1m.txt --loss sce --shard-items

(``--multi_gpu`` is accelerate's name for its torchrun launcher; on a CPU-only machine the ranks use gloo.)
``--batch-size`` is the *global* batch, split over the ranks, so a sharded run optimises exactly what the
single-process run with the same flags does (one step on W ranks = one step of one process on the same rows, see
:mod:`.sharded`; dropout masks aside).

Checkpoints, in ``out_dir``:

* ``best_dcp/``: the best model, sharded, written by every rank with ``torch.distributed.checkpoint`` (the tables as
  DTensors ``Shard(0)``), plus ``meta.json``. :func:`load_sharded_checkpoint` reads it into a sharded model of any
  world size (DCP reshards), :func:`load_dcp_as_single` into one single-process :class:`~.model.SASRec`.
* ``best.pt``: the same model as one table, the single-process format of :func:`~.train.save_checkpoint`, so
  :func:`~.train.load_checkpoint` loads it; :func:`load_table_checkpoint_sharded` loads such a file (a sharded run's
  or a single-process run's) into a sharded model.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from largevocab.profiling import device_name

from .data import Split, TrainBatches
from .losses import SASRecLoss
from .model import SASRec, SASRecConfig
from .sharded import (
    ShardedItemLoss,
    evaluate_sharded,
    gather_rows,
    item_table,
    shard_bounds,
    shard_items,
    sharded_tables,
)
from .train import (
    CHECKPOINT_NAME,
    HISTORY_NAME,
    METRICS_NAME,
    SELECTION_METRIC,
    TrainConfig,
    _autocast,
    load_checkpoint,
    resolve_device,
)

DCP_NAME = "best_dcp"
META_NAME = "meta.json"
INIT_TIMEOUT_S = 600


def _allreduce_sum_hook(group, bucket):
    """DDP communication hook: SUM the replicated parameters' gradients over the ranks (DDP's default averages).
    Each rank's loss is the global loss, so rank r's gradient is only the part flowing through its slice."""
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def data_parallel(model: SASRec, *, device_ids=None) -> DistributedDataParallel:
    """DDP over a sharded ``model``'s transformer: the table shards are left out (their gradients are exact per
    shard), the replicated parameters' gradients are summed. DDP gets a process group of its own (the same ranks as
    the tables'), so its bucketed all-reduces never interleave with the lookup's and the loss's collectives."""
    group = item_table(model).group
    ddp_group = dist.new_group(dist.get_process_group_ranks(group))
    ignored = [f"{name}.weight" for name in sharded_tables(model)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=ddp_group)
    ddp.register_comm_hook(ddp_group, _allreduce_sum_hook)
    return ddp


def split_batch(batch: torch.Tensor, world: int, rank: int, per_rank: int) -> torch.Tensor:
    """Rows ``[rank * per_rank, (rank + 1) * per_rank)`` of a global batch, padded with 0 (padding) rows."""
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return torch.cat([mine, mine.new_zeros((per_rank - mine.shape[0], *mine.shape[1:]))])


def padded_global(batch: torch.Tensor, world: int, per_rank: int) -> torch.Tensor:
    """The global batch as :func:`gather_rows` assembles it from :func:`split_batch`'s slices."""
    return torch.cat([split_batch(batch, world, r, per_rank) for r in range(world)])


# ------------------------------------------------------------------------------------------- checkpoints


def sharded_state_dict(model: SASRec) -> dict:
    """``model.state_dict()`` with each sharded table as a DTensor ``Shard(0)`` of the whole (V + 1, d) table."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    state = model.state_dict()
    for name, table in sharded_tables(model).items():
        world, rank = dist.get_world_size(table.group), dist.get_rank(table.group)
        lo, hi = shard_bounds(table.num_embeddings, world, rank)
        if (lo, hi) != (table.offset, table.offset + table.weight.shape[0]):
            raise ValueError(f"{name}: rows [{table.offset}, +{table.weight.shape[0]}) are not the Shard(0) block "
                             f"[{lo}, {hi}) of rank {rank}; only shard_items' split can be checkpointed")
        mesh = DeviceMesh.from_group(table.group, table.weight.device.type)
        shape = torch.Size((table.num_embeddings, table.embedding_dim))
        state[f"{name}.weight"] = DTensor.from_local(table.weight.detach(), mesh, [Shard(0)], run_check=False,
                                                     shape=shape, stride=(table.embedding_dim, 1))
    return state


def save_sharded_checkpoint(path: str, model: SASRec, extra: dict | None = None) -> None:
    """Write ``model`` (sharded) to the directory ``path`` with ``torch.distributed.checkpoint`` from every rank, and
    ``path/meta.json`` (config, extra, world size) from rank 0. Written to ``path.tmp`` first, then renamed, so a
    crash leaves the previous checkpoint whole."""
    import torch.distributed.checkpoint as dcp

    group = item_table(model).group
    rank = dist.get_rank(group)
    tmp = f"{path}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier(group=group)
    dcp.save(sharded_state_dict(model), checkpoint_id=tmp, process_group=group)
    if rank == 0:
        meta = {"model_config": model.config.to_dict(), "extra": extra or {},
                "world_size": dist.get_world_size(group)}
        with open(os.path.join(tmp, META_NAME), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier(group=group)


def _read_meta(path: str) -> dict:
    with open(os.path.join(path, META_NAME)) as f:
        return json.load(f)


@torch.no_grad()
def load_sharded_checkpoint(path: str, model: SASRec) -> dict:
    """Read a :func:`save_sharded_checkpoint` directory into the sharded ``model`` (any world size: each rank reads
    its rows); returns the checkpoint's ``extra``. The model's config must equal the checkpoint's."""
    import torch.distributed.checkpoint as dcp

    meta = _read_meta(path)
    if meta["model_config"] != model.config.to_dict():
        raise ValueError(f"checkpoint {path} has config {meta['model_config']}, the model {model.config.to_dict()}")
    state = sharded_state_dict(model)
    dcp.load(state, checkpoint_id=path, process_group=item_table(model).group)
    for name, table in sharded_tables(model).items():  # DCP fills the DTensors' local tensors; make sure they are ours
        table.weight.copy_(state.pop(f"{name}.weight").to_local())
    model.load_state_dict(state, strict=False)
    return meta["extra"]


def load_dcp_as_single(path: str) -> tuple[SASRec, dict]:
    """A :func:`save_sharded_checkpoint` directory as one single-process :class:`SASRec` (eval mode) and its extra;
    needs no process group."""
    import torch.distributed.checkpoint as dcp

    meta = _read_meta(path)
    model = SASRec(SASRecConfig(**meta["model_config"]))
    state = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state)
    return model.eval(), meta["extra"]


@torch.no_grad()
def full_state_dict(model: SASRec, dst: int = 0) -> dict | None:
    """The unsharded state dict (whole tables) on rank ``dst`` of the tables' group, None on the other ranks."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, table in sharded_tables(model).items():
        world, rank = dist.get_world_size(table.group), dist.get_rank(table.group)
        chunk = shard_bounds(table.num_embeddings, world, 0)[1]
        block = table.weight.new_zeros((chunk, table.embedding_dim))
        block[:table.weight.shape[0]] = table.weight
        blocks = [torch.empty_like(block) for _ in range(world)] if rank == dst else None
        dist.gather(block, blocks, dst=dist.get_global_rank(table.group, dst), group=table.group)
        if rank == dst:
            state[f"{name}.weight"] = torch.cat(blocks)[:table.num_embeddings]
    return state if dist.get_rank(item_table(model).group) == dst else None


def export_table_checkpoint(path: str, model: SASRec, extra: dict | None = None) -> None:
    """Write the sharded ``model`` as one file in :func:`~.train.save_checkpoint`'s format (rank 0 writes; every
    rank must call), loadable by :func:`~.train.load_checkpoint` in a single process."""
    state = full_state_dict(model)
    if state is not None:
        tmp = f"{path}.tmp"
        torch.save({"model_config": model.config.to_dict(), "state_dict": state, "extra": extra or {}}, tmp)
        os.replace(tmp, path)
    dist.barrier(group=item_table(model).group)


def load_table_checkpoint_sharded(path: str, group=None) -> tuple[SASRec, dict]:
    """A one-table checkpoint (:func:`~.train.save_checkpoint` or :func:`export_table_checkpoint`) as a sharded
    model (eval mode) on this rank of ``group``, and its extra."""
    model, extra = load_checkpoint(path)
    return shard_items(model, group).eval(), extra


# ----------------------------------------------------------------------------------------------- training


def _any_rank(flag: bool, group) -> bool:
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def train_sharded(model: SASRec, split: Split, loss_fn: SASRecLoss, config: TrainConfig | None = None,
                  log=print) -> dict:
    """:func:`~.train.train` for a model whose catalogue is sharded (:func:`~.sharded.shard_items`), on every rank
    of its group: Adam, early stopping on validation NDCG@10, the best checkpoint, test metrics of the best model.

    ``config.batch_size`` is the global batch (``ceil(batch_size / W)`` rows per rank). Returns the same dict on
    every rank (``train``'s keys, plus ``world_size`` and each epoch's ``step_losses``); rank 0 writes the files and
    logs. ``config.measure_loss_memory`` is not supported here (ignored), ``resume``/``chunk_epochs`` are refused;
    ``time_budget_s`` stops inside an epoch (all ranks together) and evaluates; on CUDA each rank's peak is reported.
    """
    config = config or TrainConfig()
    for name in ("resume", "chunk_epochs"):  # train()'s resumable runs have no sharded form yet: refuse, not ignore
        if getattr(config, name, None):
            raise ValueError(f"{name} is not supported with a sharded catalogue (--shard-items)")
    table = item_table(model)
    group = table.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    main = rank == 0
    device = resolve_device(config.device)
    amp = config.amp and device.type == "cuda"
    model.to(device)
    loss_fn.to(device)
    sharded_loss = ShardedItemLoss(loss_fn)
    ddp = data_parallel(model, device_ids=[device] if device.type == "cuda" else None)
    if config.out_dir and main:
        os.makedirs(config.out_dir, exist_ok=True)
        open(os.path.join(config.out_dir, HISTORY_NAME), "w").close()
    log = log if main else None
    batches = TrainBatches(split.train, max_len=model.config.max_len, batch_size=config.batch_size,
                           seed=config.seed, drop_last=config.drop_last)
    per_rank = -(-config.batch_size // world)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas))
    result = {
        "model_config": model.config.to_dict(), "train_config": asdict(config), "loss": repr(loss_fn),
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "world_size": world, "rows_per_rank": per_rank, "split": dict(split.info),
        "train_histories": len(batches.histories), "batches_per_epoch": len(batches), "history": [],
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dcp_path = os.path.join(config.out_dir, DCP_NAME) if config.out_dir else None
    evaluation = dict(ks=config.ks, users_per_batch=config.users_per_batch, amp=amp)
    best, best_state, waited, stopped_by = {"epoch": -1, SELECTION_METRIC: -math.inf}, None, 0, "max_epochs"
    start = time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        ddp.train()
        epoch_start, losses, out_of_time = time.perf_counter(), [], False
        for inputs, targets in batches:
            mine = split_batch(inputs, world, rank, per_rank).to(device)
            targets = padded_global(targets, world, per_rank).to(device)
            with _autocast(device, amp):
                hidden = gather_rows(ddp(mine), group)
                loss = sharded_loss(hidden, targets, table)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if config.time_budget_s is not None and _any_rank(time.perf_counter() - start > config.time_budget_s,
                                                              group):
                out_of_time = True
                break
        train_time = time.perf_counter() - epoch_start
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": len(losses),
                  "train_time_s": round(train_time, 3), "step_losses": losses}
        if not math.isfinite(record["train_loss"]):  # the loss is global: every rank stops here
            stopped_by = "non-finite loss"
            result["history"].append(record)
            break
        if epoch % config.eval_every == 0 or out_of_time or epoch == config.max_epochs:
            eval_start = time.perf_counter()
            valid = evaluate_sharded(model, split.valid_inputs, split.valid_targets, **evaluation)
            record["eval_time_s"] = round(time.perf_counter() - eval_start, 3)
            record["valid"] = valid
            if valid[SELECTION_METRIC] > best[SELECTION_METRIC]:  # the same metrics on every rank
                best = {"epoch": epoch, SELECTION_METRIC: valid[SELECTION_METRIC], "valid": valid}
                waited = 0
                if dcp_path:
                    save_sharded_checkpoint(dcp_path, model, {"epoch": epoch, "valid": valid})
                else:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
        result["history"].append(record)
        if config.out_dir and main:
            with open(os.path.join(config.out_dir, HISTORY_NAME), "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        if log:
            valid_text = f", valid {SELECTION_METRIC} {record['valid'][SELECTION_METRIC]:.4f}" if "valid" in record \
                else ""
            log(f"epoch {epoch}: loss {record['train_loss']:.4f} ({record['steps']} steps, {train_time:.1f} s, "
                f"{world} ranks){valid_text}")
        if out_of_time:
            stopped_by = "time_budget"
            break
        if waited >= config.patience:
            stopped_by = "patience"
            break
    total = time.perf_counter() - start
    if best["epoch"] > 0:
        if dcp_path:
            load_sharded_checkpoint(dcp_path, model)
        elif best_state is not None:
            model.load_state_dict(best_state)
    epochs = [r for r in result["history"] if r["steps"]]
    result.update({
        "stopped_by": stopped_by, "epochs_run": len(result["history"]), "best_epoch": best["epoch"],
        "best_valid": best.get("valid"), "total_time_s": round(total, 3),
        "mean_epoch_train_time_s": round(float(np.mean([r["train_time_s"] for r in epochs])), 3) if epochs else None,
    })
    if device.type == "cuda":
        peaks = [None] * world
        dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(device), group=group)
        result["train_peak_bytes_per_rank"] = peaks
    result["test"] = evaluate_sharded(model, split.test_inputs, split.test_targets, **evaluation)
    if config.out_dir:
        export_table_checkpoint(os.path.join(config.out_dir, CHECKPOINT_NAME), model,
                                {"epoch": best["epoch"], "valid": best.get("valid"), "world_size": world})
        if main:
            with open(os.path.join(config.out_dir, METRICS_NAME), "w") as f:
                json.dump(result, f, indent=1, default=str)
    return result


# ------------------------------------------------------------------------------------------ command line


def init_distributed(device: str) -> tuple[str, bool]:
    """Join the launcher's process group (torchrun / ``accelerate launch`` environment), or start a 1-rank gloo
    group when there is none; returns this rank's device name and whether this call created the group."""
    started = False
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=INIT_TIMEOUT_S)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group("nccl" if wants_cuda else "gloo", timeout=timeout)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=timeout)
        started = True
    if wants_cuda and device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(device))
    elif device == "auto":
        device = "cpu"
    return device, started


def run_cli(args, split: Split, model: SASRec, loss_fn: SASRecLoss, config: TrainConfig) -> int:
    """``largevocab sasrec ... --shard-items``: shard ``model``'s catalogue over the launcher's ranks and train."""
    device, started = init_distributed(config.device)
    try:
        config.device = device
        model = shard_items(model)
        ShardedItemLoss(loss_fn)  # refuses the losses that have no sharded form, on every rank
        main = dist.get_rank() == 0
        if main:
            print(f"data {args.data}: {split.num_items} items, {len(split.train)} training histories, "
                  f"{len(split.test_targets)} evaluated users; loss {args.loss}; {dist.get_world_size()} ranks, "
                  f"catalogue sharded; device {device}", file=sys.stderr)
            if dist.get_world_size() == 1:
                # accelerate's default launcher on a machine without GPUs starts one process, whatever
                # --num_processes says: nothing tells this process that more were asked for.
                print("note: 1 rank, the catalogue is not split; start ranks with torchrun, or with accelerate "
                      "launch --multi_gpu (its torchrun launcher, gloo on CPU)", file=sys.stderr)
        result = train_sharded(model, split, loss_fn, config, log=lambda line: print(line, file=sys.stderr))
        if main:
            result["data"] = os.path.abspath(args.data)
            result["argv"] = list(sys.argv[1:])
            result["preset"] = args.preset
            if args.out:
                with open(os.path.join(args.out, METRICS_NAME), "w") as f:
                    json.dump(result, f, indent=1, default=str)
            test = result["test"]
            print(json.dumps({"loss": args.loss, "world_size": result["world_size"],
                              "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
                              "ndcg@10": round(test["ndcg@10"], 4), "hr@10": round(test["hr@10"], 4),
                              "mean_epoch_train_time_s": result["mean_epoch_train_time_s"]}))
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            dist.destroy_process_group()
    return 0


__all__ = ["data_parallel", "export_table_checkpoint", "full_state_dict", "init_distributed",
           "load_dcp_as_single", "load_sharded_checkpoint", "load_table_checkpoint_sharded", "run_cli",
           "save_sharded_checkpoint", "sharded_state_dict", "train_sharded"]
