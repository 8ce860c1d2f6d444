"""Copy a finished `wfnet reproduce` folder's report into docs/results (tables, figures, timing; never weights).

    python experiments/reproduce_doc.py runs/rep docs/results/reproduce_mnist_cpu [--train-seconds-fix JSON]

Writes DEST/combined.{md,json,png}, DEST/<backbone>/{table1,table2,results}.md and the explain figures, and
DEST/untrain_full_test.json: per backbone (and paper-recipe sibling) the untraining's own per-class results on the
FULL test set (results.json) beside the original's. ``--train-seconds-fix`` replaces the train stage's time of the
named backbones (seconds) before the combined report is rebuilt, for processes whose timing was lost (said in the
doc that cites it).
"""
import argparse
import json
import shutil
from pathlib import Path

from wfnet.reproduce import PROFILES, combined_tables


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--train-seconds-fix", default=None)
    args = ap.parse_args()
    src, dest = Path(args.src), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    found = [m for m in PROFILES[args.profile] if (src / "timing" / f"{m}.json").exists()]
    timing = {m: json.loads((src / "timing" / f"{m}.json").read_text()) for m in found}
    for m, seconds in json.loads(args.train_seconds_fix or "{}").items():
        timing[m]["train"] = float(seconds)
    for t in timing.values():
        t["total"] = round(sum(v for k, v in t.items() if k not in ("total", "redo")), 1)
    # combined_tables reads the run folders under its `out`: rebuild the report in src, then copy it.
    report = combined_tables(src, args.dataset, found, args.profile, timing)
    for name in ("combined.md", "combined.json", "combined.png"):
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    full = {}
    for m in found:
        for folder in (src / m, src / f"{m}-paper-recipe"):
            if not folder.exists():
                continue
            out = dest / folder.name
            out.mkdir(exist_ok=True)
            for rel in ("eval/table1.md", "eval/table2.md", "results.md", "eval/audit.md"):
                if (folder / rel).exists():
                    shutil.copy2(folder / rel, out / Path(rel).name)
            for png in sorted((folder / "explain").glob("*.png")) if (folder / "explain").exists() else []:
                shutil.copy2(png, out / png.name)
            if (folder / "results.json").exists():
                r = json.loads((folder / "results.json").read_text())
                full[folder.name] = {
                    "original": {k: r["original"][k] for k in ("acc_r", "acc_f")},
                    "wf_net": {k: r["wf_net"][k] for k in ("acc_r", "acc_f")},
                    "wf_net_acc_f_per_class": {c: v["acc_f"] for c, v in r["wf_net"]["per_class"].items()},
                    "recipe": r["recipe"], "untrain_seconds": r["untrain_seconds"], "untrain": r["untrain"]}
    (dest / "untrain_full_test.json").write_text(json.dumps(full, indent=1))
    print(report["markdown"])


if __name__ == "__main__":
    main()
