"""SASRec on the kit: model masking and causality, every loss training on a real ML-1M slice, padding never an
item, ranking metrics against hand-computed values (ties, seen items, chunking), checkpoints and the CLI end to end
(readers, splits and the MovieLens download: test_sasrec_data.py).
CPU-friendly: tiny models, the torch backends only."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from largevocab.integrations.sasrec import (
    LOSS_NAMES,
    SASRec,
    SASRecConfig,
    TrainBatches,
    TrainConfig,
    build_loss,
    gbce_beta,
    leave_one_out,
    load_checkpoint,
    rank_metrics,
    read_sasrec_txt,
    save_checkpoint,
    streaming_topk,
    train,
)
from largevocab.integrations.sasrec.cli import main as cli_main

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
ML1M = os.path.join(SHARED_DATA, "rec", "ml-1m.txt")
COLLECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "collect_sasrec.py")
REPRO_TABLE = os.path.join(os.path.dirname(COLLECT), "sasrec_repro_table.py")
SLICE_USERS = 64


# Tiny tensors: the shared fixture runs this module on one intra-op thread (see conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ml1m_slice():
    """The first users of ML-1M (real data, read in place), leave-one-out."""
    if not os.path.exists(ML1M):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the shared data: {ML1M} is missing")
        pytest.skip(f"shared data not found at {ML1M}")
    return read_sasrec_txt(ML1M).head(SLICE_USERS)


def tiny_model(num_items, **overrides):
    config = dict(num_items=num_items, hidden_dim=16, num_blocks=2, num_heads=2, max_len=12, dropout=0.0)
    config.update(overrides)
    torch.manual_seed(0)
    return SASRec(SASRecConfig(**config))


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("residual_from_normed", [True, False])
def test_shapes_padding_zero_and_causality(residual_from_normed):
    model = tiny_model(30, residual_from_normed=residual_from_normed).eval()
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 5, 7, 9, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    out = model(seq)
    assert out.shape == (2, 12, 16)
    assert torch.equal(out[0, :7], torch.zeros(7, 16)) and out[0, 7:].abs().sum(-1).min() > 0
    assert model.item_weight().shape == (31, 16) and torch.equal(model.item_weight()[0], torch.zeros(16))
    for t in range(12):
        changed = seq.clone()
        changed[:, t + 1:] = torch.randint(1, 31, changed[:, t + 1:].shape)
        torch.testing.assert_close(model(changed)[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-6)
    # A shorter window is the right end of a max_len one (positions are counted from the right).
    assert model(seq[:, -5:]).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.ones(1, 13, dtype=torch.long))


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(num_items=5, hidden_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="mlet_inner_dim"):
        SASRecConfig(num_items=5, hidden_dim=16, mlet_inner_dim=8)
    with pytest.raises(ValueError, match="dropout"):
        SASRecConfig(num_items=5, dropout=1.5)


def test_padding_keys_masked_and_positions_from_start_make_left_padding_invisible():
    """With the SASRec+ settings a left-padded row gives the hidden states of the unpadded row (antklen pads on the
    right under a causal mask, so padding never reaches a real position); the pmixer/SCE default does not."""
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 5, 7, 9, 11], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 2]])
    for heads in (1, 2):
        model = tiny_model(30, num_heads=heads, positions="from_start", mask_padding_keys=True, init="normal").eval()
        out = model(seq)
        for row in range(2):
            real = seq[row][seq[row] != 0]
            torch.testing.assert_close(out[row, -len(real):], model(real[None])[0], rtol=0, atol=1e-5)
            assert torch.equal(out[row, :-len(real)], torch.zeros_like(out[row, :-len(real)]))
        for t in range(12):  # still causal with the per-row mask
            changed = seq.clone()
            changed[:, t + 1:] = torch.randint(1, 31, changed[:, t + 1:].shape)
            torch.testing.assert_close(model(changed)[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-5)
    default = tiny_model(30).eval()
    real = seq[0][seq[0] != 0]
    assert not torch.allclose(default(seq)[0, -len(real):], default(real[None])[0], atol=1e-3)


@pytest.mark.parametrize("init", ["xavier", "normal", "torch"])
@pytest.mark.parametrize("tie_output", [True, False])
def test_initialisations_and_output_table(init, tie_output):
    model = tiny_model(500, hidden_dim=32, init=init, tie_output=tie_output)
    table = model.item_emb.weight
    assert torch.equal(table[0], torch.zeros(32)) and torch.equal(model.item_weight()[0], torch.zeros(32))
    expected_std = {"xavier": math.sqrt(2 / (501 + 32)), "normal": 0.02, "torch": 1.0}[init]
    assert abs(table[1:].std().item() / expected_std - 1) < 0.1
    if init == "normal":  # every linear layer N(0, 0.02) with zero bias, as antklen's _init_weights
        for block in model.blocks:
            for linear in (block.ffn.fc1, block.ffn.fc2, block.attn.out_proj):
                assert abs(linear.weight.std().item() / 0.02 - 1) < 0.2 and not linear.bias.any()
    if tie_output:
        assert model.item_weight() is table and model.out_emb is None
    else:
        assert model.item_weight().shape == table.shape and not torch.equal(model.item_weight(), table)
        hidden = model(torch.tensor([[0, 1, 2, 3]]))
        build_loss("ce")(hidden, model.item_weight(), torch.tensor([[0, 2, 3, 4]])).backward()
        assert model.out_emb.weight.grad is not None and model.out_emb.weight.grad[1:].abs().sum() > 0


def test_unscaled_embeddings_change_the_forward():
    seq = torch.tensor([[0, 3, 5, 7]])
    scaled, unscaled = tiny_model(30).eval(), tiny_model(30, scale_embeddings=False).eval()
    assert not torch.allclose(scaled(seq), unscaled(seq))


def test_new_config_fields_are_validated():
    with pytest.raises(ValueError, match="init must be one of .*'uniform'"):
        SASRecConfig(num_items=5, init="uniform")
    with pytest.raises(ValueError, match="positions must be one of .*'left'"):
        SASRecConfig(num_items=5, positions="left")
    for name in ("mask_padding_keys", "scale_embeddings", "tie_output"):
        with pytest.raises(TypeError, match=name):
            SASRecConfig(num_items=5, **{name: 1})


def test_cli_presets_fill_only_unset_flags():
    from largevocab.integrations.sasrec.cli import PRESETS, apply_preset, build_parser

    for preset, values in PRESETS.items():
        args = build_parser().parse_args(["--data", "x.txt", "--preset", preset])
        apply_preset(args)
        assert {name: getattr(args, name) for name in values} == values
    args = build_parser().parse_args(["--data", "x.txt", "--preset", "gsasrec", "--dropout", "0.2", "--tie-output",
                                      "--betas", "0.8", "0.9"])
    apply_preset(args)
    assert (args.dropout, args.tie_output, args.betas, args.hidden_dim) == (0.2, True, [0.8, 0.9], 128)
    args = build_parser().parse_args(["--data", "x.txt"])
    apply_preset(args)
    assert args.preset == "sce" and args.dropout == 0.3 and args.betas == (0.9, 0.98)


# ---------------------------------------------------------------- losses

LOSS_CASES = [
    ("ce", {}), ("cce", {}), ("sce", {"bucket_size_y": 64}), ("sampled", {"num_negatives": 64}),
    ("sampled", {"sampling": "popularity", "num_negatives": 64}), ("sampled", {"sampling": "in_batch"}),
    ("sampled", {"num_negatives": 64, "shared_negatives": True}), ("bce", {}), ("gbce", {"num_negatives": 32}),
]


def _options(name, options, data):
    options = dict(options)
    if options.get("sampling") == "popularity":
        options["item_counts"] = data.item_counts()
    if name in ("cce", "sce", "sampled"):
        options["backend"] = "torch"
    return options


@pytest.mark.parametrize(("name", "options"), LOSS_CASES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={w}" for k, w in v.items()) or "default")
def test_each_loss_trains_on_a_real_slice(ml1m_slice, name, options):
    split = leave_one_out(ml1m_slice)
    model = tiny_model(split.num_items, hidden_dim=32, max_len=30)
    loss_fn = build_loss(name, seed=1, **_options(name, options, ml1m_slice))
    inputs, targets = TrainBatches(split.train, max_len=30, batch_size=SLICE_USERS).collate(split.train)

    def measured():
        model.eval()
        loss_fn.reseed(123)  # the same negatives / buckets before and after
        with torch.no_grad():
            return loss_fn(model(inputs), model.item_weight(), targets).item()

    before = measured()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3, betas=(0.9, 0.98))
    model.train()
    for _ in range(12):
        loss = loss_fn(model(inputs), model.item_weight(), targets)
        optimizer.zero_grad()
        loss.backward()
        assert torch.equal(model.item_emb.weight.grad[0], torch.zeros(32)), "padding row got a gradient"
        optimizer.step()
    after = measured()
    assert math.isfinite(before) and after < 0.95 * before, (name, before, after)


def test_ce_and_cce_agree_and_padding_is_not_an_item():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64)
    weight = torch.randn(11, 8, dtype=torch.float64)
    targets = torch.tensor([[0, 0, 3, 10, 1], [4, 5, 6, 7, 8]])
    valid = targets != 0
    want = torch.nn.functional.cross_entropy(hidden[valid] @ weight[1:].T, targets[valid] - 1)
    for name in ("ce", "cce"):
        torch.testing.assert_close(build_loss(name)(hidden, weight, targets), want)
        torch.testing.assert_close(build_loss(name, compact=False)(hidden, weight, targets), want)


def test_bce_and_gbce_match_the_formula():
    torch.manual_seed(0)
    hidden, weight = torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    targets = torch.tensor([[0, 2, 5]])
    k, t = 4, 0.5
    loss = build_loss("gbce", num_negatives=k, t=t, seed=7)
    got = loss(hidden, weight, targets)
    # Redraw the same negatives: uniform over items 1..8, i.e. indices 0..7 of weight[1:].
    gen = torch.Generator().manual_seed(7)
    negatives = torch.randint(0, 8, (2, k), generator=gen) + 1
    h, y = hidden[0, 1:], targets[0, 1:]
    s_pos, s_neg = (h * weight[y]).sum(-1), torch.einsum("nd,nkd->nk", h, weight[negatives])
    beta = gbce_beta(k, 8, t)
    alpha = k / 7
    assert beta == pytest.approx(alpha * (t * (1 - 1 / alpha) + 1 / alpha))
    per_row = -(torch.log(torch.sigmoid(s_pos) ** beta) + torch.log(1 - torch.sigmoid(s_neg)).sum(-1)) / (1 + k)
    torch.testing.assert_close(got, per_row.mean())
    assert gbce_beta(k, 8, 0.0) == pytest.approx(1.0) and gbce_beta(k, 8, 1.0) == pytest.approx(alpha)
    bce = build_loss("bce", num_negatives=k, seed=7)(hidden, weight, targets)
    per_row_bce = -(torch.log(torch.sigmoid(s_pos)) + torch.log(1 - torch.sigmoid(s_neg)).sum(-1)) / (1 + k)
    torch.testing.assert_close(bce, per_row_bce.mean())


def test_sampled_negatives_never_padding():
    # With weight[1:] as the catalogue, index 0 of what the library samples is item 1: a huge score on row 0 of
    # the table (padding) must not change the loss.
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 4, 8), torch.randn(6, 8)
    targets = torch.tensor([[0, 1, 2, 3], [4, 5, 1, 2]])
    for name, options in [("sampled", {"num_negatives": 16, "backend": "torch"}), ("bce", {"num_negatives": 16}),
                          ("gbce", {"num_negatives": 16}), ("sce", {"backend": "torch"}), ("ce", {})]:
        base = build_loss(name, seed=3, **options)(hidden, weight, targets)
        poisoned = weight.clone()
        poisoned[0] = 1e3 * hidden.reshape(-1, 8).mean(0)
        again = build_loss(name, seed=3, **options)(hidden, poisoned, targets)
        torch.testing.assert_close(again, base, msg=name)


def test_loss_option_errors():
    with pytest.raises(ValueError, match="loss must be one of"):
        build_loss("softmax")
    with pytest.raises(TypeError, match="takes no options"):
        build_loss("ce", num_negatives=3)
    with pytest.raises(ValueError, match="num_negatives"):
        build_loss("bce", num_negatives=0)
    with pytest.raises(ValueError, match="t must be"):
        build_loss("gbce", t=2.0)


# ---------------------------------------------------------------- metrics


def _table(scores):
    """An item table whose item i scores ``scores[i - 1]`` for the user vector [1]."""
    return torch.tensor([[0.0]] + [[s] for s in scores])


def test_metrics_hand_computed_with_ties_and_seen_items():
    # Items 1..6 score [5, 3, 5, 1, 4, 3]: ranking by (score desc, id asc) is 1, 3, 5, 2, 6, 4.
    weight = _table([5, 3, 5, 1, 4, 3])
    scorer = lambda batch: torch.ones(len(batch), 1)
    inputs = [np.array([4]), np.array([1]), np.array([2]), np.array([3])]
    targets = [3, 6, 2, 5]
    # user 0: seen {4}: ranking 1 3 5 2 6 -> target 3 at rank 2
    # user 1: seen {1}: ranking 3 5 2 6 4 -> target 6 at rank 4 (tie 2 vs 6: 2 first)
    # user 2: seen {2}: target 2 excluded -> miss
    # user 3: seen {3}: ranking 1 5 2 6 4 -> target 5 at rank 2
    m = rank_metrics(scorer, weight, inputs, targets, ks=(1, 2, 5))
    assert m["users"] == 4
    assert m["hr@1"] == 0 and m["hr@2"] == pytest.approx(2 / 4) and m["hr@5"] == pytest.approx(3 / 4)
    assert m["ndcg@2"] == pytest.approx((2 / math.log2(3)) / 4)
    assert m["ndcg@5"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert m["mrr@5"] == pytest.approx((0.5 + 0.25 + 0.5) / 4)
    # top-1 lists: 1, 3, 1, 1 -> items {1, 3}; top-2: {1,3} {3,5} {1,3} {1,5} -> {1, 3, 5}
    assert m["cov@1"] == pytest.approx(2 / 6) and m["cov@2"] == pytest.approx(3 / 6)
    no_exclusion = rank_metrics(scorer, weight, inputs, targets, ks=(5,), exclude_seen=False)
    # ranking 1 3 5 2 6 4 for all: ranks 2, 5, 4, 3
    assert no_exclusion["mrr@5"] == pytest.approx((1 / 2 + 1 / 5 + 1 / 4 + 1 / 3) / 4)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_streaming_topk_matches_a_full_sort_with_ties(chunk):
    gen = torch.Generator().manual_seed(0)
    users = torch.randint(-2, 3, (9, 3), generator=gen).float()
    weight = torch.randint(-2, 3, (41, 3), generator=gen).float()  # few distinct scores: many ties
    exclude = [np.array([1, 2, 40]), np.array([], dtype=np.int64)] + [np.array([5 * i]) for i in range(1, 8)]
    scores, items = streaming_topk(users, weight, 12, exclude=exclude, item_chunk=chunk)
    full = (users @ weight.T).numpy()
    for b in range(9):
        s = full[b, 1:].copy()
        s[np.asarray(exclude[b], dtype=np.int64) - 1] = -np.inf
        order = np.lexsort((np.arange(1, 41), -s))[:12] + 1
        assert items[b].tolist() == order.tolist(), b
        assert scores[b].tolist() == s[order - 1].tolist()


def test_ranking_is_independent_of_user_batching():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(60, 4, generator=gen)
    vectors = torch.randn(10, 4, generator=gen)
    inputs = [np.array([i + 1]) for i in range(10)]
    targets = torch.randint(1, 60, (10,), generator=gen)
    scorer_state = {"next": 0}

    def scorer(batch):
        start = scorer_state["next"]
        scorer_state["next"] += len(batch)
        return vectors[start:start + len(batch)]

    results = []
    for users_per_batch, item_chunk in [(10, None), (3, 7), (1, 59)]:
        scorer_state["next"] = 0
        results.append(rank_metrics(scorer, weight, inputs, targets, users_per_batch=users_per_batch,
                                    item_chunk=item_chunk))
    assert results[0] == results[1] == results[2]


# ---------------------------------------------------------------- data


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(25, mlet_inner_dim=32).eval()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, {"epoch": 3})
    loaded, extra = load_checkpoint(path)
    seq = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    assert extra == {"epoch": 3} and loaded.config == model.config
    torch.testing.assert_close(loaded(seq), model(seq), rtol=0, atol=0)


def test_train_early_stops_and_restores_the_best(ml1m_slice, tmp_path):
    split = leave_one_out(ml1m_slice)
    model = tiny_model(split.num_items, max_len=20)
    result = train(model, split, build_loss("cce"), TrainConfig(
        batch_size=32, max_epochs=3, patience=1, progress=False, out_dir=str(tmp_path), lr=1e-2), log=None)
    assert result["epochs_run"] <= 3 and 1 <= result["best_epoch"] <= 3
    assert result["loss_peak_bytes"] >= 0 and result["test"]["users"] == SLICE_USERS
    loaded, extra = load_checkpoint(str(tmp_path / "best.pt"))
    assert extra["epoch"] == result["best_epoch"]
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "metrics.json").read_text())["best_epoch"] == result["best_epoch"]


@pytest.mark.parametrize("loss", ["ce", "sce"])
def test_resume_continues_exactly_as_one_uninterrupted_run(ml1m_slice, tmp_path, loss):
    split = leave_one_out(ml1m_slice)
    settings = dict(batch_size=16, max_epochs=4, patience=10, seed=3, device="cpu", progress=False,
                    measure_loss_memory=False)
    options = {"bucket_size_y": 64} if loss == "sce" else {}

    def run(out, init_seed=0, **extra):
        model = tiny_model(split.num_items, dropout=0.2)  # seeds 0: the same initial weights every time
        torch.manual_seed(init_seed)  # the dropout stream of a fresh run
        result = train(model, split, build_loss(loss, seed=3, **options), TrainConfig(out_dir=str(out), **settings,
                                                                                       **extra), log=None)
        return model, result

    straight_model, straight = run(tmp_path / "straight")
    _, first = run(tmp_path / "chunked", chunk_epochs=3)
    assert first["stopped_by"] == "chunk" and first["epochs_run"] == 3
    # The resumed call restores every generator: it must not depend on the global one it starts with.
    resumed_model, resumed = run(tmp_path / "chunked", init_seed=123, resume=True)
    assert resumed["stopped_by"] == "max_epochs" and resumed["epochs_run"] == 4
    assert [(c["first_epoch"], c["last_epoch"], c["stopped_by"]) for c in resumed["chunks"]] == \
        [(1, 3, "chunk"), (4, 4, "max_epochs")]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert resumed["test"] == straight["test"] and resumed["best_epoch"] == straight["best_epoch"]
    for a, b in zip(resumed_model.state_dict().values(), straight_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len((tmp_path / "chunked" / "history.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="already finished \\(stopped by max_epochs at epoch 4\\)"):
        run(tmp_path / "chunked", resume=True)
    with pytest.raises(ValueError, match="nothing to continue"):
        run(tmp_path / "empty", resume=True)


def test_cli_end_to_end_on_a_tiny_slice(ml1m_slice, tmp_path, capsys):
    path = tmp_path / "slice.txt"
    with open(path, "w") as f:
        for user, seq in enumerate(ml1m_slice.sequences[:24], start=1):
            f.writelines(f"{user} {item}\n" for item in seq)
    out = tmp_path / "run"
    code = cli_main(["--data", str(path), "--loss", "sce", "--hidden-dim", "16", "--max-len", "20", "--epochs", "2",
                     "--batch-size", "16", "--drop-last", "--no-progress", "--device", "cpu", "--out", str(out),
                     "--seed", "3"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["ndcg@10"] == round(metrics["test"]["ndcg@10"], 4)
    assert set(metrics["test"]) >= {f"{m}@{k}" for m in ("hr", "ndcg", "mrr", "cov") for k in (1, 5, 10, 20, 50)}
    assert (out / "best.pt").exists() and len(metrics["history"]) == 2
    assert metrics["train_config"]["drop_last"] and [h["steps"] for h in metrics["history"]] == [1, 1]  # 24 // 16
    # benchmarks/collect_sasrec.py turns such runs into the committed results JSON and table.
    collected = tmp_path / "collected.json"
    collect = subprocess.run([sys.executable, COLLECT, str(out), "--out", str(collected), "--meta", "date=today"],
                             capture_output=True, text=True, timeout=120)
    assert collect.returncode == 0, collect.stderr
    result = json.loads(collected.read_text())
    assert result["date"] == "today" and result["rows"][0]["test"] == metrics["test"]
    assert f"| run | sce | --hidden-dim 16 --batch-size 16 --drop-last | {metrics['test']['ndcg@10']:.4f} |" \
        in collect.stdout
    table = subprocess.run([sys.executable, REPRO_TABLE, str(collected), "--at-epochs", "2,5"], capture_output=True,
                           text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    run_options = "--hidden-dim 16 --batch-size 16 --drop-last"
    assert f"| slice.txt | run | sce | {run_options} | {metrics['test']['ndcg@10']:.4f} |" in table.stdout
    assert "| epoch cap 2 reached |" in table.stdout
    valid_2 = metrics["history"][1]["valid"]["ndcg@10"]
    assert f"| run | sce | --hidden-dim 16 --batch-size 16 --drop-last | {valid_2:.4f} | - |" in table.stdout


def test_cli_temporal_table_and_bad_arguments(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [(u, int(rng.integers(1, 30)), int(t)) for u in range(40) for t in rng.integers(0, 1000, 12)]
    path = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(path, index=False)
    out = tmp_path / "run"
    assert cli_main(["--data", str(path), "--split", "temporal", "--loss", "gbce", "--num-negatives", "4",
                     "--hidden-dim", "8", "--max-len", "8", "--epochs", "1", "--no-progress", "--out", str(out),
                     "--min-item-interactions", "2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["split"]["protocol"] == "temporal"
    assert cli_main(["--data", str(tmp_path / "missing.txt")]) == 2
    assert cli_main(["--data", str(path), "--loss", "bce", "--num-negatives", "0"]) == 2
    assert "num_negatives" in capsys.readouterr().err
    assert cli_main(["--data", str(path), "--loss", "ce", "--drop-last", "--batch-size", "1000", "--epochs", "1",
                     "--no-progress", "--min-item-interactions", "2"]) == 2
    assert "no full batch to train on" in capsys.readouterr().err


def test_cli_reads_json_tables_through_datasets_and_names_bad_rows(tmp_path, capsys):
    pytest.importorskip("datasets")
    from largevocab.integrations.sasrec import load_interactions_dataset

    rng = np.random.default_rng(1)
    rows = [{"uid": f"u{u}", "iid": int(rng.integers(1, 20)), "ts": int(t)}
            for u in range(30) for t in rng.integers(0, 1000, 6)]
    path = tmp_path / "log.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    table = load_interactions_dataset(str(path), user_col="uid", item_col="iid", time_col="ts")
    expected = pd.DataFrame(rows).rename(columns={"uid": "user", "iid": "item", "ts": "timestamp"})
    assert table.to_dict("list") == expected.to_dict("list")
    out = tmp_path / "run"
    assert cli_main(["--data", str(path), "--user-col", "uid", "--item-col", "iid", "--time-col", "ts",
                     "--loss", "ce", "--hidden-dim", "8", "--max-len", "8", "--epochs", "1", "--no-progress",
                     "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["split"]["users"] == 30
    bad = tmp_path / "bad.jsonl"
    pd.DataFrame(rows[:3] + [{"uid": "u9", "iid": 3, "ts": "soon"}]).to_json(bad, orient="records", lines=True)
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 4: timestamp must be a number, got 'soon'"):
        load_interactions_dataset(str(bad), user_col="uid", item_col="iid", time_col="ts")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['user', 'item', 'timestamp'\]"):
        load_interactions_dataset(str(path))
    assert cli_main(["--data", str(tmp_path / "absent.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "log.xml").write_text("<a/>")
    assert cli_main(["--data", str(tmp_path / "log.xml")]) == 2
    assert "unknown file type" in capsys.readouterr().err


def test_all_losses_are_covered():
    assert {name for name, _ in LOSS_CASES} == set(LOSS_NAMES)


@pytest.mark.parametrize("shape", [(5,), (2, 3)])
def test_negative_scores_full_and_gathered_agree(shape):
    """Both ways of scoring the negatives (all V items then a gather, or the gathered K rows) give the same scores
    and the same gradients, in float64; the automatic choice takes the smaller of N x V and N x K x D."""
    from largevocab.integrations.sasrec.losses import positive_and_negative_scores

    torch.manual_seed(0)
    d, v, k = 4, 11, 3
    hidden = torch.randn(*shape, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    targets, negatives = torch.randint(0, v, shape), torch.randint(0, v, (*shape, k))
    results = []
    for full in (True, False):
        s_pos, s_neg = positive_and_negative_scores(hidden, weight, targets, negatives, full=full)
        assert s_pos.shape == shape and s_neg.shape == (*shape, k)
        grads = torch.autograd.grad((s_pos.sin().sum() + s_neg.cos().sum()), (hidden, weight))
        results.append((s_pos, s_neg, *grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want_pos = (hidden * weight[targets]).sum(-1)
    torch.testing.assert_close(positive_and_negative_scores(hidden, weight, targets, negatives)[0], want_pos)


def test_loss_memory_is_the_live_tensor_peak_independent_of_the_process_history():
    """measure_loss_peak on CPU reads the profiler's allocation events: full CE holds at least the (N, V) logits
    and their gradient, the fused loss far less, and the number repeats after large frees (the RSS peak, used
    before, reused freed pages and read 0-200 MiB for the same step depending on what ran before)."""
    from largevocab.integrations.sasrec.train import measure_loss_peak

    num_items, batch, window = 2000, 16, 24
    model = tiny_model(num_items, max_len=window).train()
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, num_items + 1, (batch, window), generator=gen)
    logit_bytes = batch * window * num_items * 4
    cpu = torch.device("cpu")
    full = measure_loss_peak(model, build_loss("ce"), inputs, inputs, cpu, False)
    fused = measure_loss_peak(model, build_loss("cce"), inputs, inputs, cpu, False)
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)  # a large allocation, freed, between measurements
    assert full >= 2 * logit_bytes and fused < logit_bytes / 4, (full, fused, logit_bytes)
    assert measure_loss_peak(model, build_loss("ce"), inputs, inputs, cpu, False) == full
