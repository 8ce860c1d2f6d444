"""The README's demo table is generated from the committed demo results (docs/results/demo_digits.json, collected
from a `wfnet demo` run by docs/results/demo_table.py): they cannot drift apart again (issue 25 item 6). Fast: reads
two text files."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("demo_table", ROOT / "docs" / "results" / "demo_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_demo_block_is_the_one_generated_from_the_committed_results():
    mod = _script()
    results = json.loads((ROOT / "docs" / "results" / "demo_digits.json").read_text())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert mod.readme_block(readme) == mod.render(results), \
        "README's demo table differs from docs/results/demo_digits.json: run python docs/results/demo_table.py --write"
    assert {r["method"] for r in results["rows"]} >= {"original", "wfnet"}


def test_render_shows_every_row_with_its_numbers():
    mod = _script()
    d = {"command": "wfnet demo", "date": "2026-12-05", "machine": "m", "insertion": 0.8123, "deletion": 0.0456,
         "rows": [{"method": "original", "acc_r": 99.5, "acc_f": 99.25, "zrf": 0.493, "rt": None, "seconds": 12.4},
                  {"method": "wfnet", "acc_r": 98.77, "acc_f": 0.0, "zrf": 0.744, "rt": "2.6 (0)", "seconds": 30}]}
    block = mod.render(d)
    assert "| original | 99.50 | 99.25 | 49.3 | - | 12 s training |" in block
    assert "| **WF-Net, one round** | 98.77 | 0.00 | 74.4 | 2.6 (0) | 30 s |" in block
    assert "insertion 0.812, deletion 0.046" in block
    with pytest.raises(ValueError, match="no demo block"):
        mod.readme_block("no markers here")
