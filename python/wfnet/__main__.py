"""``python -m wfnet`` (and ``torchrun -m wfnet``) runs the command-line interface."""
import sys

from .cli import main

sys.exit(main())
