"""Write the GPU check's verdict per fused backend into wf_kernels/verification.json (merged, per device name).

Inputs: the JUnit XML of the GPU test run (``pytest --junitxml``) and the compute-sanitizer memcheck log of
``bench/memcheck_ops.py`` per backend. Rule:

* ``triton`` is verified on this device when every test of tests/test_triton_*.py and tests/test_compile.py that ran
  passed (no failure, no error, at least one passed; skips are listed, not counted against it) and the triton
  memcheck log is clean;
* ``cuda`` likewise with tests/test_cuda_ext.py and the cuda memcheck log.

A memcheck log is clean when compute-sanitizer printed ``ERROR SUMMARY: 0 errors``, memcheck_ops.py printed its
completion line for that backend, and the exit status gpu_check.sh appended (``gpu_check: rc=N``) is 0 when present.

    python bench/record_verification.py --junit OUT/pytest_gpu.xml \
        --memcheck triton=OUT/memcheck_triton.log --memcheck cuda=OUT/memcheck_cuda.log --copy-to OUT

The entry format is described in wf_kernels/verification.py (whose ``is_verified`` reads it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "wf_kernels" / "verification.json"

# backend -> predicate on the test module name (test_triton_linear, ...)
BACKEND_TESTS = {
    "triton": lambda mod: mod.startswith("test_triton_") or mod == "test_compile",
    "cuda": lambda mod: mod == "test_cuda_ext",
}
BACKEND_TEST_FILES = {"triton": "tests/test_triton_*.py, tests/test_compile.py", "cuda": "tests/test_cuda_ext.py"}
COMPLETION = "memcheck_ops: completed backend={backend}"


def _module_of(case: ET.Element) -> str:
    """The test module (``test_xxx``) of a JUnit testcase: from classname ("tests.test_xxx[.Class]"), else from the
    file attribute, else from the name (collection errors have an empty classname and the module as name)."""
    for text in (case.get("classname") or "", case.get("file") or "", case.get("name") or ""):
        for part in re.split(r"[./\\]", text):
            if part.startswith("test_"):
                return part[:-3] if part.endswith(".py") else part
    return ""


def parse_junit(path: str | Path) -> list[dict]:
    """Every testcase of a pytest JUnit XML as {"module", "name", "outcome" (passed/failed/skipped), "message"}."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or child.text or child.tag)
                break
            if child.tag == "skipped":
                outcome, message = "skipped", (child.get("message") or "")
        name = case.get("name") or ""
        cls = case.get("classname") or ""
        cases.append({"module": _module_of(case), "name": f"{cls}::{name}" if cls else name, "outcome": outcome,
                      "message": message.strip().splitlines()[0][:300] if message.strip() else ""})
    return cases


def memcheck_status(log: str | Path | None, backend: str) -> dict:
    """{"clean": bool, "errors": int | None, "completed": bool, "rc": int | None, "reason": str}."""
    if log is None:
        return {"clean": False, "errors": None, "completed": False, "rc": None, "reason": "no memcheck log given"}
    p = Path(log)
    if not p.exists():
        return {"clean": False, "errors": None, "completed": False, "rc": None,
                "reason": f"memcheck log {p.name} missing (stage did not run)"}
    text = p.read_text(errors="replace")
    m = re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", text)
    errors = int(m[-1]) if m else None
    completed = COMPLETION.format(backend=backend) in text
    rcs = re.findall(r"gpu_check: rc=(-?\d+)", text)
    rc = int(rcs[-1]) if rcs else None
    reasons = []
    if errors is None:
        reasons.append("no compute-sanitizer ERROR SUMMARY in the log (sanitizer missing, or cut off)")
    elif errors:
        reasons.append(f"compute-sanitizer memcheck reported {errors} error(s)")
    if not completed:
        reasons.append("memcheck_ops.py did not complete")
    if rc not in (None, 0):
        reasons.append(f"memcheck run exited with status {rc}" + (" (timeout)" if rc in (124, 137) else ""))
    return {"clean": not reasons, "errors": errors, "completed": completed, "rc": rc, "reason": "; ".join(reasons)}


def backend_entry(backend: str, cases: list[dict] | None, memcheck: dict, versions: dict, junit_reason: str = "") -> dict:
    mine = [c for c in (cases or []) if BACKEND_TESTS[backend](c["module"])]
    counts = {k: sum(c["outcome"] == k for c in mine) for k in ("passed", "failed", "skipped")}
    failures = [f"{c['name']}: {c['message']}" for c in mine if c["outcome"] == "failed"]
    skipped = sorted({c["message"] or "(no reason)" for c in mine if c["outcome"] == "skipped"})
    reasons = []
    if cases is None:
        reasons.append(junit_reason or "no JUnit XML")
    elif not mine:
        reasons.append(f"no test of {BACKEND_TEST_FILES[backend]} in the JUnit XML")
    if counts["failed"]:
        reasons.append(f"{counts['failed']} test(s) of {BACKEND_TEST_FILES[backend]} failed")
    elif cases is not None and mine and not counts["passed"]:
        reasons.append(f"no test of {BACKEND_TEST_FILES[backend]} passed (all skipped)")
    if not memcheck["clean"]:
        reasons.append(memcheck["reason"])
    return {"verified": not reasons, **versions, "tests": counts, "failures": failures[:50],
            "skipped_reasons": skipped[:20], "memcheck": memcheck, "reasons": reasons}


def _versions(args) -> dict:
    out = {"date": args.date or datetime.datetime.now().isoformat(timespec="seconds")}
    for key in ("torch", "triton", "cuda"):
        out[key] = getattr(args, key)
    try:
        import torch

        out["torch"] = out["torch"] or torch.__version__
        out["cuda"] = out["cuda"] or torch.version.cuda
    except ImportError:
        pass
    try:
        import triton

        out["triton"] = out["triton"] or triton.__version__
    except ImportError:
        pass
    return out


def _device_name(arg: str | None) -> str:
    if arg:
        return arg
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("record_verification: no CUDA device here; pass --device-name (verification is per GPU)")
    return torch.cuda.get_device_name()


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--junit", help="JUnit XML of the GPU test run")
    ap.add_argument("--memcheck", action="append", default=[], metavar="BACKEND=LOG",
                    help="compute-sanitizer log of memcheck_ops.py for BACKEND (triton / cuda); repeatable")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="verification file to merge into (default %(default)s)")
    ap.add_argument("--copy-to", help="also copy the merged file into this folder")
    ap.add_argument("--device-name", help="default: torch.cuda.get_device_name()")
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--torch", help="override the recorded torch version")
    ap.add_argument("--triton", help="override the recorded triton version")
    ap.add_argument("--cuda", help="override the recorded CUDA version")
    ap.add_argument("--date", help="override the recorded date")
    args = ap.parse_args(argv)

    logs = {}
    for item in args.memcheck:
        backend, _, log = item.partition("=")
        if backend not in BACKEND_TESTS or not log:
            ap.error(f"--memcheck wants BACKEND=LOG with BACKEND in {sorted(BACKEND_TESTS)}, got {item!r}")
        logs[backend] = log
    cases, junit_reason = None, ""
    if args.junit and Path(args.junit).exists():
        try:
            cases = parse_junit(args.junit)
        except ET.ParseError as exc:
            junit_reason = f"JUnit XML unreadable (test stage cut off?): {exc}"
    else:
        junit_reason = f"JUnit XML {args.junit!r} missing (test stage did not run)"
    device = _device_name(args.device_name)
    versions = _versions(args)
    out = Path(args.out)
    try:
        record = json.loads(out.read_text()) if out.exists() else {}
    except json.JSONDecodeError:
        record = {}
    entry = record.setdefault(device, {})
    for backend in [b for b in args.backends.split(",") if b]:
        entry[backend] = backend_entry(backend, cases, memcheck_status(logs.get(backend), backend), versions,
                                       junit_reason)
        e = entry[backend]
        print(f"{device} / {backend}: verified={e['verified']} tests={e['tests']}"
              + (f" reasons: {'; '.join(e['reasons'])}" if e["reasons"] else ""))
    write_atomic(out, record)
    print(f"written: {out}")
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(args.copy_to) / out.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
