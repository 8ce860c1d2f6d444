"""Every random stream of the experiment stages comes from :func:`derive_seed`: one home for seeds.

A stream is named by the user's seed and a tuple of keys that say what it is for and where it is, e.g.
``derive_seed(cfg.seed, "untrain-rows", epoch, step)`` or ``derive_seed(cfg.seed, "random-labels", c)``. The keys are
hashed (BLAKE2b over their ``repr``), so two streams with different keys are independent for every seed, which
arithmetic combinations such as ``seed * 1000 + c`` are not (seed 1 class 0 and seed 0 class 1000 collide, and
``seed + epoch`` makes seed 0 epoch 1 the same stream as seed 1 epoch 0). Streams that are functions of (seed, epoch,
step) also make every stage resumable to the same result.

Imports nothing heavy.
"""
from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]

_KEY_TYPES = (int, str)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream named by ``keys`` under the user's ``seed`` (deterministic across processes,
    machines and Python versions: no ``hash()``)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, _KEY_TYPES):
            raise TypeError(f"seed keys must be ints or strings, got {k!r}")
    text = repr((int(seed), *[k if isinstance(k, str) else int(k) for k in keys])).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)
