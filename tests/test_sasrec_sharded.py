"""SASRec with its catalogue sharded over 2 gloo ranks (integrations/sasrec/sharded*.py) against one process with
the whole table: the same training trajectory (every step's loss, the final parameters, validation and test
metrics) for cce, sce and sampled; the merged per-shard top-k equals the single-process top-k, ties included;
checkpoints round-trip sharded (torch.distributed.checkpoint) and as one table, in both directions.

One spawn of 2 ranks runs every case (starting processes costs seconds; the cases are tiny). The single-process
references run in the test process, in float64, so "the same" means float64 rounding noise.
"""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from largevocab.integrations.sasrec import (
    SASRec,
    SASRecConfig,
    SequenceData,
    TrainBatches,
    TrainConfig,
    build_loss,
    evaluate,
    leave_one_out,
    load_checkpoint,
    save_checkpoint,
    streaming_topk,
    train,
)

from distributed import run_ranks

WORLD = 2
V, D, L, USERS = 36, 8, 6, 30  # 37 table rows: shards of 19 and 18 rows (rank 0's includes the padding row)
LOSSES = {"cce": {}, "sce": dict(bucket_size_y=8), "sampled": dict(num_negatives=10)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split():
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, V + 1, size=rng.integers(3, 11)) for _ in range(USERS)]
    return leave_one_out(SequenceData(sequences, V, np.arange(USERS)))


def _model(seed=0, tie_output=True):
    torch.manual_seed(seed)
    config = SASRecConfig(num_items=V, hidden_dim=D, num_blocks=1, num_heads=2, max_len=L, dropout=0.0,
                          tie_output=tie_output)
    return SASRec(config).double()


# One-step gradient cases: (loss, tied output table). Untied: two sharded tables, the loss reads the output one.
GRADIENT_CASES = (("cce", True), ("sce", False))


def _config():
    # Global batch 6 = 3 rows per rank; 28 training histories: the last batch (4 rows) gives rank 1 one row and
    # two padding rows.
    return TrainConfig(batch_size=6, max_epochs=2, patience=5, device="cpu", amp=False, ks=(1, 5, 10),
                       users_per_batch=7, progress=False, out_dir=None, measure_loss_memory=False)


def _tie_problem():
    """Integer-valued users and items: exact scores with many ties, to check the merge's tie order."""
    gen = torch.Generator().manual_seed(1)
    users = torch.randint(-2, 3, (13, 4), generator=gen).float()
    table = torch.randint(-2, 3, (V + 1, 4), generator=gen).float()
    exclude = [np.random.default_rng(i).integers(1, V + 1, size=i % 5) for i in range(13)]
    return users, table, exclude


def _last_batch(split):
    return list(TrainBatches(split.train, max_len=L, batch_size=_config().batch_size, seed=0))[-1]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(rank, world, tmp, reference_checkpoint):
    import torch.distributed as dist

    import largevocab as lv
    from largevocab.integrations.sasrec.sharded import (
        ShardedItemLoss,
        evaluate_sharded,
        gather_rows,
        item_table,
        shard_items,
        sharded_topk,
    )
    from largevocab.integrations.sasrec.sharded_train import (
        data_parallel,
        export_table_checkpoint,
        load_sharded_checkpoint,
        load_table_checkpoint_sharded,
        padded_global,
        save_sharded_checkpoint,
        split_batch,
        train_sharded,
    )

    group = dist.group.WORLD
    lv.parallel.set_replication_check(True)  # every loss call verifies that hidden/targets agree across ranks
    out = {"train": {}}
    split = _split()
    for name, options in LOSSES.items():
        model = shard_items(_model(), group)
        result = train_sharded(model, split, build_loss(name, seed=3, **options), _config(), log=None)
        out["train"][name] = {"result": result, "state": _state(model)}
    lv.parallel.set_replication_check(False)

    # One step's gradients, assembled from the public pieces as train_sharded does, on the last (padded) batch.
    out["grads"] = {}
    inputs, targets = _last_batch(split)
    per_rank = -(-_config().batch_size // world)
    for name, tied in GRADIENT_CASES:
        stepped = shard_items(_model(tie_output=tied), group)
        ddp = data_parallel(stepped)  # kept alive through backward: its reducer sums the gradients
        hidden = gather_rows(ddp(split_batch(inputs, world, rank, per_rank)), group)
        loss = ShardedItemLoss(build_loss(name, seed=3, **LOSSES[name]))(
            hidden, padded_global(targets, world, per_rank), item_table(stepped))
        loss.backward()
        out["grads"][name, tied] = {"loss": loss.detach(),
                                    **{n: p.grad.clone() for n, p in stepped.named_parameters()}}

    users, table, exclude = _tie_problem()
    chunk = -(-(V + 1) // world)
    lo, hi = rank * chunk, min((rank + 1) * chunk, V + 1)
    out["topk"] = {k: sharded_topk(users, table[lo:hi], lo, k, group, exclude=exclude) for k in (5, 20)}

    trained = model  # the sampled run's model
    save_sharded_checkpoint(os.path.join(tmp, "dcp"), trained, {"note": "dcp"})
    fresh = shard_items(_model(seed=7), group)
    load_sharded_checkpoint(os.path.join(tmp, "dcp"), fresh)
    out["dcp_reloaded"] = _state(fresh)
    export_table_checkpoint(os.path.join(tmp, "one.pt"), trained, {"note": "one"})

    loaded, extra = load_table_checkpoint_sharded(reference_checkpoint, group)
    out["from_single"] = {"state": _state(loaded), "extra": extra, "valid": evaluate_sharded(
        loaded, split.valid_inputs, split.valid_targets, ks=(1, 5, 10), users_per_batch=5)}
    # As bytes: tensors sent through the queue itself would live in this process's shared memory, gone at exit.
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("sharded"))
    reference = _model(seed=11).float()  # load_checkpoint builds float32 models
    path = os.path.join(tmp, "reference.pt")
    save_checkpoint(path, reference, {"note": "single"})
    ranks = run_ranks(worker, WORLD, args=(tmp, path), timeout=300)
    return tmp, reference, [torch.load(io.BytesIO(blob), weights_only=False) for blob in ranks]


def _reference_run(name):
    """train() of one process with the whole table; every training step's loss recorded by a forward hook."""
    model, loss = _model(), build_loss(name, seed=3, **LOSSES[name])
    steps = []
    loss.register_forward_hook(lambda module, inputs, output: steps.append(output.item()))
    result = train(model, _split(), loss, _config(), log=None)
    return model, result, steps


def _assert_shards_match(states, full, what):
    """Each rank's state equals the full state, its table(s) being its rows of the full table."""
    chunk = -(-(V + 1) // WORLD)
    for rank, state in enumerate(states):
        assert state.keys() == full.keys()
        for key, value in full.items():
            want = value[rank * chunk:(rank + 1) * chunk] if key in ("item_emb.weight", "out_emb.weight") else value
            # atol: Adam turns the float noise of a zero gradient (the attention's key bias) into ~1e-12 steps.
            torch.testing.assert_close(state[key], want, rtol=1e-9, atol=1e-10, msg=f"{what}: {key}, rank {rank}")


@pytest.mark.parametrize("name", list(LOSSES))
def test_two_ranks_train_the_single_process_trajectory(sharded, name):
    _, _, ranks = sharded
    model, want, steps = _reference_run(name)
    results = [r["train"][name]["result"] for r in ranks]
    for got in results:
        got_steps = [s for record in got["history"] for s in record["step_losses"]]
        assert len(got_steps) == len(steps) == 2 * 5
        np.testing.assert_allclose(got_steps, steps, rtol=1e-10)
        for g, w in zip(got["history"], want["history"], strict=True):
            assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-10)
            assert g["valid"] == w["valid"]
        assert got["best_epoch"] == want["best_epoch"] and got["test"] == want["test"]
    _assert_shards_match([r["train"][name]["state"] for r in ranks], _state(model), name)


@pytest.mark.parametrize(("name", "tied"), GRADIENT_CASES)
def test_one_step_gradients_equal_the_single_process_gradients(sharded, name, tied):
    """The transformer's gradients summed by DDP, each shard's rows of the table gradients (from the loss and from
    every rank's lookups), on a batch where one rank has padding rows."""
    _, _, ranks = sharded
    model = _model(tie_output=tied)
    inputs, targets = _last_batch(_split())
    loss = build_loss(name, seed=3, **LOSSES[name])(model(inputs), model.item_weight(), targets)
    loss.backward()
    want = {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}
    _assert_shards_match([r["grads"][name, tied] for r in ranks], want, f"gradient {name}, tied {tied}")


def test_merged_shard_topk_equals_the_whole_catalogue_topk(sharded):
    _, _, ranks = sharded
    users, table, exclude = _tie_problem()
    for k in (5, 20):
        want_scores, want_items = streaming_topk(users, table, k, exclude=exclude)
        assert (want_scores[:, :-1] == want_scores[:, 1:]).any(), "the problem must contain ties"
        for rank in ranks:
            scores, items = rank["topk"][k]
            assert torch.equal(scores, want_scores) and torch.equal(items, want_items), k


def test_checkpoints_round_trip_sharded_and_as_one_table(sharded):
    from largevocab.integrations.sasrec.sharded_train import load_dcp_as_single

    tmp, reference, ranks = sharded
    trained = [r["train"]["sampled"]["state"] for r in ranks]
    # DCP written by 2 ranks, read into a freshly initialised sharded model: exactly the trained shards.
    for got, want in zip((r["dcp_reloaded"] for r in ranks), trained, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    chunk = -(-(V + 1) // WORLD)
    full = dict(trained[0], **{"item_emb.weight": torch.cat([s["item_emb.weight"] for s in trained])})
    assert full["item_emb.weight"].shape == (V + 1, D) and chunk == trained[0]["item_emb.weight"].shape[0]
    # The one-table export and the DCP directory both load into a single process as the whole model (a float32
    # SASRec, as load_checkpoint builds, holding the float64 run's values rounded).
    for model, extra in (load_checkpoint(os.path.join(tmp, "one.pt")), load_dcp_as_single(os.path.join(tmp, "dcp"))):
        assert extra["note"] in ("one", "dcp")
        state = model.state_dict()
        assert state.keys() == full.keys() and all(torch.equal(state[k], full[k].float()) for k in full)
    # A single-process checkpoint loads into the sharded model, which then evaluates exactly like the original.
    _assert_shards_match([r["from_single"]["state"] for r in ranks], _state(reference), "from single")
    split = _split()
    want = evaluate(reference, split.valid_inputs, split.valid_targets, ks=(1, 5, 10), users_per_batch=5)
    for rank in ranks:
        assert rank["from_single"]["extra"] == {"note": "single"} and rank["from_single"]["valid"] == want


def _write_sasrec_txt(path, users=40, items=50, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for user in range(1, users + 1):
            for item in rng.integers(1, items + 1, size=rng.integers(4, 12)):
                f.write(f"{user} {item}\n")


@pytest.mark.xdist_group("accelerate_launch")
def test_cli_shard_items_under_accelerate_launch(tmp_path):
    """`accelerate launch --num_processes 2 -m largevocab sasrec ... --shard-items`: both checkpoints are written
    and the one-table file loads into a single-process model."""
    data = tmp_path / "tiny.txt"
    _write_sasrec_txt(data)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "largevocab", "sasrec",
           "--data", str(data), "--loss", "sce", "--shard-items", "--epochs", "2", "--batch-size", "16",
           "--max-len", "8", "--hidden-dim", "8", "--num-blocks", "1", "--device", "cpu", "--no-progress",
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"world_size": 2' in proc.stdout
    model, extra = load_checkpoint(str(out / "best.pt"))
    assert extra["world_size"] == 2 and model.item_emb.weight.shape == (51, 8)
    assert os.path.exists(out / "best_dcp" / "meta.json")
