"""The ``wfnet`` command: a thin layer over the stages. It parses the options (generated from each stage's
configuration dataclass), calls the stage's ``run(run, cfg)``, and prints what it returns.

Adding a subcommand: write ``configure(parser)`` and ``run(args)`` functions and add one line to ``COMMANDS``.
Only the chosen command's parser is built (:func:`build_parser`), so ``wfnet --help`` imports no stage and no torch;
``wfnet COMMAND --help`` imports that command's stage module (its options are its configuration dataclass's fields).
The stage modules are imported through :func:`_stage`, the one place this module imports them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from ._version import __version__
from .errors import RunError
from .files import CorruptFileError

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
  wfnet baselines runs/mnist_r18 --methods retrain,random-labels,negative-gradients,ssd
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
        BACKEND_NAMES = _stage("backends").BACKEND_NAMES
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
    U = _stage("untrain")
    if name in ("recipe", "targets"):
        return f"default: {_show(getattr(U.UntrainConfig(), name))}"
    tuned, paper_cnn, paper_vit = (getattr(U.recipe(r, k), name) for r, k in
                                   (("tuned", "cnn"), ("paper", "cnn"), ("paper", "vit")))
    if tuned == paper_cnn == paper_vit:
        return f"default: {_show(tuned)}"
    paper = _show(paper_cnn) if paper_cnn == paper_vit else f"{_show(paper_cnn)} (ViT {_show(paper_vit)})"
    return f"default: tuned {_show(tuned)}, paper {paper}"


def _stage(name: str):
    """The module ``wfnet.<name>`` (a stage and what it needs), imported when a command needs it: the only
    imports of this module that are not at its top, so that ``wfnet --help`` stays light."""
    return importlib.import_module(f".{name}", __package__)


# ------------------------------------------------------------------------------------------------------------------
# commands: configure(parser) and run(args)


def _setup(args):
    return _stage("run").setup(getattr(args, "device", "auto"), getattr(args, "backend", None))


def _open(args, info, device):
    return _stage("run").Run.open(args.run, device=device, data_root=getattr(args, "data_root", None), info=info)


def configure_train(p):
    add_options(p, _stage("config").DataConfig, title="model and data")
    add_options(p, _stage("train").TrainConfig, title="training")
    p.add_argument("--out", required=True, help="run folder to create (or to resume) (required)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training in --out (default: off)")


def run_train(args):
    T, C = _stage("train"), _stage("config")
    info, device = _setup(args)
    run = _stage("run").Run.create(args.out, C.DataConfig(**values_of(args, C.DataConfig)), device=device, info=info)
    T.run(run, T.TrainConfig(**values_of(args, T.TrainConfig)), resume=args.resume, progress=not args.no_progress)


def configure_untrain(p):
    _run_arg(p)
    U = _stage("untrain")
    defaults = {f.name: None for f in fields(U.UntrainConfig) if f.name not in ("recipe", "targets")}
    add_options(p, U.UntrainConfig, defaults, _untrain_default, title="untraining")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted untraining with the same options (default: off)")
    p.add_argument("--force", action="store_true", help="replace gates untrained with other options, or a damaged "
                                                        "filters file, or discard an interrupted untraining (the old "
                                                        "gates stay until the new ones are trained; default: off)")


def run_untrain(args):
    U = _stage("untrain")
    info, device = _setup(args)
    run = _open(args, info, device)
    opts = values_of(args, U.UntrainConfig)
    targets = opts["targets"]  # "auto", or module names / glob patterns, comma-separated (a list in a config file)
    if isinstance(targets, str) and targets != "auto":
        opts["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    res = U.run(run, U.config_for(run, **opts), force=args.force, resume=args.resume, progress=not args.no_progress)
    if res is not None:
        print(res["markdown"])


def configure_baselines(p):
    _run_arg(p)
    add_options(p, _stage("baselines").BaselineConfig, title="fine-tuning baselines")
    p.add_argument("--force", action="store_true", help="recompute models that exist, or replace models made "
                                                        "with other options (kept until the new ones are made; "
                                                        "default: off)")


def run_baselines(args):
    B = _stage("baselines")
    info, device = _setup(args)
    B.run(_open(args, info, device), B.BaselineConfig(**values_of(args, B.BaselineConfig)), force=args.force,
          progress=not args.no_progress)


def configure_evaluate(p):
    _run_arg(p)
    add_options(p, _stage("evaluate").EvalConfig, title="evaluation")
    add_options(p, _stage("audit").AuditConfig,
                title="the unlearning audit (--metrics mia,probe,relearn_fewshot,relearn_retain)")
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
    try:
        return _stage("sets").parse_sets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_evaluate(args):
    info, device = _setup(args)
    run = _open(args, info, device)
    if args.sets or args.set_size is not None or args.num_sets is not None:
        _evaluate_sets(args, run)
        return
    E, A = _stage("evaluate"), _stage("audit")
    cfg = E.EvalConfig(**values_of(args, E.EvalConfig), audit=A.AuditConfig(**values_of(args, A.AuditConfig)))
    print(E.run(run, cfg, force=args.force, progress=not args.no_progress)["markdown"])


def _evaluate_sets(args, run):
    """``wfnet evaluate RUN --sets ... / --set-size K --num-sets M``: the per-set table (wfnet.set_eval)."""
    set_eval = _stage("set_eval")
    if (args.set_size is None) != (args.num_sets is None):
        raise CLIError("--set-size K and --num-sets M go together")
    if args.set_retrain < 0:
        raise CLIError(f"--set-retrain must be >= 0, got {args.set_retrain}")
    # the composition: the gates' own (load_filters restores it with them)
    cfg = set_eval.SetEvalConfig(sets=args.sets or [], set_size=args.set_size, num_sets=args.num_sets or 0,
                                 seed=args.set_seed, retrain=args.set_retrain)
    try:
        cfg.all_sets(run.num_classes)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    out = set_eval.run(run, cfg, progress=not args.no_progress, log=print)
    print(out["markdown"])


def configure_explain(p):
    _run_arg(p)
    add_options(p, _stage("explain").ExplainConfig, title="explanation")
    p.add_argument("--force", action="store_true", help="redraw figures that exist (default: off)")


def run_explain(args):
    X = _stage("explain")
    info, device = _setup(args)
    out = X.run(_open(args, info, device), X.ExplainConfig(**values_of(args, X.ExplainConfig)), force=args.force,
                progress=not args.no_progress)
    print(f"explanations written to {Path(out['report']).parent} (open report.md)")


def configure_demo(p):
    p.add_argument("--out", default=None, help="run folder (default: runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run: fewer epochs, no baselines, no "
                                                        "audit, RT cap 20 (default: off)")
    p.add_argument("--model", default="small_cnn", help="the backbone (default: small_cnn)")
    p.add_argument("--image-size", type=int, default=None, help="upscale the 8x8 digits to this side (default: 28)")


def run_demo(args):
    """The ``demo`` (or ``demo-quick``) profile of :mod:`wfnet.reproduce` in one run folder: train the small CNN on
    the embedded digits, untrain every class in one round, run the two fine-tuning baselines for every class (not
    with --quick), evaluate everything (with the unlearning audit, not with --quick) and draw the explanations."""
    R = _stage("reproduce")
    info, device = _setup(args)
    profile = "demo-quick" if args.quick else "demo"
    out = args.out or f"runs/{profile}"
    entry = dict(R.PROFILES[profile]["small_cnn"])
    entry["model"] = args.model
    if args.image_size is not None:
        entry["data"] = {**entry["data"], "image_size": args.image_size}
    t0 = time.time()
    res = R.run_backbone(out, entry, "digits", device=device, progress=not args.no_progress)
    print(res["untrain"]["markdown"])
    print(res["evaluate"]["markdown"])
    if "audit" in res:
        print(res["audit"]["markdown"])
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
    _NATIVE = _stage("data")._NATIVE
    M, build_model, model_spec = _stage("model"), _stage("models").build_model, _stage("run").model_spec
    UnsupportedModelError, find_targets = M.UnsupportedModelError, M.find_targets
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
        backend_status, resolve_device = _stage("backends").backend_status, _stage("distributed").resolve_device
        device = resolve_device(args.device, None) if args.device != "auto" else "cpu"
        print(f"\nbackends on {device}:")
        for name, st in backend_status(device).items():
            state = "runs here" if st["runs_here"] else f"cannot run here: {st['why_not']}"
            print(f"  {name:7s} {'auto picks it' if st['auto_picks'] else 'auto: ' + st['auto']}; {state}")


def configure_export(p):
    _run_arg(p)
    p.add_argument("--forget", required=True, metavar="C[,C...]",
                   help="the class the exported model forgets (its id, or its name where the dataset has names, e.g. "
                        "an ImageFolder class folder), or a set of classes forgotten together, e.g. 3,7 (their gates "
                        "composed as in wfnet.sets; required)")
    threshold = _stage("model").HARD_EXPORT_THRESHOLD
    p.add_argument("--hard", type=float, nargs="?", const=True, default=None, metavar="T",
                   help="hard export: zero the weights and bias of every channel whose gate for the class is below T "
                        f"(--hard alone: wfnet.model.HARD_EXPORT_THRESHOLD = {threshold:g}; default: off, a soft "
                        "export scales them)")
    p.add_argument("--out", required=True, help="the .safetensors file to write (required)")


def run_export(args):
    """A plain model (no wfnet layers) that forgot one class, as a safetensors state dict with its description."""
    from safetensors.torch import save_file  # third-party, heavy: imported by the command that writes the file

    files, export = _stage("files"), _stage("model").export
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out must end in .safetensors, got {out}")
    info, device = _setup(args)
    run = _open(args, info, device)
    classes = class_ids(args.forget, run.class_names, "--forget")
    forget = classes[0] if len(classes) == 1 else classes  # one class: the single row, as before
    try:
        model = export(run.wrapped(), forget=forget, hard=args.hard)
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


def class_ids(text: str, class_names, option: str) -> list[int]:
    """``"3,7"`` or ``"cat,dog"`` (class names, where the dataset has them: an ImageFolder's class folders) as class
    ids of a run with ``class_names``; each class once, every id in range."""
    names = [str(n) for n in class_names]
    ids = []
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        if token in names:  # a name first: digits' names are "0".."9", the same as their ids
            ids.append(names.index(token))
        elif token.lstrip("-").isdigit():
            c = int(token)
            if not 0 <= c < len(names):
                raise CLIError(f"{option} {c} is out of range: the run has classes 0..{len(names) - 1}")
            ids.append(c)
        else:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise CLIError(f"{option}: {token!r} is neither a class id nor a class name of this run ({shown})")
    if not ids:
        raise CLIError(f"{option}: no class given")
    if len(set(ids)) != len(ids):
        raise CLIError(f"{option} {text!r} names a class twice")
    return ids


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
    import torch  # the command's own needs, after --help

    export_onnx = _stage("serve").export_onnx
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
    add_options(p, _stage("reproduce").ReproduceConfig, title="reproduction")
    p.add_argument("--force", action="store_true",
                   help="replace gates / baseline models made with other options (after editing a profile) and "
                        "redo evaluate and explain; without it such a folder is refused, naming the differences "
                        "(default: off)")


def run_reproduce(args):
    """train -> untrain -> baselines -> evaluate -> explain per backbone; finished stages are skipped."""
    R = _stage("reproduce")
    info, device = _setup(args)
    try:
        R.run(R.ReproduceConfig(**values_of(args, R.ReproduceConfig)), device=device, progress=not args.no_progress,
              force=args.force)
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
    "baselines": Command("the per-class baselines: retrain, random labels, negative gradients, SSD",
                         configure_baselines, run_baselines),
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


def build_parser(*commands: str) -> argparse.ArgumentParser:
    """The ``wfnet`` parser with the options of ``commands`` (each configuring imports its stage module); the other
    commands are listed with their one-line help only, which is all ``wfnet --help`` needs."""
    parser = argparse.ArgumentParser(prog="wfnet", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wfnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help[0].upper() + cmd.help[1:] + ".")
        if name in commands:
            cmd.configure(p)
            _common(p, cmd.device)
    return parser


def command_of(argv) -> str:
    """The command named in ``argv`` ("" when none is: ``wfnet --help``, ``wfnet --version``)."""
    return next((a for a in argv if not a.startswith("-")), "") if argv else ""


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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = parser or build_parser(command_of(argv))
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
