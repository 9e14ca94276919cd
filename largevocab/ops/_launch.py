"""Launch a Triton kernel with the largest of its configurations that the GPU's shared memory admits.

Each launcher's first configuration is chosen for an H100/H200 (227 KiB of shared memory per block). An A100
has 163 KiB and consumer GPUs (sm_86/89/120) 99 KiB, where the deepest pipelines do not fit and Triton raises
``OutOfResources`` before anything runs. ``launch`` then retries along ``smaller``: fewer pipeline stages, a
narrower ``BLOCK_D``, a narrower tile (its column axis, named by the config's ``COLUMNS``), and one stage as
the last resort. It remembers what fitted per kernel, device and specialisation, so the search runs once.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from triton.runtime.errors import OutOfResources

# tl.dot needs K >= 16.
MIN_BLOCK_D = 16
# Below two stages there is no overlap of loads and math left; one stage is the last resort.
MIN_PIPELINED_STAGES = 2
# Contract a * b + c into one FMA, as Triton has by default up to 3.9. 3.9 warns that 3.10 will turn the default
# off; asking for it keeps every kernel's rounding the same across Triton versions (the interpreter ignores it).
FP_FUSION = True

_fitted: dict = {}


def smaller(cfg):
    """The next configuration to try after ``cfg`` ran out of shared memory, or None."""
    if cfg.num_stages > MIN_PIPELINED_STAGES:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.BLOCK_D > MIN_BLOCK_D:
        return replace(cfg, BLOCK_D=cfg.BLOCK_D // 2)
    columns = getattr(cfg, cfg.COLUMNS)
    if columns > MIN_BLOCK_D:
        return replace(cfg, **{cfg.COLUMNS: columns // 2})
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=1)
    return None


def launch(kernel, grid, cfg, device, *args, **constexprs):
    """``kernel[grid(cfg)](*args, **constexprs, **cfg)``, falling back along ``smaller`` on OutOfResources.

    ``cfg`` is a frozen dataclass of ``BLOCK_*`` sizes (one named ``BLOCK_D``, one named by its ``COLUMNS``
    class attribute), ``num_warps`` and ``num_stages``. ``grid`` is a tuple, or a function of the configuration
    when it depends on the column block. Returns the configuration that ran.
    """
    key = (kernel, str(device), cfg, tuple(sorted((k, str(v)) for k, v in constexprs.items())))
    chosen = _fitted.get(key, cfg)
    while True:
        try:
            kernel[grid(chosen) if callable(grid) else grid](*args, **constexprs, **asdict(chosen),
                                                              enable_fp_fusion=FP_FUSION)
        except OutOfResources:
            chosen = smaller(chosen)
            if chosen is None:
                raise
            continue
        _fitted[key] = chosen
        return chosen
