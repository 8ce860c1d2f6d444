"""The ``wfnet`` command: train, untrain, baselines, evaluate, explain, demo.

    wfnet demo                                          # the whole job on the embedded digits, a few CPU minutes
    wfnet train --model resnet18 --dataset mnist --data-root DATA --out runs/mnist_r18
    wfnet untrain runs/mnist_r18 [--recipe tuned|paper] [--lr ... any option]
    wfnet baselines runs/mnist_r18 --methods retrain,random-labels,negative-gradients
    wfnet evaluate runs/mnist_r18                       # Table 1 (Acc_r, Acc_f, ZRF, RT) and Table 2 (Ins, Del)
    wfnet explain runs/mnist_r18                        # filter maps, gate heatmaps, insertion/deletion curves

Every subcommand takes ``--config FILE`` (YAML or JSON: option names as keys, e.g. ``lr: 0.1`` or
``lambda-forget: 10``); flags given on the command line override the file. The effective configuration is saved in
the run folder. ``train`` and ``untrain`` run data-parallel under ``torchrun --nproc_per_node=N -m wfnet ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------------------------
# argument parsing


def _add_common(p: argparse.ArgumentParser, device=True):
    p.add_argument("--config", help="YAML or JSON file of option values (command-line flags override it)")
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
        p.add_argument("--backend", default=None, choices=["auto", "naive", "torch", "triton", "cuda"],
                       help="weight-filtering backend (default: $WFNET_BACKEND or auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_data(p):
    p.add_argument("--model", default="small_cnn",
                   help="small_cnn, vgg16, resnet18, vit_tiny, vit_small, or a torchvision/timm model name")
    p.add_argument("--dataset", default="digits", help="digits (embedded), mnist, cifar10, imagenet, imagefolder")
    p.add_argument("--data-root", default=None, help="folder holding the dataset (not needed for digits)")
    p.add_argument("--download", action="store_true", help="download mnist/cifar10 into --data-root if missing")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the dataset's)")
    p.add_argument("--augment", action="store_true", help="random crop/flip augmentation when training (cifar10, "
                                                          "image folders)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use a fixed random subset of this many training samples (small machines)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="evaluate on a fixed random subset of this many test samples")


def _add_train(p):
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 15 for digits, else 10)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)


def _add_untrain(p):
    from .untrain import RECIPES

    p.add_argument("--recipe", default="tuned", choices=RECIPES,
                   help="tuned (default; Adam, clamped gates) or paper (SGD lr 100, the paper's lambdas)")
    g = p.add_argument_group("untraining options (default: the recipe's value)")
    g.add_argument("--optimizer", dest="u_optimizer", choices=["sgd", "adam"])
    g.add_argument("--lr", dest="u_lr", type=float)
    g.add_argument("--lambda-retain", type=float, help="lambda0, weight of mean CE on retained rows")
    g.add_argument("--lambda-forget", type=float, help="lambda1, weight of the reciprocal forget CE")
    g.add_argument("--lambda-reg", type=float, help="lambda2, weight of R = mean(1 - sigmoid(alpha))")
    g.add_argument("--forget-loss", choices=["mean_inverse", "inverse_mean"])
    g.add_argument("--eps", type=float, help="guard in 1/(CE_f + eps)")
    g.add_argument("--alpha-clamp", type=float, help="clamp gate logits to [-c, c] after each step (<= 0: none)")
    g.add_argument("--chi", type=int, help="copies of the retain half in label expansion")
    g.add_argument("--batch-size", dest="u_batch_size", type=int)
    g.add_argument("--init", type=float, help="initial gate logit (3 -> sigmoid 0.95)")
    g.add_argument("--max-epochs", type=int)
    g.add_argument("--patience", type=int, help="validations without improvement before early stopping")
    g.add_argument("--val-per-epoch", type=int)
    g.add_argument("--seed", dest="u_seed", type=int)
    p.add_argument("--targets", default="auto",
                   help="layers to filter: auto, or comma-separated module names / glob patterns")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wfnet", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"wfnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train the original classifier into a new run folder")
    _add_data(p)
    _add_train(p)
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--exclude-class", type=int, default=None, help="train without this class (retrained model)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training in --out")
    _add_common(p)

    p = sub.add_parser("untrain", help="train the gates of a run's model to forget every class, in one round")
    p.add_argument("run", help="run folder (from `wfnet train`)")
    _add_untrain(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted untraining")
    p.add_argument("--force", action="store_true", help="replace existing gates trained with other options")
    p.add_argument("--data-root", default=None, help="override the run's data root")
    _add_common(p)

    from .baselines import METHODS

    p = sub.add_parser("baselines", help="run the per-class baselines (retrain, random labels, negative gradients)")
    p.add_argument("run")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: all)")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning passes for random-labels/negative-gradients")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--force", action="store_true", help="recompute models that exist")
    p.add_argument("--data-root", default=None)
    _add_common(p)

    p = sub.add_parser("evaluate", help="Table 1 (Acc_r, Acc_f, ZRF, RT) and Table 2 (insertion, deletion)")
    p.add_argument("run")
    p.add_argument("--metrics", default="acc,zrf,rt,insdel", help="comma-separated subset of acc,zrf,rt,insdel")
    p.add_argument("--rt-max-epochs", type=int, default=100, help="relearn-time cap (epochs of 500 samples)")
    p.add_argument("--rt-samples", type=int, default=500, help="training samples per relearn epoch")
    p.add_argument("--rt-lr", type=float, default=0.01, help="relearn SGD learning rate")
    p.add_argument("--insdel-steps", type=int, default=21, help="points on the insertion/deletion curves")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of original,wfnet and the baselines present (default: all)")
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: all)")
    p.add_argument("--force", action="store_true", help="recompute cached results")
    p.add_argument("--data-root", default=None)
    _add_common(p)

    p = sub.add_parser("explain", help="filter maps, gate heatmaps and insertion/deletion curves (PNG + report.md)")
    p.add_argument("run")
    p.add_argument("--layers", default=None, help="comma-separated filtered layer names (default: a few)")
    p.add_argument("--top-k", type=int, default=10, help="channels per class in the filter maps")
    p.add_argument("--max-classes", type=int, default=20, help="classes drawn in the filter maps")
    p.add_argument("--force", action="store_true")
    p.add_argument("--data-root", default=None)
    _add_common(p)

    p = sub.add_parser("demo", help="the whole job on the embedded digits: train, untrain, evaluate, explain")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (fewer epochs, RT cap 20)")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--image-size", type=int, default=None, help="upscale the 8x8 digits to this side (default 28)")
    _add_common(p)
    return parser


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise CLIError(f"config file {p} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        values = _load_config_file(args.config)
        subparser = parser._subparsers._group_actions[0].choices[args.command]
        # option name as typed (lr) -> dest (u_lr for untrain's overrides)
        by_name = {}
        for action in subparser._actions:
            for opt in action.option_strings:
                by_name[opt.lstrip("-").replace("-", "_")] = action.dest
        unknown = sorted(k for k in values if k not in by_name)
        if unknown:
            raise CLIError(f"config file {args.config}: unknown option(s) {unknown} for `wfnet {args.command}`")
        subparser.set_defaults(**{by_name[k]: v for k, v in values.items()})
        args = parser.parse_args(argv)
    return args


# ------------------------------------------------------------------------------------------------------------------
# helpers


def _setup(args):
    from . import set_backend
    from .distributed import init_distributed, resolve_device

    if getattr(args, "backend", None):
        set_backend(args.backend)
    info = init_distributed(args.device if args.device not in (None, "auto") else
                            ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = resolve_device(args.device, info)
    except RuntimeError as exc:
        raise CLIError(str(exc)) from None
    return info, device


def _log(info, msg):
    if info is None or info.is_main:
        print(msg, flush=True)


def _identity(cfg: dict) -> dict:
    keys = ("model", "dataset", "image_size", "exclude_class", "train_limit", "test_limit", "train")
    return {k: cfg.get(k) for k in keys}


def _open_run(args, device, models: bool = True):
    """The run folder named on the command line; with ``models``, also its trained original model and its data."""
    from .experiment import Run

    try:
        run = Run(args.run, device=device, data_root=args.data_root)
        return (run, run.original_model(), run.data) if models else run
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _csv(text, cast=str):
    return None if text is None else [cast(t.strip()) for t in text.split(",") if t.strip()]


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def accuracy_table(run_name: str, original: dict, wf: dict, class_names, recipe: str, seconds: float) -> str:
    lines = [f"# Forgetting and retaining: {run_name}", "",
             "Mean over classes c of the accuracy with row c on the test samples of class c (Acc_f, lower is "
             "better) and of all other classes (Acc_r, higher is better), in %.", "",
             "| model | Acc_r | Acc_f |", "|---|---|---|",
             f"| original | {_fmt(original['acc_r'])} | {_fmt(original['acc_f'])} |",
             f"| WF-Net ({recipe} recipe, one round for all classes, {seconds:.0f} s) | {_fmt(wf['acc_r'])} | "
             f"{_fmt(wf['acc_f'])} |", "", "Per class:", "",
             "| class | original Acc_f | WF-Net Acc_r | WF-Net Acc_f |", "|---|---|---|---|"]
    for c, name in enumerate(class_names):
        o, w = original["per_class"][c], wf["per_class"][c]
        lines.append(f"| {name} | {_fmt(o['acc_f'])} | {_fmt(w['acc_r'])} | {_fmt(w['acc_f'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# commands


def cmd_train(args, info=None, device=None):
    from . import __version__
    from .checkpoint import save_model
    from .data import load_dataset
    from .experiment import model_spec, read_json, write_json
    from .models import build_model
    from .train import TrainConfig, train_classifier

    if info is None:
        info, device = _setup(args)
    if not args.out:
        raise CLIError("wfnet train needs --out RUN_DIR")
    out = Path(args.out)
    spec = model_spec(args.model, args.dataset, args.image_size)
    epochs = args.epochs or (15 if args.dataset == "digits" else 10)
    tcfg = TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, seed=args.seed)
    try:
        bundle = load_dataset(args.dataset, args.data_root, spec["image_size"], args.download, seed=0,
                              augment=args.augment, exclude_class=args.exclude_class,
                              train_limit=args.train_limit, test_limit=args.test_limit)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    try:
        torch.manual_seed(args.seed)  # the same initialisation as Run.build_model(seed)
        model = build_model(args.model, bundle.num_classes, bundle.in_chans, spec["image_size"])
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    cfg = {"wfnet_version": __version__, **spec, "data_root": args.data_root, "in_chans": bundle.in_chans,
           "num_classes": bundle.num_classes, "class_names": bundle.class_names, "val_fraction": 0.1, "data_seed": 0,
           "train_limit": args.train_limit, "test_limit": args.test_limit,
           "exclude_class": args.exclude_class, "augment": args.augment, "device": str(device),
           "train": asdict(tcfg)}
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = read_json(cfg_path)
        if _identity(old) != _identity(cfg):
            diff = [k for k in _identity(cfg) if _identity(old)[k] != _identity(cfg)[k]]
            raise CLIError(f"{out} already holds a different run (differs in: {', '.join(diff)}); choose another "
                           f"--out or delete that folder")
        if (out / "original.safetensors").exists() and not args.resume:
            _log(info, f"{out}: the original model is already trained (test accuracy "
                       f"{old.get('original_test_acc', '?')}); nothing to do")
            return old
    elif (out.exists() and any(out.iterdir())):
        raise CLIError(f"{out} exists and is not an empty folder or a wfnet run; choose another --out")
    if info.is_main:
        write_json(cfg_path, cfg)
    _log(info, f"training {args.model} on {args.dataset} ({len(bundle.train)} train / {len(bundle.val)} val / "
               f"{len(bundle.test)} test images, {spec['image_size']} px) on {device}")
    t0 = time.time()
    res = train_classifier(model, bundle.train, bundle.test, tcfg, device, checkpoint=out / "train_state.safetensors",
                           resume=args.resume, info=info, progress=not args.no_progress)
    if info.is_main:
        save_model(model, out / "original.safetensors", {"test_acc": res["test_acc"]})
        cfg["original_test_acc"] = res["test_acc"]
        cfg["train_seconds"] = time.time() - t0
        write_json(cfg_path, cfg)
    _log(info, f"test accuracy {res['test_acc']:.2f}% ({time.time() - t0:.0f} s); saved {out / 'original.safetensors'}")
    return cfg


def _untrain_overrides(args) -> dict:
    clamp = args.alpha_clamp
    return {"optimizer": args.u_optimizer, "lr": args.u_lr, "lambda_retain": args.lambda_retain,
            "lambda_forget": args.lambda_forget, "lambda_reg": args.lambda_reg, "forget_loss": args.forget_loss,
            "eps": args.eps, "alpha_clamp": clamp, "chi": args.chi, "batch_size": args.u_batch_size,
            "init": args.init, "max_epochs": args.max_epochs, "patience": args.patience,
            "val_per_epoch": args.val_per_epoch, "seed": args.u_seed}


def cmd_untrain(args, info=None, device=None):
    from . import metrics, save_filters, wrap
    from .serialization import write_text
    from .experiment import read_json, write_json
    from .untrain import model_kind, recipe, untrain

    if info is None:
        info, device = _setup(args)
    run, original, bundle = _open_run(args, device)
    targets = "auto" if args.targets == "auto" else _csv(args.targets)
    try:
        wf = wrap(original, run.num_classes, targets=targets)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    overrides = _untrain_overrides(args)
    no_clamp = overrides["alpha_clamp"] is not None and overrides["alpha_clamp"] <= 0
    if no_clamp:
        overrides["alpha_clamp"] = None
    ucfg = recipe(args.recipe, model_kind(wf), **overrides)
    if no_clamp:
        ucfg.alpha_clamp = None
    section = {"recipe": args.recipe, "targets": targets, **asdict(ucfg)}
    old = run.config.get("untrain")
    filters = run.run_dir / "filters.safetensors"
    if old is not None and old != section and not args.force:
        raise CLIError(f"{run.run_dir} already holds gates untrained with other options; pass --force to replace "
                       f"them, or copy the run folder")
    if old == section and filters.exists() and not args.resume and (run.run_dir / "results.json").exists():
        _log(info, f"{run.run_dir}: already untrained with these options; results in {run.run_dir / 'results.md'}")
        print((run.run_dir / "results.md").read_text()) if info.is_main else None
        return read_json(run.run_dir / "results.json")
    state_path = run.run_dir / "untrain_state.safetensors"
    if args.force and not args.resume and state_path.exists() and info.is_main:
        state_path.unlink()
    if info.is_main:
        run.config["untrain"] = section
        run.config["targets"] = targets
        write_json(run.run_dir / "config.json", run.config)
    _log(info, f"untraining {len(wf.layer_names)} filtered layers ({wf.num_filter_parameters()} gate parameters) "
               f"for all {run.num_classes} classes, {args.recipe} recipe, on {device}")
    summary = untrain(wf, bundle.train, bundle.val, ucfg, device, state_path=state_path,
                      resume=args.resume, info=info, progress=not args.no_progress)
    if not info.is_main:
        return None
    save_filters(wf, filters, {"recipe": args.recipe, "dataset": run.config["dataset"]})
    _drop_stale_wfnet_results(run.run_dir)
    write_json(run.run_dir / "untrain_summary.json", summary)
    _log(info, f"{summary['stopped']} after {summary['steps']} steps ({summary['seconds']:.0f} s); saved {filters}")
    wf.eval()
    from .train import make_loader

    loader = make_loader(bundle.test, 512)
    classes = range(run.num_classes)
    orig_acc = metrics.accuracy_forget_retain_shared(run.original_model(), loader, classes, device)
    wf_acc = metrics.accuracy_forget_retain(lambda c: (lambda x: wf(x, forget=c)), loader, classes, device,
                                            progress=not args.no_progress)
    results = {"run": str(run.run_dir), "model": run.config["model"], "dataset": run.config["dataset"],
               "recipe": args.recipe, "untrain_seconds": summary["seconds"], "original": orig_acc, "wf_net": wf_acc}
    write_json(run.run_dir / "results.json", results)
    md = accuracy_table(f"{run.config['model']} on {run.config['dataset']}", orig_acc, wf_acc, run.class_names,
                        args.recipe, summary["seconds"])
    write_text(run.run_dir / "results.md", md)
    print(md)
    return results


def _drop_stale_wfnet_results(run_dir: Path) -> None:
    """New gates make cached WF-Net metrics and explanations stale (baseline results stay valid)."""
    for p in (run_dir / "eval").glob("*_wfnet.json"):
        p.unlink()
    for name in ("table1.md", "table1.json", "table2.md", "table2.json"):
        (run_dir / "eval" / name).unlink(missing_ok=True)
    explain = run_dir / "explain"
    if explain.exists():
        import shutil

        shutil.rmtree(explain)


def cmd_baselines(args, info=None, device=None):
    from .baselines import METHODS, BaselineConfig, unlearn_baseline
    from .checkpoint import save_model
    from .experiment import read_json, write_json
    from .train import TrainConfig

    if info is None:
        info, device = _setup(args)
    run, original, bundle = _open_run(args, device)
    methods = _csv(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise CLIError(f"unknown baseline(s) {bad}: use {', '.join(METHODS)}")
    classes = list(range(run.num_classes)) if args.classes is None else _csv(args.classes, int)
    out_of_range = [c for c in classes if not 0 <= c < run.num_classes]
    if out_of_range:
        raise CLIError(f"class(es) {out_of_range} out of range: num_classes={run.num_classes}")
    bcfg = BaselineConfig(epochs=args.epochs, lr=args.lr)
    tcfg = TrainConfig(**run.config["train"])
    for method in methods:
        d = run.baseline_dir(method)
        summary_path = d / "summary.json"
        summary = read_json(summary_path) if summary_path.exists() else {"method": method, "seconds": {}}
        summary["config"] = asdict(bcfg) if method != "retrain" else asdict(tcfg)
        for c in classes:
            path = d / f"class_{c}.safetensors"
            if path.exists() and not args.force:
                continue
            model, seconds = unlearn_baseline(method, original, bundle, c, bcfg, device,
                                              build_fresh=lambda: run.build_model(seed=tcfg.seed), train_cfg=tcfg,
                                              progress=not args.no_progress)
            save_model(model, path, {"method": method, "class": c, "seconds": seconds})
            summary["seconds"][str(c)] = seconds
            summary["total_seconds"] = sum(summary["seconds"].values())
            write_json(summary_path, summary)
            _log(info, f"{method}: class {c} done in {seconds:.1f} s")
        _log(info, f"{method}: {len(summary['seconds'])} classes, {summary.get('total_seconds', 0):.0f} s in total")
    return True


def cmd_evaluate(args, info=None, device=None):
    from .report import evaluate_run

    if info is None:
        info, device = _setup(args)
    run = _open_run(args, device, models=False)
    wanted = tuple(_csv(args.metrics))
    bad = [m for m in wanted if m not in ("acc", "zrf", "rt", "insdel")]
    if bad:
        raise CLIError(f"unknown metric(s) {bad}: use acc, zrf, rt, insdel")
    try:
        tables = evaluate_run(run, metrics=wanted, force=args.force, rt_max_epochs=args.rt_max_epochs,
                              rt_samples_per_epoch=args.rt_samples, rt_lr=args.rt_lr, insdel_steps=args.insdel_steps,
                              methods=_csv(args.methods), classes=_csv(args.classes, int),
                              progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    for name in ("table1.md", "table2.md"):
        p = run.run_dir / "eval" / name
        if p.exists():
            print(p.read_text())
    return tables


def cmd_explain(args, info=None, device=None):
    from .report import explain_run

    if info is None:
        info, device = _setup(args)
    run = _open_run(args, device, models=False)
    layers = _csv(args.layers)
    try:
        out = explain_run(run, layers=layers, force=args.force, top_k=args.top_k, max_classes=args.max_classes,
                          progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"explanations written to {run.run_dir / 'explain'} (open report.md)")
    return out


def cmd_demo(args):
    """Train the small CNN on the embedded digits, untrain every class in one round, run the two fine-tuning
    baselines for every class (skipped with --quick), evaluate everything and draw the explanations."""
    info, device = _setup(args)
    quick = args.quick
    t0 = time.time()
    base = dict(config=None, device=args.device, backend=args.backend, no_progress=args.no_progress)
    train_args = argparse.Namespace(**base, model=args.model, dataset="digits", data_root=None, download=False,
                                    image_size=args.image_size, augment=False, train_limit=None, test_limit=None,
                                    epochs=8 if quick else 15, lr=0.05, batch_size=64, optimizer="sgd",
                                    weight_decay=5e-4, seed=0, out=args.out, exclude_class=None, resume=False)
    cmd_train(train_args, info, device)
    un = {k: None for k in ("u_optimizer", "u_lr", "lambda_retain", "lambda_forget", "lambda_reg", "forget_loss",
                            "eps", "alpha_clamp", "chi", "u_batch_size", "init", "max_epochs", "patience",
                            "val_per_epoch", "u_seed")}
    un["max_epochs"] = 8 if quick else 20
    untrain_args = argparse.Namespace(**base, **un, run=args.out, recipe="tuned", targets="auto", resume=False,
                                      force=False, data_root=None)
    cmd_untrain(untrain_args, info, device)
    if not quick:
        cmd_baselines(argparse.Namespace(**base, run=args.out, methods="random-labels,negative-gradients",
                                         classes=None, epochs=1, lr=0.01, force=False, data_root=None), info, device)
    eval_args = argparse.Namespace(**base, run=args.out, metrics="acc,zrf,rt,insdel",
                                   rt_max_epochs=20 if quick else 100, rt_samples=500, rt_lr=0.01, insdel_steps=21,
                                   methods=None, classes=None, force=False, data_root=None)
    cmd_evaluate(eval_args, info, device)
    cmd_explain(argparse.Namespace(**base, run=args.out, layers=None, top_k=10, max_classes=20, force=False,
                                   data_root=None), info, device)
    print(f"demo finished in {time.time() - t0:.0f} s; everything is in {args.out}/ "
          f"(config.json, original.safetensors, filters.safetensors, results.md, eval/, explain/report.md)")


COMMANDS = {"train": cmd_train, "untrain": cmd_untrain, "baselines": cmd_baselines, "evaluate": cmd_evaluate,
            "explain": cmd_explain, "demo": cmd_demo}


def main(argv=None) -> int:
    import torch.distributed as dist

    try:
        args = parse_args(argv)
        COMMANDS[args.command](args)
        if dist.is_available() and dist.is_initialized():
            # rank 0 still writes results after the last collective: tearing gloo down on the other ranks while it
            # works can abort them ("terminate called without an active exception"), so all ranks leave together
            dist.barrier()
    except CLIError as exc:
        print(f"wfnet: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
