"""The torch backend's epilogue, blocked or in whole-tensor passes: the measurement behind
``wfnet.backends.torch_ref``'s choice (whole-tensor in-place passes without a graph, cache-sized blocks with one).

    python bench/epilogue_blocks.py [--model resnet18] [--batch 64] [--image-size 32] [--reps 7] [--threads 1]

The wrapped model (fold on, torch backend, CPU) at the untraining batch: the WF forward (no grad, 2B label-expanded
rows) and the WF untraining step (``wfnet.untrain.untrain_step``, B samples -> 2B rows), each with the graph path's
block size set to ``_BLOCK`` (the library's), 4x that, and "whole" (one block: the whole tensor), and the no-graph
path forced into blocks of ``_BLOCK`` as well as run whole (the library's). Every case interleaved round robin in
one process, median of ``--reps`` rounds. Writes ``bench/results/epilogue_blocks_<date><tag>.json`` and ``.md``.
CPU numbers say nothing about GPU speed (the GPU backends have their own fused epilogues).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402  (the models, rows and step of the model benchmark)

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=bm.FOLD_MODELS)
    ap.add_argument("--batch", type=int, default=64, help="samples per untraining step (2x rows after expansion)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps: at least 3 rounds")

    import wfnet
    from wfnet.backends import torch_ref

    torch.set_num_threads(args.threads)
    n = args.batch
    gen = torch.Generator().manual_seed(0)
    x2 = torch.randn(2 * n, 3, args.image_size, args.image_size, generator=gen)
    rows = bm.label_expanded_rows(2 * n, bm.NUM_CLASSES, gen)
    xb = torch.randn(n, 3, args.image_size, args.image_size, generator=gen)
    yb = torch.randint(0, bm.NUM_CLASSES, (n,), generator=gen)
    original = bm.build(args.model, args.image_size).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    wf = wfnet.wrap(copy.deepcopy(original), bm.NUM_CLASSES).eval()
    forward = bm.wf_forward_fn(wf, x2, rows, "cpu", None)
    step = bm.wf_step_fn(wf, xb, yb, "cpu", None)
    library_block = torch_ref._BLOCK
    whole = 1 << 60
    real_gate_epilogue = torch_ref.gate_epilogue

    def blocked_no_graph(z, gate, gated_bias, act="none"):
        """The no-graph path in blocks of ``_BLOCK`` (what the library does NOT do, for the comparison)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return real_gate_epilogue(z, gate, gated_bias, act)
        b = None if gated_bias is None else gated_bias.to(z.dtype)
        return torch_ref._epilogue_blocks(z, gate.to(z.dtype), b, act, z)

    def case(fn, block, no_graph_blocked=False):
        def run():
            torch_ref._BLOCK = block
            if no_graph_blocked:
                torch_ref.gate_epilogue = blocked_no_graph
            try:
                fn()
            finally:
                torch_ref._BLOCK = library_block
                torch_ref.gate_epilogue = real_gate_epilogue
        return run

    cases = {
        "WF forward, whole-tensor passes (library)": case(forward, library_block),
        "WF forward, blocks of _BLOCK": case(forward, library_block, no_graph_blocked=True),
        "WF step, blocks of _BLOCK (library)": case(step, library_block),
        "WF step, blocks of 4 x _BLOCK": case(step, 4 * library_block),
        "WF step, whole-tensor passes": case(step, whole),
    }
    times = {k: [] for k in cases}
    with wfnet.use_backend("torch"):
        for k, fn in cases.items():
            fn()
        for r in range(args.reps):
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
            print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    date = datetime.date.today().isoformat()
    meta = {"date": date, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "model": args.model, "batch": n, "rows": 2 * n, "image_size": args.image_size,
            "reps": args.reps, "block_elements": library_block,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"epilogue_blocks_{date}{args.tag}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "times_ms": times, "median_ms": med}, indent=1)
                                         + "\n")
    lines = [f"# Torch epilogue: blocks or whole-tensor passes ({args.model}, CPU, {date})", "",
             f"**CPU run**: {meta['machine']}, torch {meta['torch']}, {args.threads} thread(s), load average "
             f"{meta['load_average']} at the end; batch {n} samples ({2 * n} label-expanded rows), {args.image_size} "
             f"px, fold on, torch backend; `_BLOCK` = {library_block} elements per thread; every case interleaved "
             f"round robin, median of {args.reps} rounds. Nothing is asserted.", "",
             "| case | median ms | min | max |", "|---|---|---|---|"]
    for k, v in times.items():
        lines.append(f"| {k} | {med[k]:.1f} | {min(v):.1f} | {max(v):.1f} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"results: {base}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
