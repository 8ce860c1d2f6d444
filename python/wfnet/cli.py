"""The ``wfnet`` command: a thin layer over :class:`wfnet.Run`. It parses the options (generated from the
configuration dataclasses of :mod:`wfnet.config`), calls one method of the run, and prints what it returns.

Adding a subcommand: write ``configure(parser)`` and ``run(args)`` functions and add one line to ``COMMANDS``.
Heavy modules (torch and everything that imports it) are imported inside the ``run`` functions, so ``--help``
answers at once.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from .config import (BASELINE_METHODS, BaselineConfig, DataConfig, EvalConfig, ExplainConfig, TrainConfig,
                     UntrainConfig, recipe)

__all__ = ["main", "build_parser", "COMMANDS"]

DESCRIPTION = """\
wfnet: multi-class machine unlearning by weight filtering (WF-Net). Train a classifier, teach its gates to forget
any class in one untraining round, compare with per-class baselines, evaluate (Tables 1 and 2 of the paper) and
explain (filter maps). Each command works on a run folder."""

EPILOG = """\
examples:
  wfnet demo                                   the whole job on the embedded digits, a few CPU minutes
  wfnet train --model resnet18 --dataset mnist --data-root DATA --out runs/mnist_r18
  wfnet untrain runs/mnist_r18                 one round for all classes (--recipe paper, --lr ...)
  wfnet baselines runs/mnist_r18 --methods retrain,random-labels,negative-gradients
  wfnet evaluate runs/mnist_r18                Table 1 (Acc_r, Acc_f, ZRF, RT) and Table 2 (insertion, deletion)
  wfnet explain runs/mnist_r18                 filter maps, gate heatmaps, insertion/deletion curves

Every command takes --config FILE (YAML or JSON, option names as keys, e.g. "lr: 0.1"; flags override it).
train and untrain run data-parallel under `torchrun --nproc_per_node=N -m wfnet ...`."""


class CLIError(Exception):
    """A user-facing error: printed on one line without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------------------------
# options generated from the dataclasses


def _base_type(tp):
    """(type, element type or None) of an annotation: int | None -> (int, None), list[int] | None -> (list, int)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    if typing.get_origin(tp) is list:
        return list, (typing.get_args(tp) or (str,))[0]
    return tp, None


def _csv(cast, choices=None):
    def parse(text: str):
        try:
            values = [cast(t.strip()) for t in str(text).split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__} values, got {text!r}")
        bad = [v for v in values if choices and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown value(s) {bad}: choose among {', '.join(choices)}")
        return values
    return parse


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else "none" if v is None else str(v)


def add_options(p, cls, defaults: dict | None = None, default_note: Callable[[str], str] | None = None,
                title: str | None = None) -> None:
    """One ``--option-name`` per field of dataclass ``cls`` (dest = the field name), with the field's help text
    and its default. ``defaults`` replaces defaults; ``default_note(name)`` replaces the "(default: ...)" text."""
    group = p.add_argument_group(title or f"{cls.__name__} options")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata.get("flag", True):
            continue
        tp, elem = _base_type(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)
        choices = f.metadata.get("choices")
        note = default_note(f.name) if default_note else f"default: {_show(default)}"
        kw = dict(dest=f.name, default=default, help=f"{f.metadata['help']} ({note})")
        if tp is bool:
            kw["action"] = "store_true"
        elif tp is list:
            kw.update(type=_csv(elem, choices), metavar=f.name.upper())
        else:
            kw.update(type=tp, metavar=f.name.upper())
            if choices:
                kw.update(choices=choices, metavar="{" + ",".join(choices) + "}")
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def values_of(args, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def _common(p, device: bool = True) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of option values, keys as the option names (flags override it; default: "
                        "none)")
    if device:
        from .backends import BACKEND_NAMES  # a light module: names only

        g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if "
                                                         "available)")
        g.add_argument("--backend", default=None, choices=BACKEND_NAMES, metavar="{" + ",".join(BACKEND_NAMES) + "}",
                       help="weight-filtering backend; one that cannot run on the device is an error before any "
                            "work (default: $WFNET_BACKEND or auto)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")


def _run_arg(p) -> None:
    p.add_argument("run", help="run folder (made by `wfnet train` or `wfnet demo`)")
    p.add_argument("--data-root", default=None, help="where the run's data is now, if it moved (default: the "
                                                     "run's)")


def _untrain_default(name: str) -> str:
    if name in ("recipe", "targets"):
        return f"default: {_show(getattr(UntrainConfig(), name))}"
    tuned, paper_cnn, paper_vit = (getattr(recipe(r, k), name) for r, k in
                                   (("tuned", "cnn"), ("paper", "cnn"), ("paper", "vit")))
    if tuned == paper_cnn == paper_vit:
        return f"default: {_show(tuned)}"
    paper = _show(paper_cnn) if paper_cnn == paper_vit else f"{_show(paper_cnn)} (ViT {_show(paper_vit)})"
    return f"default: tuned {_show(tuned)}, paper {paper}"


# ------------------------------------------------------------------------------------------------------------------
# commands: configure(parser) and run(args)


def _setup(args):
    from .run import setup

    return setup(getattr(args, "device", "auto"), getattr(args, "backend", None))


def _open(args, info, device):
    from .run import Run

    return Run.open(args.run, device=device, data_root=getattr(args, "data_root", None), info=info)


def configure_train(p):
    add_options(p, DataConfig, title="model and data")
    add_options(p, TrainConfig, title="training")
    p.add_argument("--out", required=True, help="run folder to create (or to resume) (required)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training in --out (default: off)")


def run_train(args):
    from .run import Run

    info, device = _setup(args)
    Run.train(args.out, DataConfig(**values_of(args, DataConfig)), TrainConfig(**values_of(args, TrainConfig)),
              device=device, resume=args.resume, info=info, progress=not args.no_progress)


def configure_untrain(p):
    _run_arg(p)
    defaults = {f.name: None for f in fields(UntrainConfig) if f.name not in ("recipe", "targets")}
    add_options(p, UntrainConfig, defaults, _untrain_default, title="untraining")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted untraining with the same options (default: off)")
    p.add_argument("--force", action="store_true", help="replace gates untrained with other options (they stay "
                                                        "until the new ones are trained; default: off)")


def run_untrain(args):
    info, device = _setup(args)
    run = _open(args, info, device)
    opts = values_of(args, UntrainConfig)
    targets = opts["targets"]  # "auto", or module names / glob patterns, comma-separated (a list in a config file)
    if isinstance(targets, str) and targets != "auto":
        opts["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    res = run.untrain(run.untrain_config(**opts), force=args.force, resume=args.resume,
                      progress=not args.no_progress)
    if res is not None:
        print(res["markdown"])


def configure_baselines(p):
    _run_arg(p)
    p.add_argument("--methods", type=_csv(str, BASELINE_METHODS), default=list(BASELINE_METHODS),
                   help=f"comma-separated subset of {','.join(BASELINE_METHODS)} (default: all)")
    p.add_argument("--classes", type=_csv(int), default=None, help="comma-separated class ids (default: all)")
    add_options(p, BaselineConfig, title="fine-tuning baselines")
    p.add_argument("--force", action="store_true", help="recompute models that exist, or replace models made "
                                                        "with other options (kept until the new ones are made; "
                                                        "default: off)")


def run_baselines(args):
    info, device = _setup(args)
    _open(args, info, device).baselines(args.methods, args.classes, BaselineConfig(**values_of(args, BaselineConfig)),
                                        force=args.force, progress=not args.no_progress)


def configure_evaluate(p):
    _run_arg(p)
    add_options(p, EvalConfig, title="evaluation")
    p.add_argument("--force", action="store_true", help="recompute cached results (default: off)")
    g = p.add_argument_group("forget sets (a request with sets evaluates the sets only: eval/sets.{md,json})")
    g.add_argument("--sets", nargs="+", type=_class_set, default=None, metavar="C,C[,...]",
                   help="class sets to forget together, e.g. --sets 3,7 1,4,9 (default: none)")
    g.add_argument("--set-size", type=int, default=None, metavar="K",
                   help="also evaluate --num-sets random sets of K classes (default: none)")
    g.add_argument("--num-sets", type=int, default=None, metavar="M", help="how many random sets of --set-size (default: none)")
    g.add_argument("--set-seed", type=int, default=0, help="seed of the random sets (default: 0)")
    g.add_argument("--set-retrain", type=int, default=1, metavar="N",
                   help="retrain a reference model without the set for the first N sets (cached in "
                        "baselines/retrain-sets/; default: 1)")


def _class_set(text: str) -> list[int]:
    from .sets import parse_sets

    try:
        return parse_sets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_evaluate(args):
    info, device = _setup(args)
    run = _open(args, info, device)
    if args.sets or args.set_size is not None or args.num_sets is not None:
        _evaluate_sets(args, run)
        return
    out = run.evaluate(EvalConfig(**values_of(args, EvalConfig)), force=args.force, progress=not args.no_progress)
    print(out["markdown"])


def _evaluate_sets(args, run):
    """``wfnet evaluate RUN --sets ... / --set-size K --num-sets M``: the per-set table (wfnet.set_eval)."""
    from . import set_eval

    if (args.set_size is None) != (args.num_sets is None):
        raise CLIError("--set-size K and --num-sets M go together")
    if args.set_retrain < 0:
        raise CLIError(f"--set-retrain must be >= 0, got {args.set_retrain}")
    comp = ((run.untrain_options() or {}).get("set_composition")) or None
    cfg = set_eval.SetEvalConfig(sets=args.sets or [], set_size=args.set_size, num_sets=args.num_sets or 0,
                                 seed=args.set_seed, retrain=args.set_retrain,
                                 **({"compositions": (comp,)} if comp else {}))
    try:
        cfg.all_sets(run.num_classes)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    out = set_eval.run(run, cfg, progress=not args.no_progress, log=print)
    print(out["markdown"])


def configure_explain(p):
    _run_arg(p)
    add_options(p, ExplainConfig, title="explanation")
    p.add_argument("--force", action="store_true", help="redraw figures that exist (default: off)")


def run_explain(args):
    info, device = _setup(args)
    out = _open(args, info, device).explain(ExplainConfig(**values_of(args, ExplainConfig)), force=args.force,
                                            progress=not args.no_progress)
    print(f"explanations written to {Path(out['report']).parent} (open report.md)")


def configure_demo(p):
    p.add_argument("--out", default=None, help="run folder (default: runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run: fewer epochs, no baselines, RT "
                                                        "cap 20 (default: off)")
    p.add_argument("--model", default="small_cnn", help="the backbone (default: small_cnn)")
    p.add_argument("--image-size", type=int, default=None, help="upscale the 8x8 digits to this side (default: 28)")


def run_demo(args):
    """Train the small CNN on the embedded digits, untrain every class in one round, run the two fine-tuning
    baselines for every class (not with --quick), evaluate everything (with the unlearning audit, not with --quick)
    and draw the explanations."""
    import time

    from .run import Run

    info, device = _setup(args)
    quick, progress = args.quick, not args.no_progress
    out = args.out or ("runs/demo-quick" if quick else "runs/demo")
    t0 = time.time()
    run = Run.train(out, DataConfig(model=args.model, image_size=args.image_size),
                    TrainConfig(epochs=8 if quick else 15, batch_size=64), device=device, info=info,
                    progress=progress)
    print(run.untrain(run.untrain_config(max_epochs=8 if quick else 20), progress=progress)["markdown"])
    if not quick:
        run.baselines(["random-labels", "negative-gradients"], progress=progress)
    print(run.evaluate(EvalConfig(rt_max_epochs=20 if quick else 100), progress=progress)["markdown"])
    if not quick:  # the unlearning audit beside Table 1 (a smaller protocol than the default: one k, 30 steps)
        print(run.evaluate(EvalConfig(metrics=["mia", "probe", "relearn_fewshot"], audit_samples=500,
                                      audit_shots=[10], audit_steps=30), progress=progress)["audit"]["markdown"])
    run.explain(progress=progress)
    print(f"demo finished in {time.time() - t0:.0f} s; everything is in {out}/ (config.json, original.safetensors, "
          f"filters.safetensors, results.md, eval/, explain/report.md)")


def configure_inspect(p):
    p.add_argument("--model", default="small_cnn", help="a model name as for `wfnet train --model` (default: "
                                                         "small_cnn)")
    p.add_argument("--dataset", default="digits", help="the dataset it is for: sets the classes, channels and image "
                                                       "size (default: digits)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the dataset's, "
                                                                "raised to the model's minimum)")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default: 4 at 64 px or less, else "
                                                                "16)")
    p.add_argument("--stem-stride", type=int, default=None, help="ResNet-18's first-conv stride at 64 px or less "
                                                                 "(default: 1)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the dataset's)")
    p.add_argument("--targets", default="auto", help="auto, or comma-separated module names / glob patterns "
                                                      "(default: auto)")
    p.add_argument("--backends", action="store_true", help="also list every backend: imports, runs on --device "
                                                           "here, chosen by auto (default: off)")


def run_inspect(args):
    """What `wrap` would filter in a model (layers, kinds, gate parameters), what it leaves alone and why."""
    from .data import _NATIVE
    from .model import UnsupportedModelError, find_targets
    from .models import build_model
    from .run import model_spec

    if args.dataset not in _NATIVE:
        raise CLIError(f"unknown dataset {args.dataset!r}: choose one of {', '.join(_NATIVE)}")
    in_chans = _NATIVE[args.dataset][0]
    spec = model_spec(args.model, args.dataset, args.image_size)
    num_classes = args.num_classes or {"digits": 10, "mnist": 10, "cifar10": 10, "imagenet": 1000}.get(args.dataset)
    if not num_classes:
        raise CLIError(f"--num-classes is needed for --dataset {args.dataset}")
    try:
        model = build_model(args.model, num_classes, in_chans, spec["image_size"], patch_size=args.patch_size,
                            stem_stride=args.stem_stride)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    targets = args.targets if args.targets == "auto" else [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        plan = find_targets(model, targets)
    except (UnsupportedModelError, TypeError, ValueError) as exc:
        raise CLIError(f"{args.model} cannot be wrapped: {exc}") from None
    print(f"{args.model} for {args.dataset} ({in_chans}x{spec['image_size']}x{spec['image_size']}, "
          f"{num_classes} classes)\n")
    print(plan.summary(num_classes))
    if args.backends:
        from .backends import backend_status
        from .distributed import resolve_device

        device = resolve_device(args.device, None) if args.device != "auto" else "cpu"
        print(f"\nbackends on {device}:")
        for name, st in backend_status(device).items():
            state = "runs here" if st["runs_here"] else f"cannot run here: {st['why_not']}"
            print(f"  {name:7s} {'auto picks it' if st['auto_picks'] else 'auto: ' + st['auto']}; {state}")


def configure_export(p):
    _run_arg(p)
    p.add_argument("--forget", type=_class_set, required=True, metavar="C[,C...]",
                   help="the class the exported model forgets, or a set of classes forgotten together, e.g. 3,7 "
                        "(their gates composed as in wfnet.sets; required)")
    p.add_argument("--hard", type=float, nargs="?", const=-1.0, default=None, metavar="T",
                   help="hard export: zero the weights and bias of every channel whose gate for the class is below T "
                        "(--hard alone: the default threshold 0.5; default: off, a soft export scales them)")
    p.add_argument("--out", required=True, help="the .safetensors file to write (required)")


def run_export(args):
    """A plain model (no wfnet layers) that forgot one class, as a safetensors state dict with its description."""
    import json

    from safetensors.torch import save_file

    from . import files
    from .model import HARD_EXPORT_THRESHOLD, export

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out must end in .safetensors, got {out}")
    info, device = _setup(args)
    run = _open(args, info, device)
    bad = [c for c in args.forget if not 0 <= c < run.num_classes]
    if bad:
        raise CLIError(f"--forget {bad[0]} is out of range: the run has classes 0..{run.num_classes - 1}")
    forget = args.forget[0] if len(args.forget) == 1 else args.forget  # one class: the single row, as before
    hard = HARD_EXPORT_THRESHOLD if args.hard == -1.0 else args.hard
    try:
        model = export(run.wrapped(), forget=forget, hard=hard)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    report = model.wfnet_export
    meta = {"wfnet_export": json.dumps(report), "run": str(Path(run.run_dir).resolve()),
            "model": str(run.config.get("model")), "dataset": str(run.config.get("dataset")),
            "gates_stamp": str(run.model_stamp("wfnet"))}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    files.atomic_write(out, lambda tmp: save_file(state, tmp, metadata=meta))
    kind = f"hard (gate < {report['hard']:g} removed)" if report["hard"] is not None else "soft (gates scaled in)"
    what = f"class {forget}" if isinstance(forget, int) else f"the set of classes {forget}"
    print(f"wrote {out}: {run.config.get('model')} forgetting {what}, {kind}; "
          f"{report['removed_total']} of {report['channels_total']} filtered channels removed")
    for name, (removed, total) in report["removed"].items():
        if removed:
            print(f"  {name}: {removed}/{total}")


def configure_serve_export(p):
    _run_arg(p)
    p.add_argument("--out", required=True, help="the .onnx file to write (required)")
    p.add_argument("--forget-input", default="rows", choices=("rows", "mask"),
                   help="the exported forget input: rows = int64 [B], one class per sample; mask = bool [B, N_c], a "
                        "set of classes per sample (default: rows)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="the exported model's dtype (default: float32)")


def run_serve_export(args):
    """The wrapped model with its gates as an ONNX file taking (x, forget), for ONNX Runtime (wfnet.serve)."""
    import torch

    from .serve import export_onnx

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise CLIError(f"--out must end in .onnx, got {out}")
    info, device = _setup(args)
    run = _open(args, info, device)
    c = run.config
    dtype = getattr(torch, args.dtype)
    wf = run.wrapped().to("cpu", dtype)  # traced on the CPU with the torch backend's plain ops
    example = torch.zeros(2, int(c["in_chans"]), int(c["image_size"]), int(c["image_size"]), dtype=dtype)
    try:
        export_onnx(wf, out, example, forget=args.forget_input)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    shape = "[B]" if args.forget_input == "rows" else f"[B, {run.num_classes}]"
    print(f"wrote {out}: {c.get('model')} ({args.dtype}) with inputs x [B, {c['in_chans']}, {c['image_size']}, "
          f"{c['image_size']}] and forget {shape} ({args.forget_input}); serve it with "
          f"wfnet.serve.OnnxForgetModel (README: Serving)")


def configure_reproduce(p):
    from .reproduce import BACKBONES, PROFILES

    p.add_argument("--out", default="runs/reproduce", help="folder for one run folder per backbone and the combined "
                                                           "report (default: runs/reproduce)")
    p.add_argument("--dataset", default="mnist", help="mnist, cifar10, imagenet, ... (default: mnist)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset (default: $WFNET_DATA_ROOT)")
    p.add_argument("--models", type=_csv(str, BACKBONES), default=list(BACKBONES),
                   help=f"comma-separated subset of {','.join(BACKBONES)} (default: all)")
    p.add_argument("--profile", default="cpu", choices=tuple(PROFILES),
                   help="cpu: what 2 CPU cores allow (subsets, few epochs, baselines for a few classes; written "
                        "into the report); paper: the paper's settings (default: cpu)")
    p.add_argument("--force", action="store_true",
                   help="replace gates / baseline models made with other options (after editing a profile) and "
                        "redo evaluate and explain; without it such a folder is refused, naming the differences")


def run_reproduce(args):
    """train -> untrain -> baselines -> evaluate -> explain per backbone; finished stages are skipped."""
    from .reproduce import reproduce

    info, device = _setup(args)
    try:
        reproduce(args.out, args.dataset, args.models, args.profile, device=device, data_root=args.data_root,
                  progress=not args.no_progress, force=args.force)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


@dataclass
class Command:
    help: str
    configure: Callable
    run: Callable
    device: bool = True


COMMANDS = {
    "train": Command("train the original classifier into a new run folder", configure_train, run_train),
    "untrain": Command("train the gates of a run's model to forget every class, in one round", configure_untrain,
                       run_untrain),
    "baselines": Command("the per-class baselines: retrain, random labels, negative gradients", configure_baselines,
                         run_baselines),
    "evaluate": Command("Table 1 (Acc_r, Acc_f, ZRF, RT) and Table 2 (insertion, deletion)", configure_evaluate,
                        run_evaluate),
    "explain": Command("filter maps, gate heatmaps and insertion/deletion curves (PNG + report.md)",
                       configure_explain, run_explain),
    "inspect": Command("what wrap would filter in a model (layers, kinds, gates), what it leaves alone and why",
                       configure_inspect, run_inspect),
    "export": Command("a plain model that forgot one class (soft, or hard: closed channels zeroed) as safetensors",
                      configure_export, run_export),
    "serve-export": Command("the wrapped model as ONNX taking (x, forget) as inputs, for ONNX Runtime serving",
                            configure_serve_export, run_serve_export),
    "reproduce": Command("the paper's Tables 1/2 per backbone beside the paper's rows: every stage, resumable",
                         configure_reproduce, run_reproduce),
    "demo": Command("the whole job on the embedded digits: train, untrain, baselines, evaluate, explain",
                    configure_demo, run_demo),
}


# ------------------------------------------------------------------------------------------------------------------
# parsing and main


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="wfnet", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wfnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help[0].upper() + cmd.help[1:] + ".")
        cmd.configure(p)
        _common(p, cmd.device)
    return parser


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml / json syntax errors: the message says where
        raise CLIError(f"config file {p} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CLIError(f"config file {p} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        values = _load_config_file(args.config)
        subparser = parser._subparsers._group_actions[0].choices[args.command]
        actions = {a.dest: a for a in subparser._actions if a.option_strings}
        unknown = sorted(k for k in values if k not in actions or k in ("config", "help"))
        if unknown:
            raise CLIError(f"config file {args.config}: unknown option(s) {unknown} for `wfnet {args.command}`")
        for k, v in values.items():  # values go through the option's own type and choices checks
            a = actions[k]
            if a.type is not None and v is not None:
                try:
                    v = a.type(",".join(map(str, v)) if isinstance(v, list) else v)
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    raise CLIError(f"config file {args.config}: {k}: {exc}") from None
            if a.choices is not None and v not in a.choices:
                raise CLIError(f"config file {args.config}: {k} must be one of {', '.join(map(str, a.choices))}, "
                               f"got {v!r}")
            subparser.set_defaults(**{k: v})
        args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    from .files import CorruptFileError  # torch-free, like .run's RunError: `wfnet --help` stays light
    from .run import RunError

    try:
        try:
            args = parse_args(argv)
        except SystemExit as exc:  # --help (0), or argparse's one-line usage error (2)
            return exc.code if isinstance(exc.code, int) else 2
        COMMANDS[args.command].run(args)
        _leave_process_group(barrier=True)
    except (CLIError, RunError, CorruptFileError) as exc:  # a damaged run file: named, with what to do
        print(f"wfnet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wfnet: interrupted; the run folder is as it was or holds a resumable run (--resume)", file=sys.stderr)
        return 130
    finally:
        _leave_process_group(barrier=False)
    return 0


def _leave_process_group(barrier: bool) -> None:
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            # rank 0 still writes results after the last collective: tearing gloo down on the other ranks while it
            # works can abort them ("terminate called without an active exception"), so all ranks leave together
            dist.barrier()
        else:
            dist.destroy_process_group()
