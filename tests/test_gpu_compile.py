"""Every Triton kernel variant compiles for real GPU targets and fits their shared memory, without a GPU.

The rest of the suite runs the kernels under the CPU interpreter, which accepts code the GPU compiler rejects
(non-constexpr globals, branch-dependent dtypes) and never allocates shared memory. These tests run
``benchmarks/kernel_resources.py`` (the real launchers, compile-only, Triton's bundled ptxas) for an H100 (sm_90,
227 KiB per block) and a consumer Ampere GPU (sm_86, 99 KiB), and test the launchers' shared-memory fallback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from triton.runtime.errors import OutOfResources

from largevocab.ops import _launch
from largevocab.ops._launch import MIN_BLOCK_D, launch, smaller
from largevocab.ops.triton_ce import FMA_BLOCK_COLUMNS, FMA_BLOCK_D, FMA_BLOCK_ROWS, FMA_WARPS

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "kernel_resources.py"
# Every dtype for the H100 the configurations are tuned for. On the 99 KiB consumer GPU, to keep the compile time
# down, the two with the largest tiles: tf32 (float32 operands) and bf16 (fp16 compiles the same way).
DTYPES_BY_ARCH = {90: ("fp32", "tf32", "bf16", "fp16", "fp64"), 86: ("tf32", "bf16")}
ARCHES = tuple(DTYPES_BY_ARCH)
# float64 mma (DMMA) exists on the data-centre parts only.
TENSOR_CORE_DTYPES = {90: ("tf32", "bf16", "fp16", "fp64"), 86: ("tf32", "bf16", "fp16")}
CE = {"_ce_fwd_kernel", "_ce_bwd_kernel"}
CE_DETERMINISTIC = {"_ce_fwd_kernel", "_ce_bwd_dh_kernel", "_ce_bwd_dw_kernel"}
SAMPLED_ROWS = {"_sampled_fwd_kernel", "_rows_bwd_kernel"}
SAMPLED_SHARED = {"_sampled_fwd_kernel", "_shared_bwd_kernel"}
SCE = {"_bucket_lse_fwd_kernel", "_bucket_lse_bwd_kernel"}
LOG_PROBS = {"_logp_fwd_kernel", "_logp_bwd_kernel"}
ARGMAX = {"_argmax_kernel"}
KL = {"_distill_fwd_kernel", "_distill_bwd_kernel"}
JSD = KL | {"_jsd_kernel"}


def _expected(dtypes) -> dict[str, set[str]]:
    out = {}
    for dt in dtypes:
        out |= {f"ce {dt} default": CE, f"ce {dt} all options": CE, f"ce {dt} filtered": CE,
                f"ce {dt} deterministic": CE_DETERMINISTIC, f"ce {dt} deterministic all options": CE_DETERMINISTIC,
                f"sampled {dt} per-row": SAMPLED_ROWS, f"sampled {dt} per-row logq+hits": SAMPLED_ROWS,
                f"sampled {dt} shared": SAMPLED_SHARED, f"sampled {dt} shared logq+hits": SAMPLED_SHARED,
                f"sce {dt}": SCE,
                f"logp {dt} default": LOG_PROBS, f"logp {dt} all options": LOG_PROBS, f"argmax {dt}": ARGMAX,
                f"distill {dt} forward_kl": KL, f"distill {dt} reverse_kl bias": KL, f"distill {dt} jsd bias": JSD}
    return out


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    """JSON rows of kernel_resources.py per target; both targets compile in parallel subprocesses."""
    if not _ptxas().exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: the triton wheel has no ptxas at {_ptxas()}")
        pytest.skip(f"this triton wheel has no NVIDIA toolchain ({_ptxas()} is missing)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        arch: subprocess.Popen(
            [sys.executable, str(TOOL), "--arch", str(arch), "--dtypes", ",".join(dtypes), "--json"], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for arch, dtypes in DTYPES_BY_ARCH.items()
    }
    out = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1800)
        rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert rows, f"sm_{arch}: no output (exit {proc.returncode}): {stderr[-3000:]}"
        out[arch] = rows
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_every_kernel_variant_compiles_and_fits(compiled, arch):
    rows = compiled[arch]
    errors = {r["variant"]: r["error"] for r in rows if "error" in r}
    assert not errors, f"sm_{arch}: {errors}"
    seen: dict[str, set[str]] = {}
    for r in rows:
        assert r["shared_bytes"] <= r["shared_limit"], r
        seen.setdefault(r["variant"], set()).add(r["kernel"])
    assert seen == _expected(DTYPES_BY_ARCH[arch])


def test_h100_runs_every_first_choice_configuration(compiled):
    """The configurations are chosen for sm_90: there, no kernel may need the shared-memory fallback."""
    fallbacks = [(r["variant"], r["kernel"]) for r in compiled[90] if r["tries"] > 1]
    assert not fallbacks


# A kernel ptxas could not fit in registers keeps its tiles in local memory: the deterministic IEEE-float32 dW
# kernel once compiled to 32 registers and a 7.5-7.9 KB stack. Spills of a few hundred bytes are tuning, not this.
SPILL_LIMIT_BYTES = 1024


def test_h100_keeps_every_tile_in_registers(compiled):
    heavy = [(r["variant"], r["kernel"], r["spill_bytes"]) for r in compiled[90]
             if r["spill_bytes"] > SPILL_LIMIT_BYTES]
    assert not heavy


def test_consumer_gpu_needs_the_fallback_for_the_deep_pipelines(compiled):
    """99 KiB cannot hold the 16-bit backward's 3-stage pipeline: the fallback is exercised, not dead code."""
    assert any(r["tries"] > 1 for r in compiled[86] if r["variant"] == "ce bf16 default")


@pytest.mark.parametrize("arch", ARCHES)
def test_tensor_cores_for_gemm_shaped_kernels(compiled, arch):
    """16-bit, tf32 and fp64 GEMM-shaped tiles lower to mma/wgmma; exact fp32 and per-row gathers do not."""
    for r in compiled[arch]:
        family, dtype = r["variant"].split()[:2]
        gemm = family in ("ce", "sce") or "shared" in r["variant"]
        if gemm and dtype in TENSOR_CORE_DTYPES[arch]:
            assert r["tensor_cores"], r
        if dtype == "fp32" or r["kernel"] == "_rows_bwd_kernel" or "per-row" in r["variant"]:
            assert not r["tensor_cores"], r


# ---------------------------------------------------------------------------------- the fallback itself


class _FakeKernel:
    """Raises OutOfResources for configurations whose (num_stages, BLOCK_D) exceed a budget, records launches."""

    def __init__(self, fits):
        self.fits = fits
        self.launched = []
        self.tried = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.tried.append((kwargs["num_stages"], kwargs["BLOCK_D"]))
            if not self.fits(kwargs["num_stages"], kwargs["BLOCK_D"]):
                raise OutOfResources(kwargs["num_stages"] * kwargs["BLOCK_D"], 0, "shared memory")
            self.launched.append((grid, args, kwargs))
        return run


def _cfg(stages=4, block_d=64):
    from largevocab.ops.triton_ce import _LaunchConfig

    return _LaunchConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_D=block_d, num_warps=8, num_stages=stages)


def test_smaller_walks_stages_then_block_d_then_columns_then_one_stage():
    steps, cfg = [], _cfg()
    while cfg is not None:
        steps.append((cfg.num_stages, cfg.BLOCK_D, cfg.BLOCK_V))
        cfg = smaller(cfg)
    assert steps == [(4, 64, 128), (3, 64, 128), (2, 64, 128), (2, 32, 128), (2, 16, 128), (2, 16, 64),
                     (2, 16, 32), (2, 16, 16), (1, 16, 16)]


def test_launch_falls_back_and_remembers():
    _launch._fitted.clear()
    kernel = _FakeKernel(lambda stages, block_d: stages * block_d <= 64)
    chosen = launch(kernel, (3, 1), _cfg(), torch.device("cpu"), "arg", FLAG=True)
    assert (chosen.num_stages, chosen.BLOCK_D) == (2, 32)
    assert kernel.tried == [(4, 64), (3, 64), (2, 64), (2, 32)]
    grid, args, kwargs = kernel.launched[0]
    assert grid == (3, 1) and args == ("arg",) and kwargs["FLAG"] is True and kwargs["BLOCK_N"] == 128
    assert kwargs["enable_fp_fusion"] is True  # the same rounding whatever Triton's default
    kernel.tried.clear()
    launch(kernel, (3, 1), _cfg(), torch.device("cpu"), "arg", FLAG=True)
    assert kernel.tried == [(2, 32)]  # the second call starts from what fitted
    kernel.tried.clear()
    launch(kernel, (3, 1), _cfg(), torch.device("cpu"), "arg", FLAG=False)
    assert kernel.tried[0] == (4, 64)  # another specialisation is fitted on its own
    _launch._fitted.clear()


def test_launch_reraises_when_nothing_fits():
    _launch._fitted.clear()
    kernel = _FakeKernel(lambda stages, block_d: False)
    with pytest.raises(OutOfResources):
        launch(kernel, (1,), _cfg(), torch.device("cpu"))
    assert kernel.tried[-1] == (1, MIN_BLOCK_D) and not _launch._fitted


def test_launch_recomputes_a_grid_that_depends_on_the_column_block():
    _launch._fitted.clear()
    kernel = _FakeKernel(lambda stages, block_d: stages == 1)
    chosen = launch(kernel, lambda c: (1000 // c.BLOCK_V,), _cfg(), torch.device("cpu"))
    assert chosen.BLOCK_V == MIN_BLOCK_D and kernel.launched[0][0] == (1000 // MIN_BLOCK_D,)
    _launch._fitted.clear()


# ----------------------------------------------- configurations the interpreter never picks compute the same


def _last_rung(cfg):
    while (next_cfg := smaller(cfg)) is not None:
        cfg = next_cfg
    return cfg


def _fma_tile(cfg):
    rows = "BLOCK_R" if hasattr(cfg, "BLOCK_R") else "BLOCK_N"
    return replace(cfg, **{rows: FMA_BLOCK_ROWS, cfg.COLUMNS: FMA_BLOCK_COLUMNS, "BLOCK_D": FMA_BLOCK_D,
                           "num_warps": FMA_WARPS})


# The fallback's last rung (BLOCK_D = column block = 16, one stage), which only a small-shared-memory GPU reaches,
# and the IEEE-float32 tile of GPUs' FMA path.
TILES = {"smallest": _last_rung, "fma": _fma_tile}


@pytest.fixture
def gpu_tile(monkeypatch, request):
    """Every launcher uses the tile named by the test's ``tile`` parameter instead of its interpreter config."""
    from largevocab.ops import triton_ce, triton_sampled, triton_sce

    tile = TILES[request.node.callspec.params["tile"]]
    for module in (triton_ce, triton_sampled, triton_sce):
        own = module._config
        monkeypatch.setattr(module, "_config", lambda *a, _own=own, **k: tile(_own(*a, **k)))
    _launch._fitted.clear()
    yield tile
    _launch._fitted.clear()


def _grads(fn, hidden, weight, targets, **opts):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fn(h, w, targets, **opts)
    return [loss.detach(), *torch.autograd.grad(loss, (h, w))]


CASES = ["ce", "ce deterministic", "ce filtered", "sampled per-row", "sampled shared", "sce", "logp", "distill"]


def _log_probs_loss(h, w, y, **opts):
    import largevocab as lv

    logp, ent = lv.linear_log_probs(h, w, y, return_entropy=True, **opts)
    return (logp * torch.linspace(-1.0, 2.0, len(y), dtype=logp.dtype)).sum() + ent.sum()


def _distill_loss(h, w, y, **opts):
    import largevocab as lv

    teacher = (h * 0.5).detach(), (w.flip(0) * 2.0).detach()  # another head over the same vocabulary
    return sum(lv.linear_distillation_loss(h, w, *teacher, y, kind=kind, **opts)
               for kind in ("forward_kl", "reverse_kl", "jsd"))


@pytest.mark.parametrize(("case", "tile"), [(c, "smallest") for c in CASES]
                         + [(c, "fma") for c in CASES if c != "sampled per-row"])  # per-row has no FMA tile
def test_gpu_only_configs_match_the_torch_backend(gpu_tile, case, tile):
    """Tiles that GPUs pick and the interpreter never does, checked on the interpreter (float64)."""
    import largevocab as lv

    gen = torch.Generator().manual_seed(0)
    n, v, d = 70, 300, 40  # several 16-wide column blocks and BLOCK_D steps, ragged edges on every axis
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * d**-0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::7] = -100
    if case.startswith("ce"):
        opts = dict(label_smoothing=0.1, softcap=20.0)
        if case == "ce filtered":
            opts = dict(filter_eps=2.0 ** -40)  # filters nothing that matters at float64 tolerance
        fn = lv.linear_cross_entropy
    elif case.startswith("sampled"):
        shape = (37,) if case == "sampled shared" else (n, 37)
        opts = dict(negatives=torch.randint(0, v, shape, generator=gen))
        fn = lv.sampled_cross_entropy
    elif case == "logp":  # triton_log_probs takes triton_ce's tiles
        opts = dict(temperature=0.7, softcap=20.0)
        fn = _log_probs_loss
    elif case == "distill":  # triton_distill takes triton_ce's tiles (fewer columns in its forward on GPUs)
        opts = dict(temperature=0.7)
        fn = _distill_loss
    else:
        opts = dict(n_buckets=3, bucket_size_x=30, bucket_size_y=50)
        fn = lv.scalable_cross_entropy
    deterministic = case == "ce deterministic"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        if case == "sce":
            got = _grads(fn, hidden, weight, targets, backend="triton", generator=torch.Generator().manual_seed(1),
                         **opts)
            want = _grads(fn, hidden, weight, targets, backend="torch", generator=torch.Generator().manual_seed(1),
                          **opts)
        else:
            got = _grads(fn, hidden, weight, targets, backend="triton", **opts)
            want = _grads(fn, hidden, weight, targets, backend="torch", **opts)
    finally:
        torch.use_deterministic_algorithms(previous)
    chosen = {key[0].fn.__name__: cfg for key, cfg in _launch._fitted.items()}
    assert chosen and all(gpu_tile(c) == c for c in chosen.values())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
