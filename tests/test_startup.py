"""Start-up: what a run imports beyond torch, lpips and Beam (each check in a fresh interpreter)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fresh(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_scoring_step_does_not_import_beams_model_manager_and_scipy():
    seen = _fresh(
        "import json, sys\n"
        "import lpips_pipe.pipeline.cli, lpips_pipe.transforms.beam.scoring\n"
        "base = sys.modules['apache_beam.ml.inference.base']\n"
        "print(json.dumps({'scipy': 'scipy.optimize' in sys.modules,\n"
        "                  'manager': 'apache_beam.ml.inference.model_manager' in sys.modules,\n"
        "                  'resource': getattr(base.resource, '__name__', None)}))\n")
    # Beam's load-time memory metric still has its ``resource`` module
    assert seen == {"scipy": False, "manager": False, "resource": "resource"}


def test_beams_model_manager_still_imports_afterwards():
    seen = _fresh(
        "import json, sys\n"
        "import lpips_pipe.transforms.beam.scoring\n"
        "from apache_beam.ml.inference.model_manager import ModelManager\n"
        "print(json.dumps({'name': ModelManager.__name__, 'scipy': 'scipy.optimize' in sys.modules}))\n")
    assert seen == {"name": "ModelManager", "scipy": True}


def test_the_console_entry_returns_mains_code_and_skips_the_last_collection():
    seen = _fresh(
        "import gc, json, sys\n"
        "from pipeline import cli\n"
        "sys.argv = ['lpips-pipe', '--help']\n"
        "code = cli.console_main()\n"
        "print(json.dumps({'code': code, 'frozen': gc.get_freeze_count() > 0}))\n")
    assert seen == {"code": 0, "frozen": True}
    entry = [line for line in (ROOT / "setup.py").read_text().splitlines() if '"lpips-pipe=' in line]
    assert entry and "pipeline.launch:console_main" in entry[0]  # --help at once, else cli.console_main


def test_help_imports_neither_beam_nor_torch_nor_numpy():
    """``lpips-pipe --help`` answers from the declarations alone (benchmarks/help_time.py times it)."""
    seen = _fresh(
        "import contextlib, io, json, sys\n"
        "from lpips_pipe.pipeline import launch\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    code = launch.console_main(['--help'])\n"
        "heavy = sorted(name for name in ('torch', 'apache_beam', 'numpy', 'PIL', 'pyarrow') if name in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy, 'exit130': '130' in out.getvalue(),\n"
        "                  'boxes': 'x1, y1, x2, y2' in out.getvalue()}))\n")
    assert seen == {"code": 0, "heavy": [], "exit130": True, "boxes": True}
