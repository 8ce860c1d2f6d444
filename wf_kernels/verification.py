"""Which devices the fused backends have been verified on: the reader of ``verification.json`` (next to this file).

The GPU check (``bench/gpu_check.sh`` -> ``bench/record_verification.py``) writes one entry per device name
(``torch.cuda.get_device_name()``) and fused backend::

    {"NVIDIA H100 80GB HBM3": {
        "triton": {"verified": true, "date": "...", "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0",
                   "tests": {"passed": 412, "failed": 0, "skipped": 6}, "failures": [],
                   "memcheck": {"clean": true, "errors": 0, ...}, "reasons": []},
        "cuda": {...}}}

A backend is verified on a device when the GPU tests of that backend all passed there and compute-sanitizer's
memcheck of it was clean (see ``bench/record_verification.py`` for the exact rule). ``"auto"`` uses this to send CUDA
tensors to the fused kernels only where they were verified.

No torch import: this module reads a small JSON file. Read it ONCE (e.g. at import of the backend registry) and pass
the dict around with ``table=``: dispatch runs inside ``torch.compile`` traces, where file access must not happen.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["VERIFICATION_PATH", "load_verification", "is_verified", "verification_status"]

VERIFICATION_PATH = Path(__file__).with_name("verification.json")


def load_verification(path: str | Path | None = None) -> dict:
    """The verification record (device name -> backend -> entry); {} when the file is missing or unreadable."""
    p = Path(path) if path is not None else VERIFICATION_PATH
    try:
        with open(p) as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def verification_status(device_name: str, backend: str, table: dict | None = None,
                        path: str | Path | None = None) -> tuple[bool, str]:
    """``(verified, reason)`` for ``backend`` ("triton" / "cuda") on the device called ``device_name``.

    The reason is one line meant for users ("verified on NVIDIA H100 80GB HBM3 on 2026-11-25 (torch 2.11.0, ...)" or
    why not). ``table`` is a dict from :func:`load_verification`; without it the file is read now.
    """
    table = load_verification(path) if table is None else table
    dev = table.get(device_name)
    if not isinstance(dev, dict):
        known = ", ".join(sorted(table)) or "none"
        return False, f"no GPU check recorded for {device_name!r} (verified devices: {known})"
    entry = dev.get(backend)
    if not isinstance(entry, dict):
        return False, f"the GPU check on {device_name!r} recorded nothing for backend {backend!r}"
    versions = ", ".join(f"{k} {entry.get(k)}" for k in ("torch", "triton", "cuda") if entry.get(k))
    when = f"on {entry.get('date', '?')}" + (f" ({versions})" if versions else "")
    if entry.get("verified") is True:
        return True, f"verified on {device_name} {when}"
    why = "; ".join(entry.get("reasons") or []) or "tests or memcheck did not pass"
    return False, f"not verified on {device_name} {when}: {why}"


def is_verified(device_name: str, backend: str, table: dict | None = None, path: str | Path | None = None) -> bool:
    """Whether the GPU check recorded a passing verification of ``backend`` on ``device_name``."""
    return verification_status(device_name, backend, table, path)[0]
