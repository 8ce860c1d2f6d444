"""How the gates of a forget SET compose, decided by measurement (issue 26 item 2).

For each run folder (made by ``wfnet train`` + ``wfnet untrain``) and each set size K, draws M random sets (seeded),
and for every set and composition of ``wfnet.sets`` measures Acc_f of each class in the set (goal <= 1 %), Acc_r on
the other classes (goal: within 2 points of the original on the same samples, or of the single-class WF-Net rows),
ZRF; the original, the single-class rows and, for the first set of each size, a model retrained from scratch
without the set (``wfnet.set_eval.retrain_without``) are measured on the same samples. Writes
``OUT/<name>.json`` (every row) and ``OUT/<name>.md`` (per-size summary + every set).

    python experiments/set_composition.py runs/sets-digits runs/sets-mnist-cnn --sizes 2 3 5 --num-sets 5 \
        --out docs/results/sets
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from wfnet import sets as S
from wfnet.run import Run
from wfnet.set_eval import SetEvalConfig, evaluate_sets, random_sets, sets_table_md

GOAL_F, GOAL_R = 1.0, 2.0


def summarise(rows: list[dict]) -> list[dict]:
    """Per (size, model): mean Acc_r, worst gap to the original / single-class rows, worst Acc_f, sets meeting both
    goals."""
    by_set: dict[tuple, dict] = {}
    for r in rows:
        by_set.setdefault(tuple(r["set"]), {})[r["model"]] = r
    out: dict[tuple, dict] = {}
    for members, models in by_set.items():
        orig, single = models["original"]["acc_r"], models["single-class rows"]["acc_r"]
        for name, r in models.items():
            if name == "original":
                continue
            key = (len(members), name)
            s = out.setdefault(key, {"size": len(members), "model": name, "sets": 0, "acc_r": [], "gap_orig": [],
                                     "gap_single": [], "acc_f_max": [], "meets": 0})
            s["sets"] += 1
            s["acc_r"].append(r["acc_r"])
            s["gap_orig"].append(orig - r["acc_r"])
            s["gap_single"].append(single - r["acc_r"])
            s["acc_f_max"].append(r["acc_f_max"])
            ok_r = min(orig - r["acc_r"], single - r["acc_r"]) <= GOAL_R
            s["meets"] += int(r["acc_f_max"] <= GOAL_F and ok_r)
    res = []
    for s in out.values():
        n = s["sets"]
        res.append({"size": s["size"], "model": s["model"], "sets": n, "acc_r_mean": sum(s["acc_r"]) / n,
                    "gap_orig_mean": sum(s["gap_orig"]) / n, "gap_orig_worst": max(s["gap_orig"]),
                    "gap_single_mean": sum(s["gap_single"]) / n, "gap_single_worst": max(s["gap_single"]),
                    "acc_f_max_mean": sum(s["acc_f_max"]) / n, "acc_f_worst": max(s["acc_f_max"]),
                    "meets_both": s["meets"]})
    return sorted(res, key=lambda d: (d["size"], d["model"]))


def summary_md(summary: list[dict]) -> str:
    lines = ["| size | model | sets | mean Acc_r | Acc_r gap to original (mean / worst) | gap to single-class rows "
             "(mean / worst) | worst Acc_f of a class in the set (mean over sets / worst) | sets meeting both goals |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['size']} | {s['model']} | {s['sets']} | {s['acc_r_mean']:.2f} | "
                     f"{s['gap_orig_mean']:.2f} / {s['gap_orig_worst']:.2f} | {s['gap_single_mean']:.2f} / "
                     f"{s['gap_single_worst']:.2f} | {s['acc_f_max_mean']:.2f} / {s['acc_f_worst']:.2f} | "
                     f"{s['meets_both']} / {s['sets']} |")
    return "\n".join(lines)


def combine(paths: list[Path]) -> str:
    """One table over several result files (``--combine``): per file, size and model, the summary."""
    lines = ["| gates | size | model | mean Acc_r | Acc_r gap to original (mean / worst) | gap to single-class rows "
             "(mean / worst) | worst Acc_f in the set (mean / worst) | sets meeting both goals |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        d = json.loads(path.read_text())
        for s in d["summary"]:
            lines.append(f"| {path.stem} | {s['size']} | {s['model']} | {s['acc_r_mean']:.2f} | "
                         f"{s['gap_orig_mean']:.2f} / {s['gap_orig_worst']:.2f} | {s['gap_single_mean']:.2f} / "
                         f"{s['gap_single_worst']:.2f} | {s['acc_f_max_mean']:.2f} / {s['acc_f_worst']:.2f} | "
                         f"{s['meets_both']} / {s['sets']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run folders with trained gates")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="print one table over these result files instead of measuring")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--num-sets", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sets-from", default=None, metavar="JSON",
                   help="take the sets from an earlier result file (its first --num-sets of each size) instead of "
                        "drawing them: random_sets' seeding changed (derive_seed, issue 25), so seed 0 no longer "
                        "draws the sets of the results in docs/results/sets")
    p.add_argument("--compositions", nargs="+", default=list(S.COMPOSITIONS))
    p.add_argument("--retrain", type=int, default=1, help="retrained references per size (first sets)")
    p.add_argument("--out", default="docs/results/sets")
    p.add_argument("--name", default=None, help="file stem (default: the run folder's name)")
    args = p.parse_args(argv)
    if args.combine:
        print(combine([Path(f) for f in args.combine]))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for run_dir in args.runs:
        run = Run.open(run_dir, device="cpu")
        wf = run.wrapped()
        t0 = time.time()
        rows, chosen = [], []
        for k in args.sizes:
            if args.sets_from:
                drawn = [s for s in json.loads(Path(args.sets_from).read_text())["sets"] if len(s) == k]
                if len(drawn) < args.num_sets:
                    raise ValueError(f"{args.sets_from} holds {len(drawn)} sets of size {k}, "
                                     f"--num-sets asks for {args.num_sets}")
                drawn = drawn[:args.num_sets]
            else:
                drawn = random_sets(run.num_classes, k, args.num_sets, args.seed)
            cfg = SetEvalConfig(sets=drawn,
                                compositions=tuple(args.compositions), retrain=args.retrain)
            res = evaluate_sets(run, cfg, wf=wf)
            rows += res["rows"]
            chosen += res["sets"]
            test_samples = res["test_samples"]
        result = {"run": str(run_dir), "dataset": run.config["dataset"], "model": run.config["model"],
                  "untrain": run.untrain_options(), "sets": chosen, "rows": rows, "test_samples": test_samples,
                  "summary": summarise(rows), "seconds": time.time() - t0,
                  "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                  "date": time.strftime("%Y-%m-%d"), "machine": "2-core AMD EPYC CPU, no GPU",
                  "torch": torch.__version__, "python": platform.python_version()}
        name = args.name or Path(run_dir).name
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        title = f"Forget sets: {run.config['dataset']} / {run.config['model']} ({run_dir})"
        md = [f"# {title}", "", f"Measured {result['date']} on a {result['machine']} (torch {torch.__version__}), "
              f"{result['seconds']:.0f} s:", "", "```bash", result["command"], "```", "",
              (f"Sets of sizes {args.sizes}, {args.num_sets} per size, taken from {args.sets_from}" if args.sets_from
               else f"Random sets of sizes {args.sizes}, {args.num_sets} per size (seed {args.seed})") +
              f"; every test sample "
              f"({test_samples}) run with the set. Goals: Acc_f of every class of the set <= {GOAL_F:g} %, Acc_r "
              f"within {GOAL_R:g} points of the original on the same samples or of the single-class rows.", "",
              "## Summary", "", summary_md(result["summary"]), "", "## Every set", "",
              sets_table_md(result, "Per set").split("\n", 2)[2]]
        (out / f"{name}.md").write_text("\n".join(md))
        print(summary_md(result["summary"]))


if __name__ == "__main__":
    main()
