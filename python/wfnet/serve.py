"""Serving a wrapped model: ``torch.export`` and ONNX with ``forget`` as a real input, and an ONNX Runtime runner.

A :class:`~wfnet.model.WFModel` forgets per request: ``wf(x, forget=rows)``. A server that runs an exported graph must
keep that, so the exported graph takes ``forget`` as a second input next to the images, with a dynamic batch
dimension shared by both:

* ``forget="rows"``: int64 ``[B]``, one class row per sample (the class that sample forgets);
* ``forget="mask"``: bool ``[B, N_c]``, a SET of classes per sample (True = forget that class; an all-False row is the
  original model), composed as :mod:`wfnet.sets` says (the composition in force at export time is baked in and
  recorded in the ONNX metadata).

**The export path** (:func:`export_program`, :func:`export_onnx`) always traces the ``torch`` backend (whatever
backend the model uses for training): the plain conv / matmul of the frozen weights, then ``index_select`` of
``sigmoid(alpha)`` by the rows (or ``exp(mask @ logsigmoid(alpha))`` for sets) and a ``mul`` / ``add`` epilogue.
Those are standard aten ops, so ``torch.onnx.export(..., dynamo=True)`` lowers them to standard ONNX (Gather,
MatMul, Exp, Mul, Add) and no ``wf_kernels`` custom op (Triton / CUDA kernels) ever reaches the exported graph;
:func:`export_program` refuses a graph that still holds one. The gate logits are constants of the graph (the
exporter folds ``sigmoid(alpha)`` into a table), the rows / mask select from them at run time.

**Out-of-range rows** (``forget="rows"``; a mask has no out-of-range values, ONNX Runtime checks its shape).
**decision**: never clamp (a clamped row silently serves another class's model). Two guards:

1. In the graph: before the layers see them, the rows pass :func:`range_checked`: negative rows are mapped past the
   end (ONNX ``Gather`` would wrap a negative index around: row -1 would silently be row N_c - 1), then gathered from
   ``arange(N_c)``. ONNX Runtime's ``Gather`` rejects an index outside [-N_c, N_c - 1], so any out-of-range row makes
   ``InferenceSession.run`` fail (``INVALID_ARGUMENT ... Gather ... indices element out of data bounds, idx=I``; a
   negative row r is reported as ``idx = N_c - r``). The ``torch.export`` program keeps wfnet's device-side assertion
   as well (``aten._assert_async``, which the ONNX exporter drops: hence the Gather).
2. Before the graph, for a clear error: :func:`check_forget` (numpy only) validates dtype, shape and range and raises
   ``ValueError`` naming the bad row; :class:`OnnxForgetModel`, the runner for servers, calls it on every request.

**Batch sizes.** ``x`` and ``forget`` must have the same batch size. The exporter drops torch.export's shape
assertions, and ONNX broadcasting would accept a ``forget`` of batch 1 for any number of images (every image would
silently get the first sample's rows), so the graph passes ``forget`` through :func:`batch_checked`, a ``Concat``
with a slice of ``x`` that ONNX Runtime refuses when the batch sizes differ; :func:`check_forget` reports it first.

The runner (:class:`OnnxForgetModel`) needs only ``numpy`` and ``onnxruntime`` (this module imports torch lazily), so a
serving image does not need torch. ``pip install -e ".[serve]"`` installs onnx, onnxruntime and onnxscript.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["FORGET_KINDS", "ServingModel", "export_program", "export_onnx", "range_checked", "batch_checked",
           "check_forget", "OnnxForgetModel", "onnx_metadata"]

FORGET_KINDS = ("rows", "mask")
_META_PREFIX = "wfnet."


def _check_kind(forget: str) -> str:
    if forget not in FORGET_KINDS:
        raise ValueError(f"forget must be one of {', '.join(FORGET_KINDS)} (the exported input: int64 rows [B] or a "
                         f"bool mask [B, num_classes]), got {forget!r}")
    return forget


def range_checked(rows, num_classes: int):
    """``rows`` (int64 [B]) unchanged where every row is in 0..num_classes-1; otherwise an indexing error, in eager
    torch (IndexError) and in ONNX Runtime (Gather out of bounds). Negative rows are first mapped to
    ``num_classes - row`` (>= num_classes): ONNX Gather accepts negative indices and would wrap them around."""
    import torch

    idx = torch.where(rows < 0, num_classes - rows, rows)
    return torch.arange(num_classes, dtype=rows.dtype, device=rows.device).index_select(0, idx)


def batch_checked(x, forget):
    """``forget`` unchanged, passed through an ONNX ``Concat`` (on axis 1) with a one-element slice of each image,
    which ONNX Runtime refuses when the batch sizes differ. Without it a ``forget`` of batch 1 would silently broadcast
    over a batch of images (or the reverse): the exporter drops torch.export's shape assertions, and ONNX broadcasting
    accepts 1. Only constant slices and unsqueezes are used, never a reshape to a symbolic size (which the exporter
    could take from either input's shape)."""
    import torch

    lead = (slice(None),) + (slice(0, 1),) * (x.dim() - 1)
    col = x[lead].to(forget.dtype)  # [B_x, 1, ..., 1]; its values are sliced away below
    f = forget[(...,) + (None,) * (x.dim() - forget.dim())]  # [B_f, 1 or N_c, 1, ...]: x's rank
    both = torch.cat([col, f], dim=1)  # ONNX Concat: every dimension but axis 1 must match, no broadcasting
    idx = (slice(None), 1) if forget.dim() == 1 else (slice(None), slice(1, None))
    return both[idx + (0,) * (x.dim() - 2)]


def _serving_model_class():
    import torch
    import torch.nn as nn

    class ServingModel(nn.Module):
        """``forward(x, forget)``: the wrapped model with ``forget`` a required tensor input, as exported.

        ``forget`` is int64 rows [B] (``kind="rows"``) or a bool mask [B, N_c] (``kind="mask"``); anything else is a
        TypeError / ValueError (eager) or a trace-time error (export), never a silent reinterpretation."""

        def __init__(self, wf, kind: str = "rows"):
            super().__init__()
            from .model import WFModel

            if not isinstance(wf, WFModel):
                raise TypeError(f"ServingModel expects a WFModel (from wfnet.wrap), got {type(wf).__name__}")
            self.wf = wf
            self.kind = _check_kind(kind)
            self.num_classes = wf.num_classes
            self.training = wf.training  # a new Module says True: the wrapped model's mode is the truth

        def forward(self, x, forget):
            if not isinstance(forget, torch.Tensor):
                raise TypeError(f"forget must be a tensor ({self._want()}), got {type(forget).__name__}")
            if self.kind == "rows":
                if forget.dtype != torch.int64 or forget.dim() != 1:
                    raise TypeError(f"forget must be {self._want()}, got {forget.dtype} of shape {list(forget.shape)}")
                if torch.compiler.is_exporting():
                    forget = range_checked(forget, self.num_classes)  # what ONNX Runtime enforces (module doc)
            elif forget.dtype != torch.bool or forget.dim() != 2:
                raise TypeError(f"forget must be {self._want()}, got {forget.dtype} of shape {list(forget.shape)}")
            if torch.compiler.is_exporting() and x.dim() >= 2:
                forget = batch_checked(x, forget)  # eager: Rows.prepare checks the batch size
            return self.wf(x, forget=forget)

        def _want(self) -> str:
            return ("int64 class rows [B]" if self.kind == "rows" else
                    f"a bool mask [B, {self.num_classes}] (True = forget that class)")

        def extra_repr(self):
            return f"kind={self.kind!r}, num_classes={self.num_classes}"

    return ServingModel


def __getattr__(name):  # ServingModel is built on first use: importing this module must not import torch
    if name == "ServingModel":
        cls = _serving_model_class()
        globals()["ServingModel"] = cls
        return cls
    raise AttributeError(f"module 'wfnet.serve' has no attribute {name!r}")


def _example_inputs(model, example_x, kind: str | None):
    """Example inputs of batch >= 2 (torch.export specialises a batch of 1) and the dynamic-shape spec."""
    import torch

    if not isinstance(example_x, torch.Tensor) or example_x.dim() < 1:
        raise TypeError("example_x must be an input tensor [B, ...] (its batch size does not matter)")
    x = example_x[:1].expand(2, *example_x.shape[1:]).contiguous()
    batch = torch.export.Dim("batch")
    if kind is None:  # a plain model: images only
        return (x,), {"x": {0: batch}}
    n = model.num_classes
    if kind == "rows":
        forget = torch.tensor([0, n - 1], dtype=torch.int64, device=x.device)
    else:
        forget = torch.zeros(2, n, dtype=torch.bool, device=x.device)
        forget[0, 0] = True
    return (x, forget), {"x": {0: batch}, "forget": {0: batch}}


def _custom_ops(graph) -> list[str]:
    import torch

    found = set()
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
                target.namespace in ("wf_kernels", "wfnet"):
            found.add(str(target))
    return sorted(found)


def export_program(model, example_x, forget: str | None = "rows"):
    """``torch.export`` a wrapped model (``forget="rows"`` or ``"mask"``: the kind of the ``forget`` input) or, with
    ``forget=None``, a plain ``nn.Module`` taking images only (the baseline exported the same way). The batch dimension
    is dynamic; the model is traced in eval mode under no_grad with the ``torch`` backend (module docstring)."""
    import torch

    from .backends import use_backend
    from .model import WFModel

    if forget is None:
        if isinstance(model, WFModel):
            raise ValueError("a WFModel is exported with forget='rows' or forget='mask' (forget=None would drop the "
                             "gates); export a plain model with wfnet.export(wf, forget=c) first for a fixed class")
        module = model
    else:
        module = _serving_model_class()(model, forget)
    # traced in eval mode (dropout off, BatchNorm on its running statistics); every module's own mode is restored
    # after, mixed modes included (a frozen-norm WFModel in training keeps its BatchNorm layers in eval)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        args, dynamic = _example_inputs(model, example_x, forget)
        with use_backend("torch"), torch.no_grad():
            program = torch.export.export(module, args, dynamic_shapes=dynamic)
    finally:
        for m, mode in modes:
            m.training = mode
    leftover = _custom_ops(program.graph)
    if leftover:
        raise RuntimeError(f"the exported graph still holds wfnet custom ops {leftover}; the serving export must "
                           f"trace the torch backend's plain ops (please report this)")
    return program


def export_onnx(model, path, example_x, forget: str | None = "rows", opset: int | None = None) -> Path:
    """Export to ONNX at ``path`` through the torch exporter (``torch.onnx.export(..., dynamo=True)``) from
    :func:`export_program`. Inputs ``x`` and ``forget`` (absent for a plain model), output ``logits``; metadata
    ``wfnet.forget_kind``, ``wfnet.num_classes``, ``wfnet.composition`` (read back by :func:`onnx_metadata`).
    Raises if the ``forget`` input feeds no node of the ONNX graph (the gates would be silently dropped)."""
    import torch

    from . import sets

    try:
        import onnxscript  # noqa: F401  (the torch exporter needs it; fail here with the fix)
    except ImportError as exc:
        raise ImportError(f"ONNX export needs onnx and onnxscript: pip install -e \".[serve]\" ({exc})") from None
    path = Path(path)
    program = export_program(model, example_x, forget)
    names = ["x"] if forget is None else ["x", "forget"]
    kwargs = {} if opset is None else {"opset_version": int(opset)}
    onnx_program = torch.onnx.export(program, input_names=names, output_names=["logits"], dynamo=True,
                                     verbose=False, **kwargs)
    graph = onnx_program.model.graph
    if forget is not None:
        used = any(v.name == "forget" for node in graph for v in node.inputs if v is not None)
        if not used:
            raise RuntimeError("the ONNX graph does not use its forget input: the gates were dropped")
    meta = {"forget_kind": forget or "none", "dtype": str(example_x.dtype).removeprefix("torch.")}
    if forget is not None:
        meta["num_classes"] = str(model.num_classes)
        meta["composition"] = sets.get_composition(model.set_composition) if forget == "mask" else "single row"
    for key, value in meta.items():
        onnx_program.model.metadata_props[_META_PREFIX + key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    return path


# ---------------------------------------------------------------------------------------------- serving (no torch)
def onnx_metadata(path) -> dict:
    """The ``wfnet.*`` metadata an :func:`export_onnx` file carries (prefix removed), read with onnxruntime."""
    sess = _session(path)
    return _meta(sess)


def _session(path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(f"serving an ONNX model needs onnxruntime: pip install -e \".[serve]\" ({exc})") from None
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _meta(sess) -> dict:
    props = sess.get_modelmeta().custom_metadata_map
    return {k[len(_META_PREFIX):]: v for k, v in props.items() if k.startswith(_META_PREFIX)}


def check_forget(forget, num_classes: int, kind: str, batch: int | None = None):
    """Validate a request's ``forget`` for an exported model and return it as the graph takes it (numpy int64 [B]
    for ``kind="rows"``, bool [B, num_classes] for ``"mask"``). Rows: a sequence / array of ints, each in
    0..num_classes-1. Mask: a bool array [B, num_classes], or a list of class lists (``[[3, 7], [], [1]]``; each
    class once, in range). ``batch``: the number of images. Raises TypeError / ValueError naming what is wrong."""
    import numpy as np

    _check_kind(kind)
    if kind == "mask" and isinstance(forget, (list, tuple)) and all(
            isinstance(s, (list, tuple, set, frozenset, range)) for s in forget):
        mask = np.zeros((len(forget), num_classes), dtype=bool)
        for i, s in enumerate(forget):
            for c in s:
                if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
                    raise TypeError(f"forget set {i} holds {c!r}; class ids must be ints")
                if not 0 <= c < num_classes:
                    raise ValueError(f"forget set {i} holds class {c}, out of range: num_classes={num_classes}")
                if mask[i, c]:
                    raise ValueError(f"forget set {i} lists class {c} twice")
                mask[i, c] = True
        forget = mask
    arr = np.asarray(forget)
    if kind == "rows":
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"forget rows must be integer class ids [B], got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"forget rows must have shape [B] (one class row per sample), got {list(arr.shape)}")
        if arr.size:
            bad = arr[(arr < 0) | (arr >= num_classes)]
            if bad.size:
                raise ValueError(f"forget row {int(bad[0])} is out of range: num_classes={num_classes}, valid rows "
                                 f"are 0..{num_classes - 1}")
        arr = arr.astype(np.int64, copy=False)
    else:
        if arr.dtype != np.bool_:
            raise TypeError(f"a forget mask must be bool [B, {num_classes}] (or a list of class lists), got dtype "
                            f"{arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != num_classes:
            raise ValueError(f"a forget mask must have shape [B, {num_classes}], got {list(arr.shape)}")
    if batch is not None and arr.shape[0] != batch:
        raise ValueError(f"forget has {arr.shape[0]} entries for a batch of {batch} images")
    return np.ascontiguousarray(arr)


class OnnxForgetModel:
    """An ONNX Runtime (CPU) session of an :func:`export_onnx` file that validates every request first.

        served = OnnxForgetModel("wf_rows.onnx")
        logits = served(images, forget=[3, 0, 7])        # numpy float [B, ...] images; rows or sets per kind

    ``threads``: ONNX Runtime's intra-op threads (default: its own choice). Needs numpy and onnxruntime only."""

    def __init__(self, path, threads: int | None = None):
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.metadata = _meta(self.session)
        self.kind = self.metadata.get("forget_kind")
        if self.kind not in FORGET_KINDS:
            raise ValueError(f"{self.path} is not a wfnet export with a forget input (wfnet.forget_kind = "
                             f"{self.kind!r}); run it with onnxruntime directly")
        self.num_classes = int(self.metadata["num_classes"])
        self.input_dtype = {i.name: i.type for i in self.session.get_inputs()}["x"]

    def __call__(self, x, forget):
        import numpy as np

        x = np.asarray(x)
        want = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
            self.input_dtype)
        if want is not None and x.dtype != want:
            raise TypeError(f"images must be {np.dtype(want).name} (the exported dtype), got {x.dtype}")
        forget = check_forget(forget, self.num_classes, self.kind, batch=x.shape[0] if x.ndim else None)
        return self.session.run(["logits"], {"x": x, "forget": forget})[0]

    def __repr__(self):
        return f"OnnxForgetModel({str(self.path)!r}, kind={self.kind!r}, num_classes={self.num_classes})"

