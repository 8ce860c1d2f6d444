"""Run folders: one folder per experiment, and :class:`Run`, the only code that writes or reads one.

    <run>/config.json                 what the run is: model, dataset, data options, training options
    <run>/train_state.safetensors     resumable training state (while it runs)
    <run>/original.safetensors        the trained original model; its metadata: training options, test accuracy
    <run>/untrain_state.safetensors   resumable untraining state, with the untraining options (while it runs)
    <run>/filters.safetensors         the trained gates; their metadata: the untraining options they were made with
    <run>/untrain_summary.json        validation history, stop reason, seconds       } each names the gates
    <run>/results.json, results.md    Acc_f / Acc_r of the original and of WF-Net   } (stamp) it describes
    <run>/baselines/<method>/class_<c>.safetensors   per-class baseline models (metadata: options, seconds)
    <run>/baselines/<method>/summary.json            seconds per class and in total
    <run>/eval/                       per-metric caches (each entry names the model it measured) and Tables 1/2
    <run>/explain/                    figures and report.md (``wfnet explain``)

**Transactions.** Every model file carries a random ``stamp`` and the options it was made with; every file derived
from a model names that model's stamp, and readers check both (:meth:`Run.results`, the evaluation caches). A
command's outputs land together through :func:`wfnet.files.commit`: staged first, then moved in with the stale
results of the previous configuration taken away in the same step. So a failure or a kill at any moment leaves the
folder as it was, or holding an interrupted run of the new options (a ``*_state.safetensors``, or a
``baselines/.pending-<method>`` folder) that ``--resume`` (or a rerun) finishes; it never shows results next to
models they were not computed from. :meth:`Run.open` finishes a commit a killed process left half done.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

from . import files
from ._version import __version__
from .config import (BASELINE_METHODS, METRICS, BaselineConfig, DataConfig, EvalConfig, ExplainConfig,
                     TrainConfig, UntrainConfig, default_train_epochs, recipe, with_defaults)

__all__ = ["Run", "RunError", "setup", "differences", "model_spec"]

CONFIG = "config.json"
ORIGINAL = "original.safetensors"
TRAIN_STATE = "train_state.safetensors"
FILTERS = "filters.safetensors"
UNTRAIN_STATE = "untrain_state.safetensors"
UNTRAIN_SUMMARY = "untrain_summary.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
TABLES = ("eval/table1.md", "eval/table1.json", "eval/table2.md", "eval/table2.json")
# what describes the gates (removed in the same step as new gates land)
_GATE_DERIVED = (*TABLES, "explain")
_IDENTITY = ("model", "dataset", "image_size", "patch_size", "stem_stride", "augment", "train_limit", "test_limit", "exclude_class", "train")


class RunError(Exception):
    """A failure the user can act on (a bad option, a missing or different run): the CLI prints it on one line."""


def differences(old: dict, new: dict, keys=None) -> str:
    """``name: old -> new`` for every key whose value differs (nested dicts are compared key by key)."""
    out = []
    for k in keys or list(dict.fromkeys([*new, *old])):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = differences(a, b)
            out += [f"{k}.{d}" for d in inner.split(", ")] if inner else []
        elif a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return ", ".join(out)


def model_spec(model: str, dataset: str, image_size: int | None, patch_size: int | None = None,
               stem_stride: int | None = None) -> dict:
    """Resolve the image size for a (model, dataset) pair: the dataset's native size, raised to the model's minimum."""
    from .data import default_image_size
    from .models import min_image_size

    size = image_size or default_image_size(dataset)
    return {"model": model, "dataset": dataset, "image_size": max(size, min_image_size(model)),
            "patch_size": patch_size, "stem_stride": stem_stride}


def setup(device: str | None = "auto", backend: str | None = None):
    """Join the process group under torchrun, resolve ``device`` and select ``backend`` after checking that it can
    run on that device (a tiny filtered conv), so an unusable choice fails before any work. Returns (info, device)."""
    import torch

    from .backends import BackendUnavailableError, set_backend, use_backend
    from .distributed import init_distributed, resolve_device

    wanted = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed(wanted)
    try:
        dev = resolve_device(device, info)
    except RuntimeError as exc:
        raise RunError(str(exc)) from None
    if backend is not None:
        if backend != "auto":  # probe first: a failed check leaves the process default as it was
            from .model import wrap

            probe = wrap(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1)), 2).to(dev)
            try:
                with use_backend(backend), torch.no_grad():
                    probe(torch.zeros(1, 1, 2, 2, device=dev), forget=0)
            except ValueError as exc:
                raise RunError(str(exc)) from None
            except BackendUnavailableError as exc:
                reasons = str(exc).splitlines()[1:] or [str(exc)]
                raise RunError(_one_line(f"--backend {backend} cannot run on {dev}:\n" + "\n".join(reasons))) \
                    from None
        set_backend(backend)
    return info, dev


def _one_line(text: str) -> str:
    """A multi-line message (an error with a list of reasons) as one line."""
    out = ""
    for line in (re.sub(r"^\s*-\s+", "", ln).strip() for ln in str(text).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def _stamp() -> str:
    return uuid.uuid4().hex[:16]


def _json_meta(meta: dict, key: str):
    value = meta.get(key)
    return json.loads(value) if isinstance(value, str) else value


class Run:
    """One run folder. Open an existing one with :meth:`Run.open`, create one with :meth:`Run.train`.

    >>> run = Run.open("runs/demo")
    >>> wf = run.wrapped()                # the original model with its trained gates: wf(x, forget=c)
    >>> plain = run.forget_model(3)       # a plain nn.Module that forgot class 3
    """

    def __init__(self, run_dir, config: dict, device=None, info=None, log=None):
        import torch

        from .distributed import DistInfo

        self.run_dir = Path(run_dir)
        self.config = config
        self.info = info or DistInfo()
        self.device = torch.device(device or self.config.get("device") or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            self.device = torch.device("cpu")
        self.num_classes = int(config["num_classes"])
        self.class_names = list(config.get("class_names") or [str(i) for i in range(self.num_classes)])
        self._log = log if log is not None else print
        self._data = None

    # ----------------------------------------------------------------------------------------------------------
    # opening and creating

    @classmethod
    def open(cls, path, device=None, data_root: str | None = None, info=None, log=None) -> "Run":
        """Open the run folder ``path`` (finishing a commit a killed process left half done)."""
        path = Path(path)
        if not path.exists():
            raise RunError(f"run folder {path} does not exist; create it with `wfnet train --out {path}` or "
                           f"`wfnet demo --out {path}`")
        if not (path / CONFIG).is_file():
            raise RunError(f"{path} is not a wfnet run folder (no {CONFIG}); create one with `wfnet train` or "
                           f"`wfnet demo`")
        if info is None or info.is_main:
            files.recover(path)
        config = files.read_json(path / CONFIG)
        if data_root is not None:
            config["data_root"] = data_root
        return cls(path, config, device, info, log)

    @classmethod
    def train(cls, out, data: DataConfig | None = None, train: TrainConfig | None = None, *, device=None,
              resume: bool = False, info=None, progress: bool = True, log=None) -> "Run":
        """Train the original model into the run folder ``out`` (created; or resumed with ``resume``) and return
        the run. A folder holding a different complete run is refused, naming every differing option."""
        import torch

        from .distributed import DistInfo
        from .models import build_model

        data, train = data or DataConfig(), train or TrainConfig()
        info = info or DistInfo()
        out = Path(out)
        train = replace(train, epochs=train.epochs or default_train_epochs(data.dataset))
        spec = model_spec(data.model, data.dataset, data.image_size, data.patch_size, data.stem_stride)
        bundle = _load_data(data.dataset, data.data_root, spec["image_size"], download=data.download,
                            augment=data.augment, exclude_class=data.exclude_class, train_limit=data.train_limit,
                            test_limit=data.test_limit)
        config = {"wfnet_version": __version__, **spec, "data_root": data.data_root, "augment": data.augment,
                  "train_limit": data.train_limit, "test_limit": data.test_limit,
                  "exclude_class": data.exclude_class, "in_chans": bundle.in_chans, "num_classes": bundle.num_classes,
                  "class_names": bundle.class_names, "val_fraction": 0.1, "data_seed": 0,
                  "device": str(device or "cpu"), "train": asdict(train)}
        if info.is_main and out.exists():
            files.recover(out)
        if (out / CONFIG).exists():
            old = files.read_json(out / CONFIG)
            saved = {k: old.get(k) for k in _IDENTITY}
            saved["train"] = with_defaults(TrainConfig, saved["train"] or {})
            diff = differences(saved, {k: config[k] for k in _IDENTITY})
            if diff and (out / ORIGINAL).exists():
                raise RunError(f"{out} already holds a different run ({diff}); choose another --out or delete that "
                               f"folder")
            if diff and resume:
                raise RunError(f"--resume: the interrupted training in {out} used other options ({diff}); resume "
                               f"with those, or start it over without --resume")
            if (out / ORIGINAL).exists():
                run = cls(out, old, device, info, log)
                run._say(f"{out}: the original model is already trained (test accuracy "
                         f"{run.original_info().get('test_acc', float('nan')):.2f}%); nothing to do")
                return run
            if diff:
                (log or print)(f"{out}: replacing an interrupted training with other options ({diff})") \
                    if info.is_main else None
                resume = False
        elif out.exists() and any(out.iterdir()):
            raise RunError(f"{out} exists and is neither empty nor a wfnet run folder; choose another --out")
        if info.enabled:  # every rank has checked the folder before rank 0 writes to it
            import torch.distributed as dist

            dist.barrier()
        try:
            torch.manual_seed(train.seed)  # the same initialisation as build_model(seed=train.seed)
            model = build_model(data.model, bundle.num_classes, bundle.in_chans, spec["image_size"],
                                patch_size=data.patch_size, stem_stride=data.stem_stride)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        run = cls(out, config, device, info, log)
        if info.is_main:
            if not resume:
                (out / TRAIN_STATE).unlink(missing_ok=True)
            files.write_json(out / CONFIG, config)  # a run with no original model yet: an interrupted training
        run._say(f"training {data.model} on {data.dataset} ({len(bundle.train)} train / {len(bundle.val)} val / "
                 f"{len(bundle.test)} test images, {spec['image_size']} px) on {run.device}")
        run._data = bundle
        from .checkpoint import save_model
        from .train import train_classifier

        t0 = time.time()
        res = train_classifier(model, bundle.train, bundle.test, train, run.device, checkpoint=out / TRAIN_STATE,
                               resume=resume, info=info, progress=progress)
        if info.is_main:
            meta = {"stamp": _stamp(), "train": asdict(train), "test_acc": res["test_acc"],
                    "seconds": res["seconds"]}  # the whole training, an interrupted process's epochs included
            save_model(model, files.staging_path(out, ORIGINAL), meta)
            files.commit(out, new=[ORIGINAL], stale=[TRAIN_STATE])
        resumed = f", {time.time() - t0:.0f} s in this process" if res["seconds"] > time.time() - t0 + 1 else ""
        run._say(f"test accuracy {res['test_acc']:.2f}% ({res['seconds']:.0f} s{resumed}); saved {out / ORIGINAL}")
        return run

    # ----------------------------------------------------------------------------------------------------------
    # models and data

    def _say(self, msg: str) -> None:
        if self.info.is_main and self._log:
            self._log(msg)

    @property
    def data(self):
        """The run's data (train / val / test), loaded once."""
        if self._data is None:
            c = self.config
            self._data = _load_data(c["dataset"], c.get("data_root"), c["image_size"], augment=False,
                                    val_fraction=c.get("val_fraction", 0.1), seed=c.get("data_seed", 0),
                                    train_limit=c.get("train_limit"), test_limit=c.get("test_limit"))
        return self._data

    def build_model(self, seed: int = 0):
        """A fresh, randomly initialised model of the run's architecture (seeded), on the device, in eval mode."""
        import torch

        from .models import build_model

        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = build_model(c["model"], self.num_classes, c["in_chans"], c["image_size"],
                            patch_size=c.get("patch_size"), stem_stride=c.get("stem_stride"))
        return m.to(self.device).eval()

    def original_info(self) -> dict:
        """The original model's metadata (stamp, training options, test accuracy, seconds), checked against
        config.json."""
        from .checkpoint import read_state_meta

        path = self.run_dir / ORIGINAL
        if not path.exists():
            raise RunError(f"{path} does not exist: the original model is not trained yet (`wfnet train --out "
                           f"{self.run_dir} --resume` finishes an interrupted training)")
        meta = read_state_meta(path)
        if "stamp" not in meta:
            raise RunError(f"{path} was written by an older wfnet that did not record its options; train it again "
                           f"into a new folder")
        trained, configured = meta.get("train") or {}, self.config.get("train") or {}
        if with_defaults(TrainConfig, trained) != with_defaults(TrainConfig, configured):
            raise RunError(f"{path} was trained with other options than {CONFIG} says "
                           f"({differences(meta.get('train') or {}, self.config.get('train') or {})})")
        return meta

    def original_model(self):
        """The trained original model, on the run's device, in eval mode."""
        from .checkpoint import load_model_weights

        self.original_info()
        m = self.build_model()
        load_model_weights(m, self.run_dir / ORIGINAL)
        return m.eval()

    def untrain_options(self) -> dict | None:
        """The untraining options the gates in ``filters.safetensors`` were made with (None: no gates yet)."""
        saved = self._filters_meta().get("untrain")
        if saved is None:
            return None
        full = with_defaults(UntrainConfig, saved)
        full.pop("num_workers", None)
        return full

    def _filters_meta(self) -> dict:
        from .serialization import read_filters_metadata

        path = self.run_dir / FILTERS
        if not path.exists():
            return {}
        meta = read_filters_metadata(path)
        return {"stamp": meta.get("stamp"), "original_stamp": meta.get("original_stamp"),
                "untrain": _json_meta(meta, "untrain")}

    def wrapped(self, gates: bool = True, targets="auto"):
        """The original model wrapped by :func:`wfnet.wrap`, with the run's trained gates loaded (``gates=False``:
        fresh gates on ``targets``). ``wf(x, forget=c)`` forgets class c; ``wf(x)`` is the original model."""
        from .model import wrap
        from .serialization import load_filters

        meta = self._filters_meta() if gates else {}
        if gates:
            if not meta:
                raise RunError(f"{self.run_dir / FILTERS} does not exist: untrain first (`wfnet untrain "
                               f"{self.run_dir}`)")
            if meta["original_stamp"] != self.original_info().get("stamp"):
                raise RunError(f"{self.run_dir / FILTERS} was untrained on another original model than "
                               f"{ORIGINAL}; untrain again with --force")
            targets = meta["untrain"].get("targets", "auto")
        try:
            wf = wrap(self.original_model(), self.num_classes, targets=targets)
        except (TypeError, ValueError) as exc:
            raise RunError(str(exc)) from None
        if gates:
            load_filters(wf, self.run_dir / FILTERS)
        return wf.to(self.device).eval()

    def forget_model(self, c: int):
        """A plain ``nn.Module`` (no wfnet layers) that forgot class ``c``: the gates of row c baked into the
        weights (:func:`wfnet.export`)."""
        from .model import export

        if not 0 <= int(c) < self.num_classes:
            raise RunError(f"class {c} is out of range: num_classes={self.num_classes}")
        return export(self.wrapped(), forget=int(c)).eval()

    def model_stamp(self, method: str, c: int | None = None) -> str | None:
        """The stamp of the model a result of ``method`` (for class ``c``) is computed from."""
        if method == "original":
            return self.original_info().get("stamp")
        if method == "wfnet":
            return self._filters_meta().get("stamp")
        return self.baseline_info(method, c).get("stamp")

    # ----------------------------------------------------------------------------------------------------------
    # untraining

    def results(self) -> dict | None:
        """``results.json`` when it describes the gates in ``filters.safetensors`` (else None)."""
        path = self.run_dir / RESULTS_JSON
        meta = self._filters_meta()
        if not meta or not path.exists():
            return None
        res = files.read_json(path)
        return res if res.get("filters_stamp") == meta["stamp"] and res.get("untrain") == meta["untrain"] else None

    def untrain_config(self, **options) -> UntrainConfig:
        """The full untraining options: ``options`` over the recipe's values (``recipe``, default tuned; None =
        the recipe's value), for this run's kind of backbone."""
        from .untrain import model_kind

        wf = self.wrapped(gates=False, targets=options.get("targets") or "auto")
        try:
            return recipe(options.get("recipe") or "tuned", model_kind(wf), **options)
        except ValueError as exc:
            raise RunError(str(exc)) from None

    def untrain(self, options: UntrainConfig | None = None, *, force: bool = False, resume: bool = False,
                progress: bool = True) -> dict | None:
        """Train the gates for every class in one round and write them with their results (see the module
        docstring for what lands when). ``options``: a full :class:`UntrainConfig` (:meth:`untrain_config` builds
        one from a recipe); default: the tuned recipe. Gates made with other options are replaced only with
        ``force``, and only once the new ones are trained. Returns the results (None on non-main ranks)."""
        import torch

        from .backends import BackendUnavailableError
        from .checkpoint import read_state_meta
        from .untrain import options_key, untrain

        cfg = options or self.untrain_config()
        key = options_key(cfg)
        try:
            current = self.untrain_options()
        except files.CorruptFileError:
            if not force:
                raise
            # --force replaces the gates whatever they hold; a damaged file holds nothing worth keeping
            self._say(f"{self.run_dir / FILTERS} is damaged or truncated; --force: untraining anew to replace it")
            current = None
        if current is not None and current != key and not force:
            raise RunError(f"{self.run_dir} already holds gates untrained with other options "
                           f"({differences(current, key)}); pass --force to replace them (the old ones stay until "
                           f"the new ones are trained), or copy the run folder")
        state = self.run_dir / UNTRAIN_STATE
        if resume and state.exists() and read_state_meta(state).get("config") != key:
            raise RunError(f"--resume: the interrupted untraining in {self.run_dir} used other options "
                           f"({differences(read_state_meta(state).get('config') or {}, key)}); resume with those, "
                           f"or start over without --resume")
        if current == key:
            done = self.results()
            if done is not None:
                self._say(f"{self.run_dir}: already untrained with these options; results in "
                          f"{self.run_dir / RESULTS_MD}")
                return {**done, "markdown": (self.run_dir / RESULTS_MD).read_text(encoding="utf-8")}
        if not resume and not force and state.exists():
            # a killed untraining left its state: starting over silently would throw that work away
            raise RunError(f"{self.run_dir} holds an interrupted untraining ({state.name}): pass --resume to "
                           f"continue it (with the same options), or --force to discard it and start over")
        wf = self.wrapped(gates=False, targets=cfg.targets)
        self._say(f"{self.run_dir}: {wf.plan.one_line(wf.num_classes)}")
        bundle = self.data
        try:  # the real model on one real sample: an unusable backend fails here, before any training
            with torch.no_grad():
                wf(bundle.train[0][0][None].to(self.device), forget=0)
        except BackendUnavailableError as exc:
            raise RunError(_one_line(exc)) from None
        if current == key and (self.run_dir / UNTRAIN_SUMMARY).exists():
            # the gates exist, only their results are missing (deleted by hand): evaluate them, no retraining
            from .serialization import load_filters

            load_filters(wf, self.run_dir / FILTERS)
            summary = files.read_json(self.run_dir / UNTRAIN_SUMMARY)
            return self._commit_untrain(wf, cfg, summary, new_gates=False, progress=progress)
        self._say(f"untraining {len(wf.layer_names)} filtered layers ({wf.num_filter_parameters()} gate parameters) "
                  f"for all {self.num_classes} classes, {cfg.recipe} recipe, on {self.device}")
        try:
            summary = untrain(wf, bundle.train, bundle.val, cfg, self.device, state_path=state, resume=resume,
                              info=self.info, progress=progress)
        except BackendUnavailableError as exc:
            raise RunError(_one_line(exc)) from None
        if not self.info.is_main:
            return None
        self._say(f"{summary['stopped']} after {summary['steps']} steps ({summary['seconds']:.0f} s)")
        return self._commit_untrain(wf, cfg, summary, new_gates=True, progress=progress)

    def _commit_untrain(self, wf, cfg, summary, new_gates: bool, progress: bool) -> dict:
        from . import metrics
        from .report import accuracy_md
        from .serialization import save_filters
        from .train import make_loader
        from .untrain import options_key

        key = options_key(cfg)
        stamp = _stamp() if new_gates else self._filters_meta()["stamp"]
        wf.eval()
        loader = make_loader(self.data.test, 512)
        classes = range(self.num_classes)
        orig_acc = metrics.accuracy_forget_retain_shared(self.original_model(), loader, classes, self.device)
        wf_acc = metrics.accuracy_forget_retain(lambda c: (lambda x: wf(x, forget=c)), loader, classes, self.device,
                                                progress=progress)
        results = {"run": str(self.run_dir), "model": self.config["model"], "dataset": self.config["dataset"],
                   "recipe": cfg.recipe, "untrain_seconds": summary["seconds"], "filters_stamp": stamp,
                   "untrain": key, "original": orig_acc, "wf_net": wf_acc}
        summary = {**summary, "filters_stamp": stamp, "untrain": key}
        md = accuracy_md(self.class_names, orig_acc, wf_acc, cfg.recipe, summary["seconds"], self.config["dataset"],
                         self.config["model"])
        root = self.run_dir
        new = [UNTRAIN_SUMMARY, RESULTS_JSON, RESULTS_MD]
        stale = []
        if new_gates:  # what described the old gates leaves as the new ones land
            stale = [*_GATE_DERIVED, *[str(p.relative_to(root)) for p in root.glob("eval/*_wfnet.json")],
                     UNTRAIN_STATE]
            meta = {"stamp": stamp, "original_stamp": self.original_info()["stamp"], "untrain": key,
                    "dataset": self.config["dataset"]}
            save_filters(wf, files.staging_path(root, FILTERS), meta)
            new.append(FILTERS)
        files.write_json(files.staging_path(root, UNTRAIN_SUMMARY), summary)
        files.write_json(files.staging_path(root, RESULTS_JSON), results)
        files.write_text(files.staging_path(root, RESULTS_MD), md)
        files.commit(root, new=new, stale=stale)
        self._say(f"saved {root / FILTERS}")
        results["markdown"] = md
        return results

    # ----------------------------------------------------------------------------------------------------------
    # baselines

    def baseline_dir(self, method: str) -> Path:
        return self.run_dir / "baselines" / method

    def baseline_methods(self) -> list[str]:
        return [m for m in BASELINE_METHODS if self.baseline_classes(m)]

    def baseline_classes(self, method: str) -> list[int]:
        d = self.baseline_dir(method)
        return sorted(int(p.stem.split("_")[1]) for p in d.glob("class_*.safetensors")) if d.exists() else []

    def baseline_info(self, method: str, c: int) -> dict:
        from .checkpoint import read_state_meta

        path = self.baseline_dir(method) / f"class_{c}.safetensors"
        if not path.exists():
            raise RunError(f"{path} does not exist: run `wfnet baselines {self.run_dir} --methods {method}`")
        return read_state_meta(path)

    def baseline_model(self, method: str, c: int):
        from .checkpoint import load_model_weights

        self.baseline_info(method, c)
        m = self.build_model()
        load_model_weights(m, self.baseline_dir(method) / f"class_{c}.safetensors")
        return m.eval()

    def baselines(self, methods=None, classes=None, options: BaselineConfig | None = None, *, force: bool = False,
                  progress: bool = True) -> dict:
        """Run the per-class baselines (default: all methods, all classes) and return ``{method: summary}``.

        Models that exist with the same options are kept (``force``: recomputed). Models made with other options
        are replaced only with ``force``: the new ones go to ``baselines/.pending-<method>/`` (a rerun continues
        there) and replace the old folder in one step once every requested class is done."""
        from .baselines import unlearn_baseline
        from .checkpoint import save_model

        methods = list(methods or BASELINE_METHODS)
        bad = [m for m in methods if m not in BASELINE_METHODS]
        if bad:
            raise RunError(f"unknown baseline(s) {bad}: use {', '.join(BASELINE_METHODS)}")
        classes = list(range(self.num_classes)) if classes is None else [int(c) for c in classes]
        out_of_range = [c for c in classes if not 0 <= c < self.num_classes]
        if out_of_range:
            raise RunError(f"class(es) {out_of_range} out of range: num_classes={self.num_classes}")
        options = options or BaselineConfig()
        tcfg = TrainConfig(**self.config["train"])
        root = self.run_dir
        for method in methods:  # check every method before running any
            made_with = self.baseline_made_with(method, options)
            old = self._baseline_options(method)
            if old is not None and old != made_with and not force:
                raise RunError(f"{self.baseline_dir(method)} holds {method} models made with other options "
                               f"({differences(old, made_with)}); pass --force to replace them (the old ones stay "
                               f"until the new ones are made)")
        original = self.original_model()
        stamp_original = self.original_info()["stamp"]
        summaries = {}
        for method in methods:
            made_with = self.baseline_made_with(method, options)
            old = self._baseline_options(method)
            final = self.baseline_dir(method)
            pending = final.parent / f".pending-{method}"
            swap = old is not None and old != made_with
            if pending.exists() and (not swap or _dir_options(pending) not in (None, made_with)):
                import shutil

                shutil.rmtree(pending)  # an interrupted replacement with yet other options
            target = pending if swap else final
            for c in classes:
                path = target / f"class_{c}.safetensors"
                if path.exists() and not (force and not swap):
                    continue
                model, seconds = unlearn_baseline(method, original, self.data, c, options, self.device,
                                                  build_fresh=lambda: self.build_model(seed=tcfg.seed),
                                                  train_cfg=tcfg, progress=progress)
                meta = {"stamp": _stamp(), "original_stamp": stamp_original, "method": method, "class": c,
                        "seconds": seconds, "options": made_with}
                if swap:  # not visible as a result until the whole folder is swapped in
                    save_model(model, path, meta)
                    files.write_json(target / "summary.json", _baseline_summary(method, target))
                else:
                    rel = str(path.relative_to(root))
                    save_model(model, files.staging_path(root, rel), meta)
                    extra = {c: meta}
                    files.write_json(files.staging_path(root, f"{rel}.summary"),
                                     _baseline_summary(method, final, extra))
                    files.commit(root, new={rel: str(files.staging_path(root, rel).relative_to(root)),
                                            str((final / "summary.json").relative_to(root)):
                                                str(files.staging_path(root, f"{rel}.summary").relative_to(root))},
                                 stale=TABLES)
                self._say(f"{method}: class {c} done in {seconds:.1f} s")
            if swap:
                rel = str(final.relative_to(root))
                files.commit(root, new={rel: str(pending.relative_to(root))},
                             stale=[rel, *TABLES,
                                    *[str(p.relative_to(root)) for p in root.glob(f"eval/*_{method}.json")]])
            summaries[method] = _baseline_summary(method, final)
            self._say(f"{method}: {len(summaries[method]['seconds'])} classes, "
                      f"{summaries[method]['total_seconds']:.0f} s in total")
        return summaries

    def baseline_made_with(self, method: str, options: BaselineConfig) -> dict:
        """The options ``method``'s models are made with: the run's training options for retrain, else
        ``options``."""
        return asdict(TrainConfig(**self.config["train"])) if method == "retrain" else asdict(options)

    def baselines_made_otherwise(self, method: str, options: BaselineConfig) -> bool:
        """Whether ``method``'s models exist and were made with options other than these."""
        return self._baseline_options(method) not in (None, self.baseline_made_with(method, options))

    def _baseline_options(self, method: str) -> dict | None:
        saved = _dir_options(self.baseline_dir(method))
        return None if saved is None else with_defaults(TrainConfig if method == "retrain" else BaselineConfig, saved)

    # ----------------------------------------------------------------------------------------------------------
    # evaluation and explanation

    def evaluate(self, options: EvalConfig | None = None, *, force: bool = False, progress: bool = True) -> dict:
        """Table 1 (Acc_r, Acc_f, ZRF, RT) and Table 2 (insertion, deletion) of every method in the run, written
        under ``eval/`` (see :mod:`wfnet.evaluate`). Returns ``{"table1", "table2", "markdown"}``."""
        from .evaluate import evaluate_run

        o = options or EvalConfig()
        try:
            return evaluate_run(self, metrics=tuple(o.metrics or METRICS), force=force, rt_max_epochs=o.rt_max_epochs,
                                rt_samples_per_epoch=o.rt_samples, rt_lr=o.rt_lr, rt_batch_size=o.rt_batch_size,
                                rt_seed=o.rt_seed, insdel_steps=o.insdel_steps, zrf_seed=o.zrf_seed,
                                batch_size=o.batch_size, methods=o.methods,
                                classes=None if o.classes is None else [int(c) for c in o.classes],
                                progress=progress, test_limit=o.test_limit,
                                audit_options=dict(samples=o.audit_samples, shots=tuple(o.audit_shots or (10, 50)),
                                                   steps=o.audit_steps, hard_threshold=o.hard_threshold))
        except ValueError as exc:
            raise RunError(str(exc)) from None

    def explain(self, options: ExplainConfig | None = None, *, force: bool = False, progress: bool = True) -> dict:
        """Filter maps, gate heatmaps and insertion / deletion curves under ``explain/`` (see
        :mod:`wfnet.explain`). Returns ``{"report": path, "figures": {name: path}}``."""
        from .explain import explain_run

        o = options or ExplainConfig()
        try:
            return explain_run(self, layers=o.layers, force=force, top_k=o.top_k, min_classes=o.min_classes,
                               max_classes=o.max_classes, insdel_steps=o.insdel_steps, progress=progress,
                               test_limit=o.test_limit)
        except ValueError as exc:
            raise RunError(str(exc)) from None


def _dir_options(d: Path) -> dict | None:
    """The options the baseline models in folder ``d`` were made with (None: no model)."""
    from .checkpoint import read_state_meta

    for p in sorted(d.glob("class_*.safetensors")) if d.exists() else []:
        return read_state_meta(p).get("options")
    return None


def _baseline_summary(method: str, d: Path, extra: dict | None = None) -> dict:
    """Seconds per class and in total, from the models' own metadata (plus ``extra`` {class: meta} not yet
    moved in)."""
    from .checkpoint import read_state_meta

    metas = {int(p.stem.split("_")[1]): read_state_meta(p) for p in d.glob("class_*.safetensors")} \
        if d.exists() else {}
    metas.update(extra or {})
    seconds = {str(c): metas[c]["seconds"] for c in sorted(metas)}
    options = next(iter(metas.values()))["options"] if metas else None
    return {"method": method, "options": options, "seconds": seconds, "total_seconds": sum(seconds.values())}


def _load_data(name, root, image_size, **kw):
    from .data import load_dataset

    try:
        return load_dataset(name, root, image_size, **kw)
    except (FileNotFoundError, ValueError) as exc:
        raise RunError(str(exc)) from None
