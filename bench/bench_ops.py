"""Benchmark of the filtered conv / linear ops against the plain layer, per provider, mode, shape and dtype.

Providers: plain (F.conv2d / F.linear with bias, the unfiltered layer), naive (masked weights per sample), torch
(conv/matmul + unfused gate), torch_compile (torch.compile of the torch path), triton (fused kernels), cuda (the
compiled extension; skipped with a note while ``wfnet.available_backends()['cuda']`` reports an error).
Modes: forward (inference, under no_grad), backward (grad of a saved forward; x and the gate logits need grads,
weights frozen unless --train-weight; --no-alpha-grad: grad to x only), fwd+bwd. Shapes: VGG-16 and ResNet-18 convs (CIFAR-style 32x32), ViT-T / ViT-S qkv (65 tokens at
32x32 / patch 4 with N_c=10, 197 at 224 / patch 16 with N_c=1000), batch 256 = label-expanded 128 (64 forget samples
on their label rows + 3*64 retain samples on random rows).

Modes: ``forward`` is inference (no_grad: no graph, nothing saved); ``backward`` and ``fwd+bwd`` are training (the
gate logits and x need grads). Rows are prepared outside the timed region: drawn, moved to the device and validated
once (``wfnet.rows.prepare_rows`` when the library has it, so the timed WF call pays no validation sync that the
plain layer does not; the torch_compile provider gets the device tensor, since a compiled graph asserts on the
device). On a GPU each cell also records the host syncs of one call (``torch.cuda.set_sync_debug_mode``).

Timing: on GPU the median (with the 20th / 80th percentiles) of ``triton.testing.do_bench`` (CUDA events; it returns
the MEAN unless quantiles or return_mode="median" are passed, so they are passed) and, beside it, the median of
``triton.testing.do_bench_cudagraph`` (the same call replayed from a CUDA graph: launch overhead removed; a call that
cannot be captured, e.g. one that syncs, is recorded as such). On CPU the median of a ``time.perf_counter`` loop.
Each provider's ratio to plain and the peak memory above the inputs (GPU only) are reported. Results go to
bench/results/bench_<device>_<date><tag>.json and .md, stamped with device, torch / triton / CUDA / cuDNN versions,
TF32 flags and date, and are rewritten after every shape, so a run cut short keeps what it measured.
``--record-dispatch`` also times both Triton conv paths (forward; the backward is the same for both), writes the
faster per shape to wf_kernels/dispatch_table.json for this device and reloads the table in place
(``wf_kernels.dispatch.TABLE``), so the triton provider is then timed on the path the table picks.
``--quick``: few repetitions and, unless --shapes is given, one representative subset of shapes
(QUICK_SHAPES); torch_compile is left out on GPU in quick mode (recorded as skipped with that reason).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from wfnet import profiling  # host syncs and GPU timing, shared with bench_model.py and the GPU tests
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
QUICK_SHAPES = ("vgg16.conv1_2", "vgg16.conv4_2", "resnet18.layer2.0.conv1", "resnet18.layer3", "vit_s.qkv.32px",
                "vit_s.qkv.224px")
PROVIDERS = ("plain", "naive", "torch", "torch_compile", "triton", "cuda")
MODES = ("forward", "backward", "fwd+bwd")
MODE_KIND = {"forward": "inference (no_grad)", "backward": "training", "fwd+bwd": "training"}
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
        rows_tensor=label_expanded_rows(batch, nc, gen).to(device),
    )
    case["rows"] = prepare(case["rows_tensor"], nc, batch)
    if device == "cuda":
        torch.cuda.synchronize()  # the copies and the validation are done before anything is timed
    return case, conv


def prepare(rows, num_classes, batch):
    """Rows validated once, outside the timed region (``wfnet.rows.prepare_rows``; the plain device tensor on a
    library without it)."""
    try:
        from wfnet.rows import prepare_rows
    except ImportError:
        return rows
    return prepare_rows(rows, num_classes, batch)


def rows_mode() -> str:
    try:
        from wfnet.rows import prepare_rows  # noqa: F401
        return "wfnet.rows.prepare_rows once per case, outside the timed region (torch_compile: the device tensor)"
    except ImportError:
        return "int64 device tensor made before timing (this library version re-validates it per call)"


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
    rows = c["rows_tensor"] if provider == "torch_compile" else c["rows"]
    if kind == "conv":
        def fn():
            return wf_conv2d(c["x"], c["weight"], c["bias"], c["alpha_weight"], c["alpha_bias"], rows,
                             backend=backend, **conv)
    else:
        def fn():
            return wf_linear(c["x"], c["weight"], c["bias"], c["alpha_weight"], c["alpha_bias"], rows,
                             backend=backend)
    try:  # unsupported input -> a note instead of a number
        fn()
    except wfnet.BackendUnavailableError as exc:
        return f"skipped: {str(exc).splitlines()[-1].strip(' -')}"
    except Exception as exc:  # a broken provider is recorded, not fatal: the other providers still get measured
        return f"skipped: error in the first call: {type(exc).__name__}: {exc}"[:400]
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


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def count_host_syncs(fn) -> int | None:
    """Host syncs of one call of ``fn`` (GPU only; None on a CPU): :func:`wfnet.profiling.count_host_syncs`."""
    report = profiling.count_host_syncs(fn)
    return None if report is None else report.count


def measure(fn, device, quick, graph=True) -> dict:
    """{"ms": median, "p20_ms", "p80_ms", "graph_ms" (CUDA-graph replay median) or "graph_skipped", "peak_mib",
    "syncs"}. GPU: triton.testing; CPU: time.perf_counter loop (median)."""
    if device == "cuda":
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        res = {"peak_mib": round(peak, 2), "syncs": count_host_syncs(fn)}
        res.update(profiling.time_cuda(fn, warmup=5 if quick else 25, rep=20 if quick else 100, graph=graph,
                                       syncs=res["syncs"]))
        return res
    fn()
    times = profiling.time_cpu(fn, 3 if quick else 10)
    return {"ms": statistics.median(times), "p20_ms": None, "p80_ms": None, "peak_mib": None, "syncs": None,
            "graph_skipped": "CPU: no CUDA graphs"}


def stamp(device):
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": name, "device_type": device, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
            else None, "date": datetime.datetime.now().isoformat(timespec="seconds"), "host_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "argv": sys.argv[1:],
            "tf32": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision()},
            "autotune": os.environ.get("WFNET_AUTOTUNE", "1") != "0",
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def write(results, meta, path_base):
    path_base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# wfnet op benchmark: {meta['device']} ({meta['device_type']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, "
             f"{meta['date']}; batch {meta['batch']}; TF32 {meta['tf32']}; autotune {meta['autotune']}.", "",
             f"Cells: median ms ({meta['timer']}) (ratio to plain[, CUDA-graph replay median ms][, peak MiB above "
             f"inputs][, host syncs per call when not 0]). forward = inference (no_grad); backward, fwd+bwd = "
             f"training. Rows: {meta['rows']}.", ""]
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
                extra = "" if v.get("graph_ms") is None else f", graph {v['graph_ms']:.3f}"
                extra += "" if v.get("peak_mib") is None else f", {v['peak_mib']:.0f} MiB"
                extra += f", {v['syncs']} sync" if v.get("syncs") else ""
                extra += (f", RECOMPILED {v['recompiles_while_timed']}x while timed"
                          if v.get("recompiles_while_timed") else "")
                cells.append(f"{v['ms']:.3f} ({v['ratio_to_plain']:.2f}x{extra})")
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | " + " | ".join(cells) + " |")
    notes = sorted({f"{p}: {v['skipped']}" for r in results for p, v in r["providers"].items() if "skipped" in v})
    notes += sorted({f"{p} (CUDA graph): {v['graph_skipped']}" for r in results for p, v in r["providers"].items()
                     if v.get("graph_skipped") and meta["device_type"] == "cuda"})
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
        times[path] = measure(fn, device, quick, graph=False)["ms"]
    key = dispatch.shape_key("conv2d", c["x"].dtype, tuple(c["x"].shape), tuple(c["weight"].shape), conv["stride"],
                             conv["padding"], conv["dilation"], 1, cl)
    entry = {"path": min(times, key=times.get), "implicit_gemm_ms": times["implicit_gemm"],
             "epilogue_ms": times["epilogue"],
             # dispatch prefers a measured entry over the roofline prediction (wf_kernels/dispatch.py)
             "source": f"measured {dispatch.DEVICE_NAME} {datetime.date.today().isoformat()}"}
    return key, entry


def save_dispatch(meta):
    """Merge this run's conv path measurements into wf_kernels/dispatch_table.json under this device's name."""
    from wf_kernels import dispatch

    table = dispatch._load_table()
    table.setdefault(dispatch.DEVICE_NAME, {}).update(meta["dispatch"])  # the name dispatch looks up
    tmp = dispatch.TABLE_PATH.with_name(dispatch.TABLE_PATH.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, dispatch.TABLE_PATH)
    # dispatch read the table at import: reload it IN PLACE so every later call (and any module holding a reference
    # to dispatch.TABLE) takes the paths just measured
    dispatch.TABLE.clear()
    dispatch.TABLE.update(dispatch._load_table())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vgg16,resnet18,vit", help="comma list of vgg16, resnet18, vit")
    ap.add_argument("--providers", default=None, help=f"comma list of {', '.join(PROVIDERS)} (default: all; "
                                                      f"--quick on GPU leaves out torch_compile)")
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
    excluded = {}
    if args.providers is None:
        providers = list(PROVIDERS)
        if args.quick and device == "cuda":
            providers.remove("torch_compile")
            excluded["torch_compile"] = ("skipped: left out by --quick (an inductor compile per shape, dtype and "
                                         "mode costs minutes); run without --quick (FULL=1 in gpu_check.sh)")
    else:
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
    meta.update(batch=args.batch, providers=providers + list(excluded), modes=modes, rows=rows_mode(),
                mode_kinds=MODE_KIND,
                timer=("triton.testing.do_bench median of CUDA-event times (p20/p80 in the JSON); graph = "
                       "triton.testing.do_bench_cudagraph median" if device == "cuda"
                       else "time.perf_counter median"),
                alpha_grad=not args.no_alpha_grad, train_weight=args.train_weight, dispatch={})
    dev_tag = (meta["device"].replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "")
               if device == "cuda" else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"bench_{dev_tag}_{datetime.date.today().isoformat()}{args.tag}"
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    # the "backward" mode re-runs one saved graph (retain_graph=True), which donated buffers forbid
    torch._functorch.config.donated_buffer = False

    results = []
    filt = [s for s in args.shapes.split(",") if s]
    if args.quick and not filt:
        filt = list(QUICK_SHAPES)
        meta["shapes"] = f"--quick subset: {', '.join(QUICK_SHAPES)}"
    for model in args.models.split(","):
        kind = "linear" if model == "vit" else "conv"
        for spec in MODELS[model]:
            if filt and not any(f in spec[0] for f in filt):  # substring match (QUICK_SHAPES are full names)
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
                    row = {"shape": spec[0], "spec": list(spec[1:]), "dtype": dname, "mode": mode,
                           "mode_kind": MODE_KIND[mode], "providers": {}}
                    for p, fwd in fns.items():
                        if isinstance(fwd, str):
                            row["providers"][p] = {"skipped": fwd}
                            continue
                        try:
                            graphs0 = compiled_graphs()
                            fn = timed_call(fwd, case, mode, p == "plain")
                            fn()  # compiles (torch_compile: this mode's graph) happen here, before timing
                            graphs1 = compiled_graphs()
                            row["providers"][p] = measure(fn, device, args.quick)
                            if p == "torch_compile":
                                # a guard that fails on every call recompiles inside the timed region: say so
                                row["providers"][p]["compiles_before_timing"] = graphs1 - graphs0
                                row["providers"][p]["recompiles_while_timed"] = compiled_graphs() - graphs1
                            if p == "triton":
                                from wf_kernels import dispatch

                                row["providers"][p]["path"] = dispatch.last_decisions.get(
                                    "conv2d" if kind == "conv" else "linear")
                        except Exception as exc:  # record, keep going: one failing provider must not end the run
                            row["providers"][p] = {"skipped": f"error: {type(exc).__name__}: {exc}"[:300]}
                    for p, why in excluded.items():
                        row["providers"][p] = {"skipped": why}
                    plain = row["providers"]["plain"].get("ms")
                    plain_graph = row["providers"]["plain"].get("graph_ms")
                    for v in row["providers"].values():
                        if "ms" in v:
                            v["ratio_to_plain"] = v["ms"] / plain if plain else float("nan")
                        if v.get("graph_ms") is not None and plain_graph:
                            v["graph_ratio_to_plain"] = v["graph_ms"] / plain_graph
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
