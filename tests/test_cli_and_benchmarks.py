"""The README's commands, the demo and the benchmark harness run end to end at tiny sizes (so none can rot)."""

import csv
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(path) as f:
        return f.read()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(*cmd):
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = read(os.path.join(ROOT, "README.md"))
    ci = read(os.path.join(ROOT, ".ci", "run"))
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, commands  # one runs the main job, one runs the tests
    install = ("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && "
               ".venv/bin/pip install -e \".[hf,bench,test]\"")
    assert all(c.startswith(install + " && ") for c in commands)
    assert install in ci
    test_command = commands[1][len(install) + 4:]
    assert test_command in ci


def test_demo_runs_and_agrees():
    out = run("-m", "largevocab", "demo", "--tokens", "64", "--vocab", "1000", "--dim", "16", "--device", "cpu")
    assert "same loss: True" in out


def test_cli_usage():
    proc = subprocess.run([sys.executable, "-m", "largevocab", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "largevocab", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2


def test_benchmark_harness_writes_its_csv(tmp_path):
    out_csv = tmp_path / "bench.csv"
    run("benchmarks/bench_ce.py", "--device", "cpu", "--n", "64", "--v", "512", "--d", "16", "--repeats", "1",
        "--providers", "torch_eager,lv_torch", "--modes", "forward,forward+backward", "--out", str(out_csv))
    rows = read_csv(out_csv)
    assert [(r["provider"], r["mode"]) for r in rows] == [
        ("torch_eager", "forward"), ("torch_eager", "forward+backward"),
        ("lv_torch", "forward"), ("lv_torch", "forward+backward")]
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["loss_abs_error"]) < 1e-4 and r["device"]


def test_appending_rows_of_other_columns_rewrites_the_csv_under_their_union(tmp_path, monkeypatch):
    """The post-training benchmark appends GRPO and distillation rows (different floor columns) to one file: every
    line must stay under a header that names its fields."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from harness import append_csv

    path = str(tmp_path / "mixed.csv")
    append_csv([{"task": "grpo", "flops": 1}], path)
    append_csv([{"task": "grpo", "flops": 2}], path)
    append_csv([{"task": "distill", "flops_kl": 3}], path)
    assert read_csv(path) == [{"task": "grpo", "flops": "1", "flops_kl": ""},
                              {"task": "grpo", "flops": "2", "flops_kl": ""},
                              {"task": "distill", "flops": "", "flops_kl": "3"}]


def test_a_failed_worker_reports_its_own_exception_not_the_launchers(tmp_path, monkeypatch):
    """A rank failing under torch.distributed.run ends torchrun's stderr with its ChildFailedError and a box of '=':
    the reason a benchmark prints must be the rank's exception (CI once showed only '=====')."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from harness import run_worker

    script = tmp_path / "fails.py"
    script.write_text("import torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "if dist.get_rank() == 1:\n"
                      "    raise ValueError('rank 1 cannot go on')\n"
                      "dist.barrier()\n")
    result, reason = run_worker("-m", ["torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                       str(script)])
    assert result is None and reason.endswith("ValueError: rank 1 cannot go on"), reason
    script.write_text("import sys\nprint('partial', file=sys.stderr)\nsys.exit(3)\n")
    assert run_worker(str(script), []) == (None, "partial")


@pytest.mark.parametrize("path", sorted(
    os.path.join(ROOT, "benchmarks", "results", f) for f in os.listdir(os.path.join(ROOT, "benchmarks", "results"))
    if f.endswith(".csv")))
def test_committed_results_parse(path):
    rows = read_csv(path)
    assert rows, path
    for r in rows:
        assert r["device"] and r["date"]
        if "loss_peak_MiB" in r:  # a memory-only table (benchmarks/sasrec_loss_memory.py)
            assert float(r["loss_peak_MiB"]) > 0 and int(r["positions"]) > 0, r
            continue
        if r.get("skipped"):  # a provider that could not run here: the row says why, and holds no numbers
            assert not r["ms"], r
            continue
        assert float(r["ms"]) > 0 and int(r["peak_extra_bytes"]) >= 0


def test_catalogue_benchmark_plot_and_summary_run(tmp_path):
    out_csv = tmp_path / "catalogue.csv"
    run("benchmarks/bench_catalogue.py", "--device", "cpu", "--n", "64", "--v", "700", "--d", "16",
        "--repeats", "1", "--out", str(out_csv))
    rows = read_csv(out_csv)
    assert [r["provider"] for r in rows] == ["full_ce", "lv_ce", "lv_sce", "lv_sampled", "lv_sampled_shared"]
    png = tmp_path / "catalogue.png"
    run("benchmarks/plot.py", str(out_csv), "--out", str(png))
    assert png.stat().st_size > 0


@pytest.mark.parametrize("task", ["grpo", "distill"])
def test_posttrain_benchmark_providers_agree(tmp_path, task):
    """bench_posttrain.py at toy sizes: every provider that runs here (Liger is not a dependency) gives the
    materialised loss, and the CSV names the task and kinds."""
    out_csv = tmp_path / "posttrain.csv"
    run("benchmarks/bench_posttrain.py", "--task", task, "--device", "cpu", "--n", "64", "--v", "300", "--d", "16",
        "--d-teacher", "24", "--repeats", "1", "--providers", "materialised,trl_chunked,lv_torch", "--out",
        str(out_csv))
    rows = read_csv(out_csv)
    kinds = ("forward_kl", "jsd") if task == "distill" else ("",)
    assert sorted((r["provider"], r["kind"]) for r in rows) == sorted(
        (p, k) for p in ("materialised", "trl_chunked", "lv_torch") for k in kinds)
    for kind in kinds:
        want = next(float(r["loss"]) for r in rows if r["provider"] == "materialised" and r["kind"] == kind)
        for r in rows:
            if r["kind"] == kind:
                assert not r["skipped"] and float(r["loss"]) == pytest.approx(want, rel=1e-4, abs=1e-6), r


def test_sampled_benchmark_runs(tmp_path):
    out_csv = tmp_path / "sampled.csv"
    run("benchmarks/bench_sampled.py", "--device", "cpu", "--n", "64", "--k", "16", "--v", "500", "--d", "16",
        "--repeats", "1", "--providers", "torch_materialised,lv_torch", "--out", str(out_csv))
    rows = read_csv(out_csv)
    assert {(r["provider"], r["layout"]) for r in rows} == {
        (p, layout) for p in ("torch_materialised", "lv_torch") for layout in ("rows", "shared")}


def test_ce_benchmark_sweeps_shapes_and_approximate_losses(tmp_path):
    out_csv = tmp_path / "sweep.csv"
    run("benchmarks/bench_ce.py", "--device", "cpu", "--n", "32", "--v", "300,600", "--d", "8", "--repeats", "1",
        "--providers", "torch_eager,lv_sce", "--out", str(out_csv))
    rows = read_csv(out_csv)
    want = [(v, p) for v in ("300", "600") for p in ("torch_eager", "lv_sce")]
    assert [(r["v"], r["provider"]) for r in rows] == want
    assert [r["approximate"] for r in rows[:2]] == ["False", "True"]
    table = run("benchmarks/summarize.py", str(out_csv))
    assert table.count("| lv_sce |") == 2 and "V=600" in table


def test_gpu_session_script_plumbing_at_toy_sizes(tmp_path):
    """The GPU stages' commands run end to end (SMOKE=1: toy sizes on this machine), and a bad stage is refused."""
    script = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", script, "ce"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["provider"] for r in read_csv(tmp_path / "ce.csv")} == {"torch_eager", "lv_torch"}
    bad = subprocess.run(["bash", script, "nonsense"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr
    no_data = subprocess.run(["bash", script, "sasrec"], capture_output=True, text=True, cwd=ROOT,
                             env={**env, "REC": str(tmp_path / "none")})
    assert no_data.returncode == 2 and "run the fetch stage" in no_data.stderr


def test_gpu_session_sasrec_stage_at_toy_sizes(tmp_path):
    """The sasrec stage runs a study job through the runner and brings back its row (SMOKE=1: one epoch of 64
    ML-1M users at window 16 instead of the job's own settings; one job instead of four)."""
    import json

    rec = os.path.join(ROOT, "..", "shared", "data", "rec")
    if not os.path.isfile(os.path.join(rec, "ml-1m.txt")):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the shared data: {rec}/ml-1m.txt is missing")
        pytest.skip(f"shared data not found at {rec}")
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable, REC=rec, SASREC_JOBS="ml_gbce_s0")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), "sasrec"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = json.loads((tmp_path / "sasrec" / "ml_gbce_s0.json").read_text())["rows"][0]
    assert row["epochs_run"] == 1 and row["train_config"]["time_budget_s"] <= 120
    assert row["model_config"]["max_len"] == 16 and row["argv"][row["argv"].index("--preset") + 1] == "gsasrec"


@pytest.mark.xdist_group("accelerate_launch")
def test_sasrec_benchmark_runs_single_and_under_accelerate_with_two_processes(tmp_path):
    out_csv = tmp_path / "sasrec.csv"
    common = ["--catalogues", "1500", "--batch-size", "8", "--max-len", "16", "--dim", "16", "--steps", "2"]
    run("benchmarks/bench_sasrec.py", *common, "--losses", "ce,cce,sce", "--out", str(out_csv))
    run("benchmarks/bench_sasrec.py", *common, "--losses", "cce", "--processes", "2", "--out", str(out_csv))
    rows = read_csv(out_csv)
    assert [(r["provider"], r["processes"]) for r in rows] == [("ce", "1"), ("cce", "1"), ("sce", "1"), ("cce", "2")]
    assert all(int(r["num_items"]) == 1500 and float(r["ms"]) > 0 for r in rows)


def test_popularity_floor_is_the_minimum_of_our_gbce_loss_over_per_item_scores(monkeypatch):
    """benchmarks/sasrec_popularity_floor.py's closed form against the loss the trainer runs (losses.py), with one
    score per item as the 'model' and the expectation over negatives taken by Monte Carlo: equal at the closed-form
    scores, larger when they move."""
    import numpy as np
    import torch

    from largevocab.integrations.sasrec.losses import GeneralisedBinaryCrossEntropy, gbce_beta

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from sasrec_popularity_floor import popularity_floor, target_frequencies

    v, k, t = 300, 64, 0.75
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, v + 1)
    histories = [rng.choice(np.arange(1, v + 1), size=int(rng.integers(2, 40)), p=zipf / zipf.sum())
                 for _ in range(3000)]
    q = target_frequencies(histories, v, max_len=20)
    beta = gbce_beta(k, v, t)
    floor = popularity_floor(q, k, beta)

    loss = GeneralisedBinaryCrossEntropy(num_negatives=k, t=t, seed=1)
    targets = torch.from_numpy(rng.choice(v, size=40_000, p=q))  # 0-based, as compute() takes them
    seen = q > 0
    best = torch.full((v,), -30.0, dtype=torch.float64)
    best[torch.from_numpy(seen)] = torch.from_numpy(np.log(beta * q[seen] * v / k))

    def expected(scores):
        loss.reseed(1)
        hidden = torch.ones(len(targets), 1, dtype=torch.float64)
        return float(loss.compute(hidden, scores.unsqueeze(1), targets))

    at_best = expected(best)
    # The sampled targets' frequencies differ from q by ~1/sqrt(40k) per item: the floor holds to about 1%.
    assert at_best == pytest.approx(floor, rel=0.01)
    for shift in (-0.5, 0.5):
        assert expected(best + shift) > at_best * 1.01


def test_gsasrec_reference_log_is_collected_epoch_by_epoch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from collect_gsasrec_reference import collect

    (tmp_path / "train_stdout.txt").write_text(
        "Total params: 1\nEpoch 0 evaluation result: {nDCG@10: 0.0, R@1: 0.0, R@10: 0.0}\n"
        "Epoch 1 evaluation result: {nDCG@10: 0.0012040915477533397, R@1: 0.0, R@10: 0.00390625}\n")
    (tmp_path / "train_stderr.txt").write_text(
        "Epoch 0 loss: 3.99:  21%|##  | 10/48\rEpoch 0 loss: 2.68: 100%|####| 48/48\r"
        "Epoch 1 loss: 0.9: 50%\rEpoch 1 loss: 0.82: 100%|####| 48/48\n")
    (tmp_path / "test_stdout.txt").write_text("{nDCG@10: 0.0011, R@1: 0.0, R@10: 0.0021}\n")
    row = collect(str(tmp_path))
    assert [(h["epoch"], h["train_loss"], h["valid"]["nDCG@10"]) for h in row["history"]] == [
        (1, 2.68, 0.0), (2, 0.82, 0.0012040915477533397)]
    assert row["best_epoch"] == 2 and row["test"] == {"nDCG@10": 0.0011, "R@1": 0.0, "R@10": 0.0021}

    from sasrec_repro_table import reference_table

    line = reference_table([{**row, "repository": "asash/gSASRec-pytorch", "commit": "7e350285fb0123",
                             "config": "config_ml1m.py", "validation": "512 users", "stopped_by": "time limit",
                             "changes": ["one"]}]).splitlines()[-1]
    assert line == ("| asash/gSASRec-pytorch | 7e350285fb | config_ml1m.py | 0.0011 | 0.0021 | 2 / 2 | 512 users "
                    "| time limit | 1 (in the row's JSON) |")


def test_repro_curves_table_lines_runs_up_by_epoch_and_measures_the_seed_spread(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from sasrec_repro_table import curves_table, main

    def row(run, seed, curve, *extra):
        argv = ["--data", "x/ml-1m.txt", "--loss", "ce", "--preset", "sasrec+", "--seed", str(seed), *extra]
        return {"run": run, "loss": "ce", "argv": argv,
                "history": [{"epoch": e, "valid_ndcg@10": v} for e, v in enumerate(curve, start=1)]}

    rows = [row("s0", 0, [0.10, 0.20]), row("s1", 1, [0.14, 0.30, 0.31], "--resume"),
            row("mlet", 0, [0.05], "--hidden-dim", "16")]
    lines = curves_table(rows, [1, 3]).splitlines()
    assert lines[2:] == [
        "| s0 | ce | --preset sasrec+ | 0.1000 | - |",
        "| s1 | ce | --preset sasrec+ --resume | 0.1400 | 0.3100 |",
        "| mlet | ce | --preset sasrec+ --hidden-dim 16 | 0.0500 | - |",
        # Seeds 0 and 1 (the resumed run is the same run): (0.14 - 0.10) / 0.12 at epoch 1; one run reached epoch 3.
        "| spread of 2 seeds | ce | --preset sasrec+ | 33.3% (2) | - |"]
    with pytest.raises(SystemExit):
        main(["--at-epochs", "ten", "unused.json"])


def test_sasrec_study_runner_continues_unfinished_runs_and_collects_each_call(tmp_path, monkeypatch, capsys):
    """benchmarks/sasrec_study.py: a run stopped resumably (here by --chunk-epochs) is continued with --resume by
    the next call of the runner and collected after each; a finished one is skipped; bad job files are named."""
    import json
    import random

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from sasrec_study import load_jobs, main

    rng = random.Random(0)
    data = tmp_path / "rec"
    data.mkdir()
    (data / "toy.txt").write_text("".join(f"{u} {rng.randint(1, 30)}\n" for u in range(1, 41) for _ in range(8)))
    jobs = tmp_path / "jobs.json"
    args = ["--data", "$REC/toy.txt", "--loss", "ce", "--hidden-dim", "8", "--max-len", "8", "--batch-size", "16",
            "--epochs", "2", "--chunk-epochs", "1", "--device", "cpu"]
    jobs.write_text(json.dumps([{"name": "toy", "args": args, "min": 1}]))
    common = [str(jobs), "--until", "2999-01-01 00:00", "--runs-dir", str(tmp_path / "runs"), "--results",
              str(tmp_path / "results"), "--data-dir", str(data), "--reserve", "0"]
    epochs_run = []
    for _ in range(3):
        assert main(common) == 0
        epochs_run.append(json.loads((tmp_path / "results" / "toy.json").read_text())["rows"][0]["epochs_run"])
    out = capsys.readouterr().out
    assert epochs_run == [1, 2, 2] and "toy: started" in out and "toy: continued" in out
    assert "toy: finished earlier, skipped" in out
    assert main([*common[:1], "--until", "2000-01-01 00:00", *common[3:]]) == 0  # past deadline: nothing runs
    jobs.write_text(json.dumps([{"name": "a", "args": ["--out", "x"]}]))
    with pytest.raises(ValueError, match=r"job 'a' sets \['--out'\]"):
        load_jobs(str(jobs))
    jobs.write_text(json.dumps([{"name": "a", "args": []}, {"name": "a", "args": []}]))
    with pytest.raises(ValueError, match=r"job names repeat: \['a'\]"):
        load_jobs(str(jobs))
    jobs.write_text(json.dumps([{"name": "a", "args": []}]))
    with pytest.raises(ValueError, match=r"--only: no jobs named \['b'\]"):
        load_jobs(str(jobs), ["b"])


def test_sasrec_study_runner_overrides_for_short_sessions(tmp_path, monkeypatch, capsys):
    """--cap and --min-budget replace every job's cap/min, --extra appends flags (the last value wins), and --extra
    may not set what the runner sets."""
    import json

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from sasrec_study import main

    data = tmp_path / "rec"
    data.mkdir()
    (data / "toy.txt").write_text("".join(f"{u} {1 + (u * 7 + k) % 25}\n" for u in range(1, 31) for k in range(8)))
    jobs = tmp_path / "jobs.json"
    args = ["--data", "$REC/toy.txt", "--loss", "ce", "--hidden-dim", "8", "--max-len", "8", "--epochs", "3",
            "--device", "cpu"]
    jobs.write_text(json.dumps([{"name": "toy", "args": args, "min": 100_000}]))
    common = [str(jobs), "--until", "2999-01-01 00:00", "--runs-dir", str(tmp_path / "runs"), "--results",
              str(tmp_path / "results"), "--data-dir", str(data)]
    assert main(common) == 0 and "toy: 9000 s left before the deadline, skipped" in capsys.readouterr().out
    assert not (tmp_path / "results" / "toy.json").exists()  # the job's min (100,000 s) was not met
    assert main([*common, "--min-budget", "1", "--cap", "77", "--extra", "--epochs 1 --batch-size 8"]) == 0
    assert "toy: started, budget 77 s" in capsys.readouterr().out
    row = json.loads((tmp_path / "results" / "toy.json").read_text())["rows"][0]
    config = row["train_config"]
    assert row["epochs_run"] == 1 and config["max_epochs"] == 1 and config["batch_size"] == 8
    assert config["time_budget_s"] == 77
    with pytest.raises(SystemExit):
        main([*common, "--extra", "--out elsewhere"])
    assert "--extra must not set" in capsys.readouterr().err


def test_sasrec_study_jobs_file_is_valid_and_names_every_committed_row(monkeypatch):
    """Every row of the study has its job (name and flags) in benchmarks/sasrec_study_jobs.json."""
    import glob
    import json

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from sasrec_study import load_jobs

    jobs = {job["name"]: job for job in load_jobs(os.path.join(ROOT, "benchmarks", "sasrec_study_jobs.json"))}
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", "sasrec_repro_2026-12-01", "ml_*.json")):
        name = os.path.basename(path)[:-len(".json")]
        with open(path) as f:
            row = json.load(f)["rows"][0]
        argv, i = [], 0
        while i < len(row["argv"]):  # the row's argv without what the runner sets, the data under $REC
            a = row["argv"][i]
            if a in ("--out", "--time-budget", "--threads", "--device"):
                i += 2
                continue
            if a not in ("--resume", "--no-progress"):
                argv.append("$REC/" + os.path.basename(a) if argv[-1:] == ["--data"] else a)
            i += 1
        assert name in jobs and argv == jobs[name]["args"], name


def test_sasrec_loss_memory_builds_each_job_from_its_flags(tmp_path, monkeypatch, capsys):
    import json
    import random

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from sasrec_loss_memory import main

    rng = random.Random(1)
    (tmp_path / "toy.txt").write_text("".join(f"{u} {rng.randint(1, 300)}\n" for u in range(1, 41) for _ in range(9)))
    jobs = tmp_path / "jobs.json"
    common = ["--data", "$REC/toy.txt", "--hidden-dim", "8", "--max-len", "8", "--batch-size", "32"]
    jobs.write_text(json.dumps([{"name": "full", "args": [*common, "--loss", "ce"]},
                                {"name": "fused", "args": [*common, "--loss", "cce"]}]))
    out = tmp_path / "memory.csv"
    assert main([str(jobs), "--data-dir", str(tmp_path), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [r["job"] for r in rows] == ["full", "fused"] and rows[0]["positions"] == rows[1]["positions"]
    logits_mib = int(rows[0]["positions"]) * int(rows[0]["items"]) * 4 / 2**20
    assert float(rows[0]["loss_peak_MiB"]) >= 2 * logits_mib > float(rows[1]["loss_peak_MiB"])
    assert "| full | ce |" in capsys.readouterr().out
