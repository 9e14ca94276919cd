"""The main job (`largevocab` with no arguments runs `largevocab lm`) end to end at a tiny setting, also under
`accelerate launch` with two CPU processes (DDP over gloo)."""

import csv
import os
import subprocess
import sys

import pytest

TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--dim", "32", "--layers", "1", "--heads", "2"]


def run_job(tmp_path, *extra):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "largevocab", *TINY, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return proc.stdout, rows, out


def test_main_job_runs_every_loss_on_the_embedded_default(tmp_path):
    stdout, rows, out = run_job(tmp_path)
    assert [r["loss"] for r in rows] == ["ce", "cce", "sce", "sampled"]
    for r in rows:
        assert int(r["vocab"]) == 50257 and float(r["step_ms"]) > 0 and float(r["val_loss"]) > 0
    # Exact fused CE trains exactly like full CE: same curve (up to float rounding), same validation loss.
    ce, cce = rows[0], rows[1]
    assert abs(float(ce["train_loss"]) - float(cce["train_loss"])) < 1e-3
    assert abs(float(ce["val_loss"]) - float(cce["val_loss"])) < 1e-3
    assert "val CE" in stdout
    with open(out / "curves.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4 * 3
    assert (out / "lm_benchmark.png").stat().st_size > 0


def test_main_job_under_accelerate_with_two_cpu_processes(tmp_path):
    pytest.importorskip("accelerate")
    _, rows, _ = run_job(tmp_path, "--losses", "ce,cce", "--processes", "2")
    assert [r["processes"] for r in rows] == ["2", "2"]
    assert [int(r["tokens_per_step"]) for r in rows] == [2 * 2 * 32, 2 * 2 * 32]
    assert abs(float(rows[0]["val_loss"]) - float(rows[1]["val_loss"])) < 1e-3


def test_main_job_rejects_unknown_losses(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "largevocab", "lm", "--losses", "ce,focal", "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "focal" in proc.stderr
    assert not os.path.exists(tmp_path / "summary.csv")
