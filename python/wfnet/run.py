"""Run folders: one folder per experiment, and :class:`Run`, which manages one: its files, their stamps and commits.

The stages that fill a folder are modules of their own, each with its configuration dataclass and a
``run(run, cfg)`` function: :mod:`wfnet.train`, :mod:`wfnet.untrain`, :mod:`wfnet.baselines`, :mod:`wfnet.evaluate`
(with :mod:`wfnet.audit`), :mod:`wfnet.explain`; :mod:`wfnet.reproduce` chains them. They write through
:meth:`Run.stage_path` and :meth:`Run.commit`; this module imports none of them.

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
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from . import files
from ._version import __version__
from .backends import BackendUnavailableError, set_backend, use_backend
from .checkpoint import load_model_weights, read_state_meta
from .config import DataConfig
from .data import default_image_size, load_dataset
from .distributed import DistInfo, init_distributed, resolve_device
from .errors import RunError
from .model import export, wrap
from .models import build_model, min_image_size
from .serialization import load_filters, read_filters_metadata

__all__ = ["Run", "RunError", "setup", "differences", "model_spec", "new_stamp", "one_line"]

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
GATE_DERIVED = (*TABLES, "explain")
_IDENTITY = ("model", "dataset", "image_size", "patch_size", "stem_stride", "augment", "train_limit", "test_limit",
             "exclude_class", "train")


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
    size = image_size or default_image_size(dataset)
    return {"model": model, "dataset": dataset, "image_size": max(size, min_image_size(model)),
            "patch_size": patch_size, "stem_stride": stem_stride}


def setup(device: str | None = "auto", backend: str | None = None):
    """Join the process group under torchrun, resolve ``device`` and select ``backend`` after checking that it can
    run on that device (a tiny filtered conv), so an unusable choice fails before any work. Returns (info, device)."""
    wanted = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_distributed(wanted)
    try:
        dev = resolve_device(device, info)
    except RuntimeError as exc:
        raise RunError(str(exc)) from None
    if backend is not None:
        if backend != "auto":  # probe first: a failed check leaves the process default as it was
            probe = wrap(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1)), 2).to(dev)
            try:
                with use_backend(backend), torch.no_grad():
                    probe(torch.zeros(1, 1, 2, 2, device=dev), forget=0)
            except ValueError as exc:
                raise RunError(str(exc)) from None
            except BackendUnavailableError as exc:
                reasons = str(exc).splitlines()[1:] or [str(exc)]
                raise RunError(one_line(f"--backend {backend} cannot run on {dev}:\n" + "\n".join(reasons))) \
                    from None
        set_backend(backend)
    return info, dev


def one_line(text: str) -> str:
    """A multi-line message (an error with a list of reasons) as one line."""
    out = ""
    for line in (re.sub(r"^\s*-\s+", "", ln).strip() for ln in str(text).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def new_stamp() -> str:
    """A random stamp naming one model file; every result derived from it names it too."""
    return uuid.uuid4().hex[:16]


def _json_meta(meta: dict, key: str):
    value = meta.get(key)
    return json.loads(value) if isinstance(value, str) else value


class Run:
    """One run folder. Open an existing one with :meth:`Run.open`, create one with :meth:`Run.train`.

    >>> run = Run.open("runs/demo")
    >>> wf = run.wrapped()                # the original model with its trained gates: wf(x, forget=c)
    >>> plain = run.forget_model(3)       # a plain nn.Module that forgot class 3

    Creating one: ``wfnet.train.run(Run.create(out, DataConfig(...)), TrainConfig(...))``; the other stages take the
    opened run: ``wfnet.untrain.run(run, cfg)``, ``wfnet.evaluate.run(run, EvalConfig())``, ...
    """

    def __init__(self, run_dir, config: dict, device=None, info=None, log=None):
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
    def create(cls, out, data: DataConfig | None = None, *, device=None, info=None, log=None) -> "Run":
        """The run of ``data`` in folder ``out``, not written yet: the data is loaded (its classes and channels go
        into the config); :func:`wfnet.train.run` claims the folder (:meth:`claim`) and trains it."""
        data = data or DataConfig()
        spec = model_spec(data.model, data.dataset, data.image_size, data.patch_size, data.stem_stride)
        bundle = _load_data(data.dataset, data.data_root, spec["image_size"], download=data.download,
                            augment=data.augment, exclude_class=data.exclude_class, train_limit=data.train_limit,
                            test_limit=data.test_limit)
        config = {"wfnet_version": __version__, **spec, "data_root": data.data_root, "augment": data.augment,
                  "train_limit": data.train_limit, "test_limit": data.test_limit,
                  "exclude_class": data.exclude_class, "in_chans": bundle.in_chans, "num_classes": bundle.num_classes,
                  "class_names": bundle.class_names, "val_fraction": 0.1, "data_seed": 0,
                  "device": str(device or "cpu"), "train": None}
        run = cls(out, config, device, info, log)
        run._data = bundle
        return run

    def claim(self, train: dict, defaults: dict, resume: bool = False) -> str:
        """Claim the folder for this run trained with options ``train`` (``defaults``: the training options'
        defaults, completing options saved by an older wfnet). Returns "done" (the folder already holds this run's
        original model: the config is the saved one), "resume" (continue the interrupted training) or "fresh".
        A folder holding a different run, or a different interrupted training with ``resume``, is refused, naming
        every differing option."""
        out, info = self.run_dir, self.info
        self.config = {**self.config, "train": dict(train)}
        if info.is_main and out.exists():
            files.recover(out)
        if (out / CONFIG).exists():
            old = files.read_json(out / CONFIG)
            saved = {k: old.get(k) for k in _IDENTITY}
            saved["train"] = {**defaults, **(saved["train"] or {})}
            diff = differences(saved, {k: self.config[k] for k in _IDENTITY})
            if diff and (out / ORIGINAL).exists():
                raise RunError(f"{out} already holds a different run ({diff}); choose another --out or delete that "
                               f"folder")
            if diff and resume:
                raise RunError(f"--resume: the interrupted training in {out} used other options ({diff}); resume "
                               f"with those, or start it over without --resume")
            if (out / ORIGINAL).exists():
                self.config = old
                return "done"
            if diff:
                self.say(f"{out}: replacing an interrupted training with other options ({diff})")
                resume = False
        elif out.exists() and any(out.iterdir()):
            raise RunError(f"{out} exists and is neither empty nor a wfnet run folder; choose another --out")
        if info.enabled:  # every rank has checked the folder before rank 0 writes to it
            dist.barrier()
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                (out / TRAIN_STATE).unlink(missing_ok=True)
            files.write_json(out / CONFIG, self.config)  # a run with no original model yet: an interrupted training
        return "resume" if resume else "fresh"

    # ----------------------------------------------------------------------------------------------------------
    # writing: every stage's outputs land through these

    def say(self, msg: str) -> None:
        """Print a progress line (main rank only; silenced with ``log=False``)."""
        if self.info.is_main and self._log:
            self._log(msg)

    def stage_path(self, rel: str) -> Path:
        """Where a new version of ``rel`` is written before :meth:`commit` moves it in."""
        return files.staging_path(self.run_dir, rel)

    def commit(self, new, stale=()) -> None:
        """Move the staged ``new`` files in and take ``stale`` away, in one step (:func:`wfnet.files.commit`)."""
        files.commit(self.run_dir, new=new, stale=stale)

    def gate_derived(self) -> list[str]:
        """Every file that describes the gates: it leaves in the same step as new gates land."""
        root = self.run_dir
        return [*GATE_DERIVED, *[str(p.relative_to(root)) for p in root.glob("eval/*_wfnet.json")],
                "eval/audit.json", "eval/audit.md"]

    # ----------------------------------------------------------------------------------------------------------
    # models and data

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
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = build_model(c["model"], self.num_classes, c["in_chans"], c["image_size"],
                            patch_size=c.get("patch_size"), stem_stride=c.get("stem_stride"))
        return m.to(self.device).eval()

    def original_info(self) -> dict:
        """The original model's metadata (stamp, training options, test accuracy, seconds), checked against
        config.json."""
        path = self.run_dir / ORIGINAL
        if not path.exists():
            raise RunError(f"{path} does not exist: the original model is not trained yet (`wfnet train --out "
                           f"{self.run_dir} --resume` finishes an interrupted training)")
        meta = read_state_meta(path)
        if "stamp" not in meta:
            raise RunError(f"{path} was written by an older wfnet that did not record its options; train it again "
                           f"into a new folder")
        trained, configured = meta.get("train") or {}, self.config.get("train") or {}
        # both are written from the same options by wfnet.train.run; an option one of them lacks was added after
        # an older wfnet wrote it, so only the options both name are compared
        if any(trained[k] != configured[k] for k in set(trained) & set(configured)):
            raise RunError(f"{path} was trained with other options than {CONFIG} says "
                           f"({differences(meta.get('train') or {}, self.config.get('train') or {})})")
        return meta

    def original_model(self):
        """The trained original model, on the run's device, in eval mode."""
        self.original_info()
        m = self.build_model()
        load_model_weights(m, self.run_dir / ORIGINAL)
        return m.eval()

    def untrain_options(self) -> dict | None:
        """The untraining options the gates in ``filters.safetensors`` were made with, as saved (None: no gates
        yet; :func:`wfnet.untrain.saved_options` completes them with options added since)."""
        return self.filters_meta().get("untrain")

    def filters_meta(self) -> dict:
        """The gates' stamp, their original model's stamp and their untraining options ({} without gates)."""
        path = self.run_dir / FILTERS
        if not path.exists():
            return {}
        meta = read_filters_metadata(path)
        return {"stamp": meta.get("stamp"), "original_stamp": meta.get("original_stamp"),
                "untrain": _json_meta(meta, "untrain")}

    def wrapped(self, gates: bool = True, targets="auto"):
        """The original model wrapped by :func:`wfnet.wrap`, with the run's trained gates loaded (``gates=False``:
        fresh gates on ``targets``). ``wf(x, forget=c)`` forgets class c; ``wf(x)`` is the original model."""
        meta = self.filters_meta() if gates else {}
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
        if not 0 <= int(c) < self.num_classes:
            raise RunError(f"class {c} is out of range: num_classes={self.num_classes}")
        return export(self.wrapped(), forget=int(c)).eval()

    def model_stamp(self, method: str, c: int | None = None) -> str | None:
        """The stamp of the model a result of ``method`` (for class ``c``) is computed from."""
        if method == "original":
            return self.original_info().get("stamp")
        if method == "wfnet":
            return self.filters_meta().get("stamp")
        return self.baseline_info(method, c).get("stamp")

    def results(self) -> dict | None:
        """``results.json`` when it describes the gates in ``filters.safetensors`` (else None)."""
        path = self.run_dir / RESULTS_JSON
        meta = self.filters_meta()
        if not meta or not path.exists():
            return None
        res = files.read_json(path)
        return res if res.get("filters_stamp") == meta["stamp"] and res.get("untrain") == meta["untrain"] else None

    def baseline_dir(self, method: str) -> Path:
        return self.run_dir / "baselines" / method

    def baseline_methods(self) -> list[str]:
        """The baseline methods with models in the folder, by name (``wfnet.baselines.METHODS`` orders tables)."""
        d = self.run_dir / "baselines"
        return sorted(p.name for p in d.iterdir() if p.is_dir() and self.baseline_classes(p.name)) \
            if d.is_dir() else []

    def baseline_classes(self, method: str) -> list[int]:
        d = self.baseline_dir(method)
        return sorted(int(p.stem.split("_")[1]) for p in d.glob("class_*.safetensors")) if d.exists() else []

    def baseline_info(self, method: str, c: int) -> dict:
        path = self.baseline_dir(method) / f"class_{c}.safetensors"
        if not path.exists():
            raise RunError(f"{path} does not exist: run `wfnet baselines {self.run_dir} --methods {method}`")
        return read_state_meta(path)

    def baseline_model(self, method: str, c: int):
        self.baseline_info(method, c)
        m = self.build_model()
        load_model_weights(m, self.baseline_dir(method) / f"class_{c}.safetensors")
        return m.eval()

    def baseline_options(self, method: str) -> dict | None:
        """The options ``method``'s models were made with, as saved (None: no model)."""
        return dir_options(self.baseline_dir(method))

    def replace_baselines(self, method: str, pending: Path) -> None:
        """Swap the completed ``pending`` folder in for ``method``'s models, with what described the old ones."""
        root = self.run_dir
        rel = str(self.baseline_dir(method).relative_to(root))
        self.commit(new={rel: str(pending.relative_to(root))},
                    stale=[rel, *TABLES, *[str(p.relative_to(root)) for p in root.glob(f"eval/*_{method}.json")]])

    @staticmethod
    def discard(path: Path) -> None:
        """Remove an interrupted stage's leftovers (a pending folder made with other options)."""
        shutil.rmtree(path)


def dir_options(d: Path) -> dict | None:
    """The options the baseline models in folder ``d`` were made with (None: no model)."""
    for p in sorted(d.glob("class_*.safetensors")) if d.exists() else []:
        return read_state_meta(p).get("options")
    return None


def baseline_summary(method: str, d: Path, extra: dict | None = None) -> dict:
    """Seconds per class and in total, from the models' own metadata (plus ``extra`` {class: meta} not yet
    moved in)."""
    metas = {int(p.stem.split("_")[1]): read_state_meta(p) for p in d.glob("class_*.safetensors")} \
        if d.exists() else {}
    metas.update(extra or {})
    seconds = {str(c): metas[c]["seconds"] for c in sorted(metas)}
    options = next(iter(metas.values()))["options"] if metas else None
    return {"method": method, "options": options, "seconds": seconds, "total_seconds": sum(seconds.values())}


def _load_data(name, root, image_size, **kw):
    try:
        return load_dataset(name, root, image_size, **kw)
    except (FileNotFoundError, ValueError) as exc:
        raise RunError(str(exc)) from None
