"""Compile every Triton kernel variant for a GPU target on a machine without a GPU, and report its resources.

The CPU interpreter runs the kernels' arithmetic but not the compiler: it accepts code that the GPU compiler
rejects (a non-constexpr global, a dot too small for the target) and never allocates shared memory or
registers. This script runs the real launchers (``largevocab.ops.triton_*``) on CPU tensors with Triton's active
driver replaced by one that names a GPU target and with each launch turned into a compile-only warm-up, so every
kernel is lowered to a cubin with the exact constexprs, options and block sizes it would get on that GPU.

Per compiled kernel it reports shared memory (against the target's per-block limit), registers, spill bytes
(stack + local, from ``cuobjdump``) and whether the PTX uses tensor cores (``wgmma`` on sm_90, ``mma`` before).
Exit status 1 when a variant fails to compile or overflows shared memory even after the launchers' fallback.

    python benchmarks/kernel_resources.py --arch 90            # Markdown table
    python benchmarks/kernel_resources.py --arch 80 --json     # one JSON object per line

Needs the ``triton`` wheel only (its bundled ptxas and cuobjdump); no CUDA driver, no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# The launchers pick their GPU configuration only when the interpreter is off, at import time.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_resources.py compiles for a GPU target: run it with TRITON_INTERPRET unset")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import largevocab  # noqa: E402, F401  (registers the custom ops the variants call)
from largevocab.ops import _launch  # noqa: E402

WARP_SIZE = 32
# Largest dynamic shared memory one block may opt into (CUDA programming guide, compute capabilities table).
SHARED_LIMIT_BYTES = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
# SM counts only steer the forward's vocabulary split, which does not change what is compiled.
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
# Small problem: compilation depends on dtypes and constexprs, not on sizes (sizes only pick the grid).
N, V, D, K = 300, 1_000, 96, 200
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


@dataclass
class KernelReport:
    variant: str
    kernel: str
    num_warps: int
    num_stages: int
    block_columns: int
    block_d: int
    tries: int
    shared_bytes: int
    shared_limit: int
    registers: int
    spill_bytes: int
    tensor_cores: bool


class _CompileOnlyDriver:
    """Just enough of Triton's driver interface for ``JITFunction.run`` to compile for ``target``."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, WARP_SIZE)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


class _DeviceProperties:
    def __init__(self, arch: int):
        self.multi_processor_count = SM_COUNT[arch]


@contextmanager
def compile_only(arch: int, sink: list):
    """Launches compile for sm_``arch``; nothing runs. A kernel over the target's shared memory raises
    OutOfResources; one that fits appends ``(name, CompiledKernel, column block, BLOCK_D, tries)`` to ``sink``."""
    run = JITFunction.run
    get_props = torch.cuda.get_device_properties
    # Not reset_active(): that would build the default driver, which fails where there is no GPU.
    active = driver._active

    limit = SHARED_LIMIT_BYTES[arch]
    rejected: dict[str, int] = {}

    def warm_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        name = self.fn.__name__
        # What the real launch checks first (CompiledKernel._init_handles), so the launchers' fallback runs.
        if kernel.metadata.shared > limit:
            rejected[name] = rejected.get(name, 0) + 1
            raise OutOfResources(kernel.metadata.shared, limit, "shared memory")
        columns = next(kwargs[k] for k in ("BLOCK_V", "BLOCK_K", "BLOCK_C") if k in kwargs)
        sink.append((name, kernel, columns, kwargs["BLOCK_D"], rejected.pop(name, 0) + 1))
        return kernel

    JITFunction.run = warm_run
    _launch._fitted.clear()
    torch.cuda.get_device_properties = lambda device=None: _DeviceProperties(arch)
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield
    finally:
        JITFunction.run = run
        torch.cuda.get_device_properties = get_props
        driver._active = active
        _launch._fitted.clear()


def _inputs(dtype: torch.dtype, rows: int = N):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, D, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (rows,), generator=g)
    return hidden, weight, targets, torch.ones(rows, dtype=torch.bool)


def _ce(dtype, *, bias=False, deterministic=False, with_lse=False, **options):
    def call():
        hidden, weight, targets, valid = _inputs(dtype)
        b = torch.zeros(V, dtype=dtype, requires_grad=True) if bias else None
        loss, lse, *_ = torch.ops.largevocab.linear_cross_entropy(
            hidden, weight, b, targets, -100, "none", options.get("label_smoothing", 0.0),
            options.get("z_loss", 0.0), options.get("softcap"), options.get("filter_eps"), "triton", [False] * 3,
            True)
        total = loss.sum() + (lse.sum() if with_lse else 0)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            total.backward()
        finally:
            torch.use_deterministic_algorithms(previous)
    return call


def _sampled(dtype, *, shared, correction, remove_hits=True):
    def call():
        hidden, weight, targets, valid = _inputs(dtype)
        g = torch.Generator().manual_seed(1)
        negatives = torch.randint(0, V, (K,) if shared else (N, K), generator=g)
        corr = torch.rand(V, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        loss, _ = torch.ops.largevocab.sampled_cross_entropy(hidden, weight, targets, valid, negatives,
                                                             corr if correction else None, remove_hits, "triton")
        loss.sum().backward()
    return call


def _sce(dtype):
    def call():
        hidden, weight, targets, _ = _inputs(dtype)
        g = torch.Generator().manual_seed(2)
        rows = torch.randint(0, N, (8, 40), generator=g)
        cols = torch.randint(0, V, (8, 256), generator=g)
        lse, positive = torch.ops.largevocab.bucket_lse(hidden, weight, targets, rows, cols, "triton")
        (lse.sum() + positive.sum()).backward()
    return call


def _log_probs(dtype, *, bias=False, entropy=False, softcap=None, temperature=1.0):
    def call():
        hidden, weight, targets, _ = _inputs(dtype)
        b = torch.zeros(V, dtype=dtype, requires_grad=True) if bias else None
        logp, ent, _ = torch.ops.largevocab.linear_log_probs(hidden, weight, b, targets, -100, softcap, temperature,
                                                            entropy, "triton", True)
        (logp.sum() + (ent.sum() if entropy else 0)).backward()
    return call


def _argmax(dtype):
    def call():
        hidden, weight, _, _ = _inputs(dtype)
        torch.ops.largevocab.linear_argmax(hidden.detach(), weight.detach(), torch.zeros(V, dtype=dtype), 30.0,
                                           "triton")
    return call


def _distill(dtype, kind, *, bias=False):
    def call():
        hidden, weight, _, valid = _inputs(dtype)
        g = torch.Generator().manual_seed(3)
        teacher = [torch.randn(N, D + 32, generator=g).to(dtype), torch.randn(V, D + 32, generator=g).to(dtype)]
        bs, bt = (torch.zeros(V, dtype=dtype, requires_grad=True), torch.zeros(V, dtype=dtype)) if bias else (None,) * 2
        loss, *_ = torch.ops.largevocab.linear_distillation_loss(hidden, weight, bs, *teacher, bt, valid, kind, 0.5,
                                                                 0.7, "none", True, "triton", [False] * 3)
        loss.sum().backward()
    return call


def variants(dtypes=tuple(DTYPES)) -> dict:
    """Every distinct compile the library can ask for: each dtype with options off and all on, and each mode."""
    out = {}
    for name in dtypes:
        dtype = DTYPES[name]
        out[f"ce {name} default"] = _ce(dtype)
        out[f"ce {name} all options"] = _ce(dtype, bias=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                                            with_lse=True)
        out[f"ce {name} filtered"] = _ce(dtype, filter_eps=2.0 ** -12)
        out[f"ce {name} deterministic"] = _ce(dtype, deterministic=True)
        out[f"ce {name} deterministic all options"] = _ce(dtype, bias=True, label_smoothing=0.1, softcap=30.0,
                                                          deterministic=True, with_lse=True)
        for shared in (False, True):
            kind = "shared" if shared else "per-row"
            out[f"sampled {name} {kind}"] = _sampled(dtype, shared=shared, correction=False, remove_hits=False)
            out[f"sampled {name} {kind} logq+hits"] = _sampled(dtype, shared=shared, correction=True)
        out[f"sce {name}"] = _sce(dtype)
        out[f"logp {name} default"] = _log_probs(dtype)
        out[f"logp {name} all options"] = _log_probs(dtype, bias=True, entropy=True, softcap=30.0, temperature=0.7)
        out[f"argmax {name}"] = _argmax(dtype)
        out[f"distill {name} forward_kl"] = _distill(dtype, "forward_kl")
        out[f"distill {name} reverse_kl bias"] = _distill(dtype, "reverse_kl", bias=True)
        out[f"distill {name} jsd bias"] = _distill(dtype, "jsd", bias=True)
    return out


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) of the cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return int(fields["REG"]), int(fields["STACK"]) + int(fields["LOCAL"])


def _tensor_cores(ptx: str) -> bool:
    return bool(re.search(r"\b(wgmma|mma)\.", ptx))


def _error_line(exc: Exception) -> str:
    """One line for the table: a CompilationError's message is source context ending in a caret; its cause says why."""
    cause = exc.__cause__ or exc
    lines = [line for line in str(cause).splitlines() if line.strip(" ^")]
    return f"{type(cause).__name__}: {lines[-1].strip() if lines else ''}"


def collect(arch: int, only: str | None = None, dtypes=tuple(DTYPES)) -> tuple[list[KernelReport], dict[str, str]]:
    """Compile the variants of ``dtypes`` (those whose name contains ``only``) for sm_``arch``.

    Returns (reports, errors by variant).
    """
    reports, errors = [], {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for label, call in variants(dtypes).items():
        if only and only not in label:
            continue
        sink = []
        torch.backends.cuda.matmul.allow_tf32 = label.split()[1] == "tf32"
        try:
            with compile_only(arch, sink):
                call()
        except Exception as exc:  # noqa: BLE001 - a compile error of any kind is the finding to report
            errors[label] = _error_line(exc)
            continue
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        for kernel_name, kernel, columns, block_d, tries in sink:
            md = kernel.metadata
            regs, spills = _resources(kernel.asm["cubin"])
            reports.append(KernelReport(
                variant=label, kernel=kernel_name, num_warps=md.num_warps, num_stages=md.num_stages,
                block_columns=columns, block_d=block_d, tries=tries,
                shared_bytes=md.shared, shared_limit=SHARED_LIMIT_BYTES[arch],
                registers=regs, spill_bytes=spills, tensor_cores=_tensor_cores(kernel.asm["ptx"]),
            ))
    return reports, errors


def markdown(arch: int, reports: list[KernelReport], errors: dict[str, str]) -> str:
    lines = [
        f"Triton {triton.__version__}, torch {torch.__version__}, target sm_{arch} "
        f"(shared limit {SHARED_LIMIT_BYTES[arch]} B per block)",
        "",
        "| variant | kernel | tries | warps | stages | BLOCK_V/K/C | BLOCK_D | shared B | registers | spill B | "
        "tensor cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        cells = [r.variant, r.kernel, r.tries, r.num_warps, r.num_stages, r.block_columns, r.block_d,
                 r.shared_bytes, r.registers, r.spill_bytes,
                 "yes" if r.tensor_cores else "no"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [f"| {label} | **compile error** | | | | | | | | | {err} |" for label, err in errors.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT_BYTES),
                        help="compute capability x 10 (80 = A100, 86/89 = consumer Ampere/Ada, 90 = H100/H200)")
    parser.add_argument("--only", default=None, help="compile only variants whose name contains this")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {list(DTYPES)}")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel, errors as {variant, error}")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        parser.error(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    reports, errors = collect(args.arch, args.only, dtypes)
    if args.json:
        for r in reports:
            print(json.dumps(asdict(r)))
        for label, err in errors.items():
            print(json.dumps({"variant": label, "error": err}))
    else:
        print(markdown(args.arch, reports, errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
