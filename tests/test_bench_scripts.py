"""The benchmark / GPU-check scripts in their smallest CPU mode, and the verification record (write + read back).

Each script runs in a subprocess (as gpu_check.sh runs it) with a tiny config and writes into a tmp folder. Nothing
here looks at a timing value beyond its type: timings are measured and recorded, never asserted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))


def _run(args, tmp_path, interpret=False, timeout=120):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # conftest sets it for in-process tests; the scripts choose for themselves
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, got {found}"
    return found[0]


def test_bench_model_cpu_smoke(tmp_path):
    _run([BENCH / "bench_model.py", "--quick", "--models", "resnet18", "--batch", "2", "--image-size", "8",
          "--variants", "torch,triton,cuda", "--device", "cpu", "--out", tmp_path, "--tag", "_t"], tmp_path)
    data = json.loads(_one(tmp_path, "model_cpu_*_t.json").read_text())
    assert _one(tmp_path, "model_cpu_*_t.md").read_text().count("CPU") >= 2
    meta = data["meta"]
    for key in ("device", "device_type", "torch", "triton", "cuda", "cudnn", "tf32", "date", "batch", "image_size",
                "timer", "memory", "rows", "targets"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and meta["batch"] == 2
    assert set(meta["tf32"]) == {"cuda.matmul.allow_tf32", "cudnn.allow_tf32", "float32_matmul_precision"}
    (block,) = data["results"]
    assert block["model"] == "resnet18" and block["expanded_batch"] == 4
    for what in ("forward", "step"):
        cell = block["plain"][what]
        assert isinstance(cell["ms"], float) and "peak_mib" in cell
        assert isinstance(block["wf"]["torch"][what]["ms"], float)
    # variants that cannot run here are recorded with their reason, not dropped
    for v in ("triton", "cuda"):
        assert block["wf"][v]["skipped"], v
    assert "wf_forward/plain_forward" in block["ratios"]["torch"]
    assert "wf_step/plain_step" in block["ratios"]["torch"]


def test_bench_model_fold_table_smoke(tmp_path):
    """Issue 24's interleaved table: every case measured, the fold's chains and both step ratios recorded."""
    _run([BENCH / "bench_model.py", "--fold-table", "--models", "resnet18", "--batch", "2", "--image-size", "8",
          "--reps", "5", "--device", "cpu", "--out", tmp_path, "--tag", "_t", "--note", "smoke"], tmp_path,
         timeout=300)
    data = json.loads(_one(tmp_path, "fold_cpu_*_t.json").read_text())
    (block,) = data["results"]
    assert data["meta"]["note"] == "smoke" and block["expanded_batch"] == 4
    assert {"plain forward", "plain+BN-folded forward", "WF forward (fold)", "WF forward (no fold)",
            "plain fine-tuning step", "plain fine-tuning step (2B samples)", "WF untraining step (fold)",
            "WF untraining step (no fold)"} == set(block["times_ms"])
    assert all(len(v) == 5 and all(isinstance(t, float) for t in v) for v in block["times_ms"].values())
    assert len(block["folded"]) == block["filtered_layers"] == 20
    for ratio in ("WF fwd / plain fwd", "WF fwd / plain+BN-folded fwd", "WF step / plain step, same rows",
                  "WF step / plain step, same samples"):
        assert set(block["ratios"][ratio]) == {"before", "after"}
    md = _one(tmp_path, "fold_cpu_*_t.md").read_text()
    assert "same rows" in md and "smoke" in md and "layer1.0.conv1 -> layer1.0.bn1 -> layer1.0.relu" in md


def test_bench_ops_cpu_smoke(tmp_path):
    _run([BENCH / "bench_ops.py", "--quick", "--batch", "4", "--models", "vit", "--shapes", "vit_t.qkv.32px",
          "--dtypes", "fp32", "--providers", "plain,torch,cuda", "--device", "cpu", "--out", tmp_path, "--tag", "_t"], tmp_path)
    data = json.loads(_one(tmp_path, "bench_cpu_*_t.json").read_text())
    meta = data["meta"]
    for key in ("device", "torch", "triton", "cuda", "cudnn", "tf32", "date", "timer", "rows", "batch"):
        assert key in meta, key
    assert "median" in meta["timer"]
    modes = {r["mode"]: r for r in data["results"]}
    assert set(modes) == {"forward", "backward", "fwd+bwd"}
    assert modes["forward"]["mode_kind"].startswith("inference")
    for r in data["results"]:
        assert isinstance(r["providers"]["plain"]["ms"], float)
        assert isinstance(r["providers"]["torch"]["ratio_to_plain"], float)
        assert r["providers"]["cuda"]["skipped"]


def test_sync_count_cpu_reports_it_needs_cuda(tmp_path):
    _run([BENCH / "sync_count.py", "--out", tmp_path, "--backends", "torch,cuda", "--device", "cpu", "--batch", "2",
          "--step-batch", "2"], tmp_path)
    data = json.loads((tmp_path / "sync_count_cpu.json").read_text())
    assert "needs CUDA" in data["sync_counting"]
    torch_res = data["backends"]["torch"]
    assert torch_res["forward/cpu_tensor"]["syncs"] is None and torch_res["untrain_step"]["syncs"] is None
    assert data["backends"]["cuda"]["skipped"]


def test_memcheck_ops_interpreter_smoke(tmp_path):
    out = tmp_path / "mc.json"
    proc = _run([BENCH / "memcheck_ops.py", "--backend", "triton", "--device", "cpu", "--limit", "3",
                 "--json", out], tmp_path,
                interpret=True)
    assert "memcheck_ops: completed backend=triton cases=3" in proc.stdout
    data = json.loads(out.read_text())
    assert data["failed"] == 0 and len(data["cases"]) == 3 and all(c["ok"] for c in data["cases"])


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="6">
<testcase classname="tests.test_triton_linear" name="test_linear_cuda[a]" time="0.1"/>
<testcase classname="tests.test_triton_conv2d" name="test_conv_cuda[b]" time="0.1"/>
<testcase classname="tests.test_triton_conv2d" name="test_interp" time="0.0"><skipped message="interpreter-only routing"/></testcase>
<testcase classname="tests.test_compile" name="test_compile_linear" time="0.1"/>
<testcase classname="tests.test_cuda_ext" name="test_ext_conv[x]" time="0.1"><failure message="AssertionError: mismatch">trace</failure></testcase>
<testcase classname="tests.test_ops" name="test_other" time="0.1"/>
</testsuite></testsuites>
"""
CLEAN_LOG = """========= COMPUTE-SANITIZER
memcheck_ops: completed backend={b} cases=40 in 12.0 s
========= ERROR SUMMARY: 0 errors
gpu_check: rc=0
"""


def test_record_verification_roundtrip(tmp_path):
    from wf_kernels.verification import is_verified, load_verification, verification_status

    junit = tmp_path / "pytest_gpu.xml"
    junit.write_text(JUNIT)
    logs = {}
    for b in ("triton", "cuda"):
        logs[b] = tmp_path / f"memcheck_{b}.log"
        logs[b].write_text(CLEAN_LOG.format(b=b))
    out = tmp_path / "verification.json"
    copy_dir = tmp_path / "copy"
    args = [BENCH / "record_verification.py", "--junit", junit, "--memcheck", f"triton={logs['triton']}",
            "--memcheck", f"cuda={logs['cuda']}", "--out", out, "--copy-to", copy_dir, "--device-name", "Fake GPU",
            "--torch", "2.11.0", "--triton", "3.6.0", "--cuda", "13.0"]
    _run(args, tmp_path)
    table = load_verification(out)
    tri, cu = table["Fake GPU"]["triton"], table["Fake GPU"]["cuda"]
    assert tri["verified"] is True and tri["tests"] == {"passed": 3, "failed": 0, "skipped": 1}
    assert tri["torch"] == "2.11.0" and tri["triton"] == "3.6.0" and tri["cuda"] == "13.0" and tri["date"]
    assert tri["skipped_reasons"] == ["interpreter-only routing"]
    assert cu["verified"] is False and cu["tests"]["failed"] == 1
    assert cu["failures"] and "mismatch" in cu["failures"][0]
    assert is_verified("Fake GPU", "triton", path=out) and not is_verified("Fake GPU", "cuda", table=table)
    assert not is_verified("Other GPU", "triton", table=table)
    ok, why = verification_status("Other GPU", "triton", table=table)
    assert not ok and "Fake GPU" in why
    assert json.loads((copy_dir / "verification.json").read_text()) == table

    # a dirty memcheck un-verifies triton; the merge keeps other devices' entries
    logs["triton"].write_text("memcheck_ops: completed backend=triton cases=40\n========= ERROR SUMMARY: 2 errors\n")
    table["Another GPU"] = {"triton": {"verified": True}}
    out.write_text(json.dumps(table))
    _run(args, tmp_path)
    table = load_verification(out)
    assert table["Fake GPU"]["triton"]["verified"] is False
    assert "2 error" in " ".join(table["Fake GPU"]["triton"]["reasons"])
    assert is_verified("Another GPU", "triton", table=table)

    # no JUnit XML and no memcheck logs (stages that never ran): nothing verified, and the reasons say why
    _run([BENCH / "record_verification.py", "--junit", tmp_path / "missing.xml", "--out", out, "--device-name",
          "Fake GPU"], tmp_path)
    entry = load_verification(out)["Fake GPU"]
    assert not entry["triton"]["verified"] and not entry["cuda"]["verified"]
    assert any("missing" in r for r in entry["cuda"]["reasons"])


def test_load_verification_missing_or_broken(tmp_path):
    from wf_kernels.verification import is_verified, load_verification

    assert load_verification(tmp_path / "none.json") == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert load_verification(bad) == {}
    assert not is_verified("NVIDIA H100 80GB HBM3", "triton", path=bad)


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_gpu_check_script_syntax():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_epilogue_blocks_smoke(tmp_path):
    """bench/epilogue_blocks.py: every case measured and recorded (the library's block size restored after each)."""
    _run([BENCH / "epilogue_blocks.py", "--batch", "2", "--image-size", "8", "--reps", "3", "--out", tmp_path,
          "--tag", "_t"], tmp_path, timeout=300)
    data = json.loads(_one(tmp_path, "epilogue_blocks_*_t.json").read_text())
    assert len(data["times_ms"]) == 5 and all(len(v) == 3 for v in data["times_ms"].values())
    assert data["meta"]["block_elements"] == 1 << 18
    assert "whole-tensor passes (library)" in _one(tmp_path, "epilogue_blocks_*_t.md").read_text()
