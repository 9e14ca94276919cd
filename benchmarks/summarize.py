"""Markdown table of a results CSV from bench_ce.py: time and peak extra memory relative to torch eager.

    python benchmarks/summarize.py benchmarks/results/ce_cpu_2026-11-23.csv [--mode forward+backward]
"""

from __future__ import annotations

import argparse
import csv

BASELINES = ("torch_eager", "full_ce")  # bench_ce.py / bench_catalogue.py name for materialised full CE


def table(rows: list[dict], mode: str) -> str:
    """One markdown table per (N, V, D) shape in the file."""
    shapes = sorted({(int(r["n"]), int(r["v"]), int(r["d"])) for r in rows})
    blocks = []
    for n, v, d in shapes:
        same = [r for r in rows if (int(r["n"]), int(r["v"]), int(r["d"])) == (n, v, d)]
        heading = f"N={n}, V={v}, D={d}, {same[0]['dtype']}, {same[0].get('mode', mode)}" if len(shapes) > 1 else ""
        blocks.append((heading + "\n\n" if heading else "") + _shape_table(same, mode))
    return "\n\n".join(blocks)


def _shape_table(rows: list[dict], mode: str) -> str:
    rows = [r for r in rows if r.get("mode", mode) == mode]
    base = next((r for r in rows if r["provider"] in BASELINES), None)
    has_error = all("loss_abs_error" in r for r in rows)
    last = "loss error vs float64" if has_error else "loss"
    lines = [f"| provider | time (ms) | vs full CE | peak extra (MiB) | vs full CE | {last} |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms, peak = float(r["ms"]), int(r["peak_extra_bytes"])
        rel_t = f"{ms / float(base['ms']):.2f}x" if base else "-"
        rel_m = f"{peak / int(base['peak_extra_bytes']):.1%}" if base else "-"
        value = f"{float(r['loss_abs_error']):.1e}" if has_error else f"{float(r['loss']):.4f}"
        lines.append(f"| {r['provider']} | {ms:.0f} | {rel_t} | {peak / 2**20:.0f} | {rel_m} | {value} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--mode", default="forward+backward")
    args = parser.parse_args(argv)
    with open(args.csv) as f:
        print(table(list(csv.DictReader(f)), args.mode))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
