"""Tables as markdown: the one renderer of Table 1 (Acc_r, Acc_f, ZRF, RT) and of Table 2 (insertion, deletion).

The table dicts come from :mod:`wfnet.evaluate` (``eval/table1.json``, ``eval/table2.json``); the accuracy table
written after untraining (``results.md``) is Table 1 with only the accuracy columns filled (:func:`accuracy_md`).
The paper's numbers for the same dataset / backbone are shown beside ours (:mod:`wfnet.paper`).
"""
from __future__ import annotations

import math

from . import paper

__all__ = ["table1_md", "table2_md", "accuracy_md", "mean", "fmt", "method_label"]


def mean(values) -> float | None:
    """Mean of the values that are numbers (None and NaN left out); None when there is none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def fmt(v, digits=1, scale=1.0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.{digits}f}"


def method_label(method: str) -> str:
    key = paper.normalise_method(method)
    return paper.METHOD_LABELS.get(key, method) if key else method


def table1_md(t: dict, run_dir=None, per_class: bool = False) -> str:
    """Table 1 as markdown from a table dict (``eval/table1.json``); columns with no value anywhere show "n/a",
    and their footnotes are left out. ``per_class``: one more table with Acc_r / Acc_f per class and row."""
    title = t.get("title") or f"{t['dataset']} / {t['backbone']}"
    where = f"Run `{run_dir}`; m" if run_dir is not None else "M"
    lines = [f"# Table 1: {title}", "",
             f"{where}eans over the classes evaluated per row (all {t['num_classes']} unless noted)"
             + (f", on a fixed random subset of {t['test_images']} of the {t['test_images_total']} test images"
                if t.get("test_images") and t["test_images"] < t.get("test_images_total", 0) else "") + ".", "",
             "| model | Acc_r (%) ↑ | Acc_f (%) ↓ | ZRF (%) ↑ | RT ↑ | ZRF Bad-Teaching code (%) |"
             + (" paper Acc_r | paper Acc_f | paper ZRF | paper RT |" if t["paper_available"] else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|---|" if t["paper_available"] else "")]
    for r in t["rows"]:
        note = "" if len(r["classes"]) == t["num_classes"] else f" ({len(r['classes'])} classes)"
        cells = [r["model"] + note, fmt(r["acc_r"], 2), fmt(r["acc_f"], 2), fmt(r["zrf"], 1, 100), r["rt"],
                 fmt(r["zrf_bad_teaching"], 2, 100)]
        if t["paper_available"]:
            p = r["paper"]
            cells += ([fmt(p["acc_r"], 2), fmt(p["acc_f"], 2), fmt(p["zrf"], 1, 100), p["rt"] or "-"] if p
                      else ["-"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "- Acc_r / Acc_f: accuracy with the model for class c on the other classes' / class c's test "
              "samples, mean over c. Acc_r: higher is better (ideal: the original's); Acc_f: lower is better "
              "(ideal 0)."]
    if t.get("zrf_random_seed") is not None:
        lines.append(f"- ZRF: 1 - mean JS(model, random network) on class c's test samples (textbook JS, natural "
                     f"log; random network seed {t['zrf_random_seed']}), x100. Higher = closer to random behaviour. "
                     "The last column is the Bad-Teaching code's variant (KL(m||p), averaged over classes too), x100.")
    rt = t.get("rt_params")
    if rt:
        lines.append(f"- RT: epochs of {rt['samples_per_epoch']} random training samples (SGD lr {rt['lr']}, batch "
                     f"{rt['batch_size']}, seed {rt['seed']}) until class c's accuracy is back at the original "
                     f"model's, checked before the first epoch too (0 = never forgotten); \"mean (never)\": classes "
                     f"never relearned within {rt['max_epochs']} epochs count as {rt['max_epochs']} in the mean. "
                     "Higher is better.")
    if t["paper_available"]:
        lines.append("- Paper ZRF is shown as a percentage for every dataset (the paper prints ImageNet's as a "
                     "fraction).")
    if per_class:
        names = t.get("class_names") or [str(c) for c in range(t["num_classes"])]
        lines += ["", "Per class:", "",
                  "| class | " + " | ".join(f"{r['model'].split(' (')[0]} Acc_r | {r['model'].split(' (')[0]} Acc_f"
                                              for r in t["rows"]) + " |",
                  "|---|" + "---|---|" * len(t["rows"])]
        for c, name in enumerate(names):
            cells = []
            for r in t["rows"]:
                v = r["per_class"].get(c) or r["per_class"].get(str(c)) or {}
                cells += [fmt(v.get("acc_r"), 2), fmt(v.get("acc_f"), 2)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table2_md(t: dict, run_dir) -> str:
    lines = [f"# Table 2: {t['dataset']} / {t['backbone']}", "", f"Run `{run_dir}`.", "",
             "| model | Insertion ↑ | Deletion ↓ |" + (" paper Ins | paper Del |" if t["paper_available"] else ""),
             "|---|---|---|" + ("---|---|" if t["paper_available"] else "")]
    for r in t["rows"]:
        cells = [r["model"], fmt(r["insertion"], 3), fmt(r["deletion"], 3)]
        if t["paper_available"]:
            cells += [fmt(r["paper"]["insertion"], 2), fmt(r["paper"]["deletion"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if not t["steps"]:  # insdel was not among the requested metrics: say so instead of describing no curve
        lines += ["", "- Insertion / deletion were not computed (`--metrics` did not include insdel)."]
        return "\n".join(lines) + "\n"
    n = len(t["steps"])
    lines += ["", "- For class c, each filtered layer's channels are ranked by relevance (lowest sigmoid(alpha[c]) "
              "first). Insertion re-opens the top p% of every layer in the unlearned model (row c); deletion closes "
              "them in the original model (all gates open). Value: mean softmax confidence for class c on its test "
              "samples divided by the original model's; score: area under that curve for p in [0, 1] "
              f"({n} evenly spaced steps, trapezoid rule), mean over classes. Insertion: higher is better; "
              "deletion: lower is better."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Entry points



def accuracy_md(class_names, original: dict, wf: dict, recipe: str, seconds: float, dataset: str,
                backbone: str) -> str:
    """``results.md`` after untraining: Table 1's accuracy columns for the original and WF-Net, per class too."""
    paper_rows = paper.table1_rows(dataset, backbone) or {}
    rows = []
    for method, label, acc in (("original", "original", original),
                               ("wfnet", f"WF-Net ({recipe} recipe, one round for all classes, {seconds:.0f} s)", wf)):
        rows.append({"method": method, "model": label, "classes": list(range(len(class_names))),
                     "acc_r": acc["acc_r"], "acc_f": acc["acc_f"], "zrf": None, "zrf_bad_teaching": None,
                     "rt": "-" if method == "original" else "n/a",
                     "per_class": {c: {"acc_f": v["acc_f"], "acc_r": v["acc_r"]}
                                   for c, v in acc["per_class"].items()},
                     "paper": paper_rows.get(method)})
    t = {"dataset": dataset, "backbone": backbone, "num_classes": len(class_names), "class_names": list(class_names),
         "paper_available": bool(paper_rows), "zrf_random_seed": None, "rt_params": None, "rows": rows,
         "title": f"{dataset} / {backbone}, accuracy after untraining"}
    return table1_md(t, None, per_class=True)
