"""Dispatch says why: the table's predicted entries are used on a GPU with a known spec, a measurement replaces them,
unseen shapes fall back to the same roofline (or the fixed default without a spec); the roofline script runs on a
tiny model. Devices are simulated by setting ``dispatch.DEVICE_NAME``; tensors are meta (dispatch reads shapes only).
"""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wf_kernels import dispatch, roofline

ROOT = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"   # torch.cuda.get_device_name() of an H100 SXM


def _bench_roofline():
    if "bench_roofline" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("bench_roofline", ROOT / "bench" / "roofline.py")
        sys.modules["bench_roofline"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["bench_roofline"]


@pytest.fixture
def device(monkeypatch):
    """Pretend to run on a named GPU; the table and the computed-decision cache are restored afterwards."""
    saved_table = json.loads(json.dumps(dispatch.TABLE))
    monkeypatch.setattr(dispatch, "_computed", {})
    monkeypatch.setattr(dispatch, "_nearest_memo", {})

    def set_name(name):
        monkeypatch.setattr(dispatch, "DEVICE_NAME", name)
    yield set_name
    dispatch.TABLE.clear()
    dispatch.TABLE.update(saved_table)


def _conv(b, c, h, o, k=3, s=1, p=1, dtype=torch.bfloat16):
    x, w = torch.empty(b, c, h, h, dtype=dtype, device="meta"), torch.empty(o, c, k, k, dtype=dtype, device="meta")
    return x, w, (s, s), (p, p), (1, 1)


_KEY = re.compile(r"conv2d\|(\w+)\|B(\d+)\|C(\d+)\|H(\d+)\|W(\d+)\|O(\d+)\|k(\d+)x(\d+)\|s(\d+)x(\d+)\|p(\d+)x(\d+)"
                  r"\|d(\d+)x(\d+)\|g(\d+)\|(nchw|nhwc)$")


def test_spec_matching_of_device_names():
    assert roofline.spec_for_device("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert roofline.spec_for_device("NVIDIA H200").name == "H200"
    assert roofline.spec_for_device("NVIDIA A100-SXM4-80GB").name == "A100 80GB"
    for other in ("NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 4090", "cpu", "triton-interpreter"):
        assert roofline.spec_for_device(other) is None, other
    with pytest.raises(ValueError, match="unknown device spec"):
        roofline.get_spec("b200")


def test_predicted_entries_match_the_roofline_they_name():
    """Every predicted entry is what conv_prediction / linear_prediction give today for its shape: a changed
    efficiency factor or spec without regenerating the table (bench/roofline.py --write-dispatch) fails here."""
    sections = {k: v for k, v in dispatch._load_table().items() if k.startswith(dispatch.PREDICTED_PREFIX)}
    assert set(sections) == {dispatch.PREDICTED_PREFIX + s for s in roofline.DEVICE_SPECS}
    paths = set()
    for name, entries in sections.items():
        spec = roofline.DEVICE_SPECS[name[len(dispatch.PREDICTED_PREFIX):]]
        assert len(entries) > 50
        for key, e in entries.items():
            assert e["source"] == f"roofline prediction {spec.name} {roofline.PREDICTION_DATE}"
            assert not dispatch.is_measured(e)
            dt = getattr(torch, key.split("|")[1])
            if key.startswith("linear"):
                m, k, n = (int(v) for v in re.findall(r"\|[MKN](\d+)", key))
                _, again = dispatch.linear_prediction(spec, dt, m, k, n, tf32=bool(e["assumes"]["tf32"]))
            else:
                f = _KEY.match(key).groups()
                b, c, h, w, o, kh, kw, sh, sw, ph, pw, dh, dw, g = map(int, f[1:15])
                _, again = dispatch.conv_prediction(spec, dt, (b, c, h, w), (o, c // g, kh, kw), (sh, sw), (ph, pw),
                                                    (dh, dw), g, f[15] == "nhwc", bool(e["assumes"]["tf32"]))
            assert again == e, key
            paths.add(e["path"])
    assert paths == {"implicit_gemm", "epilogue", "gemm"}  # the roofline does not pick one design everywhere


def test_table_prediction_is_used_on_a_known_gpu(device):
    device(H100)
    table = dispatch.TABLE[dispatch.PREDICTED_PREFIX + "H100 SXM"]
    chosen = {}
    for name, args in {"memory-bound stem": _conv(256, 64, 56, 64), "compute-bound deep": _conv(256, 512, 7, 512)}.items():
        key = dispatch.shape_key("conv2d", args[0].dtype, args[0].shape, args[1].shape, *args[2:], 1, False)
        path, reason = dispatch.conv_path(*args, 1, False)
        assert path == table[key]["path"]
        assert "roofline prediction H100 SXM 2026-12-05 (table" in reason and "implicit_gemm_eff" in reason
        assert dispatch.last_decisions["conv2d"] == (path, reason)
        chosen[name] = path
    # fused saves a pass where bandwidth rules; at 0.7x cuDNN's speed it loses where FLOPs rule
    assert chosen == {"memory-bound stem": "implicit_gemm", "compute-bound deep": "epilogue"}


def test_measurement_replaces_prediction_and_covers_nearby_batches(device):
    device(H100)
    x, w, s, p, d = _conv(256, 512, 7, 512)
    key = dispatch.shape_key("conv2d", x.dtype, x.shape, w.shape, s, p, d, 1, False)
    assert dispatch.conv_path(x, w, s, p, d, 1, False)[0] == "epilogue"
    dispatch.TABLE.setdefault(H100, {})[key] = {"path": "implicit_gemm", "implicit_gemm_ms": 0.05,
                                               "epilogue_ms": 0.07, "source": f"measured {H100} 2026-12-05"}
    path, reason = dispatch.conv_path(x, w, s, p, d, 1, False)
    assert path == "implicit_gemm" and reason.startswith(f"measured on {H100}:")
    # label expansion doubles the batch: the B=256 measurement still decides, and says so
    x2 = torch.empty(512, 512, 7, 7, dtype=x.dtype, device="meta")
    path, reason = dispatch.conv_path(x2, w, s, p, d, 1, False)
    assert path == "implicit_gemm" and "at B=256 (nearest measured batch to B=512)" in reason
    # 16x away is too far: back to the roofline, computed for this unseen shape
    x3 = torch.empty(16, 512, 7, 7, dtype=x.dtype, device="meta")
    path, reason = dispatch.conv_path(x3, w, s, p, d, 1, False)
    assert "computed for this shape" in reason
    t = roofline.conv_path_seconds(roofline.DEVICE_SPECS["H100 SXM"], x.dtype, x3.shape, w.shape, s, p, d)
    assert path == min(t, key=t.get)
    # an old measured entry without "source" is a measurement too
    del dispatch.TABLE[H100][key]["source"]
    assert dispatch.conv_path(x, w, s, p, d, 1, False)[1].startswith("measured")


def test_fp32_prediction_follows_the_tf32_flag(device, monkeypatch):
    device(H100)
    args = _conv(256, 64, 56, 64, dtype=torch.float32)
    assert "(table" in dispatch.conv_path(*args, 1, False)[1]            # made with torch's default: cuDNN TF32 on
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    path, reason = dispatch.conv_path(*args, 1, False)
    assert "computed for this shape" in reason and "tf32=False" in reason


def test_unknown_gpu_and_cpu_take_the_fixed_defaults(device):
    x, w, s, p, d = _conv(256, 64, 56, 64)
    for name in ("NVIDIA GeForce RTX 4090", "triton-interpreter"):
        device(name)
        path, reason = dispatch.conv_path(x, w, s, p, d, 1, False)
        assert path == "epilogue" and "no measurement" in reason and "no datasheet spec" in reason
        path, reason = dispatch.linear_path((50432, 384), torch.empty(1152, 384, device="meta"), torch.float32)
        assert path == "gemm" and "no datasheet spec" in reason


def test_linear_prediction_from_the_table(device):
    device(H100)
    w = torch.empty(1152, 384, device="meta")
    path, reason = dispatch.linear_path((256 * 197, 384), w, torch.float32)   # ViT-S qkv at batch 256
    entry = dispatch.TABLE[dispatch.PREDICTED_PREFIX + "H100 SXM"]["linear|float32|M50432|K384|N1152"]
    assert path == entry["path"] and "(table" in reason
    dispatch.force_path("linear", "epilogue")
    try:
        assert dispatch.linear_path((256 * 197, 384), w, torch.float32) == (
            "epilogue", "forced by force_path / WFNET_TRITON_LINEAR_PATH")
    finally:
        dispatch.force_path("linear", None)


# ----------------------------------------------------------------------------------------------- bench/roofline.py
class _Tiny(nn.Module):
    """conv-BN-ReLU (folds all), conv-BN then a residual add (folds BN only), conv-ReLU without BN (no fold)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 16, 3, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.relu(self.b1(self.c1(x)))
        y = self.relu(self.b2(self.c2(y)) + y)
        return self.head(F.relu(self.c3(y)).mean((2, 3)))


def test_roofline_on_a_tiny_model():
    R = _bench_roofline()
    specs = [roofline.DEVICE_SPECS["H100 SXM"], roofline.DEVICE_SPECS["A100 80GB"]]
    res = R.analyze(_Tiny(), (3, 16, 16), 4, torch.float32, specs)
    assert [li["folds"] for li in res["layers"]] == [["native_batch_norm", "relu_"], ["native_batch_norm"], []]
    dev = res["devices"]["H100 SXM"]
    for mode in ("infer", "train"):
        ratio = dev[mode]["ratio"]
        assert ratio["plain"] == 1.0
        assert ratio["separate"] > 1.0 > ratio["folded"]                    # one pass more / fewer than plain
        assert ratio["fused+folded"] <= ratio["folded"] / roofline.IMPLICIT_GEMM_EFF
        assert ratio["fused"] == pytest.approx(ratio["fused@1"], rel=0.5)
    assert dev["infer"]["ratio"]["fused@1"] <= 1.0                         # gate in the epilogue: free at inference
    rows = dev["layers"]
    # c3 has no BN to fold into: folded == separate for it
    assert rows[2]["infer_us"]["folded"] == pytest.approx(rows[2]["infer_us"]["separate"])
    # the first filtered layer needs no input gradient; the untraining step costs more than the forward
    assert all(r["train_us"][d] > r["infer_us"][d] for r in rows for d in R.DESIGNS)
    assert res["devices"]["A100 80GB"]["infer"]["total_ms"]["plain"] > dev["infer"]["total_ms"]["plain"]
    assert dev["finetune_ms"] > dev["train"]["total_ms"]["plain"]          # weight gradients cost extra
    with pytest.raises(ValueError, match="no layer to filter"):
        R.analyze(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2, 2), 2, torch.float32, specs)


def test_training_trace_claims_the_right_backward_ops():
    R = _bench_roofline()
    m = _Tiny().to("meta").eval()
    tr = R.trace(m, torch.empty(2, 3, 16, 16, device="meta"), ["c1", "c2", "c3"], "train")
    blocks = R.find_blocks(tr, ["c1", "c2", "c3"])
    assert [b.need_grad_x for b in blocks] == [False, True, True]
    assert [[o.name for o in b.bwd_chain] for b in blocks] == [
        ["threshold_backward", "native_batch_norm_backward"], ["native_batch_norm_backward"], []]
    assert all(o.name == "convolution_backward" for b in blocks for o in b.bwd_gemm)


def test_roofline_cli_writes_labelled_tables_and_dispatch_sections(tmp_path):
    R = _bench_roofline()
    R.main(["--models", "resnet18", "--batch", "2", "--dtypes", "bf16", "--no-finetune", "--also", "h200",
            "--out-dir", str(tmp_path), "--tag", "_t"])
    md = (tmp_path / f"roofline_h100_{roofline.PREDICTION_DATE}_t.md").read_text()
    assert "PREDICTIONS" in md and "NOT measurements" in md and "| H200 | resnet18 | bf16 |" in md
    assert "| layer4.1.conv2 |" in md
    data = json.loads((tmp_path / f"roofline_h100_{roofline.PREDICTION_DATE}_t.json").read_text())
    assert data["meta"]["kind"].startswith("roofline PREDICTION")
    assert len(data["results"][0]["layers"]) == 20                         # ResNet-18: every conv is filtered
    for bad in (["--device", "b200"], ["--models", "no_such_model"], ["--ig-eff", "0"]):
        with pytest.raises(SystemExit):
            R.main(bad + ["--out-dir", str(tmp_path)])
    # --write-dispatch's writer replaces predicted sections and keeps measured ones
    table = tmp_path / "table.json"
    table.write_text(json.dumps({H100: {"k": {"path": "epilogue"}}, "roofline:H200": {"old": {}}}))
    R.write_dispatch({"roofline:H200": {"new": {"path": "gemm"}}}, table)
    assert json.loads(table.read_text()) == {H100: {"k": {"path": "epilogue"}}, "roofline:H200": {"new": {"path": "gemm"}}}


def test_decisions_trace_under_torch_compile_fullgraph(device):
    """wf_conv2d / wf_linear call dispatch inside torch.compile traces: every step (table, computed roofline,
    nearest-batch measurement) must trace without a graph break, also once the batch size turns dynamic."""
    device(H100)
    w = torch.randn(512, 512, 3, 3)   # ResNet-18 layer4 (in the table at B=256)

    def f(x):
        conv, _ = dispatch.conv_path(x, w, (1, 1), (1, 1), (1, 1), 1, False)
        lin, _ = dispatch.linear_path((x.shape[0] * 3, 8), w.flatten(1)[:, :8], torch.float32)
        return x + (1.0 if conv == "implicit_gemm" else 2.0) + (10.0 if lin == "gemm" else 20.0)

    dispatch.TABLE.setdefault(H100, {})[dispatch.shape_key("conv2d", torch.float32, (8, 512, 7, 7), w.shape, (1, 1),
                                                           (1, 1), (1, 1), 1, False)] = {
        "path": "implicit_gemm", "implicit_gemm_ms": 0.5, "epilogue_ms": 1.0, "source": "measured"}
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    try:
        for b, why in ((256, "(table"), (7, "nearest measured batch to B=7"), (40, "computed for this shape")):
            x = torch.zeros(b, 512, 7, 7)
            out = compiled(x)
            path, reason = dispatch.last_decisions["conv2d"]
            assert why in reason, (b, reason)
            assert float(out[0, 0, 0, 0]) == (1.0 if path == "implicit_gemm" else 2.0) + 10.0
    finally:
        torch._dynamo.reset()
