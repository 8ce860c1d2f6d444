"""Calibration of the `cpu` profile of `wfnet reproduce --dataset mnist` (issue 13), on real MNIST and 2 CPU cores.

Sub-commands (every result is appended as one JSON line to --log, default runs/calib/results.jsonl; weights go to
runs/calib/, which is git-ignored):

    bench     seconds per training step (fwd+bwd+SGD) and per untraining step for each backbone, fp32 vs bf16
              autocast, channels_last on/off
    train     train an original model (subset, epochs, batch, optimizer, OneCycle/cosine, random-shift augmentation,
              bf16 autocast) and evaluate on the FULL 10,000-image MNIST test set
    untrain   wrap a trained model, run wfnet.untrain.untrain with recipe(name, kind, **overrides) on a train subset,
              then evaluate per class c (row c on the test set: Acc_f on class c, Acc_r on the others; mean over c)
    baseline  time one class of each per-class baseline (wfnet.baselines.unlearn_baseline) and measure its Acc_r/Acc_f

Data: /work/shared/data/mnist.npz, normalised with MNIST's mean/std; VGG gets the 28x28 digits zero-padded (in pixel
space, i.e. background) to 32x32. Augmentation: random integer shift of up to +-2 px (pad 2 with background, random
crop), applied per sample on the batch tensor.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "calib"
MEAN, STD = 0.1307, 0.3081
CNN = ("vgg16", "vgg16_bn", "resnet18", "small_cnn")


# ------------------------------------------------------------------------------------------------------------- data
def load_mnist(image_size: int = 28):
    d = np.load("/work/shared/data/mnist.npz")

    def prep(x):
        x = torch.from_numpy(x).float().div_(255.0).unsqueeze(1)
        if image_size != 28:
            p = (image_size - 28) // 2
            x = F.pad(x, (p, image_size - 28 - p, p, image_size - 28 - p))  # background padding
        return ((x - MEAN) / STD).contiguous()

    return (prep(d["x_train"]), torch.from_numpy(d["y_train"]).long(),
            prep(d["x_test"]), torch.from_numpy(d["y_test"]).long())


def subset(x, y, n, seed=0):
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 12345))[:n].sort().values
    return x[idx], y[idx]


def random_shift(x, max_shift: int, g: torch.Generator):
    """Per-sample random integer translation by up to +-max_shift px (background fill)."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    bg = (0.0 - MEAN) / STD
    xp = F.pad(x, (max_shift,) * 4, value=bg)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=g)
    iy = (torch.arange(H)[None, :] + dy[:, None])  # [B, H]
    ix = (torch.arange(W)[None, :] + dx[:, None])  # [B, W]
    b = torch.arange(B)[:, None, None]
    out = xp[:, 0][b, iy[:, :, None], ix[:, None, :]]  # [B, H, W]  (C == 1)
    return out.unsqueeze(1).contiguous()


# ----------------------------------------------------------------------------------------------------------- models
def image_size_for(name: str) -> int:
    return 32 if name.startswith("vgg") else 28


def build(name: str) -> nn.Module:
    from wfnet.models import build_model
    if name == "vgg16_bn":  # **decision candidate**: VGG-16 with BatchNorm, adapted like wfnet.models' vgg16
        import torchvision
        m = torchvision.models.vgg16_bn(num_classes=10)
        m.features[0] = nn.Conv2d(1, 64, 3, padding=1)
        m.avgpool = nn.AdaptiveAvgPool2d(1)
        m.classifier = nn.Linear(512, 10)
        return m
    if name == "resnet18_s2":  # **decision candidate**: 3x3 stride-2 stem, no max-pool (layer1 at 14x14)
        m = build_model("resnet18", 10, in_chans=1, image_size=28)
        m.conv1 = nn.Conv2d(1, 64, 3, stride=2, padding=1, bias=False)
        return m
    if name == "resnet18_tv":  # torchvision's own stem (7x7 stride 2 + max-pool; layer1 at 7x7)
        import torchvision
        m = torchvision.models.resnet18(num_classes=10)
        m.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        return m
    if name.startswith("vit_") and "_p" in name:  # e.g. vit_tiny_p7: patch 7 at 28 px (16 tokens + cls)
        import timm
        base, p = name.rsplit("_p", 1)
        arch = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}[base]
        return timm.create_model(arch, pretrained=False, num_classes=10, in_chans=1, img_size=28, patch_size=int(p))
    return build_model(name, 10, in_chans=1, image_size=image_size_for(name))


def kind_of(name: str) -> str:
    return "vit" if name.startswith("vit") else "cnn"


def amp(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def env_info():
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()), "cpus": os.cpu_count()}


def log(args, rec):
    rec = {**rec, **{"env_end": env_info()}}
    p = Path(args.log)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


@torch.no_grad()
def predict(fwd, x, dtype, bs=500, cl=False):
    out = []
    for i in range(0, len(x), bs):
        xb = x[i:i + bs]
        if cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with amp(dtype):
            out.append(fwd(xb).float().argmax(1))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------------------ bench
def cmd_bench(args):
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        s = image_size_for(name)
        for dtype in args.dtypes.split(","):
            for cl in ([False, True] if kind_of(name) == "cnn" and args.channels_last_both else [kind_of(name) == "cnn" and args.cl]):
                torch.manual_seed(0)
                m = build(name)
                if cl:
                    m = m.to(memory_format=torch.channels_last)
                opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                x = torch.randn(args.batch, 1, s, s)
                y = torch.randint(0, 10, (args.batch,))
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                times, cpu = [], []
                env0 = env_info()
                for i in range(args.warmup + args.steps):
                    t, c0 = time.perf_counter(), time.process_time()
                    with amp(dtype):
                        loss = F.cross_entropy(m(x).float(), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t)
                        cpu.append(time.process_time() - c0)
                m.eval()
                tinf = []
                with torch.no_grad():
                    for i in range(1 + max(2, args.steps // 2)):
                        t = time.perf_counter()
                        with amp(dtype):
                            m(x)
                        if i:
                            tinf.append(time.perf_counter() - t)
                rec = {"cmd": "bench_train", "model": name, "dtype": dtype, "channels_last": cl, "batch": args.batch,
                       "train_step_s_median": float(np.median(times)), "train_step_s_min": float(np.min(times)),
                       "train_img_per_s": args.batch / float(np.median(times)),
                       "train_step_cpu_s_median": float(np.median(cpu)),
                       "idle_est_train_img_per_s": args.batch * args.threads / float(np.median(cpu)),
                       "infer_img_per_s": args.batch / float(np.median(tinf)), "env_start": env0}
                if args.untrain:
                    import wfnet
                    from wfnet.untrain import expand_batch, recipe, untrain_loss
                    wf = wfnet.wrap(m, 10)
                    wf.eval()
                    cfg = recipe("tuned", kind_of(name))
                    params = list(wf.filter_parameters())
                    uopt = torch.optim.Adam(params, lr=0.1)
                    ut, uc = [], []
                    for i in range(1 + max(2, args.steps // 2)):
                        inputs, rows, labels, nf = expand_batch(x, y, 10, 3, torch.Generator().manual_seed(i))
                        t, c0 = time.perf_counter(), time.process_time()
                        with amp(dtype):
                            logits = wf(inputs, forget=rows)
                        loss, _ = untrain_loss(logits, labels, nf, params, cfg)
                        uopt.zero_grad()
                        loss.backward()
                        uopt.step()
                        if i:
                            ut.append(time.perf_counter() - t)
                            uc.append(time.process_time() - c0)
                    rec["untrain_step_s_median"] = float(np.median(ut))
                    rec["untrain_step_cpu_s_median"] = float(np.median(uc))
                    rec["untrain_samples_per_step"] = int(inputs.shape[0])
                log(args, rec)


# ------------------------------------------------------------------------------------------------------------ train
def make_opt_sched(m, args, total_steps):
    if args.opt == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    elif args.opt == "adamw":
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=args.wd)
    else:
        raise ValueError(args.opt)
    if args.sched == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps,
                                                    pct_start=args.warmup_frac, anneal_strategy="cos",
                                                    div_factor=25.0, final_div_factor=1e3,
                                                    cycle_momentum=(args.opt == "sgd"))
    else:  # linear warmup + cosine
        w = max(1, int(args.warmup_frac * total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, total_steps - w))))
    return opt, sched


def cmd_train(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    s = image_size_for(args.model)
    xtr, ytr, xte, yte = load_mnist(s)
    xtr, ytr = subset(xtr, ytr, args.train_limit, args.seed)
    m = build(args.model)
    cl = args.cl and kind_of(args.model) == "cnn"
    if cl:
        m = m.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(ytr) / args.batch)
    total = int(round(args.epochs * steps_per_epoch))
    opt, sched = make_opt_sched(m, args, total)
    g = torch.Generator().manual_seed(args.seed)
    env0 = env_info()
    t0 = time.time()
    step, hist = 0, []
    ep = 0
    while step < total:
        m.train()
        perm = torch.randperm(len(ytr), generator=g)
        tl = n = 0
        for i in range(0, len(perm), args.batch):
            if step >= total:
                break
            idx = perm[i:i + args.batch]
            xb = random_shift(xtr[idx], args.shift, g)
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with amp(args.dtype):
                out = m(xb)
            loss = F.cross_entropy(out.float(), ytr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), args.clip)
            opt.step()
            sched.step()
            step += 1
            tl += loss.item() * len(idx)
            n += len(idx)
            if step % 50 == 0:
                print(f"step {step}/{total} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        ep += 1
        hist.append({"epoch": ep, "train_loss": tl / max(n, 1), "seconds": time.time() - t0})
    train_s = time.time() - t0
    m.eval()
    t1 = time.time()
    pred = predict(m, xte, args.eval_dtype, cl=cl)
    acc = (pred == yte).float().mean().item() * 100
    eval_s = time.time() - t1
    print(f"test accuracy ({args.eval_dtype}, full test set): {acc:.2f}% after {train_s:.0f}s of training", flush=True)
    pred32 = None
    if args.eval_dtype != "fp32":
        pred32 = (predict(m, xte, "fp32", cl=cl) == yte).float().mean().item() * 100
    out = Path(args.out or RUNS / f"{args.tag or args.model}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(m.to(memory_format=torch.contiguous_format).state_dict(), out)
    log(args, {"cmd": "train", "model": args.model, "tag": args.tag, "train_limit": args.train_limit,
               "epochs": args.epochs, "batch": args.batch, "opt": args.opt, "lr": args.lr, "wd": args.wd,
               "sched": args.sched, "warmup_frac": args.warmup_frac, "shift": args.shift, "dtype": args.dtype,
               "channels_last": cl, "label_smoothing": args.label_smoothing, "steps": total, "image_size": s,
               "test_acc_full": acc, "test_acc_fp32": pred32, "eval_dtype": args.eval_dtype,
               "train_seconds": train_s, "eval_seconds": eval_s, "history": hist, "weights": str(out),
               "env_start": env0})


# ---------------------------------------------------------------------------------------------------------- untrain
def per_class_acc(fwd_for_class, xte, yte, dtype, classes=range(10), bs=500):
    """Acc_f[c] (class-c test samples) and Acc_r[c] (the others) with the model for class c on the test set."""
    af, ar = [], []
    for c in classes:
        pred = predict(lambda x: fwd_for_class(x, c), xte, dtype, bs)
        ok = (pred == yte)
        af.append(ok[yte == c].float().mean().item() * 100)
        ar.append(ok[yte != c].float().mean().item() * 100)
    return af, ar


def load_model(name, weights):
    m = build(name)
    m.load_state_dict(torch.load(weights, map_location="cpu"))
    return m.eval()


def cmd_untrain(args):
    import wfnet
    from wfnet.untrain import recipe, untrain
    torch.set_num_threads(args.threads)
    s = image_size_for(args.model)
    xtr, ytr, xte, yte = load_mnist(s)
    # train subset for untraining, a small fixed validation subset (early stopping / best gates), test subset
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(7))
    val_idx, tr_idx = perm[:args.val_limit], perm[args.val_limit:args.val_limit + args.train_limit]
    train_ds = TensorDataset(xtr[tr_idx], ytr[tr_idx])
    val_ds = TensorDataset(xtr[val_idx], ytr[val_idx])
    xe, ye = subset(xte, yte, args.test_limit, 1)
    m = load_model(args.model, args.weights)
    pred0 = predict(m, xe, args.eval_dtype)
    orig_acc = (pred0 == ye).float().mean().item() * 100
    wf = wfnet.wrap(m, 10)
    overrides = json.loads(args.overrides) if args.overrides else {}
    cfg = recipe(args.recipe, kind_of(args.model), max_epochs=args.epochs, patience=args.patience,
                 val_per_epoch=args.val_per_epoch, **overrides)
    env0 = env_info()
    t0 = time.time()
    with amp(args.dtype):
        summary = untrain(wf, train_ds, val_ds, cfg, torch.device("cpu"), progress=False)
    ut_s = time.time() - t0
    t1 = time.time()
    wf.eval()
    af, ar = per_class_acc(lambda x, c: wf(x, forget=c), xe, ye, args.eval_dtype)
    ev_s = time.time() - t1
    sig = torch.cat([torch.sigmoid(p.detach().float()).flatten() for p in wf.filter_parameters()])
    out = RUNS / f"{args.tag}_filters.pt"
    torch.save({k: v.detach() for k, v in wf.named_filter_parameters()}, out)
    log(args, {"cmd": "untrain", "model": args.model, "tag": args.tag, "recipe": args.recipe,
               "config": summary["config"], "train_limit": len(tr_idx), "val_limit": len(val_idx),
               "test_n": len(ye), "dtype": args.dtype, "eval_dtype": args.eval_dtype,
               "steps": summary["steps"], "stopped": summary["stopped"], "untrain_seconds": ut_s,
               "eval_seconds": ev_s, "orig_acc_test_subset": orig_acc,
               "acc_f": af, "acc_r": ar, "mean_acc_f": float(np.mean(af)), "mean_acc_r": float(np.mean(ar)),
               "gates_below_0.5_frac": (sig < 0.5).float().mean().item(), "gate_mean": sig.mean().item(),
               "val_history": [{"step": h["step"], "val_loss": h["val"]["loss"], "val_forget_ce": h["val"]["forget_ce"],
                                "val_retain_ce": h["val"]["retain_ce"]} for h in summary["history"]],
               "env_start": env0})


# --------------------------------------------------------------------------------------------------------- baseline
def cmd_baseline(args):
    from wfnet.baselines import unlearn_baseline
    from wfnet.baselines import BaselineConfig
    torch.set_num_threads(args.threads)
    s = image_size_for(args.model)
    xtr, ytr, xte, yte = load_mnist(s)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(7))
    val_idx, tr_idx = perm[:args.val_limit], perm[args.val_limit:args.val_limit + args.train_limit]

    class B:  # the DataBundle fields unlearn_baseline reads
        train = TensorDataset(xtr[tr_idx], ytr[tr_idx])
        val = TensorDataset(xtr[val_idx], ytr[val_idx])
        test = TensorDataset(xte, yte)
        num_classes = 10
    xe, ye = subset(xte, yte, args.test_limit, 1)
    orig = load_model(args.model, args.weights)
    for method in args.methods.split(","):
        env0 = env_info()
        cfg = BaselineConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch)
        with amp(args.dtype):
            model, secs = unlearn_baseline(method, orig, B, args.cls, cfg, torch.device("cpu"), progress=False)
        pred = predict(model, xe, args.eval_dtype)
        ok = pred == ye
        log(args, {"cmd": "baseline", "model": args.model, "method": method, "class": args.cls,
                   "train_limit": len(tr_idx), "epochs": args.epochs, "lr": args.lr, "dtype": args.dtype,
                   "seconds": secs, "acc_f": ok[ye == args.cls].float().mean().item() * 100,
                   "acc_r": ok[ye != args.cls].float().mean().item() * 100, "test_n": len(ye), "env_start": env0})


def cmd_export(args):
    """Collect every JSON line of runs/calib/*.jsonl into docs/results/calibration_mnist_cpu.json."""
    recs = []
    for f in sorted(RUNS.glob("*.jsonl")):
        for line in open(f):
            if line.strip():
                r = json.loads(line)
                r.pop("history", None) if args.compact else None
                recs.append({"source": f.name, **r})
    out = ROOT / "docs" / "results" / "calibration_mnist_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    snap = Path("/tmp/wfsnap/COMMIT")
    meta = {"library_commit": snap.read_text().strip() if snap.exists() else None,
            "note": "wfnet imported from a snapshot of that commit (the working tree was being edited by others)"}
    out.write_text(json.dumps({"meta": meta, "records": recs}, indent=1) + "\n")
    print(out, len(recs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", default=str(RUNS / "results.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--models", default="vgg16,vgg16_bn,resnet18,vit_tiny,vit_small")
    b.add_argument("--dtypes", default="fp32,bf16")
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--steps", type=int, default=4)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--cl", action="store_true")
    b.add_argument("--channels-last-both", action="store_true")
    b.add_argument("--untrain", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--tag")
    t.add_argument("--out")
    t.add_argument("--train-limit", type=int)
    t.add_argument("--epochs", type=float, default=1)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--opt", default="sgd", choices=("sgd", "adamw"))
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--wd", type=float, default=5e-4)
    t.add_argument("--sched", default="onecycle", choices=("onecycle", "cosine"))
    t.add_argument("--warmup-frac", type=float, default=0.15)
    t.add_argument("--shift", type=int, default=2)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--clip", type=float, default=0.0)
    t.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    t.add_argument("--eval-dtype", default="fp32", choices=("fp32", "bf16"))
    t.add_argument("--cl", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    u = sub.add_parser("untrain")
    u.add_argument("--model", required=True)
    u.add_argument("--weights", required=True)
    u.add_argument("--tag", required=True)
    u.add_argument("--recipe", default="tuned")
    u.add_argument("--overrides", default="")
    u.add_argument("--train-limit", type=int, default=10000)
    u.add_argument("--val-limit", type=int, default=1000)
    u.add_argument("--test-limit", type=int)
    u.add_argument("--epochs", type=int, default=1)
    u.add_argument("--patience", type=int, default=10)
    u.add_argument("--val-per-epoch", type=int, default=5)
    u.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    u.add_argument("--eval-dtype", default="bf16", choices=("fp32", "bf16"))
    bl = sub.add_parser("baseline")
    bl.add_argument("--model", required=True)
    bl.add_argument("--weights", required=True)
    bl.add_argument("--methods", default="random-labels,negative-gradients")
    bl.add_argument("--cls", type=int, default=0)
    bl.add_argument("--train-limit", type=int, default=20000)
    bl.add_argument("--val-limit", type=int, default=1000)
    bl.add_argument("--test-limit", type=int)
    bl.add_argument("--epochs", type=int, default=1)
    bl.add_argument("--lr", type=float, default=0.01)
    bl.add_argument("--batch", type=int, default=128)
    bl.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    bl.add_argument("--eval-dtype", default="bf16", choices=("fp32", "bf16"))
    ex = sub.add_parser("export")
    ex.add_argument("--compact", action="store_true")
    args = ap.parse_args()
    {"export": cmd_export, "bench": cmd_bench, "train": cmd_train, "untrain": cmd_untrain, "baseline": cmd_baseline}[args.cmd](args)


if __name__ == "__main__":
    main()
