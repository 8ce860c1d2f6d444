"""Serving: torch.export / ONNX of wrapped models with ``forget`` as a real input, run by ONNX Runtime on the CPU.

Parity is checked against the eager wrapped model for random rows and random masks at a batch size other than the
export example's (the batch dimension is dynamic), on ResNet-18 and ViT-T (timm vit_tiny_patch16_224, img_size 32,
patch 4), in fp32 and fp16. The gates are random (logits ~ N(0, 3)), so different ``forget`` inputs give very
different outputs: a graph that dropped them could not match the eager model for two different inputs.

Needs the ``serve`` extra (onnx, onnxruntime, onnxscript); skipped with the reason when it is absent.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the serve extra is not installed (pip install -e \".[serve]\")")
pytest.importorskip("onnxscript", reason="the serve extra is not installed (pip install -e \".[serve]\")")
pytest.importorskip("onnx", reason="the serve extra is not installed (pip install -e \".[serve]\")")

import wfnet  # noqa: E402
from wfnet import serve  # noqa: E402
from wfnet.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_C = 10
# max |ORT - eager| relative to the eager output's max magnitude. fp32: both run fp32 on the CPU and differ only in
# summation order (measured <= 2e-6 on ViT-T); fp16: as the kernel tests' CPU half tolerance.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-2}


def _wrapped(name: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    wf = wfnet.wrap(build_model(name, N_C, image_size=32), N_C).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in wf.filter_parameters():  # open and closed channels, different per class
            p.copy_(torch.randn(p.shape, generator=g) * 3)
    return wf.to(dtype)


def _forget(kind: str, batch: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "rows":
        return torch.randint(0, N_C, (batch,), generator=gen)
    mask = torch.rand(batch, N_C, generator=gen) < 0.3
    mask[0] = False  # an empty set: the original model for that sample
    return mask


_CACHE = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, dtype, kind) -> (wf, onnx path), exported once per module."""
    folder = tmp_path_factory.mktemp("onnx")

    def get(name, dtype, kind):
        key = (name, dtype, kind)
        if key not in _CACHE:
            wf = _wrapped(name, dtype)
            x = torch.randn(3, 3, 32, 32, dtype=dtype)
            path = serve.export_onnx(wf, folder / f"{name}_{str(dtype)[6:]}_{kind}.onnx", x, forget=kind)
            _CACHE[key] = (wf, path)
        return _CACHE[key]

    yield get
    _CACHE.clear()


@pytest.mark.parametrize("name,dtype,kind", [
    ("resnet18", torch.float32, "rows"), ("resnet18", torch.float32, "mask"), ("resnet18", torch.float16, "rows"),
    ("vit_tiny", torch.float32, "rows"), ("vit_tiny", torch.float32, "mask"), ("vit_tiny", torch.float16, "mask"),
])
def test_onnx_runtime_matches_eager(exported, name, dtype, kind):
    wf, path = exported(name, dtype, kind)
    served = serve.OnnxForgetModel(path)
    assert (served.kind, served.num_classes) == (kind, N_C)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, 32, 32, generator=gen).to(dtype)  # batch 5: not the export example's batch
    outs, refs = [], []
    for _ in range(3):
        forget = _forget(kind, 5, gen)
        with torch.no_grad():
            ref = wf(x, forget=forget).float()
        out = torch.from_numpy(served(x.numpy(), forget.numpy())).float()
        tol = REL_TOL[dtype] * ref.abs().max().item()
        err = (out - ref).abs().max().item()
        assert err <= tol, f"{name} {dtype} {kind}: max |ORT - eager| {err:.3g} > {tol:.3g}"
        outs.append(out)
        refs.append(ref)
    # the forget input is live: different draws give different outputs, far beyond the tolerance
    assert (outs[0] - outs[1]).abs().max().item() > 10 * tol
    with torch.no_grad():
        plain = wf(x).float()
    assert (outs[0] - plain).abs().max().item() > 10 * tol


def test_onnx_graph_has_only_standard_ops(exported):
    import onnx

    _, path = exported("resnet18", torch.float32, "mask")
    model = onnx.load(str(path))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert [i.name for i in model.graph.input] == ["x", "forget"]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_export_program_traces_plain_ops_whatever_the_backend():
    """Even with a fused backend selected, the exported graph holds aten ops only (no wf_kernels custom op); and the
    torch.export program itself reproduces the eager model with forget as an input, at a new batch size."""
    wf = _wrapped("small_cnn")
    x = torch.randn(4, 3, 16, 16)
    with wfnet.use_backend("triton"):
        program = serve.export_program(wf, x, forget="rows")
    namespaces = {n.target.namespace for n in program.graph.nodes
                  if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    assert namespaces == {"aten"}, namespaces
    rows = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    x7 = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x7, rows), wf(x7, forget=rows))
        with pytest.raises(Exception):  # wfnet's device-side assertion / the range check, never a silent row
            program.module()(x7, torch.tensor([3, 1, 4, 1, 5, 9, N_C]))


def test_out_of_range_rows_fail_in_onnx_runtime(exported):
    """The raw session (a server that skips validation) refuses rows outside 0..N_c-1, negative ones included (ONNX
    Gather would wrap -1 around to N_c - 1); the runner raises a clear ValueError before the session runs."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    _, path = exported("resnet18", torch.float32, "rows")
    served = serve.OnnxForgetModel(path)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    served.session.run(None, {"x": x, "forget": np.array([0, 1, 2, N_C - 1])})  # valid rows run
    for bad in ([0, 1, 2, N_C], [0, -1, 2, 3], [0, 1, -N_C, 3]):
        with pytest.raises(InvalidArgument, match="Gather"):
            served.session.run(None, {"x": x, "forget": np.array(bad, dtype=np.int64)})
        with pytest.raises(ValueError, match="out of range"):
            served(x, bad)


@pytest.mark.parametrize("kind", ["rows", "mask"])
def test_batch_mismatch_fails_in_onnx_runtime(exported, kind):
    """A forget of batch 1 must not broadcast over 4 images (nor 4 forgets over 1 image)."""
    _, path = exported("resnet18", torch.float32, kind)
    served = serve.OnnxForgetModel(path)
    rng = np.random.default_rng(0)
    one = np.array([3]) if kind == "rows" else np.eye(N_C, dtype=bool)[[3]]
    four = np.array([3, 3, 3, 3]) if kind == "rows" else np.eye(N_C, dtype=bool)[[3, 3, 3, 3]]
    x4 = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    for x, f in ((x4, one), (x4[:1], four)):
        with pytest.raises(Exception, match="mismatched dimensions|Concat"):
            served.session.run(None, {"x": x, "forget": f})
        with pytest.raises(ValueError, match="entries for a batch"):
            served(x, f)


def test_mask_shape_and_dtype_are_checked(exported):
    _, path = exported("resnet18", torch.float32, "mask")
    served = serve.OnnxForgetModel(path)
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(Exception, match="dimensions"):
        served.session.run(None, {"x": x, "forget": np.zeros((2, N_C + 1), bool)})
    with pytest.raises(Exception, match="type"):
        served.session.run(None, {"x": x, "forget": np.zeros((2, N_C), np.int64)})
    # the runner takes class lists and checks them as wfnet.sets does
    out = served(x, [[3, 7], []])
    mask = np.zeros((2, N_C), bool)
    mask[0, [3, 7]] = True
    np.testing.assert_array_equal(out, served(x, mask))
    with pytest.raises(ValueError, match="twice"):
        served(x, [[3, 3], []])
    with pytest.raises(ValueError, match="out of range"):
        served(x, [[N_C], []])
    with pytest.raises(TypeError, match="bool"):
        served(x, np.zeros((2, N_C), np.int64))
    with pytest.raises(TypeError, match="float32"):
        served(x.astype(np.float64), [[1], [2]])


def test_check_forget_errors():
    assert serve.check_forget([1, 2], N_C, "rows").dtype == np.int64
    with pytest.raises(TypeError, match="integer"):
        serve.check_forget(np.array([True, False]), N_C, "rows")
    with pytest.raises(TypeError, match="integer"):
        serve.check_forget([1.0, 2.0], N_C, "rows")
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        serve.check_forget([[1, 2]], N_C, "rows")
    with pytest.raises(ValueError, match="shape"):
        serve.check_forget(np.zeros((2, 3), bool), N_C, "mask")
    with pytest.raises(ValueError, match="forget must be one of"):
        serve.check_forget([1], N_C, "sets")


def test_set_composition_is_recorded_and_exported(tmp_path):
    """The composition in force at export is baked in (here "min") and named in the metadata."""
    wf = _wrapped("small_cnn")
    x = torch.randn(3, 3, 16, 16)
    with wfnet.sets.use_composition("min"):
        path = serve.export_onnx(wf, tmp_path / "min.onnx", x, forget="mask")
        mask = torch.tensor([[True, False, True] + [False] * 7, [False] * 10, [True] * 10])
        with torch.no_grad():
            ref = wf(x, forget=mask)
    served = serve.OnnxForgetModel(path)
    assert served.metadata["composition"] == "min"
    np.testing.assert_allclose(served(x.numpy(), mask.numpy()), ref.numpy(), rtol=0, atol=1e-5 * ref.abs().max().item())


def test_plain_model_exports_the_same_way_and_a_wfmodel_needs_a_forget_kind(tmp_path):
    wf = _wrapped("small_cnn")
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="forget='rows' or forget='mask'"):
        serve.export_program(wf, x, forget=None)
    with pytest.raises(ValueError, match="forget must be one of"):
        serve.export_program(wf, x, forget="sets")
    plain = wfnet.export(wf, forget=3)
    path = serve.export_onnx(plain, tmp_path / "plain.onnx", x, forget=None)
    assert serve.onnx_metadata(path)["forget_kind"] == "none"
    with pytest.raises(ValueError, match="not a wfnet export with a forget input"):
        serve.OnnxForgetModel(path)
    import onnxruntime as ort

    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, wf(x, forget=3).numpy(), rtol=0, atol=1e-4)


def test_serving_model_refuses_the_other_kind():
    wf = _wrapped("small_cnn")
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TypeError, match="int64 class rows"):
        serve.ServingModel(wf, "rows")(x, torch.zeros(2, N_C, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool mask"):
        serve.ServingModel(wf, "mask")(x, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="WFModel"):
        serve.ServingModel(torch.nn.Linear(2, 2))


def test_runner_needs_no_torch(exported, tmp_path):
    """A serving process imports numpy and onnxruntime only: wfnet.serve's runner must work with torch unimportable."""
    _, path = exported("resnet18", torch.float32, "rows")
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from wfnet.serve import OnnxForgetModel\n"
            f"m = OnnxForgetModel({str(path)!r}, threads=1)\n"
            "out = m(np.zeros((2, 3, 32, 32), np.float32), [1, 2])\n"
            "assert out.shape == (2, 10), out.shape\n"
            "try:\n    m(np.zeros((1, 3, 32, 32), np.float32), [10])\nexcept ValueError as e:\n    print('ok', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok forget row 10 is out of range" in proc.stdout


def test_cli_serve_export(tmp_path, capsys):
    """`wfnet serve-export RUN --out m.onnx`: the run's wrapped model with its gates, reproduced by ONNX Runtime."""
    from wfnet.cli import main

    run = tmp_path / "run"
    common = ["--no-progress", "--device", "cpu"]
    assert main(["train", "--out", str(run), "--epochs", "1", "--train-limit", "200", "--test-limit", "100",
                 *common]) == 0
    assert main(["untrain", str(run), "--max-epochs", "1", *common]) == 0
    out = tmp_path / "m.onnx"
    assert main(["serve-export", str(run), "--out", str(out), "--forget-input", "mask", *common]) == 0
    assert "forget [B, 10] (mask)" in capsys.readouterr().out
    r = wfnet.Run.open(run, device="cpu")
    x = torch.stack([r.data.test[i][0] for i in range(6)])
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[1, 3] = mask[2, [1, 4, 9]] = mask[5] = True
    with torch.no_grad():
        ref = r.wrapped()(x, forget=mask)
    served = serve.OnnxForgetModel(out)
    np.testing.assert_allclose(served(x.numpy(), mask.numpy()), ref.numpy(), rtol=0,
                               atol=REL_TOL[torch.float32] * ref.abs().max().item())
    assert main(["serve-export", str(run), "--out", str(tmp_path / "m.pt"), *common]) == 2


def test_serve_latency_bench_quick(tmp_path):
    """bench/serve_latency.py --quick writes its JSON / markdown with every variant timed (values not asserted)."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_latency.py"), "--quick", "--out", str(tmp_path),
                           "--tag", "_t"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = tmp_path.glob("serve_latency_*_t.json")
    data = json.loads(found.read_text())
    assert data["meta"]["reps"] >= 5 and "machine" in data["meta"] and "date" in data["meta"]
    cell = data["results"]["small_cnn"]["latency"]["2"]
    for v in ("plain", "wf_rows", "wf_mask"):
        assert isinstance(cell[v]["median_ms"], float) and cell[v]["reps"] == 5
    assert isinstance(cell["wf_rows/plain"], float)
    assert "| small_cnn | 2 |" in found.with_suffix(".md").read_text()


@pytest.mark.parametrize("train", [False, True])
def test_export_leaves_every_module_mode_as_it_was(train):
    """Exporting traces in eval mode and restores each module's own mode after (a fresh wrapper Module says
    training=True: restoring from it once put an eval model in training mode, dropout on)."""
    wf = _wrapped("small_cnn").train(train)
    before = {n: m.training for n, m in wf.named_modules()}
    if train:  # training, with the BatchNorm layers frozen in eval by the WFModel
        assert before[""] and before["model.features.0"] and not before["model.features.1"]
    else:
        assert not any(before.values())
    serve.export_program(wf, torch.randn(2, 3, 16, 16), forget="mask")
    assert {n: m.training for n, m in wf.named_modules()} == before


def test_windowed_attention_exports(tmp_path):
    """Swin's window attention runs its qkv on a folded batch (B * windows): the rows are repeated per window in the
    graph with a symbolic fold, and ONNX Runtime matches the eager model at a new batch size. (A small Swin: one
    block per stage, 48 channels, 56 px, windows of 7; 4 windows per image in the first stage.)"""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7, num_classes=N_C,
                              embed_dim=48, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))
    wf = wfnet.wrap(model, N_C).eval()
    with torch.no_grad():
        for p in wf.filter_parameters():
            p.copy_(torch.randn(p.shape) * 3)
    path = serve.export_onnx(wf, tmp_path / "swin.onnx", torch.randn(2, 3, 56, 56), forget="rows")
    x, rows = torch.randn(5, 3, 56, 56), torch.tensor([1, 5, 9, 0, 2])
    with torch.no_grad():
        ref = wf(x, forget=rows)
    out = serve.OnnxForgetModel(path)(x.numpy(), rows.numpy())
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=REL_TOL[torch.float32] * ref.abs().max().item())
    with torch.no_grad():
        assert (wf(x, forget=rows.flip(0)) - ref).abs().max() > 1e-3  # the rows matter
