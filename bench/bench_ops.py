"""Benchmark of the filtered conv / linear ops against the plain layer, per provider, mode, shape and dtype.

Providers: plain (F.conv2d / F.linear with bias, the unfiltered layer), naive (masked weights per sample), torch
(conv/matmul + unfused gate), torch_compile (torch.compile of the torch path), triton (fused kernels), cuda (the
compiled extension; skipped with a note while ``wfnet.available_backends()['cuda']`` reports an error).
Modes: forward (inference, under no_grad), backward (grad of a saved forward; x and the gate logits need grads,
weights frozen unless --train-weight; --no-alpha-grad: grad to x only), fwd+bwd. Shapes: VGG-16 and ResNet-18 convs (CIFAR-style 32x32), ViT-T / ViT-S qkv (65 tokens at
32x32 / patch 4 with N_c=10, 197 at 224 / patch 16 with N_c=1000), batch 256 = label-expanded 128 (64 forget samples
on their label rows + 3*64 retain samples on random rows).

Times are medians from ``triton.testing.do_bench`` on GPU and a plain ``time.perf_counter`` loop on CPU (``--quick``
for a smoke run); each provider's ratio to plain and the peak memory above the inputs (GPU only) are reported. Results
go to bench/results/bench_<device>_<date>.json and .md, stamped with device, torch / triton versions and date, and
are rewritten after every shape, so a run cut short keeps what it measured. ``--record-dispatch`` also times both
Triton conv paths (forward; the backward is the same for both) and writes the faster per shape to
wf_kernels/dispatch_table.json for this device.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# (name, C_in, C_out, H=W, kernel, stride, padding)
VGG16 = [("vgg16.conv1_1", 3, 64, 32, 3, 1, 1), ("vgg16.conv1_2", 64, 64, 32, 3, 1, 1),
         ("vgg16.conv2_1", 64, 128, 16, 3, 1, 1), ("vgg16.conv2_2", 128, 128, 16, 3, 1, 1),
         ("vgg16.conv3_1", 128, 256, 8, 3, 1, 1), ("vgg16.conv3_2", 256, 256, 8, 3, 1, 1),
         ("vgg16.conv4_1", 256, 512, 4, 3, 1, 1), ("vgg16.conv4_2", 512, 512, 4, 3, 1, 1),
         ("vgg16.conv5_x", 512, 512, 2, 3, 1, 1)]
RESNET18 = [("resnet18.conv1", 3, 64, 32, 3, 1, 1), ("resnet18.layer1", 64, 64, 32, 3, 1, 1),
            ("resnet18.layer2.0.conv1", 64, 128, 32, 3, 2, 1), ("resnet18.layer2.down", 64, 128, 32, 1, 2, 0),
            ("resnet18.layer2", 128, 128, 16, 3, 1, 1), ("resnet18.layer3.0.conv1", 128, 256, 16, 3, 2, 1),
            ("resnet18.layer3", 256, 256, 8, 3, 1, 1), ("resnet18.layer4.0.conv1", 256, 512, 8, 3, 2, 1),
            ("resnet18.layer4", 512, 512, 4, 3, 1, 1)]
# (name, tokens, F_in, num_classes); F_out = 3 * F_in
VIT = [("vit_t.qkv.32px", 65, 192, 10), ("vit_t.qkv.224px", 197, 192, 1000),
       ("vit_s.qkv.32px", 65, 384, 10), ("vit_s.qkv.224px", 197, 384, 1000)]
MODELS = {"vgg16": VGG16, "resnet18": RESNET18, "vit": VIT}
PROVIDERS = ("plain", "naive", "torch", "torch_compile", "triton", "cuda")
MODES = ("forward", "backward", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def label_expanded_rows(batch: int, num_classes: int, gen) -> torch.Tensor:
    """First quarter: forget samples on their label rows; the rest: retain samples on random rows (chi = 3)."""
    forget = batch // 4
    labels = torch.randint(0, num_classes, (forget,), generator=gen)
    retain = torch.randint(0, num_classes, (batch - forget,), generator=gen)
    return torch.cat([labels, retain])


def make_case(kind, spec, batch, dtype, device, train_weight, alpha_grad):
    gen = torch.Generator().manual_seed(0)
    if kind == "conv":
        _, c_in, c_out, hw, k, s, p = spec
        x = torch.randn(batch, c_in, hw, hw, generator=gen)
        w = torch.randn(c_out, c_in, k, k, generator=gen) / (c_in * k * k) ** 0.5
        nc, c = 10, c_out
        conv = dict(stride=(s, s), padding=(p, p), dilation=(1, 1), groups=1)
    else:
        _, t, f_in, nc = spec
        x = torch.randn(batch, t, f_in, generator=gen)
        w = torch.randn(3 * f_in, f_in, generator=gen) / f_in**0.5
        c = 3 * f_in
        conv = None
    x = x.to(device, dtype)
    if kind == "conv" and device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)  # the layout cuDNN prefers for bf16 / TF32
    case = dict(
        x=x.requires_grad_(True), weight=w.to(device, dtype).requires_grad_(train_weight),
        bias=torch.randn(c, generator=gen).to(device, dtype).requires_grad_(train_weight),
        alpha_weight=torch.randn(nc, c, generator=gen).to(device).requires_grad_(alpha_grad),
        alpha_bias=torch.randn(nc, c, generator=gen).to(device).requires_grad_(alpha_grad),
        rows=label_expanded_rows(batch, nc, gen).to(device),
    )
    return case, conv


def make_fn(provider, kind, case, conv):
    """A zero-argument forward for this provider, or a string saying why it is skipped."""
    import wfnet
    from wfnet.ops import wf_conv2d, wf_linear

    c = case
    if provider == "plain":
        if kind == "conv":
            return lambda: F.conv2d(c["x"], c["weight"], c["bias"], **conv)
        return lambda: F.linear(c["x"], c["weight"], c["bias"])
    if provider == "cuda" or provider == "triton":
        err = wfnet.available_backends()[provider]
        if err is not None:
            return f"skipped: {err}"
    if provider == "torch_compile":
        backend = "torch"
    else:
        backend = provider
    if kind == "conv":
        def fn():
            return wf_conv2d(c["x"], c["weight"], c["bias"], c["alpha_weight"], c["alpha_bias"], c["rows"],
                             backend=backend, **conv)
    else:
        def fn():
            return wf_linear(c["x"], c["weight"], c["bias"], c["alpha_weight"], c["alpha_bias"], c["rows"],
                             backend=backend)
    try:  # unsupported input -> a note instead of a number
        fn()
    except wfnet.BackendUnavailableError as exc:
        return f"skipped: {str(exc).splitlines()[-1].strip(' -')}"
    if provider == "torch_compile":
        return torch.compile(fn, fullgraph=True)
    return fn


def _leaves(case, plain):
    tensors = (case["x"], case["weight"], case["bias"]) + (() if plain else (case["alpha_weight"], case["alpha_bias"]))
    return [v for v in tensors if v.requires_grad]


def timed_call(fwd, case, mode, plain):
    """The callable whose time is measured for ``mode`` (plain has no gate logits to differentiate)."""
    if mode == "forward":  # inference forward: no graph, nothing saved for backward
        def run():
            with torch.no_grad():
                return fwd()
        return run
    leaves = _leaves(case, plain)
    if mode == "backward":
        out = fwd()
        grad = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)

    def fb():
        out = fwd()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    return fb


def measure(fn, device, quick):
    """(median ms, peak extra MiB or None)."""
    if device == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100)
        return float(ms), round(peak, 2)
    fn()
    reps = 3 if quick else 10
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


def stamp(device):
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": name, "device_type": device, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host_cpus": os.cpu_count(), "argv": sys.argv[1:]}


def write(results, meta, path_base):
    path_base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# wfnet op benchmark: {meta['device']} ({meta['device_type']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}; "
             f"batch {meta['batch']}; times are medians in ms ({meta['timer']}); x = ratio to plain; "
             f"mem = peak MiB above inputs.", ""]
    if meta["device_type"] != "cuda":
        lines += ["**CPU run: a smoke test of the script, not a performance result.**", ""]
    provs = meta["providers"]
    lines.append("| shape | dtype | mode | " + " | ".join(provs) + " |")
    lines.append("|---|---|---|" + "---|" * len(provs))
    for r in results:
        cells = []
        for p in provs:
            v = r["providers"].get(p)
            if v is None:
                cells.append("")
            elif "skipped" in v:
                cells.append("skip")
            else:
                mem = "" if v["peak_mib"] is None else f", {v['peak_mib']:.0f} MiB"
                cells.append(f"{v['ms']:.3f} ({v['ratio_to_plain']:.2f}x{mem})")
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | " + " | ".join(cells) + " |")
    notes = sorted({f"{p}: {v['skipped']}" for r in results for p, v in r["providers"].items() if "skipped" in v})
    if notes:
        lines += ["", "Skipped providers:", ""] + [f"- {n}" for n in notes]
    if meta.get("dispatch"):
        lines += ["", "Conv dispatch (triton forward, ms):", "", "| key | implicit_gemm | epilogue | chosen |",
                  "|---|---|---|---|"]
        for k, e in meta["dispatch"].items():
            lines.append(f"| {k} | {e['implicit_gemm_ms']:.4f} | {e['epilogue_ms']:.4f} | {e['path']} |")
    path_base.with_suffix(".md").write_text("\n".join(lines) + "\n")


def record_dispatch(case, conv, device, quick):
    """Time both Triton conv paths (forward) for this shape; return the table entry and its key."""
    from wf_kernels import dispatch, ops as kops

    c = case
    cl = kops.is_channels_last(c["x"])
    times = {}
    for path in dispatch.CONV_PATHS:
        fn = lambda: kops.wf_conv2d(c["x"], c["weight"], c["bias"], c["alpha_weight"], c["alpha_bias"],  # noqa
                                    c["rows"], conv["stride"], conv["padding"], conv["dilation"], 1, path=path)
        times[path] = measure(fn, device, quick)[0]
    key = dispatch.shape_key("conv2d", c["x"].dtype, tuple(c["x"].shape), tuple(c["weight"].shape), conv["stride"],
                             conv["padding"], conv["dilation"], 1, cl)
    entry = {"path": min(times, key=times.get), "implicit_gemm_ms": times["implicit_gemm"],
             "epilogue_ms": times["epilogue"]}
    return key, entry


def save_dispatch(meta):
    """Merge this run's conv path measurements into wf_kernels/dispatch_table.json under this device's name."""
    from wf_kernels import dispatch

    table = dispatch._load_table()
    table.setdefault(dispatch.DEVICE_NAME, {}).update(meta["dispatch"])  # the name dispatch looks up
    dispatch.TABLE_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vgg16,resnet18,vit", help="comma list of vgg16, resnet18, vit")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--batch", type=int, default=256, help="samples per batch (label-expanded: B/4 forget + 3B/4 "
                                                           "retain rows); default 256")
    ap.add_argument("--shapes", default="", help="comma list of shape-name substrings to keep (e.g. conv4,vit_s)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    ap.add_argument("--train-weight", action="store_true", help="weights need grads too (default: frozen)")
    ap.add_argument("--no-alpha-grad", action="store_true", help="gate logits frozen: grad to the input only")
    ap.add_argument("--record-dispatch", action="store_true",
                    help="time both Triton conv paths and write the faster per shape to wf_kernels/dispatch_table.json")
    ap.add_argument("--out", default=str(RESULTS), help="output folder (default bench/results)")
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    providers = [p for p in args.providers.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    bad = [p for p in providers if p not in PROVIDERS] + [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown provider/mode {bad}")
    if args.record_dispatch and device != "cuda":
        ap.error("--record-dispatch records GPU measurements only")
    if "plain" not in providers:
        providers.insert(0, "plain")  # ratios are to plain
    meta = stamp(device)
    meta.update(batch=args.batch, providers=providers, modes=modes,
                timer="triton.testing.do_bench median" if device == "cuda" else "time.perf_counter median",
                alpha_grad=not args.no_alpha_grad, train_weight=args.train_weight, dispatch={})
    dev_tag = (meta["device"].replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "")
               if device == "cuda" else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"bench_{dev_tag}_{datetime.date.today().isoformat()}{args.tag}"
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)

    results = []
    filt = [s for s in args.shapes.split(",") if s]
    for model in args.models.split(","):
        kind = "linear" if model == "vit" else "conv"
        for spec in MODELS[model]:
            if filt and not any(f in spec[0] for f in filt):
                continue
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                case, conv = make_case(kind, spec, args.batch, dtype, device, args.train_weight,
                                       not args.no_alpha_grad)
                fns = {p: make_fn(p, kind, case, conv) for p in providers}
                if args.record_dispatch and kind == "conv" and isinstance(fns.get("triton"), type(lambda: 0)):
                    key, entry = record_dispatch(case, conv, device, args.quick)
                    meta["dispatch"][key] = entry
                    save_dispatch(meta)  # after every shape: a run cut short keeps its measurements
                for mode in modes:
                    row = {"shape": spec[0], "spec": list(spec[1:]), "dtype": dname, "mode": mode, "providers": {}}
                    for p, fwd in fns.items():
                        if isinstance(fwd, str):
                            row["providers"][p] = {"skipped": fwd}
                            continue
                        try:
                            ms, peak = measure(timed_call(fwd, case, mode, p == "plain"), device, args.quick)
                            row["providers"][p] = {"ms": ms, "peak_mib": peak}
                        except Exception as exc:  # record, keep going: one failing provider must not end the run
                            row["providers"][p] = {"skipped": f"error: {type(exc).__name__}: {exc}"[:300]}
                    plain = row["providers"]["plain"].get("ms")
                    for v in row["providers"].values():
                        if "ms" in v:
                            v["ratio_to_plain"] = v["ms"] / plain if plain else float("nan")
                    results.append(row)
                    print(f"{spec[0]:28s} {dname:5s} {mode:8s} " + "  ".join(
                        f"{p}={v['ms']:.3f}ms({v['ratio_to_plain']:.2f}x)" if "ms" in v else f"{p}=skip"
                        for p, v in row["providers"].items()), flush=True)
                    write(results, meta, base)
                del case, fns
                if device == "cuda":
                    torch.cuda.empty_cache()
    write(results, meta, base)
    print(f"results: {base}.json / .md")


if __name__ == "__main__":
    main()
