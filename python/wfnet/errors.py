"""The error the user can act on, with no heavy import (the CLI catches it before torch is loaded).

:class:`RunError`: a bad option, a missing or different run, a stage that cannot run; the CLI prints its message on
one line (``wfnet: error: ...``) with exit status 2. A damaged file is :class:`wfnet.files.CorruptFileError`.
"""
from __future__ import annotations

__all__ = ["RunError"]


class RunError(Exception):
    """A failure the user can act on (a bad option, a missing or different run): the CLI prints it on one line."""
