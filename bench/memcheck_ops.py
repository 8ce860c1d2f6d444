"""Odd-shape forward + backward through one fused backend, small enough to run under compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/memcheck_ops.py --backend triton
    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/memcheck_ops.py --backend cuda
    python bench/memcheck_ops.py --backend triton --json OUT/warm.json     # without the sanitizer: warms the
                                                                             # Triton cache, records compile times

Cases (every one forward AND backward to x and the gate logits; the first conv / linear spec also to the weights):
conv2d with odd sizes (3x5x11x9 -> 7, 3x3 stride 2; 2x6x7x13 -> 33, 1x1 no bias; 2x3x9x10 -> 17, 3x3 dilation 2),
in NCHW and channels_last; linear [3, 7, 13] -> 19 and [5, 1, 129] -> 67 (no bias); fp32 and bf16 (bf16 only on a
GPU: the interpreter's tl.dot is wrong for bf16); atomic and deterministic backward (``torch.use_deterministic_
algorithms``); for ``triton`` both conv paths (implicit GEMM, cuDNN + fused epilogue) and both linear paths (GEMM,
cuBLAS + epilogue). Rows leave some classes empty. Each result is compared with the ``torch`` backend (relative
error of the output and of every gradient); a gross mismatch (> 5% fp32, > 10% bf16), a NaN or an exception is a
failure. Exit 0 and a final line ``memcheck_ops: completed backend=<b> cases=<n>`` only when every case passed:
bench/record_verification.py requires that line in the memcheck log.

On a CPU-only machine run with TRITON_INTERPRET=1 (tiny shapes, fp32 only); ``cuda`` needs the compiled extension.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

# cuBLAS needs a fixed workspace for deterministic results (torch raises otherwise under deterministic mode)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

CONV_SPECS = [  # (B, C_in, H, W, C_out, k, stride, padding, dilation, bias)
    (3, 5, 11, 9, 7, 3, 2, 1, 1, True),
    (2, 6, 7, 13, 33, 1, 1, 0, 1, False),
    (2, 3, 9, 10, 17, 3, 1, 2, 2, True),
]
LINEAR_SPECS = [  # (B, T, F_in, F_out, bias)
    (3, 7, 13, 19, True),
    (5, 1, 129, 67, False),
]
NUM_CLASSES = 5
TOL = {torch.float32: 0.05, torch.bfloat16: 0.10}


def _rows(batch, gen):
    # classes 0 and 3 only (+ 4 when the batch allows): classes 1 and 2 stay empty (empty segments)
    return torch.tensor([(0, 3, 4)[i % 3] for i in range(batch)], dtype=torch.long)[torch.randperm(batch, generator=gen)]


def _rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def make_conv(spec, dtype, device, channels_last, gen):
    b, c, h, w, o, k, s, p, d, has_bias = spec
    x = torch.randn(b, c, h, w, generator=gen)
    t = dict(x=x, weight=torch.randn(o, c, k, k, generator=gen) / (c * k * k) ** 0.5,
             bias=torch.randn(o, generator=gen) if has_bias else None,
             alpha_weight=torch.randn(NUM_CLASSES, o, generator=gen),
             alpha_bias=torch.randn(NUM_CLASSES, o, generator=gen) if has_bias else None)
    t = {n: (v.to(device, dtype if n in ("x", "weight", "bias") else torch.float32) if v is not None else None)
         for n, v in t.items()}
    if channels_last:
        t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    return t, dict(stride=s, padding=p, dilation=d), _rows(b, gen)


def make_linear(spec, dtype, device, gen):
    b, tk, f_in, f_out, has_bias = spec
    t = dict(x=torch.randn(b, tk, f_in, generator=gen), weight=torch.randn(f_out, f_in, generator=gen) / f_in**0.5,
             bias=torch.randn(f_out, generator=gen) if has_bias else None,
             alpha_weight=torch.randn(NUM_CLASSES, f_out, generator=gen),
             alpha_bias=torch.randn(NUM_CLASSES, f_out, generator=gen) if has_bias else None)
    t = {n: (v.to(device, dtype if n in ("x", "weight", "bias") else torch.float32) if v is not None else None)
         for n, v in t.items()}
    return t, {}, _rows(b, gen)


def run_case(op, tensors, conv, rows, backend, weight_grad):
    """Forward + backward with fresh leaves; returns (out, {name: grad}) as float32 CPU tensors."""
    from wfnet.ops import wf_conv2d, wf_linear

    leaves = {}
    args = {}
    for n, v in tensors.items():
        if v is None:
            args[n] = None
            continue
        need = n in ("x", "alpha_weight", "alpha_bias") or (weight_grad and n in ("weight", "bias"))
        a = v.detach().clone(memory_format=torch.preserve_format).requires_grad_(need)
        args[n] = a
        if need:
            leaves[n] = a
    r = rows.to(args["x"].device)
    if op == "conv2d":
        out = wf_conv2d(args["x"], args["weight"], args["bias"], args["alpha_weight"], args["alpha_bias"], r,
                        backend=backend, **conv)
    else:
        out = wf_linear(args["x"], args["weight"], args["bias"], args["alpha_weight"], args["alpha_bias"], r,
                        backend=backend)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad)
    if out.is_cuda:
        torch.cuda.synchronize()  # surface asynchronous errors at this case
    return out.detach().float().cpu(), {n: g.float().cpu() for n, g in zip(leaves, grads)}


def cases(backend, device, interpret):
    dtypes = [torch.float32] if interpret or device == "cpu" else [torch.float32, torch.bfloat16]
    conv_paths = ["implicit_gemm", "epilogue"] if backend == "triton" else [None]
    linear_paths = ["gemm", "epilogue"] if backend == "triton" else [None]
    for det in (False, True):
        for dtype in dtypes:
            for i, spec in enumerate(CONV_SPECS):
                for cl in (False, True):
                    for path in conv_paths:
                        yield dict(op="conv2d", spec=spec, dtype=dtype, channels_last=cl, path=path,
                                   deterministic=det, weight_grad=(i == 0 and not det))
            for i, spec in enumerate(LINEAR_SPECS):
                for path in linear_paths:
                    yield dict(op="linear", spec=spec, dtype=dtype, channels_last=False, path=path,
                               deterministic=det, weight_grad=(i == 0 and not det))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, choices=("triton", "cuda"))
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--json", help="write per-case results (first/second call ms = compile time, errors) here")
    ap.add_argument("--limit", type=int, default=0, help="run only the first N cases (smoke tests)")
    ap.add_argument("--once", action="store_true", help="one call per case (no second, timed call): under the "
                                                        "sanitizer the second call adds time and no coverage")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    interpret = os.environ.get("TRITON_INTERPRET") == "1"

    import wfnet
    from wf_kernels import dispatch

    err = wfnet.available_backends()[args.backend]
    if err is not None:
        print(f"memcheck_ops: backend {args.backend!r} is not available: {err}", flush=True)
        return 2
    if args.backend == "triton" and device == "cpu" and not interpret:
        print("memcheck_ops: the triton backend on CPU tensors needs TRITON_INTERPRET=1 (set before start)")
        return 2
    gen = torch.Generator().manual_seed(0)
    results, failed = [], 0
    todo = list(cases(args.backend, device, interpret))
    if args.limit:
        todo = todo[:args.limit]
    t_start = time.perf_counter()
    for c in todo:
        dname = str(c["dtype"]).replace("torch.", "")
        layout = ("nhwc " if c["channels_last"] else "nchw ") if c["op"] == "conv2d" else ""
        label = (f"{c['op']} {c['spec']} {dname} {layout}path={c['path']} det={c['deterministic']} "
                 f"wgrad={c['weight_grad']}")
        rec = {"op": c["op"], "spec": list(c["spec"]), "dtype": dname, "channels_last": c["channels_last"],
               "path": c["path"], "deterministic": c["deterministic"], "weight_grad": c["weight_grad"]}
        try:
            if c["op"] == "conv2d":
                tensors, conv, rows = make_conv(c["spec"], c["dtype"], device, c["channels_last"], gen)
            else:
                tensors, conv, rows = make_linear(c["spec"], c["dtype"], device, gen)
            torch.use_deterministic_algorithms(c["deterministic"], warn_only=True)
            if c["path"] is not None:
                dispatch.force_path(c["op"], c["path"])
            t0 = time.perf_counter()
            out, grads = run_case(c["op"], tensors, conv, rows, args.backend, c["weight_grad"])
            t1 = time.perf_counter()
            if not args.once:
                run_case(c["op"], tensors, conv, rows, args.backend, c["weight_grad"])
            t2 = time.perf_counter() if not args.once else t1
            ref_t = {n: (v.float() if v is not None else None) for n, v in tensors.items()}
            ref_out, ref_grads = run_case(c["op"], ref_t, conv, rows, "torch", c["weight_grad"])
            errs = {"out": _rel(out, ref_out)}
            errs.update({f"grad_{n}": _rel(g, ref_grads[n]) for n, g in grads.items()})
            tol = TOL[c["dtype"]]
            bad = {k: v for k, v in errs.items() if not v <= tol}  # NaN compares False: bad
            rec.update(first_call_ms=(t1 - t0) * 1e3, second_call_ms=(t2 - t1) * 1e3, rel_err=errs,
                       ok=not bad)
            if bad:
                failed += 1
                print(f"MISMATCH {label}: {bad} (tolerance {tol})", flush=True)
            else:
                print(f"ok {label}: first {rec['first_call_ms']:.0f} ms, then {rec['second_call_ms']:.1f} ms; "
                      f"max rel err {max(errs.values()):.2e}", flush=True)
        except Exception as exc:
            failed += 1
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            print(f"ERROR {label}:", flush=True)
            traceback.print_exc()
        finally:
            dispatch.force_path(c["op"], None)
            torch.use_deterministic_algorithms(False)
        results.append(rec)
    total = time.perf_counter() - t_start
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "backend": args.backend, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "interpret": interpret, "torch": torch.__version__, "seconds": total, "failed": failed,
            "compile_ms_total": sum(max(r.get("first_call_ms", 0) - r.get("second_call_ms", 0), 0) for r in results),
            "cases": results}, indent=1))
    if failed:
        print(f"memcheck_ops: FAILED backend={args.backend}: {failed} of {len(results)} case(s)", flush=True)
        return 1
    print(f"memcheck_ops: completed backend={args.backend} cases={len(results)} in {total:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
