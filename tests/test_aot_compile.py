"""Static GPU verification: every Triton kernel variant the runtime can launch compiles for sm_90 and sm_80 without
spilling registers or exceeding shared memory, and so does the CUDA extension (no GPU needed; see
bench/aot_verify.py for how the launches are intercepted). The "ci" suite compiles three of the seven folded
activations (none, relu, gelu: ``aot_verify.CI_WRAPPER_VALUES``); ``bench/aot_verify.py --suite full`` all of them.
Measured 2026-12-05 on the 2-core AMD EPYC CPU, no GPU, with other jobs running: 306 s for this module (both archs
with this Triton while nvcc builds csrc/, then the GPU machine's Triton 3.6 on both archs, its pip install included);
the two architectures compile in parallel subprocesses."""
from __future__ import annotations

import enum
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("aot_verify", ROOT / "bench" / "aot_verify.py")
aot = importlib.util.module_from_spec(spec)
sys.modules["aot_verify"] = aot
spec.loader.exec_module(aot)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# every kernel a launch wrapper starts; a new kernel must be added to the verification's cases (and here)
KERNELS = {"_wf_linear_fwd_kernel", "_wf_conv2d_fwd_kernel", "_gate_fwd_kernel", "_gate_bwd_kernel",
           "_class_grad_kernel"}


def test_every_launched_kernel_is_covered():
    """The kernels defined in wf_kernels are exactly the ones the verification compiles (a kernel added later
    without a case here would otherwise never be checked)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import wf_kernels.backward
    import wf_kernels.conv2d
    import wf_kernels.epilogue
    import wf_kernels.gates
    import wf_kernels.linear

    found = set()
    for mod in (wf_kernels.backward, wf_kernels.conv2d, wf_kernels.epilogue, wf_kernels.gates, wf_kernels.linear):
        for name, obj in vars(mod).items():
            # autotuned kernels wrap the JITFunction; under TRITON_INTERPRET=1 (set by conftest) @triton.jit makes
            # InterpretedFunctions
            kinds = (JITFunction, InterpretedFunction)
            if name.endswith("_kernel") and (isinstance(obj, kinds) or isinstance(getattr(obj, "fn", None), kinds)):
                found.add(name)
    assert found == KERNELS


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]\n")
    assert aot.parse_ptxas_log(log) == dict(registers=255, spill_stores=12, spill_loads=8, stack=16)
    with pytest.raises(aot.AOTUnavailable, match="registers"):
        aot.parse_ptxas_log("ptxas info: nothing useful")  # a changed log format must not read as 'no spills'


def test_blocks_per_sm():
    assert aot.blocks_per_sm(90, registers=255, shared=0, num_warps=8) == 1  # 256 regs x 256 threads = 65,536
    assert aot.blocks_per_sm(90, registers=32, shared=0, num_warps=4) == 16  # thread limit: 2048 / 128
    assert aot.blocks_per_sm(80, registers=64, shared=100_000, num_warps=4) == 1  # shared memory: 167,936 / 100,000


def test_violations_flag_spills_smem_and_errors():
    ok = dict(kernel="k", arch=90, dtype="bf16", layout="NHWC", num_warps=4, num_stages=3, constexprs={},
              registers=200, spill_stores=0, spill_loads=0, shared=1000, error=None)
    assert aot.violations([ok]) == []
    assert "spills" in aot.violations([dict(ok, spill_stores=4)])[0]
    assert "shared memory" in aot.violations([dict(ok, arch=80, shared=200_000)])[0]
    assert "does not compile" in aot.violations([dict(ok, error="CompilationError: x")])[0]


def _fake_wrapper(x, path: str, save_z: bool, act: Literal["none", "relu", "gelu"] = "relu",
                  mode: Optional[_Mode] = None, in_place: bool = False):
    """Stands for a launch wrapper that gained arguments after the verification's cases were written."""


class _Mode(enum.Enum):
    A = "a"
    B = "b"


def test_wrapper_arguments_are_discovered_and_enumerated():
    """A wrapper argument the cases do not set (an activation, a folded epilogue) is enumerated from its
    annotation, its default first, and every combination is compiled; one that cannot be enumerated is an error,
    never silently left at its default."""
    choices = aot.wrapper_choices(_fake_wrapper, handled={"x", "path", "save_z"})
    assert choices == {"act": ("relu", "none", "gelu"), "mode": (None, _Mode.A, _Mode.B), "in_place": (False, True)}
    combos = aot._combos(choices)
    assert len(combos) == 3 * 3 * 2 and combos[0] == {"act": "relu", "mode": None, "in_place": False}

    # the CI suite keeps CI_WRAPPER_VALUES of an argument, in the wrapper's order; "full" keeps every value
    assert aot._suite_values(choices, "full") == choices
    assert aot._suite_values(choices, "ci")["act"] == tuple(v for v in ("relu", "none", "gelu")
                                                           if v in aot.CI_WRAPPER_VALUES["act"])
    from wf_kernels.activation import ACTIVATIONS
    assert set(aot.CI_WRAPPER_VALUES["act"]) < set(ACTIVATIONS)
    with pytest.raises(aot.AOTUnavailable, match="does not take"):
        aot._suite_values({"act": ("none", "relu")}, "ci")  # "gelu" gone from a wrapper: the subset must follow

    def untyped(x, act="none"):
        pass
    with pytest.raises(aot.AOTUnavailable, match="'act'.*annotate it bool, typing.Literal"):
        aot.wrapper_choices(untyped, handled={"x"})

    def plain_str(x, act: str = "none"):
        pass
    with pytest.raises(aot.AOTUnavailable, match="'act'"):
        aot.wrapper_choices(plain_str, handled={"x"})


def test_every_launch_wrapper_argument_is_set_or_enumerable():
    """The project's own launch wrappers, as they are now: every argument the verification's cases leave to the
    wrapper can be enumerated (else the slow test below would fail with the same message, later)."""
    cases = aot._cases("ci")
    wrappers = {c["wrapper"]: c["handled"] for c in cases}
    assert len(wrappers) == 5
    for fn, handled in wrappers.items():
        aot.wrapper_choices(fn, handled)  # raises AOTUnavailable naming the argument


@pytest.mark.slow
def test_aot_compile_sm90_sm80(tmp_path):
    procs = {arch: aot.run_arch_subprocess(arch, "ci", tmp_path / f"{arch}.json") for arch in (90, 80)}
    csrc, csrc_skip = None, None
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc:
        csrc = aot.csrc_usage((90, 80), nvcc=nvcc)  # runs while the two Triton processes compile
    else:
        csrc_skip = "nvcc not found: the CUDA extension's kernels were not compiled"
    records = []
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=1800)  # ~3-5 min on 2 cores (the CI suite)
        assert proc.returncode == 0, f"AOT compile for sm_{arch} failed:\n{out[-6000:]}"
        records += json.loads((tmp_path / f"{arch}.json").read_text())
    for arch in (90, 80):
        kernels = {r["kernel"] for r in records if r["arch"] == arch}
        assert kernels == KERNELS, f"sm_{arch}: compiled {sorted(kernels)}, expected {sorted(KERNELS)}"
        dtypes = {r["dtype"] for r in records if r["arch"] == arch and r["kernel"] == "_wf_linear_fwd_kernel"}
        assert dtypes == set(aot.DTYPES)
        for kernel in ("_wf_linear_fwd_kernel", "_wf_conv2d_fwd_kernel"):  # WFNET_AUTOTUNE=0 runs it unpruned
            a0 = {r["dtype"] for r in records if r["arch"] == arch and r["kernel"] == kernel
                  and "autotune0" in r["roles"]}
            assert a0 == set(aot.DTYPES), f"sm_{arch} {kernel}: the WFNET_AUTOTUNE=0 config compiled for {a0}"
    bad = aot.violations(records)
    assert not bad, f"{len(bad)} kernel variants fail the static check:\n" + "\n".join(bad[:30])
    if csrc is not None:
        assert {r["arch"] for r in csrc} == {90, 80}
        spilling = [r for r in csrc if r["spill_stores"] or r["spill_loads"]]
        assert not spilling, f"CUDA extension kernels spill: {spilling}"
    if csrc_skip:
        pytest.skip(csrc_skip + " (the Triton kernels passed)")


@pytest.mark.slow
def test_aot_compile_with_the_gpu_machines_triton(tmp_path):
    """The GPU machine runs Triton 3.6 (engineering notes): what this machine's Triton compiles, 3.6 may not. It is
    pip-installed into a temporary folder and imported instead of the installed one, in the same subprocesses."""
    try:
        other = aot.install_triton(aot.GPU_MACHINE_TRITON, tmp_path / "triton")
    except RuntimeError as e:
        pytest.skip(str(e))
    procs = {arch: aot.run_arch_subprocess(arch, "ci", tmp_path / f"{arch}.json", triton_path=other)
             for arch in (90, 80)}
    records = []
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=1800)  # ~3-5 min on 2 cores (the CI suite)
        assert proc.returncode == 0, f"AOT compile with triton {aot.GPU_MACHINE_TRITON} for sm_{arch} failed:\n{out[-6000:]}"
        records += json.loads((tmp_path / f"{arch}.json").read_text())
    assert {r["triton"] for r in records} == {aot.GPU_MACHINE_TRITON}
    assert {r["kernel"] for r in records} == KERNELS
    bad = aot.violations(records)
    assert not bad, f"{len(bad)} kernel variants fail with triton {aot.GPU_MACHINE_TRITON}:\n" + "\n".join(bad[:30])


def test_spills_are_placed_in_or_outside_loops():
    """Local-memory accesses (register spills) inside a loop body (closed by a backward branch) run every iteration;
    the others once per program. A SASS without instructions is an error, never 'no spills'."""
    sass = """
        /*0280*/                   STL [R1], R9 ;
        /*0650*/                   FADD R21, R45, R21 ;
        /*0700*/                   LDL R38, [R1] ;
        /*17f0*/              @!P2 BRA 0x650 ;
        /*1800*/                   LDL.LU R5, [R1] ;
        /*1810*/                   EXIT ;
        /*1820*/                   BRA 0x1820;
    """
    assert aot.local_memory_in_loops(sass) == dict(in_loops=1, outside=2, loops=2)
    with pytest.raises(aot.AOTUnavailable, match="no instructions"):
        aot.local_memory_in_loops("nothing here")
