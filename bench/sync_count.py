"""Count host-device synchronisations of a wrapped ResNet-18: one forward per way of giving rows, one untraining step.

    python bench/sync_count.py --out bench/results            # on a GPU: counts; on a CPU: runs, reports no counts

For each backend ("auto" and every explicit one that imports): one inference forward (no_grad) of a wrapped CIFAR
ResNet-18 with the rows given as (a) a CPU int64 tensor, (b) one int, (c) a CUDA int64 tensor, and one untraining
step exactly like the body of ``wfnet.untrain.untrain``'s loop (CPU batch -> ``expand_batch`` on the CPU -> inputs to
the device, CPU rows to the model -> ``untrain_loss`` (one host copy of the loss parts, which the progress bar
shows) -> backward -> Adam step -> clamp). Each is run once untimed first (lazy initialisation, Triton compiles),
then once under ``torch.cuda.set_sync_debug_mode("warn")``, counting the warnings it raises and where (file:line of
the innermost wfnet / bench frame). The targets of issue 9 are recorded beside the counts: at most 1 sync per forward
(a CUDA tensor of rows needs one range check), at most 1 per untraining step (the loss parts). Nothing is asserted.

Writes ``sync_count_<device>.json``. Sync counting needs CUDA (the debug mode reports CUDA synchronisations only):
on a CPU-only machine the script still runs every case once and says so in the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch

from wfnet import profiling

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"forward": 1, "untrain_step": 1}
_OWN = ("wfnet", "wf_kernels", "bench", "torch/optim", "torch/nn")


def count_syncs(fn, cuda: bool) -> dict:
    """Run ``fn`` once; on CUDA count the synchronisations torch's sync debug mode reports, and where
    (:func:`wfnet.profiling.count_host_syncs`)."""
    if not cuda:
        fn()
        return {"syncs": None, "where": []}
    report = profiling.count_host_syncs(fn)
    return {"syncs": report.count, "where": report.where}


def build(device, num_classes=10):
    import wfnet
    from wfnet.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes, in_chans=3, image_size=32)
    return wfnet.wrap(model, num_classes).to(device).eval()


def untrain_step_fn(wf, x_cpu, y_cpu, device, cfg, opt, params, step):
    """One step of wfnet.untrain.untrain's loop body (same calls, same order)."""
    from wfnet.untrain import untrain_step

    def fn():
        gen = torch.Generator().manual_seed(1000 + step[0])
        step[0] += 1
        return untrain_step(wf, params, opt, x_cpu, y_cpu, wf.num_classes, cfg, gen, device)
    return fn


def run_backend(backend, device, batch, step_batch):
    import wfnet
    from wfnet.untrain import recipe

    cuda = device.type == "cuda"
    res = {}
    with wfnet.use_backend(backend):
        wf = build(device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        rows_cpu = torch.randint(0, 10, (batch,), generator=gen)
        kinds = {"cpu_tensor": rows_cpu, "int": 3}
        if cuda:
            kinds["cuda_tensor"] = rows_cpu.to(device)
        else:
            res["forward/cuda_tensor"] = {"skipped": "no CUDA device"}
        for kind, rows in kinds.items():
            def fwd(rows=rows):
                with torch.no_grad():
                    return wf(x, forget=rows)
            fwd()  # warm-up: lazy init, Triton compiles, cuDNN plans
            r = count_syncs(fwd, cuda)
            r["target_max"] = TARGETS["forward"]
            r["within_target"] = None if r["syncs"] is None else r["syncs"] <= TARGETS["forward"]
            res[f"forward/{kind}"] = r
        cfg = recipe("tuned", "cnn")
        params = list(wf.filter_parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr)
        xs = torch.randn(step_batch, 3, 32, 32, generator=gen)
        ys = torch.randint(0, 10, (step_batch,), generator=gen)
        step = [0]
        fn = untrain_step_fn(wf, xs, ys, device, cfg, opt, params, step)
        fn()  # warm-up (optimizer state, backward kernels)
        r = count_syncs(fn, cuda)
        r["target_max"] = TARGETS["untrain_step"]
        r["within_target"] = None if r["syncs"] is None else r["syncs"] <= TARGETS["untrain_step"]
        r["batch"] = f"{step_batch} -> {step_batch // 2 + cfg.chi * (step_batch - step_batch // 2)} label-expanded"
        res["untrain_step"] = r
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--backends", default="auto,torch,triton,cuda")
    ap.add_argument("--batch", type=int, default=0, help="forward batch (default 32 on GPU, 4 on CPU)")
    ap.add_argument("--step-batch", type=int, default=0, help="untraining batch before expansion (default 128 on "
                                                             "GPU, 4 on CPU)")
    args = ap.parse_args(argv)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(dev)
    cuda = dev == "cuda"
    batch = args.batch or (32 if cuda else 4)
    step_batch = args.step_batch or (128 if cuda else 4)

    import wfnet

    avail = wfnet.available_backends()
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "device_type": dev,
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "model": "resnet18 (CIFAR stem), N_c=10",
           "forward_batch": batch, "step_batch": step_batch, "targets": TARGETS,
           "method": ("torch.cuda.set_sync_debug_mode('warn'), one warning per synchronising CUDA call, counted "
                      "over one call after one untimed warm-up call"),
           "sync_counting": "ok" if cuda else "needs CUDA: set_sync_debug_mode reports CUDA synchronisations only; "
                                              "every case ran once on the CPU, no counts",
           "backends": {}}
    rc = 0
    for backend in [b for b in args.backends.split(",") if b]:
        if backend != "auto" and avail.get(backend) is not None:
            out["backends"][backend] = {"skipped": avail[backend]}
            print(f"{backend}: skipped: {avail[backend]}")
            continue
        if backend != "auto":  # imports, but cannot run on this device (e.g. the built cuda extension on a CPU)
            from wfnet.backends import backend_status

            st = backend_status(device)[backend]
            if not st["runs_here"]:
                out["backends"][backend] = {"skipped": st["why_not"]}
                print(f"{backend}: skipped: {st['why_not']}")
                continue
        try:
            res = run_backend(backend, device, batch, step_batch)
        except Exception as exc:  # record and go on: one broken backend must not hide the others' counts
            res = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
            rc = 1
        out["backends"][backend] = res
        for case, r in res.items():
            if isinstance(r, dict) and "syncs" in r:
                print(f"{backend:7s} {case:22s} syncs={r['syncs']} (target <= {r['target_max']})"
                      + (f"  at {', '.join(r['where'])}" if r["where"] else ""))
            else:
                print(f"{backend:7s} {case:22s} {r}")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    tag = out["device"].replace(" ", "_").replace("/", "_") if cuda else "cpu"
    path = folder / f"sync_count_{tag}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
