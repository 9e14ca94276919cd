"""Figures from bench_ce.py / bench_catalogue.py CSVs: time and peak memory against vocabulary size (log scales).

    python benchmarks/plot.py benchmarks/results/ce_cpu_2026-11-23.csv --out benchmarks/results/ce_cpu.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

MODE = "forward+backward"


def load(paths: list[str], mode: str) -> dict[str, list[tuple[int, float, float]]]:
    """provider -> sorted [(V, ms, peak MiB)] for rows of ``mode`` (rows without a mode column count)."""
    series = defaultdict(list)
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("mode", mode) != mode:
                    continue
                series[row["provider"]].append(
                    (int(row["v"]), float(row["ms"]), int(row["peak_extra_bytes"]) / 2**20))
    return {p: sorted(points) for p, points in series.items()}


def plot(series, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for provider, points in series.items():
        vocab = [p[0] for p in points]
        time_ax.plot(vocab, [p[1] for p in points], marker="o", label=provider)
        mem_ax.plot(vocab, [p[2] for p in points], marker="o", label=provider)
    for ax, label in ((time_ax, "time per step (ms)"), (mem_ax, "peak extra memory (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="vocabulary / catalogue size V", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--mode", default=MODE)
    parser.add_argument("--title", default="largevocab losses against full cross-entropy")
    args = parser.parse_args(argv)
    series = load(args.csv, args.mode)
    if not series:
        parser.error(f"no rows with mode {args.mode!r} in {args.csv}")
    plot(series, args.out, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
