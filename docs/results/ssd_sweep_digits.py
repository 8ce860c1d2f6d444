"""SSD's two hyper-parameters on the embedded digits (issue 27): alpha (selection weighting) x lambda (dampening
constant), every class forgotten in turn, Acc_f / Acc_r on the test split, the fraction of parameter elements
dampened, and the cost.

The demo's model and recipe (small CNN, 15 epochs, batch 64, seed 0). The importances do not depend on alpha or
lambda: the full-data importances are computed once, the forget-class ones once per class, and every (alpha, lambda)
pair only re-dampens a copy of the original.

    OMP_NUM_THREADS=1 python docs/results/ssd_sweep_digits.py --out docs/results/ssd_sweep_digits
    python docs/results/ssd_sweep_digits.py --render docs/results/ssd_sweep_digits   # the .md from the .json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from wfnet.data import labels_of, load_dataset
from wfnet.metrics import accuracy_forget_retain_shared
from wfnet.models import build_model
from wfnet.ssd import fisher_importance, ssd_dampen
from wfnet.train import TrainConfig, train_classifier

_READING = "<!-- reading: written by hand, kept by --render -->"
ALPHAS = (1, 5, 10, 20, 30, 50, 70, 100, 200, 500, 1000)
LAMBDAS = (0.1, 0.5, 1.0)


def markdown(res: dict) -> str:
    """The sweep table (means over the 10 classes) from the JSON this script writes."""
    o, t = res["original"], res["train"]
    lines = [f"# SSD on the digits: selection weighting alpha x dampening constant lambda", "",
             f"Measured {res['date']} on a {res['machine']} (`docs/results/ssd_sweep_digits.py`, seed {res['seed']}).",
             f"Small CNN trained on the embedded digits as in `wfnet demo` ({t['epochs']} epochs, batch "
             f"{t['batch_size']}; test accuracy {t['test_acc']:.2f} %). Every class forgotten in turn with SSD "
             f"(`wfnet.ssd`); Acc_f / Acc_r on the 450 test images, means over the 10 classes (max Acc_f / min Acc_r "
             f"over the classes beside them). Original: Acc_f {o['acc_f']:.2f} %, Acc_r {o['acc_r']:.2f} %.", "",
             "| alpha | lambda | Acc_f (%) | max Acc_f | Acc_r (%) | min Acc_r | weights dampened (%) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['alpha']:g} | {r['lambda']:g} | {r['acc_f']:.2f} | {r['acc_f_max']:.2f} | "
                     f"{r['acc_r']:.2f} | {r['acc_r_min']:.2f} | {100 * r['dampened']:.3f} |")
    fi, fo = res["full_importance"], res["forget_importance"]
    lines += ["", f"Cost (batch {res['importance_batch_size']}): the full-data importance pass "
              f"{fi['seconds']:.1f} s over {fi['samples']} samples (once, shared by every class); per class, the "
              f"forget-class pass {fo['seconds_mean']:.2f} s over {fo['samples_mean']:.0f} samples on average, plus "
              f"the dampening (milliseconds). Training the original took {t['seconds']:.0f} s; one retraining per "
              f"class costs about as much, per class.", ""]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--render", default=None, help="write PREFIX.md from PREFIX.json and stop")
    ap.add_argument("--out", default="docs/results/ssd_sweep_digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="importance batches (forget and full data alike)")
    args = ap.parse_args()
    if args.render:
        md = Path(args.render + ".md")
        # the hand-written reading below the marker survives a re-render
        kept = md.read_text().partition(_READING)[2] if md.exists() and _READING in md.read_text() else ""
        md.write_text(markdown(json.loads(Path(args.render + ".json").read_text())) +
                      (_READING + kept if kept else ""))
        return
    torch.set_num_threads(1)
    device = torch.device("cpu")
    data = load_dataset("digits")
    torch.manual_seed(args.seed)  # the initialisation (train_classifier seeds only the data order from here on)
    model = build_model("small_cnn", data.num_classes, data.in_chans, data.image_size)
    t0 = time.perf_counter()
    info = train_classifier(model, data.train, data.test, TrainConfig(epochs=15, batch_size=64, seed=args.seed),
                            device, progress=False)
    train_seconds = time.perf_counter() - t0
    model.eval()
    test = DataLoader(data.test, batch_size=512)
    classes = list(range(data.num_classes))
    y_train = labels_of(data.train)
    t0 = time.perf_counter()
    full_imp, full_samples = fisher_importance(model, DataLoader(data.train, batch_size=args.batch_size))
    full_seconds = time.perf_counter() - t0
    forget_imp, forget_seconds, forget_samples = {}, {}, {}
    for c in classes:
        t0 = time.perf_counter()
        loader = DataLoader(Subset(data.train, (y_train == c).nonzero().flatten().tolist()),
                            batch_size=args.batch_size)
        forget_imp[c], forget_samples[c] = fisher_importance(model, loader)
        forget_seconds[c] = time.perf_counter() - t0
    original = accuracy_forget_retain_shared(model, test, classes)
    rows = []
    for alpha in ALPHAS:
        for lam in LAMBDAS:
            per_class, frac, damp_s = {}, [], []
            for c in classes:
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                n, total, _ = ssd_dampen(m, forget_imp[c], full_imp, alpha, lam)
                damp_s.append(time.perf_counter() - t0)
                frac.append(n / total)
                r = accuracy_forget_retain_shared(m.eval(), test, [c])
                per_class[c] = (r["per_class"][c]["acc_f"], r["per_class"][c]["acc_r"])
            acc_f = [v[0] for v in per_class.values()]
            acc_r = [v[1] for v in per_class.values()]
            rows.append({"alpha": alpha, "lambda": lam, "acc_f": float(np.mean(acc_f)),
                         "acc_f_max": float(np.max(acc_f)), "acc_r": float(np.mean(acc_r)),
                         "acc_r_min": float(np.min(acc_r)), "dampened": float(np.mean(frac)),
                         "dampen_seconds": float(np.mean(damp_s)), "per_class": per_class})
            print(f"alpha {alpha:>4} lambda {lam:>4}: Acc_f {rows[-1]['acc_f']:.2f} Acc_r {rows[-1]['acc_r']:.2f} "
                  f"dampened {100 * rows[-1]['dampened']:.3f}%", flush=True)
    out = {"date": "2026-12-05", "machine": "2-core AMD EPYC CPU, no GPU (shared), torch "
           f"{torch.__version__}, 1 thread", "python": platform.python_version(), "seed": args.seed,
           "model": "small_cnn", "dataset": "digits", "train": {"epochs": 15, "batch_size": 64,
                                                               "test_acc": info["test_acc"],
                                                               "seconds": train_seconds},
           "importance_batch_size": args.batch_size, "full_importance": {"seconds": full_seconds,
                                                                          "samples": full_samples},
           "forget_importance": {"seconds_mean": float(np.mean(list(forget_seconds.values()))),
                                 "samples_mean": float(np.mean(list(forget_samples.values())))},
           "original": {"acc_f": original["acc_f"], "acc_r": original["acc_r"]}, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(markdown(json.loads(json.dumps(out))))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
