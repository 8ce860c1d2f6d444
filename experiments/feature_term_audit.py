"""Issue 14, item 5: does the feature-level forget term (``lambda_feature``) close the leak the audit measures?

Copies the original model (and its config) of an existing MNIST run folder (default runs/mnist_cnn_audit, made by
the commands of docs/results/audit_mnist_small_cnn.md) into one folder per lambda_feature, untrains each with the
same tuned options as that run plus lambda_feature, evaluates Acc_r / Acc_f on the full test set and the audit
(MIA, probe, k-shot relearning) on classes 0 and 1 for WF-Net and its hard export, and writes one JSON + markdown
summary. lambda_feature = 0 reproduces the run's own gates (the reference row).

    python experiments/feature_term_audit.py [--source runs/mnist_cnn_audit] [--lambdas 0,3,30] [--out runs/feat]

``--variant predicted`` (an experiment, not a library option): instead of a random retain sample, each forget
sample's features are pulled toward the batch's mean retain features of the class the model now predicts for it
(its logits under row c, c excluded): class c collapsed onto a neighbouring class's cluster rather than toward the
middle.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import wfnet.untrain as U
from wfnet import Run
from wfnet import evaluate
from wfnet.audit import AuditConfig
from wfnet.evaluate import EvalConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="runs/mnist_cnn_audit")
    ap.add_argument("--lambdas", default="0,3,30")
    ap.add_argument("--out", default="runs/feat")
    ap.add_argument("--classes", default="0,1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", default="random", choices=("random", "predicted"))
    args = ap.parse_args()
    if args.variant == "predicted":
        _patch_predicted_target()
    torch.set_num_threads(args.threads)
    src, out = Path(args.source), Path(args.out)
    classes = [int(c) for c in args.classes.split(",")]
    summary = {}
    for lam in [float(v) for v in args.lambdas.split(",")]:
        d = out / (f"lambda_feature_{lam:g}" + ("" if args.variant == "random" else f"_{args.variant}"))
        if not (d / "original.safetensors").exists():
            d.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "original.safetensors"):
                shutil.copy2(src / name, d / name)
        run = Run.open(d, device="cpu", log=False)
        t0 = time.time()
        U.run(run, U.config_for(run, max_epochs=1, lambda_feature=lam), progress=False)
        untrain_s = time.time() - t0
        t1 = evaluate.run(run, EvalConfig(metrics=["acc"], methods=["original", "wfnet"]), progress=False)["table1"]
        audit = evaluate.run(run, EvalConfig(metrics=["mia", "probe", "relearn_fewshot"], methods=["wfnet"],
                                             classes=classes, audit=AuditConfig(audit_samples=1000)),
                             progress=False)["audit"]
        rows = {r["method"]: r for r in t1["rows"]}
        summary[f"{lam:g}{'' if args.variant == 'random' else ' ' + args.variant}"] = {"acc_r": rows["wfnet"]["acc_r"], "acc_f": rows["wfnet"]["acc_f"],
                        "original_acc_r": rows["original"]["acc_r"], "untrain_seconds": untrain_s,
                        "audit": {k: v for k, v in audit.items() if k != "markdown"},
                        "audit_markdown": audit["markdown"]}
        print(lam, flush=True)
        name = "summary.json" if args.variant == "random" else f"summary_{args.variant}.json"
        (out / name).write_text(json.dumps(summary, indent=1))


def _patch_predicted_target():
    real = U.untrain_loss

    def loss_with_predicted_target(logits, labels, n_forget, params, cfg, features=None, generator=None):
        loss, parts = real(logits, labels, n_forget, params, cfg.__class__(**{**cfg.__dict__, "lambda_feature": 0.0}))
        if cfg.lambda_feature <= 0 or features is None or n_forget == 0:
            return loss, parts
        f = features.float().flatten(1)
        k = logits.shape[1]
        retain_f, retain_y = f[n_forget:].detach(), labels[n_forget:]
        sums = torch.zeros(k, f.shape[1], device=f.device).index_add_(0, retain_y, retain_f)
        counts = torch.bincount(retain_y, minlength=k).clamp_min(1).unsqueeze(1)
        means = sums / counts
        masked = logits[:n_forget].detach().float().scatter(1, labels[:n_forget, None], float("-inf"))
        target = means[masked.argmax(1)]
        scale = retain_f.pow(2).sum(1).mean().clamp_min(1e-12)
        term = (f[:n_forget] - target).pow(2).sum(1).mean() / scale
        parts = {**parts, "feature_term": float(term)}
        return loss + cfg.lambda_feature * term, parts

    U.untrain_loss = loss_with_predicted_target


if __name__ == "__main__":
    main()
