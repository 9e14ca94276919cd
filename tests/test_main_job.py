"""The main job (`largevocab` with no arguments runs `largevocab lm`) end to end at a tiny setting, also under
`accelerate launch` with two CPU processes (DDP over gloo)."""

import csv
import json
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


@pytest.mark.xdist_group("accelerate_launch")
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


def test_main_job_names_a_bad_text_or_tokenizer_once_before_training(tmp_path, capsys):
    from largevocab.integrations.lm_benchmark import main

    assert main(["--text", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "a")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--tokenizer", str(tmp_path / "no_tokenizer"), "--out", str(tmp_path / "b")]) == 2
    assert "no_tokenizer" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a" / "summary.csv") and not os.path.exists(tmp_path / "b")


def test_exact_step_schedule_and_labels():
    from largevocab.integrations.lm_benchmark import JobConfig

    cfg = JobConfig(steps=10, exact_start=2, exact_end=3, exact_every=4)
    assert [s for s in range(10) if cfg.is_exact_step("sce", s)] == [0, 1, 3, 7, 8, 9]
    assert not any(cfg.is_exact_step(loss, s) for loss in ("ce", "cce") for s in range(10))
    assert cfg.label("sce") == "sce b_y=256 exact_start=2 exact_end=3 exact_every=4"
    assert JobConfig(num_negatives=64).label("sampled") == "sampled K=64" and cfg.label("cce") == "cce"


def test_text_sources_through_datasets_and_their_errors(tmp_path):
    pytest.importorskip("datasets")
    import pandas as pd

    from largevocab.integrations.lm_benchmark import JobConfig, load_text

    rows = [{"body": "first line"}, {"body": "second, with ünïcode"}]
    pd.DataFrame(rows).to_json(tmp_path / "c.jsonl", orient="records", lines=True)
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        assert load_text(JobConfig(text=str(tmp_path / name), text_column="body")) == \
            "first line\nsecond, with ünïcode"
    with pytest.raises(ValueError, match=r"c\.jsonl' has no column 'text'; columns are \['body'\]"):
        load_text(JobConfig(text=str(tmp_path / "c.jsonl")))
    pd.DataFrame([{"body": "a"}, {"body": 3}]).to_json(tmp_path / "mixed.jsonl", orient="records", lines=True)
    with pytest.raises(ValueError, match="could not load|row 2"):
        load_text(JobConfig(text=str(tmp_path / "mixed.jsonl"), text_column="body"))
    (tmp_path / "c.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unknown file type '.xml'"):
        load_text(JobConfig(text=str(tmp_path / "c.xml")))
    with pytest.raises(ValueError, match="no such file"):
        load_text(JobConfig(text=str(tmp_path / "absent.txt")))


def test_main_job_on_a_jsonl_file_with_validation_curve_and_remedies(tmp_path):
    pytest.importorskip("datasets")
    from largevocab.integrations.lm_benchmark import DEFAULT_TEXT, read_text

    corpus = tmp_path / "corpus.jsonl"
    paragraphs = [p for p in read_text(DEFAULT_TEXT)[:60000].split("\n\n") if p.strip()]
    with open(corpus, "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    stdout, rows, out = run_job(tmp_path, "--text", str(corpus), "--losses", "ce,sce", "--steps", "4",
                                "--eval-every", "2", "--exact-end", "1", "--exact-every", "2", "--val-windows", "3")
    assert [r["label"] for r in rows] == ["ce", "sce b_y=256 exact_end=1 exact_every=2"]
    assert [int(r["exact_steps"]) for r in rows] == [0, 2]  # steps 1 and 3 (every 2nd; the last is one of them)
    assert all(int(r["val_tokens"]) == 3 * 32 and r["text"] == "corpus.jsonl" for r in rows)
    with open(out / "val_curves.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert [(r["loss"], int(r["step"])) for r in curve] == [(loss, s) for loss in ("ce", "sce") for s in (0, 2, 4)]
    # Step 0 is the same initial model for every loss, evaluated the same way.
    assert curve[0]["val_ce"] == curve[3]["val_ce"] and float(curve[0]["train_seconds"]) == 0
    assert float(rows[1]["val_loss"]) == float(curve[-1]["val_ce"])
    assert "What each loss is for" in stdout and "val CE" in stdout
