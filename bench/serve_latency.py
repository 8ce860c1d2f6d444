"""ONNX Runtime latency of a served WF-Net model (``forget`` as an input) vs the plain model exported the same way.

For each model (ResNet-18 with the CIFAR stem, ViT-T: timm vit_tiny_patch16_224, img_size 32, patch 4; N_c = 10,
32x32 RGB, random weights and random gate logits: latency does not depend on their values) three ONNX files are made
with ``wfnet.serve.export_onnx`` (torch.export -> ``torch.onnx.export(..., dynamo=True)``):

* ``plain``: ``wfnet.export(wf, forget=3)``, the plain model with one class's gates baked into its weights: what a
  deployment that serves ONE forgotten class runs, and the same network as the original;
* ``wf_rows``: the wrapped model with ``forget`` int64 [B] (a class row per sample);
* ``wf_mask``: the wrapped model with ``forget`` bool [B, N_c] (a set of classes per sample; 30 % of the classes).

Each is run by an ONNX Runtime CPU session (``intra_op_num_threads`` = ``--threads``, default 1: the machine is
shared, and a busy core stalls every multi-threaded region) at each batch size. Timing: the raw ``session.run`` (no
request validation) in a ``time.perf_counter`` loop of ``--iters`` calls, per repetition; the variants are
INTERLEAVED (one loop of each per repetition, in a rotating order) so that load changes on the shared CPU hit all of
them alike; the figure is the median over ``--reps`` (>= 5) repetitions of the per-call time, with min / max beside,
and the ratio to ``plain`` is the median of the per-repetition ratios (each pair ran back to back).

Output: bench/results/serve_latency_<date><tag>.json and .md (machine, versions, threads, load average before and
after). ``--quick``: small_cnn at 16 px, batch 1 and 2, 5 reps of 2 calls (the test's smoke mode).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NUM_CLASSES = 10
VARIANTS = ("plain", "wf_rows", "wf_mask")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(name: str, image_size: int, seed: int = 0):
    import torch

    import wfnet
    from wfnet.models import build_model

    torch.manual_seed(seed)
    wf = wfnet.wrap(build_model(name, NUM_CLASSES, image_size=image_size), NUM_CLASSES).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in wf.filter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3)
    return wf


def export_all(name: str, image_size: int, folder: Path) -> tuple[dict, dict]:
    """variant -> ONNX path, and variant -> export seconds."""
    import torch

    import wfnet
    from wfnet import serve

    wf = build(name, image_size)
    x = torch.randn(2, 3, image_size, image_size)
    paths, seconds = {}, {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        path = folder / f"{name}_{variant}.onnx"
        if variant == "plain":
            serve.export_onnx(wfnet.export(wf, forget=3), path, x, forget=None)
        else:
            serve.export_onnx(wf, path, x, forget=variant[3:])
        paths[variant], seconds[variant] = path, round(time.perf_counter() - t0, 2)
    return paths, seconds


def feeds(variant: str, batch: int, image_size: int, rng) -> dict:
    import numpy as np

    x = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    if variant == "plain":
        return {"x": x}
    if variant == "wf_rows":
        return {"x": x, "forget": rng.integers(0, NUM_CLASSES, batch).astype(np.int64)}
    return {"x": x, "forget": rng.random((batch, NUM_CLASSES)) < 0.3}


def time_model(paths: dict, batches, image_size: int, reps: int, iters: int, threads: int) -> dict:
    import numpy as np

    from wfnet.serve import _session

    sessions = {v: _session(p, threads) for v, p in paths.items()}
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        inputs = {v: feeds(v, batch, image_size, rng) for v in VARIANTS}
        for v in VARIANTS:  # warm-up (first-run allocations, ORT's arena growth)
            for _ in range(3):
                sessions[v].run(None, inputs[v])
        samples = {v: [] for v in VARIANTS}
        for rep in range(reps):
            order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]  # rotate who goes first
            for v in order:
                sess, feed = sessions[v], inputs[v]
                t0 = time.perf_counter()
                for _ in range(iters):
                    sess.run(None, feed)
                samples[v].append((time.perf_counter() - t0) / iters * 1e3)
        cell = {v: {"median_ms": round(statistics.median(s), 4), "min_ms": round(min(s), 4),
                    "max_ms": round(max(s), 4), "reps": len(s), "iters": iters} for v, s in samples.items()}
        for v in ("wf_rows", "wf_mask"):
            # paired: each repetition's ratio (its loops ran back to back, under about the same load), then the
            # median; steadier on a shared CPU than the ratio of the medians (also recorded)
            cell[f"{v}/plain"] = round(statistics.median(w / p for w, p in zip(samples[v], samples["plain"])), 3)
            cell[f"{v}/plain (ratio of medians)"] = round(cell[v]["median_ms"] / cell["plain"]["median_ms"], 3)
        out[str(batch)] = cell
    return out


def write(meta: dict, results: dict, base: Path) -> None:
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"# ONNX Runtime serving latency (CPU), {meta['date']}", "",
             f"Machine: {meta['machine']}; onnxruntime {meta['onnxruntime']} (CPUExecutionProvider, "
             f"{meta['threads']} intra-op thread(s)), torch {meta['torch']}, onnx {meta['onnx']}, onnxscript "
             f"{meta['onnxscript']}. Load average before / after: {meta['load_before']} / {meta['load_after']}.", "",
             "Per-call `session.run` time, median of interleaved repetitions (min-max in brackets); `plain` = the "
             "plain model (one class's gates baked in) exported the same way; `wf_rows` = forget int64 [B]; "
             "`wf_mask` = forget bool [B, 10]; ratios: median over repetitions of the ratio within a repetition.", "",
             "| model | batch | plain ms | wf_rows ms | wf_mask ms | wf_rows / plain | wf_mask / plain |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for model, block in results.items():
        for batch, cell in block["latency"].items():
            def fmt(v):
                c = cell[v]
                return f"{c['median_ms']:.3f} [{c['min_ms']:.3f}-{c['max_ms']:.3f}]"
            lines.append(f"| {model} | {batch} | {fmt('plain')} | {fmt('wf_rows')} | {fmt('wf_mask')} | "
                         f"{cell['wf_rows/plain']:.2f} | {cell['wf_mask/plain']:.2f} |")
    lines += ["", "Export seconds (torch.export + ONNX translation + optimisation): " + "; ".join(
        f"{m}: " + ", ".join(f"{v} {s}" for v, s in b["export_s"].items()) for m, b in results.items()),
        "", f"Command: `{meta['command']}`", ""]
    base.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,vit_tiny")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=9, help="interleaved repetitions (>= 5); the median is reported")
    ap.add_argument("--iters", type=int, default=0, help="calls per repetition (0: 32 / batch, at least 2)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--quick", action="store_true", help="small_cnn, 16 px, batches 1,2, 5 reps of 2 calls")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.image_size, args.reps, args.iters = "small_cnn", "1,2", 16, 5, 2
    if args.reps < 5:
        ap.error("--reps must be at least 5 (the median of >= 5 interleaved repetitions)")
    sys.path.insert(0, str(ROOT / "python"))
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    torch.set_num_threads(max(1, args.threads))
    batches = [int(b) for b in args.batches.split(",")]
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core {cpu_name()}, no GPU used",
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "threads": args.threads, "image_size": args.image_size, "num_classes": NUM_CLASSES, "batches": batches,
            "reps": args.reps, "load_before": [round(v, 2) for v in os.getloadavg()],
            "command": "python bench/serve_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"serve_latency_{meta['date']}{args.tag}"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            paths, seconds = export_all(name, args.image_size, Path(tmp))
            per_batch = {}
            for b in batches:
                iters = args.iters or max(2, 32 // b)
                per_batch.update(time_model(paths, [b], args.image_size, args.reps, iters, args.threads))
            results[name] = {"export_s": seconds, "latency": per_batch}
            meta["load_after"] = [round(v, 2) for v in os.getloadavg()]
            write(meta, results, base)  # rewritten after every model: a run cut short keeps what it measured
            print(f"{name}: " + json.dumps(per_batch), flush=True)
    print(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
