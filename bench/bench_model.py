"""Whole-model cost of weight filtering, side by side in one run: ResNet-18, VGG-16 (CIFAR stems) and ViT-S.

For each model and dtype (fp32; bf16 under autocast), at the untraining batch (B = 128 samples, label-expanded to
2B = 256: the first quarter of the rows are the samples' own labels, the rest random, as bench_ops.py):

* ``plain forward``: the original frozen model, eval, no_grad, 2B samples;
* ``WF forward``: the wrapped model (``wfnet.wrap``), eval, no_grad, 2B samples with mixed rows given as a CPU int64
  tensor (the library validates them on the CPU and copies them once per forward: the cost a user pays);
* ``plain fine-tuning step``: what every per-class baseline pays per step (``wfnet.baselines``): the original model,
  every weight trainable, train mode, SGD(lr 0.01, momentum 0.9), cross-entropy on B samples;
* ``WF untraining step``: the body of ``wfnet.untrain.untrain``'s loop: ``expand_batch`` (B -> 2B on the CPU), the
  wrapped model in eval mode, ``untrain_loss`` (one host copy of the loss parts), backward to the gates only, Adam,
  clamp. Both steps start from a CPU batch and move it to the device inside the step.

Variants of the WF model: ``naive`` (masked weights per sample), ``torch`` eager, ``torch_compile`` (the torch backend
under ``torch.compile``; beside it ``plain_compile``, the compiled original, for a like-for-like ratio), ``triton``,
``cuda``, and ``auto`` (what the library picks). A variant that cannot run is recorded as skipped with its reason
(``wfnet.available_backends()`` / ``BackendUnavailableError`` / the exception), never dropped.

Timing: GPU: median (and p20 / p80) of ``triton.testing.do_bench`` (CUDA events), plus the median of
``triton.testing.do_bench_cudagraph`` for the forwards when they can be captured; CPU: median of a
``time.perf_counter`` loop. Peak memory beside every time: GPU ``torch.cuda.max_memory_allocated`` above what was
allocated before the call; CPU the peak resident set of the process during the call above the resident set before it
(Linux: ``/proc/self/clear_refs`` = 5 resets VmHWM; elsewhere ``resource.getrusage().ru_maxrss``, which only grows:
then a call that stays under an earlier peak reads 0; the method is recorded). psutil is not used: it has no peak
resident size on Linux. Host syncs per call are counted on GPU (``torch.cuda.set_sync_debug_mode``).

Ratios reported against the targets of issue 9 (H100): WF forward / plain forward <= 1.05; WF untraining step /
plain fine-tuning step <= 0.8; naive / WF at VGG-16 >= 20. Nothing is asserted: the script measures and records.

Output: bench/results/model_<device>_<date><tag>.json and .md, with device, versions (torch, triton, CUDA, cuDNN),
TF32 flags, shapes, batch and date, rewritten after every model and dtype, so a run cut short keeps what it measured.
``--quick``: few repetitions; on GPU leaves out torch_compile (minutes of inductor compiles; recorded as skipped);
on CPU also a smaller default batch (16). CPU numbers say nothing about GPU speed and are labelled CPU.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_ops import count_host_syncs  # noqa: E402  (bench/ is on sys.path)
from wfnet import profiling  # noqa: E402  (host syncs and GPU timing: one home, wfnet.profiling)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = ("resnet18", "vgg16", "vit_small")
VARIANTS = ("naive", "torch", "torch_compile", "triton", "cuda", "auto")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
TARGETS = {"wf_forward/plain_forward": "<= 1.05 (stretch 1.02) on H100",
           "wf_step/plain_step": "<= 0.8 on H100",
           "naive/wf at vgg16": ">= 20 on H100"}
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------- measurement
class PeakRSS:
    """Peak resident set of this process during a call, above the resident set before it (CPU runs)."""

    def __init__(self):
        self.method = "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status("VmHWM")
            self.method = ("VmHWM after /proc/self/clear_refs=5, minus VmRSS before the call (Linux; glibc "
                           "malloc_trim(0) first so that freed heap memory is returned and re-counted)")
        except OSError:
            self.method = ("resource.getrusage ru_maxrss delta (monotone: a call under an earlier peak reads 0)")

    @staticmethod
    def _status(key) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(key)

    @staticmethod
    def trim():
        """Hand the heap's free memory back to the OS first (glibc), so that memory an earlier call freed but the
        allocator kept does not hide this call's peak."""
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            return True
        except (OSError, AttributeError):
            return False

    def measure(self, fn) -> float:
        self.trim()
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = self._status("VmRSS")
            fn()
            return (self._status("VmHWM") - before) / 2**20
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(fn, device: str, quick: bool, rss: PeakRSS, graph: bool) -> dict:
    """Warm-up call (compiles happen here), then memory, syncs and times of ``fn``."""
    g0 = compiled_graphs()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    g1 = compiled_graphs()
    res = {"first_call_s": round(first_s, 3)}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        res["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        res["syncs"] = count_host_syncs(fn)
        res.update(profiling.time_cuda(fn, warmup=10 if quick else 50, rep=50 if quick else 300, graph=graph,
                                       syncs=res["syncs"]))
    else:
        res["peak_mib"] = round(rss.measure(fn), 1)
        times = profiling.time_cpu(fn, 3 if quick else 10)
        res.update(ms=statistics.median(times), min_ms=min(times), max_ms=max(times), reps=len(times))
    res["compiles_in_warmup"] = g1 - g0
    recompiles = compiled_graphs() - g1
    if recompiles:
        res["recompiles_while_timed"] = recompiles
    return res


# ----------------------------------------------------------------------------------------------- the cases
def label_expanded_rows(batch: int, num_classes: int, gen) -> torch.Tensor:
    """First quarter: forget samples on their label rows; the rest: retain samples on random rows (as bench_ops)."""
    forget = batch // 4
    labels = torch.randint(0, num_classes, (forget,), generator=gen)
    retain = torch.randint(0, num_classes, (batch - forget,), generator=gen)
    return torch.cat([labels, retain])


def build(name: str, image_size: int):
    from wfnet.models import build_model

    torch.manual_seed(0)
    return build_model(name, NUM_CLASSES, in_chans=3, image_size=image_size)


def autocast(device, dtype):
    if dtype is None:
        return torch.autocast(device_type=device, enabled=False)
    return torch.autocast(device_type=device, dtype=dtype)


def plain_forward_fn(model, x, device, dtype):
    def fn():
        with torch.no_grad(), autocast(device, dtype):
            return model(x)
    return fn


def wf_forward_fn(wf, x, rows_cpu, device, dtype):
    def fn():
        with torch.no_grad(), autocast(device, dtype):
            return wf(x, forget=rows_cpu)
    return fn


def plain_step_fn(model, x_cpu, y_cpu, device, dtype):
    """One step of a per-class baseline (wfnet.baselines): all weights trainable, train mode, SGD + momentum."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def fn():
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x_cpu.to(device)).float(), y_cpu.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return fn


def wf_step_fn(wf, x_cpu, y_cpu, device, dtype):
    """One step of wfnet.untrain.untrain's loop (``untrain_step``; tuned recipe: Adam on the gates, clamp)."""
    from wfnet.untrain import recipe, untrain_step

    cfg = recipe("tuned", wf.kind)
    params = list(wf.filter_parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    step = [0]

    def fn():
        gen = torch.Generator().manual_seed(step[0])
        step[0] += 1
        with autocast(device, dtype):  # autocast covers the forward; the backward follows the recorded dtypes
            untrain_step(wf, params, opt, x_cpu, y_cpu, wf.num_classes, cfg, gen, device)
    return fn


def variant_reason(variant: str, device: str) -> str | None:
    """Why a variant cannot run here (None = it can try)."""
    import wfnet

    if variant in ("triton", "cuda"):
        err = wfnet.available_backends()[variant]
        if err is not None:
            return err
        if variant == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter: far too slow for a model)"
        if variant == "cuda" and device == "cpu":
            return "the cuda backend runs on CUDA tensors only"
    return None


def backend_of(variant: str) -> str:
    return "torch" if variant == "torch_compile" else variant


# ----------------------------------------------------------------------------------------------- output
def ratios(block: dict) -> dict:
    """wf_forward / plain_forward, wf_step / plain_step, naive / variant (forward and step) per variant."""
    out = {}
    pf, ps = block["plain"]["forward"].get("ms"), block["plain"]["step"].get("ms")
    pcf = block.get("plain_compile", {}).get("forward", {}).get("ms")
    pcs = block.get("plain_compile", {}).get("step", {}).get("ms")
    naive = block["wf"].get("naive", {})
    for v, r in block["wf"].items():
        f, s = r.get("forward", {}).get("ms"), r.get("step", {}).get("ms")
        d = {}
        if f and pf:
            d["wf_forward/plain_forward"] = f / pf
        if s and ps:
            d["wf_step/plain_step"] = s / ps
        if v == "torch_compile":
            if f and pcf:
                d["wf_forward/plain_compile_forward"] = f / pcf
            if s and pcs:
                d["wf_step/plain_compile_step"] = s / pcs
        if v != "naive":
            nf, ns = naive.get("forward", {}).get("ms"), naive.get("step", {}).get("ms")
            if nf and f:
                d["naive_forward/wf_forward"] = nf / f
            if ns and s:
                d["naive_step/wf_step"] = ns / s
        if d:
            out[v] = {k: round(x, 4) for k, x in d.items()}
    return out


def _cell(r: dict | None) -> str:
    if not r:
        return ""
    if "skipped" in r:
        return "skip"
    if "error" in r:
        return "error"
    s = f"{r['ms']:.2f}"
    if r.get("graph_ms") is not None:
        s += f" (graph {r['graph_ms']:.2f})"
    if r.get("peak_mib") is not None:
        s += f", {r['peak_mib']:.0f} MiB"
    if r.get("syncs"):
        s += f", {r['syncs']} sync"
    if r.get("recompiles_while_timed"):
        s += f", RECOMPILED {r['recompiles_while_timed']}x while timed"
    return s


def write(meta: dict, blocks: list, base: Path) -> None:
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": blocks}, indent=1) + "\n")
    cpu = meta["device_type"] != "cuda"
    lines = [f"# wfnet model benchmark: {meta['device']}{' (CPU)' if cpu else ''}", ""]
    if cpu:
        lines += ["**CPU run** (" + f"{meta['host_cpus']} cores, {meta['torch_threads']} torch threads, load average "
                  f"{meta.get('load_average_at_start')} at start, {meta.get('load_average_now')} at the last write): "
                  "it shows that the benchmark runs and how the paths compare on this CPU; it says nothing about GPU "
                  "speed.", ""]
    lines += [f"- {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, cuDNN "
              f"{meta['cudnn']}; TF32 {meta['tf32']}; autotune {meta['autotune']}",
              f"- batch {meta['batch']} samples (label-expanded to {2 * meta['batch']} for the forwards and the WF "
              f"step; the plain fine-tuning step runs {meta['batch']}), image {meta['image_size']} px, N_c = "
              f"{NUM_CLASSES}; rows: {meta['rows']}",
              f"- times: {meta['timer']}; memory: {meta['memory']}",
              "- cells: median ms (CUDA-graph replay median), peak MiB above the inputs, host syncs per call when "
              "not 0", ""]
    for b in blocks:
        lines += [f"## {b['model']} {b['dtype']} ({b['filtered_layers']} filtered layers, {b['params_m']:.1f} M "
                  f"weights)", "", "| variant | forward | untraining / fine-tuning step | fwd ratio | step ratio "
                  "| naive/this fwd | naive/this step |", "|---|---|---|---|---|---|---|"]
        lines.append(f"| plain (original) | {_cell(b['plain']['forward'])} | {_cell(b['plain']['step'])} "
                     f"| 1.00 | 1.00 | | |")
        if "plain_compile" in b:
            lines.append(f"| plain_compile | {_cell(b['plain_compile'].get('forward'))} | "
                         f"{_cell(b['plain_compile'].get('step'))} | | | | |")
        for v, r in b["wf"].items():
            rr = b["ratios"].get(v, {})

            def fmt(k):
                return f"{rr[k]:.2f}" if k in rr else ""
            if "skipped" in r:
                lines.append(f"| WF {v} | skip | skip | | | | |")
                continue
            lines.append(f"| WF {v} | {_cell(r.get('forward'))} | {_cell(r.get('step'))} | "
                         f"{fmt('wf_forward/plain_forward')} | {fmt('wf_step/plain_step')} | "
                         f"{fmt('naive_forward/wf_forward')} | {fmt('naive_step/wf_step')} |")
        notes = [f"- WF {v}: {r['skipped']}" for v, r in b["wf"].items() if "skipped" in r]
        for v, r in list(b["wf"].items()) + [("plain", b["plain"])] + ([("plain_compile", b["plain_compile"])]
                                                                        if "plain_compile" in b else []):
            for what in ("forward", "step"):
                x = r.get(what) or {}
                if "error" in x:
                    notes.append(f"- {v} {what}: {x['error']}")
                if "skipped" in x:
                    notes.append(f"- {v} {what}: {x['skipped']}")
        if notes:
            lines += ["", "Skipped / failed:", ""] + sorted(set(notes))
        lines.append("")
    lines += ["Targets (issue 9, H100): " + "; ".join(f"{k} {v}" for k, v in TARGETS.items()) + ".", ""]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")


def stamp(device: str, rss: PeakRSS) -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})")
    return {"device": name, "device_type": device, "torch": torch.__version__, "triton": tv,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "tf32": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision()},
            "autotune": os.environ.get("WFNET_AUTOTUNE", "1") != "0",
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "host_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "argv": sys.argv[1:], "targets": TARGETS,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "timer": ("triton.testing.do_bench median of CUDA-event times (p20/p80 in the JSON); graph = "
                      "triton.testing.do_bench_cudagraph median (forwards only)") if device == "cuda"
            else "time.perf_counter loop, median",
            "memory": ("torch.cuda.max_memory_allocated above the allocation before the call" if device == "cuda"
                       else f"peak RSS: {rss.method}"),
            "rows": ("forwards: label-expanded rows as a CPU int64 tensor per call (validated on the CPU, copied "
                     "once per forward); WF step: rows from wfnet.untrain.expand_batch (CPU)")}


# ----------------------------------------------------------------------------------------------- the fold table
FOLD_MODELS = ("resnet18", "vgg16_bn", "mobilenet_v3_large")


def fold_table(name: str, args, device: str, reps: int, compiled: bool) -> dict:
    """Issue 24's rows for one model, every case INTERLEAVED in one process (round robin, one call of each case per
    round, ``reps`` rounds after one warm-up round), so that the load of a shared machine hits all of them alike:
    plain eager forward, the plain model with every BatchNorm folded into its conv
    (``torch.fx.experimental.optimization.fuse``: the honest limit), WF forward with the fold (AFTER) and without it
    (``wrap(fold=False)``: the path before issue 24, BEFORE), the plain fine-tuning step on the B samples and on 2B
    samples (as many rows as the WF step's label expansion makes: the like-for-like cost per row), the WF untraining
    step with and without the fold; with ``compiled`` also the compiled (inductor) forwards of plain / WF fold / WF
    no fold.
    Ratios: of the medians, and the median of the per-round ratios (robust to load drifting between rounds);
    noise: (max - min) / median per case."""
    import wfnet
    from torch.fx.experimental.optimization import fuse

    n = args.batch
    gen = torch.Generator().manual_seed(0)
    x2 = torch.randn(2 * n, 3, args.image_size, args.image_size, generator=gen)
    rows = label_expanded_rows(2 * n, NUM_CLASSES, gen)
    xb = torch.randn(n, 3, args.image_size, args.image_size, generator=gen)
    yb = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    y2 = torch.randint(0, NUM_CLASSES, (2 * n,), generator=gen)
    original = build(name, args.image_size).to(device).eval()
    with torch.no_grad():  # trained-like BatchNorm statistics, so no case is helped by identity affines
        for m in original.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    for p in original.parameters():
        p.requires_grad_(False)
    fused = fuse(copy.deepcopy(original))
    wf = wfnet.wrap(copy.deepcopy(original), NUM_CLASSES).to(device).eval()
    wf_off = wfnet.wrap(copy.deepcopy(original), NUM_CLASSES, fold=False).to(device).eval()
    trainable = copy.deepcopy(original).train()
    for p in trainable.parameters():
        p.requires_grad_(True)
    trainable2 = copy.deepcopy(trainable)
    cases = {
        "plain forward": plain_forward_fn(original, x2, device, None),
        "plain+BN-folded forward": plain_forward_fn(fused, x2, device, None),
        "WF forward (fold)": wf_forward_fn(wf, x2, rows, device, None),
        "WF forward (no fold)": wf_forward_fn(wf_off, x2, rows, device, None),
        "plain fine-tuning step": plain_step_fn(trainable, xb, yb, device, None),
        "plain fine-tuning step (2B samples)": plain_step_fn(trainable2, x2, y2, device, None),
        "WF untraining step (fold)": wf_step_fn(wf, xb, yb, device, None),
        "WF untraining step (no fold)": wf_step_fn(wf_off, xb, yb, device, None),
    }
    if compiled:
        cases["compiled plain forward"] = plain_forward_fn(torch.compile(original), x2, device, None)
        cases["compiled WF forward (fold)"] = wf_forward_fn(torch.compile(wf), x2, rows, device, None)
        cases["compiled WF forward (no fold)"] = wf_forward_fn(torch.compile(wf_off), x2, rows, device, None)
    times = {k: [] for k in cases}
    with wfnet.use_backend("torch"):
        for k, fn in cases.items():  # warm-up (and compiles)
            t0 = time.perf_counter()
            fn()
            print(f"{name} warm-up {k}: {time.perf_counter() - t0:.1f} s", flush=True)
        for r in range(reps):
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
            print(f"{name} round {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in times.items()),
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a, b):
        if a not in times or b not in times:
            return None
        return {"of_medians": round(med[a] / med[b], 4),
                "median_per_round": round(statistics.median(x / y for x, y in zip(times[a], times[b])), 4)}

    pairs = {"WF fwd / plain fwd": ("WF forward (fold)", "WF forward (no fold)", "plain forward"),
             "WF fwd / plain+BN-folded fwd": ("WF forward (fold)", "WF forward (no fold)",
                                              "plain+BN-folded forward"),
             "WF step / plain step, same rows": ("WF untraining step (fold)", "WF untraining step (no fold)",
                                                 "plain fine-tuning step (2B samples)"),
             "WF step / plain step, same samples": ("WF untraining step (fold)", "WF untraining step (no fold)",
                                                    "plain fine-tuning step"),
             "compiled WF fwd / compiled plain fwd": ("compiled WF forward (fold)", "compiled WF forward (no fold)",
                                                      "compiled plain forward")}
    ratios = {k: {"after": ratio(a, c), "before": ratio(b, c)} for k, (a, b, c) in pairs.items() if c in times}
    return {"model": name, "batch": n, "expanded_batch": 2 * n, "image_size": args.image_size, "reps": reps,
            "filtered_layers": len(wf.layer_names), "folded": wf.fold_plan.chains,
            "unfolded": wf.fold_plan.unfolded, "fold_error": wf.fold_plan.error,
            "times_ms": times, "median_ms": med,
            "noise": {k: round((max(v) - min(v)) / med[k], 3) for k, v in times.items()}, "ratios": ratios}


def _loads(v) -> str:
    return "n/a" if not v else "(" + ", ".join(f"{x:.2f}" for x in v) + ")"


def write_fold_table(meta: dict, blocks: list, base: Path) -> None:
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": blocks}, indent=1) + "\n")
    lines = [f"# The fold (issue 24): measured on this CPU, {meta['date']}", "",
             f"**CPU run**, machine: {meta['machine']}; {meta['torch_threads']} torch thread(s); load average "
             f"{_loads(meta.get('load_average_at_start'))} at start, {_loads(meta.get('load_average_now'))} at the "
             f"last write (about 1 = this benchmark alone; every case is interleaved in one process, round robin, so "
             f"that other jobs' load hits all of them alike). torch "
             f"{meta['torch']}, backend torch (the CPU default). CPU numbers say nothing about GPU speed.", "",
             f"Batch {meta['batch']} samples (label-expanded to {2 * meta['batch']} rows for the forwards and the WF "
             f"step; the plain fine-tuning step runs {meta['batch']} samples, and {2 * meta['batch']} for the "
             f"same-rows ratio), image {meta['image_size']} px (CIFAR stems for "
             f"resnet18 / vgg16_bn; 224 px is too slow on 2 shared cores), N_c = {NUM_CLASSES}. BEFORE = the same "
             f"wrapped model with wrap(fold=False) (the path before issue 24), AFTER = with the fold; both measured "
             f"in the same rounds. Ratio cells: ratio of medians (median of the per-round ratios)."
             + (f" {meta['note']}" if meta.get("note") else ""), ""]
    lines += ["| model | ratio | before | after | goal |", "|---|---|---|---|---|"]
    goals = {"WF fwd / plain fwd": "<= 0.90 (ResNet-18)", "WF fwd / plain+BN-folded fwd": "<= 1.05",
             "WF step / plain step, same rows": "<= 0.70",
             "WF step / plain step, same samples": "none (label expansion: 2B rows per B samples)",
             "compiled WF fwd / compiled plain fwd": "<= 1.02"}
    for b in blocks:
        for k, r in b["ratios"].items():
            cell = {w: (f"{r[w]['of_medians']:.3f} ({r[w]['median_per_round']:.3f})" if r[w] else "")
                    for w in ("before", "after")}
            lines.append(f"| {b['model']} | {k} | {cell['before']} | {cell['after']} | {goals[k]} |")
    for b in blocks:
        lines += ["", f"## {b['model']}: {len(b['folded'])} of {b['filtered_layers']} filtered layers folded "
                      f"({sum(1 for c in b['folded'] if c[2])} with their activation)", "",
                  "| case | median ms | min | max | noise (max-min)/median |", "|---|---|---|---|---|"]
        for k, v in b["times_ms"].items():
            lines.append(f"| {k} | {b['median_ms'][k]:.1f} | {min(v):.1f} | {max(v):.1f} | {b['noise'][k]:.2f} |")
        unf = sorted(set(b["unfolded"].values()))
        lines += ["", "Folded chains: " + ", ".join(f"{c[0]} -> {c[1]}" + (f" -> {c[2]}" if c[2] else "")
                                                   for c in b["folded"])]
        if unf:
            lines += ["", "Not folded: " + "; ".join(f"{why} ({sum(1 for w in b['unfolded'].values() if w == why)})"
                                                    for why in unf)]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")


def fold_main(args, device: str) -> int:
    models = [m for m in args.models.split(",") if m] if args.models != ",".join(MODELS) else list(FOLD_MODELS)
    bad = [m for m in models if m not in FOLD_MODELS]
    if bad:
        raise SystemExit(f"--fold-table models: {', '.join(FOLD_MODELS)}; got {bad}")
    meta = {"date": args.date or datetime.date.today().isoformat(), "machine": args.machine or platform.processor(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "batch": args.batch,
            "image_size": args.image_size, "argv": sys.argv[1:], "note": args.note,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"fold_cpu_{meta['date']}{args.tag}"
    blocks = []
    compiled = {m for m in (args.fold_compiled or "").split(",") if m}
    for name in models:
        blocks.append(fold_table(name, args, device, args.reps, name in compiled))
        meta["load_average_now"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        write_fold_table(meta, blocks, base)
        print(json.dumps(blocks[-1]["ratios"]), flush=True)
    print(f"results: {base}.json / .md")
    return 0


# ----------------------------------------------------------------------------------------------- main
def run_model(name, dname, args, device, rss, variants, excluded) -> dict:
    import wfnet

    dtype = DTYPES[dname]
    n = args.batch
    gen = torch.Generator().manual_seed(0)
    x2 = torch.randn(2 * n, 3, args.image_size, args.image_size, generator=gen)
    rows = label_expanded_rows(2 * n, NUM_CLASSES, gen)
    xb = torch.randn(n, 3, args.image_size, args.image_size, generator=gen)
    yb = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x2d = x2.to(device)
    if device == "cuda" and name != "vit_small":
        x2d = x2d.contiguous(memory_format=torch.channels_last)
    original = build(name, args.image_size).to(device).eval()
    if device == "cuda" and name != "vit_small":
        original = original.to(memory_format=torch.channels_last)
    for p in original.parameters():
        p.requires_grad_(False)
    block = {"model": name, "dtype": dname, "autocast": dname != "fp32", "batch": n, "expanded_batch": 2 * n,
             "input": [3, args.image_size, args.image_size],
             "params_m": sum(p.numel() for p in original.parameters()) / 1e6, "plain": {}, "wf": {}}

    def attempt(fn_factory, graph):
        try:
            return measure(fn_factory(), device, args.quick, rss, graph)
        except Exception as exc:
            traceback.print_exc()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return {"error": f"{type(exc).__name__}: {exc}"[:400]}

    block["plain"]["forward"] = attempt(lambda: plain_forward_fn(original, x2d, device, dtype), True)
    trainable = copy.deepcopy(original).train()
    for p in trainable.parameters():
        p.requires_grad_(True)
    block["plain"]["step"] = attempt(lambda: plain_step_fn(trainable, xb, yb, device, dtype), False)
    del trainable
    if "torch_compile" in variants:
        compiled = torch.compile(original)
        block["plain_compile"] = {"forward": attempt(lambda: plain_forward_fn(compiled, x2d, device, dtype), True)}
        trainable = copy.deepcopy(original).train()
        for p in trainable.parameters():
            p.requires_grad_(True)
        ctrain = torch.compile(trainable)
        block["plain_compile"]["step"] = attempt(lambda: plain_step_fn(ctrain, xb, yb, device, dtype), False)
        del trainable, ctrain, compiled
    print(f"{name} {dname} plain: forward {_cell(block['plain']['forward'])} | step {_cell(block['plain']['step'])}",
          flush=True)

    wf = wfnet.wrap(copy.deepcopy(original), NUM_CLASSES).to(device).eval()
    block["filtered_layers"] = len(wf.layer_names)
    gates = {k: v.detach().clone() for k, v in wf.named_filter_parameters()}
    for v in list(variants) + list(excluded):
        if v in excluded:
            block["wf"][v] = {"skipped": excluded[v]}
            continue
        reason = variant_reason(v, device)
        if reason:
            block["wf"][v] = {"skipped": reason}
            print(f"{name} {dname} WF {v}: skipped: {reason[:200]}", flush=True)
            continue
        with torch.no_grad():  # every variant starts from the same gates
            for k, p in wf.named_filter_parameters():
                p.copy_(gates[k])
        model = torch.compile(wf) if v == "torch_compile" else wf
        res = {}
        try:
            with wfnet.use_backend(backend_of(v)):
                res["forward"] = attempt(lambda: wf_forward_fn(model, x2d, rows, device, dtype), True)
                res["step"] = attempt(lambda: wf_step_fn(model, xb, yb, device, dtype), False)
        except wfnet.BackendUnavailableError as exc:  # use_backend itself refused
            res = {"skipped": str(exc).replace("\n", " ")[:400]}
        for what in ("forward", "step"):  # a backend that refuses the input: a skip with its reason, not an error
            e = res.get(what, {}).get("error", "")
            if e.startswith("BackendUnavailableError"):
                res[what] = {"skipped": e}
        if all("skipped" in r for r in res.values() if isinstance(r, dict)) and "skipped" not in res:
            res = {"skipped": res.get("forward", {}).get("skipped", "")}
        block["wf"][v] = res
        if "skipped" not in res:
            print(f"{name} {dname} WF {v}: forward {_cell(res.get('forward'))} | step {_cell(res.get('step'))}",
                  flush=True)
        else:
            print(f"{name} {dname} WF {v}: skipped: {res['skipped'][:200]}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    block["ratios"] = ratios(block)
    del wf, original
    if device == "cuda":
        torch.cuda.empty_cache()
    return block


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default: all; --quick "
                                                     f"on GPU, and any CPU run, leave out torch_compile)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, bf16 (bf16 = autocast); default fp32,bf16 on "
                                                   "GPU, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=0, help="samples per step before label expansion (default 128; "
                                                         "16 on CPU with --quick)")
    ap.add_argument("--image-size", type=int, default=32, help="input side in px (CIFAR stems up to 64)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="few repetitions; see the module docstring")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 1 on CPU, where a shared "
                                                           "machine's load stalls every multi-threaded region; "
                                                           "torch's default on GPU runs)")
    ap.add_argument("--out", default=str(RESULTS), help="output folder (default bench/results)")
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    ap.add_argument("--fold-table", action="store_true",
                    help=f"issue 24's interleaved table instead (models {', '.join(FOLD_MODELS)}; see fold_table)")
    ap.add_argument("--reps", type=int, default=5, help="--fold-table: timed rounds (median of at least 5)")
    ap.add_argument("--fold-compiled", default="", help="--fold-table: models that also get the compiled forwards")
    ap.add_argument("--date", default="", help="--fold-table: the date recorded (default today)")
    ap.add_argument("--machine", default="", help="--fold-table: the machine recorded (default platform.processor)")
    ap.add_argument("--note", default="", help="--fold-table: a sentence recorded under the table's header (e.g. "
                    "which code version measured it)")
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads or device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if not args.batch:
        args.batch = 16 if (args.quick and device == "cpu") else 128
    if args.fold_table:
        if args.reps < 5:
            ap.error("--reps: the fold table takes the median of at least 5 rounds")
        return fold_main(args, device)
    models = [m for m in args.models.split(",") if m]
    dtypes = [d for d in (args.dtypes or ("fp32,bf16" if device == "cuda" else "fp32")).split(",") if d]
    bad = [m for m in models if m not in MODELS] + [d for d in dtypes if d not in DTYPES]
    excluded = {}
    if args.variants is None:
        variants = list(VARIANTS)
        if args.quick or device == "cpu":
            variants.remove("torch_compile")
            excluded["torch_compile"] = ("skipped: left out by default " + ("in --quick mode" if args.quick else
                                         "on CPU") + " (inductor compiles of a whole model, forward and step, per "
                                         "dtype, take minutes); pass --variants to include it")
    else:
        variants = [v for v in args.variants.split(",") if v]
        bad += [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown model / dtype / variant: {bad}")
    if "vgg16" in models and args.image_size < 32:
        ap.error("vgg16 needs --image-size >= 32")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    rss = PeakRSS()
    meta = stamp(device, rss)
    meta.update(batch=args.batch, image_size=args.image_size, models=models, dtypes=dtypes,
                variants=variants + list(excluded), quick=args.quick)
    tag = meta["device"].replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "") \
        if device == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"model_{tag}_{datetime.date.today().isoformat()}{args.tag}"
    blocks = []
    write(meta, blocks, base)
    for name in models:
        for dname in dtypes:
            t0 = time.perf_counter()
            blocks.append(run_model(name, dname, args, device, rss, variants, excluded))
            blocks[-1]["seconds"] = round(time.perf_counter() - t0, 1)
            meta["load_average_now"] = os.getloadavg() if hasattr(os, "getloadavg") else None
            write(meta, blocks, base)  # after every model and dtype: a run cut short keeps what it measured
            print(f"{name} {dname}: ratios {json.dumps(blocks[-1]['ratios'])} ({blocks[-1]['seconds']} s)",
                  flush=True)
    print(f"results: {base}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
