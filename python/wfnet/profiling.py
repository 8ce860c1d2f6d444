"""Host-sync counting and GPU timing, in one place for the benchmarks (``bench/``) and the GPU tests.

* :func:`count_host_syncs`: the device-to-host synchronisations torch's sync debug mode reports while a function
  runs, each located at the innermost frame of wfnet / wf_kernels code that caused it (CUDA only: the debug mode
  reports CUDA synchronisations, so without CUDA the answer is None and the function is not run).
* :func:`time_cuda`: median / p20 / p80 milliseconds of a function with ``triton.testing.do_bench`` (CUDA events,
  L2 flushed between calls), and of its CUDA-graph replay unless it syncs (a sync cannot be captured). Medians and
  quantiles only, never the mean.
* :func:`time_cpu`: a ``time.perf_counter`` loop in milliseconds (each call's time; the caller takes the median).
"""
from __future__ import annotations

import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["SyncReport", "count_host_syncs", "time_cuda", "time_cpu", "quantiles"]


@dataclass
class SyncReport:
    """How many host syncs one call made, and where (``file:line (function)`` per sync)."""
    count: int
    where: list[str] = field(default_factory=list)


def _where(stack) -> str:
    """The innermost frame of wfnet / wf_kernels code (else the innermost frame) as ``file:line (function)``."""
    frames = [f for f in stack if "warnings.py" not in f.filename and "profiling.py" not in f.filename]
    own = [f for f in frames if any(k in f.filename.replace("\\", "/") for k in ("/wfnet/", "/wf_kernels/"))]
    f = (own or frames or stack)[-1]
    name = f.filename.replace("\\", "/")
    for marker in ("/python/wfnet/", "/wfnet/", "/wf_kernels/", "/torch/"):
        if marker in name:
            name = marker.strip("/").split("/")[-1] + "/" + name.split(marker, 1)[1]
            break
    return f"{name}:{f.lineno} ({f.name})"


def count_host_syncs(fn) -> SyncReport | None:
    """Run ``fn`` once under ``torch.cuda.set_sync_debug_mode("warn")`` and report the synchronisations it made.
    None without CUDA (``fn`` is then not run)."""
    if not torch.cuda.is_available():
        return None
    where: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            where.append(_where(traceback.extract_stack()[:-1]))

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old_show = warnings.showwarning
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old_show
    torch.cuda.synchronize()
    return SyncReport(len(where), where)


def quantiles(bench, fn, **kw) -> tuple[float, float | None, float | None]:
    """(median, p20, p80) from a ``triton.testing`` benchmark function; (median, None, None) from one whose signature
    has no quantiles. Never the mean."""
    try:
        med, lo, hi = bench(fn, quantiles=[0.5, 0.2, 0.8], **kw)
        return float(med), float(lo), float(hi)
    except TypeError:
        return float(bench(fn, return_mode="median", **kw)), None, None


def time_cuda(fn, warmup: int, rep: int, graph: bool = True, syncs: int | None = None) -> dict:
    """``{"ms", "p20_ms", "p80_ms"}`` of ``fn`` on the GPU (``triton.testing.do_bench``, ``warmup`` / ``rep`` in
    ms), plus ``"graph_ms"`` (CUDA-graph replay median) or ``"graph_skipped"`` with the reason when ``graph``:
    a function that syncs (``syncs`` > 0) cannot be captured, and a failed capture is reported, not raised."""
    import triton.testing  # only on a GPU machine: importing triton's testing module is not free

    med, lo, hi = quantiles(triton.testing.do_bench, fn, warmup=warmup, rep=rep)
    res = {"ms": med, "p20_ms": lo, "p80_ms": hi}
    if graph:
        if syncs:
            res["graph_skipped"] = f"{syncs} host sync(s) per call: cannot be captured in a CUDA graph"
        else:
            try:
                res["graph_ms"] = quantiles(triton.testing.do_bench_cudagraph, fn, rep=rep)[0]
            except Exception as exc:  # capture failed: say why, keep the event timing
                res["graph_skipped"] = f"capture failed: {type(exc).__name__}: {exc}"[:300]
                torch.cuda.synchronize()
    return res


def time_cpu(fn, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` (``time.perf_counter``; call it once before to warm up)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times
