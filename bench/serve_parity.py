"""Export parity: ONNX Runtime (CPU) vs the eager wrapped model, per model, dtype and forget input.

For ResNet-18 (CIFAR stem) and ViT-T (timm vit_tiny_patch16_224, img_size 32, patch 4), N_c = 10, random weights and
random gate logits (~ N(0, 3): open and closed channels, different per class), in fp32 and fp16, with ``forget`` as
int64 rows [B] and as a bool mask [B, 10] (30 % of the classes per sample, the first sample's set empty): the model is
exported with ``wfnet.serve.export_onnx`` (example batch 2), then ``--draws`` random (images, forget) pairs at batch
``--batch`` are run by ONNX Runtime and by the eager model (torch backend, CPU). Recorded per cell: the max |ORT -
eager| over the draws, the same relative to max |eager|, and, to show the forget input is live, the smallest max
|ORT(forget_i) - ORT(forget_j)| between two draws' forget inputs on the same images and the max |eager(forget) -
eager(no forget)|.

Output: bench/results/serve_parity_<date><tag>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from serve_latency import NUM_CLASSES, build, cpu_name  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,vit_tiny")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "python"))
    import onnxruntime
    import torch

    from wfnet import serve

    torch.set_num_threads(1)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core {cpu_name()}, no GPU used",
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "batch": args.batch,
            "draws": args.draws, "command": "python bench/serve_parity.py " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for dname in args.dtypes.split(","):
                dtype = getattr(torch, dname)
                wf = build(name, 32).to(dtype)
                for kind in serve.FORGET_KINDS:
                    path = serve.export_onnx(wf, Path(tmp) / f"{name}_{dname}_{kind}.onnx",
                                             torch.randn(2, 3, 32, 32, dtype=dtype), forget=kind)
                    served = serve.OnnxForgetModel(path, threads=1)
                    gen = torch.Generator().manual_seed(0)
                    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(dtype)
                    with torch.no_grad():
                        plain = wf(x).double()
                    errs, rels, outs, effect = [], [], [], 0.0
                    for _ in range(args.draws):
                        if kind == "rows":
                            f = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen)
                        else:
                            f = torch.rand(args.batch, NUM_CLASSES, generator=gen) < 0.3
                            f[0] = False
                        with torch.no_grad():
                            ref = wf(x, forget=f).double()
                        out = torch.from_numpy(served(x.numpy(), f.numpy())).double()
                        errs.append((out - ref).abs().max().item())
                        rels.append(errs[-1] / ref.abs().max().item())
                        outs.append(out)
                        effect = max(effect, (ref - plain).abs().max().item())
                    between = min((outs[i] - outs[j]).abs().max().item()
                                  for i in range(len(outs)) for j in range(i + 1, len(outs)))
                    rows.append({"model": name, "dtype": dname, "forget": kind, "max_abs_diff": max(errs),
                                 "max_rel_diff": max(rels), "min_diff_between_forget_inputs": between,
                                 "max_effect_of_gates": effect})
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"serve_parity_{meta['date']}{args.tag}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [f"# ONNX Runtime vs eager parity of served WF-Net models, {meta['date']}", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, onnxruntime {meta['onnxruntime']} (CPU). Batch "
             f"{args.batch} (the export example had 2), {args.draws} random forget inputs per cell.", "",
             "| model | dtype | forget | max abs diff | max rel diff | min diff between two forget inputs (ORT) | "
             "max effect of the gates (eager) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['forget']} | {r['max_abs_diff']:.2e} | "
                     f"{r['max_rel_diff']:.2e} | {r['min_diff_between_forget_inputs']:.3g} | "
                     f"{r['max_effect_of_gates']:.3g} |")
    lines += ["", f"Command: `{meta['command']}`", ""]
    base.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
