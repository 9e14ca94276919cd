"""Post-training heads: time and peak extra memory of fused log-probs+entropy and distillation against the rest.

    python benchmarks/bench_posttrain.py --task grpo --n 8192 --v 151936 --d 1024          # GRPO-shaped, Qwen V
    python benchmarks/bench_posttrain.py --task distill --n 4096 --v 131072 --d 512 --d-teacher 1024

``grpo``: per-token log-probs and entropies at temperature 0.9 of N completion tokens, then backward of a GRPO-like
objective ``-sum(advantage * logp) - 0.01 * sum(entropy)`` (per-token upstream gradients, as GRPO's are). Providers:
materialised ``log_softmax`` + gather + entropy (``materialised``), TRL's materialised ``selective_log_softmax`` +
``entropy_from_logits`` (``trl_selective``), TRL's chunked fused head ``ChunkedLogProbFunction`` (``trl_chunked``,
what its trainers call), Liger's ``LigerFusedLinearGRPOLoss`` (``liger``: chunked PyTorch, its own clipped
objective without the entropy, N tokens as completions of 1024), and ``lv.linear_log_probs`` (``lv_torch``,
``lv_triton`` on CUDA).

``distill``: ``forward_kl`` and ``jsd`` (beta 0.5) between a student (D) and a teacher (D_T) head, mean over
tokens, backward to the student. Providers: materialised ``F.kl_div`` on both log-softmaxes, TRL's
``ChunkedDivergenceFunction`` (``trl_chunked``), Liger's chunked ``LigerFusedLinearJSDLoss`` (``liger``, soft
term only; beta 0 is its forward KL) and its Triton ``LigerFusedLinearJSD`` (``liger_triton``, CUDA), and
``lv.linear_distillation_loss``. Liger is not a dependency: ``pip install --no-deps liger-kernel`` (or put it on
``PYTHONPATH``) to include it; without it its rows say why they were skipped.

Each provider runs in a fresh subprocess (peak memory its own: CPU peak RSS above what the inputs held, CUDA
allocator peak); time is the median of the repeats after one warm-up. A provider whose estimated peak exceeds the
available memory is skipped with the estimate rather than started (an out-of-memory kill could hit another
process). The floors beside each result: GEMM FLOPs (2·N·V·D per pass over a head, passes as each algorithm
needs) and the bytes of the inputs and gradients.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date

import torch
import torch.nn.functional as F

from largevocab.profiling import PeakMemory

from harness import append_csv, device_name, run_worker, time_ms, versions

TASKS = ("grpo", "distill")
PROVIDERS = {"grpo": ("materialised", "trl_selective", "trl_chunked", "liger", "lv_torch", "lv_triton"),
             "distill": ("materialised", "trl_chunked", "liger", "liger_triton", "lv_torch", "lv_triton")}
CUDA_ONLY = ("lv_triton", "liger_triton")
KINDS = ("forward_kl", "jsd")
TEMPERATURE = 0.9
ENTROPY_WEIGHT = 0.01
JSD_BETA = 0.5
# Tokens per completion when Liger's GRPO loss (which chunks by sequence) gets the N tokens as sequences.
LIGER_COMPLETION_LEN = 1024
SEED = 0
# Live (N, V) float32 buffers at the peak of each materialised provider's forward+backward (counted from its code:
# logits, log-softmax, softmax / products and their gradients); the chunked providers hold O(chunk x V).
MATERIALISED_BUFFERS = {"grpo": 5, "distill": 8}
MEMORY_HEADROOM = 0.8
RESULT_COLUMNS = ("provider", "kind", "ms", "peak_extra_bytes", "loss", "skipped")


def make_inputs(args):
    gen = torch.Generator().manual_seed(SEED)
    n, v, d = args.n, args.v, args.d
    hidden = torch.randn(n, d, generator=gen).to(args.device)
    weight = (torch.randn(v, d, generator=gen) * 2.0 * d**-0.5).to(args.device)
    targets = torch.randint(0, v, (n,), generator=gen).to(args.device)
    extra = {"advantage": torch.randn(n, generator=gen).to(args.device)}
    if args.task == "distill":
        dt = args.d_teacher
        extra["teacher_hidden"] = torch.randn(n, dt, generator=gen).to(args.device)
        extra["teacher_weight"] = (torch.randn(v, dt, generator=gen) * 2.0 * dt**-0.5).to(args.device)
    return hidden, weight, targets, extra


def _grpo_objective(logp, entropy, advantage):
    return -(advantage * logp).sum() - ENTROPY_WEIGHT * entropy.sum()


def build_grpo(provider):
    """``(hidden, weight, targets, extra) -> scalar`` for one GRPO provider, or raise ImportError."""
    import largevocab as lv

    if provider == "materialised":
        def fn(h, w, y, extra):
            log_p = (h @ w.T / TEMPERATURE).log_softmax(-1)
            logp = log_p.gather(-1, y[:, None])[:, 0]
            entropy = -(log_p.exp() * log_p).sum(-1)
            return _grpo_objective(logp, entropy, extra["advantage"])
        return fn
    if provider == "trl_selective":
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        def fn(h, w, y, extra):
            logits = h @ w.T / TEMPERATURE
            return _grpo_objective(selective_log_softmax(logits, y), entropy_from_logits(logits), extra["advantage"])
        return fn
    if provider == "trl_chunked":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def fn(h, w, y, extra):
            logp, entropy, *_ = ChunkedLogProbFunction.apply(h, w, None, y, TEMPERATURE, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                             None, 1.0, ("log_probs", "entropy"))
            return _grpo_objective(logp, entropy, extra["advantage"])
        return fn
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # Its own GRPO objective (clipped ratio, no entropy term) over (sequences, completion length); it chunks by
        # sequence, so one sequence of all N tokens would materialise every logit.
        loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, temperature=TEMPERATURE)

        def fn(h, w, y, extra):
            n = h.shape[0]
            if n > LIGER_COMPLETION_LEN and n % LIGER_COMPLETION_LEN:
                # Falling back to one sequence would time Liger with every logit materialised.
                raise ValueError(f"liger: N = {n} is not a multiple of its completion length {LIGER_COMPLETION_LEN}")
            seqs = max(1, n // LIGER_COMPLETION_LEN)
            h, y = h.view(seqs, -1, h.shape[-1]), y.view(seqs, -1)
            return loss(h, w, y, torch.ones_like(y), extra["advantage"][:seqs])[0]
        return fn
    if provider in ("lv_torch", "lv_triton"):
        backend = provider.removeprefix("lv_")

        def fn(h, w, y, extra):
            logp, entropy = lv.linear_log_probs(h, w, y, temperature=TEMPERATURE, return_entropy=True,
                                                backend=backend)
            return _grpo_objective(logp, entropy, extra["advantage"])
        return fn
    raise ValueError(f"unknown provider {provider!r}")


def build_distill(provider, kind):
    import largevocab as lv

    beta = 0.0 if kind == "forward_kl" else JSD_BETA
    if provider == "materialised":
        def fn(h, w, y, extra):
            log_s = (h @ w.T).log_softmax(-1)
            with torch.no_grad():
                log_t = (extra["teacher_hidden"] @ extra["teacher_weight"].T).log_softmax(-1)
            if kind == "forward_kl":
                return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean()
            log_m = torch.logaddexp(log_s + torch.log1p(torch.tensor(-beta)), log_t + torch.log(torch.tensor(beta)))
            kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
            kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
            return (beta * kl_t + (1 - beta) * kl_s).mean()
        return fn
    if provider == "trl_chunked":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def fn(h, w, y, extra):
            div, _ = ChunkedDivergenceFunction.apply(h, w, None, extra["teacher_hidden"], extra["teacher_weight"], None,
                                                     beta, 1.0)
            return div.mean()
        return fn
    if provider == "liger":
        # Liger's chunked (PyTorch, torch.compile'd) distillation loss, soft term only: beta 0 is its forward KL.
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta)
        return lambda h, w, y, extra: loss(h, w, extra["teacher_hidden"], extra["teacher_weight"], y)
    if provider == "liger_triton":
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=beta)
        return lambda h, w, y, extra: loss(h, w, extra["teacher_hidden"], extra["teacher_weight"])
    if provider in ("lv_torch", "lv_triton"):
        backend = provider.removeprefix("lv_")
        return lambda h, w, y, extra: lv.linear_distillation_loss(
            h, w, extra["teacher_hidden"], extra["teacher_weight"], kind=kind, beta=JSD_BETA, backend=backend)
    raise ValueError(f"unknown provider {provider!r}")


def worker(args) -> dict:
    hidden, weight, targets, extra = make_inputs(args)
    fn = build_grpo(args.provider) if args.task == "grpo" else build_distill(args.provider, args.kind)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def step():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets, extra)
        loss.backward()
        return loss

    with PeakMemory(args.device) as memory:
        loss = step()
    ms = time_ms(step, args.device, args.repeats)
    return {"provider": args.provider, "kind": args.kind, "ms": ms, "peak_extra_bytes": int(memory.extra_bytes),
            "loss": loss.item()}


def floors(args) -> dict:
    """GEMM FLOPs of the algorithms and the bytes of inputs + gradients (float32)."""
    n, v, d = args.n, args.v, args.d
    per_pass = 2 * n * v * d
    if args.task == "grpo":
        # Materialised: 1 forward GEMM + 2 backward; fused with a per-token upstream gradient: + 1 recompute.
        return {"gemm_flops_materialised": 3 * per_pass, "gemm_flops_fused": 4 * per_pass,
                "bytes_inputs_and_grads": 4 * 2 * (n * d + v * d), "bytes_logits_nxv": 4 * n * v}
    teacher = 2 * n * v * args.d_teacher
    # Materialised: student + teacher forward, 2 student backward GEMMs. Fused (torch, mean reduction): the same,
    # backward GEMMs in the forward pass; Triton: + 1 recompute of both (+ 1 more forward of both for the JSD).
    return {"gemm_flops_materialised": 3 * per_pass + teacher, "gemm_flops_fused_torch": 3 * per_pass + teacher,
            "gemm_flops_fused_triton_kl": 4 * per_pass + 2 * teacher,
            "gemm_flops_fused_triton_jsd": 5 * per_pass + 3 * teacher,
            "bytes_inputs_and_grads": 4 * (2 * (n * d + v * d) + n * args.d_teacher + v * args.d_teacher),
            "bytes_logits_nxv": 4 * n * v}


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _too_big(provider, args) -> str | None:
    if args.device == "cuda" or provider not in ("materialised", "trl_selective"):
        return None
    need = MATERIALISED_BUFFERS[args.task] * 4 * args.n * args.v
    available = _available_bytes()
    if available is not None and need > MEMORY_HEADROOM * available:
        return f"needs ~{need / 2**30:.1f} GiB of (N, V) buffers, {available / 2**30:.1f} GiB available"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="grpo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--v", type=int, default=151_936)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--d-teacher", type=int, default=1024)
    parser.add_argument("--providers", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--note", default="", help="conditions, e.g. 'under contention: load average 6 on 2 cores'")
    parser.add_argument("--out", default=None, help="CSV to append to")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.provider:  # worker process
        print(json.dumps(worker(args)))
        return 0

    providers = args.providers.split(",") if args.providers else [
        p for p in PROVIDERS[args.task] if args.device == "cuda" or p not in CUDA_ONLY]
    kinds = KINDS if args.task == "distill" else ("",)
    meta = {"date": date.today().isoformat(), "device": device_name(args.device), "task": args.task, "n": args.n,
            "v": args.v, "d": args.d, "d_teacher": args.d_teacher if args.task == "distill" else "",
            "dtype": "float32", "note": args.note, **floors(args), "versions": json.dumps(versions())}
    print(f"{args.task}: N={args.n} V={args.v} D={args.d}"
          + (f" D_T={args.d_teacher}" if args.task == "distill" else "") + f" float32 on {meta['device']}",
          flush=True)
    rows = []
    for kind in kinds:
        for provider in providers:
            reason = _too_big(provider, args)
            result = None
            if reason is None:
                result, reason = run_worker(__file__, [
                    "--task", args.task, "--device", args.device, "--n", str(args.n), "--v", str(args.v),
                    "--d", str(args.d), "--d-teacher", str(args.d_teacher), "--repeats", str(args.repeats),
                    "--provider", provider, "--kind", kind])
            label = f"{provider} {kind}".strip()
            if result is None:
                rows.append({**meta, "provider": provider, "kind": kind, "skipped": reason})
                print(f"{label:>24}  skipped: {reason}", flush=True)
                continue
            rows.append({**meta, **result, "skipped": ""})
            print(f"{label:>24}  {result['ms'] / 1e3:8.1f} s  peak extra {result['peak_extra_bytes'] / 2**30:7.2f} GiB"
                  f"  loss {result['loss']:.6g}", flush=True)
    columns = [*meta, *RESULT_COLUMNS]
    rows = [{k: row.get(k, "") for k in columns} for row in rows]
    floor_keys = [k for k in meta if k.startswith(("gemm_flops", "bytes_"))]
    print("floors: " + ", ".join(f"{k} {meta[k] / (1e12 if 'flops' in k else 2**30):.2f}"
                                 f"{' TFLOP' if 'flops' in k else ' GiB'}" for k in floor_keys))
    append_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
