"""Shared fixtures: the validation images (../shared/validation), real weights, demo pairs."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.seed_reference, pipeline, transforms without an install

VALIDATION = ROOT.parent / "shared" / "validation"

from tests.s3_server import s3_server  # noqa: E402,F401  # the session's S3 server (versitygw), for tests/test_s3.py


@pytest.fixture(scope="session")
def validation_dir() -> pathlib.Path:
    if not VALIDATION.is_dir():
        pytest.fail(f"validation images not found at {VALIDATION} (shared/ must sit beside the repository)")
    return VALIDATION


@pytest.fixture(scope="session")
def alex_weights():
    from lpips_pipe.transforms.model.weights import ModelConfig, resolve_weights

    return resolve_weights(ModelConfig(net="alex"))


@pytest.fixture(scope="session")
def alex_scorer():
    from lpips_pipe.transforms.model.scorer import LpipsScorer
    from lpips_pipe.transforms.model.weights import ModelConfig

    return LpipsScorer(ModelConfig(net="alex", device="cpu"))


@pytest.fixture(scope="session")
def seed_alex(alex_weights):
    from tests.seed_reference import SeedLPIPSPipe

    return SeedLPIPSPipe(alex_weights.state_dict, net="alex")


# The fast tier, `bash scripts/test.sh -m "not slow"` (README, "Tests"): these modules cover the score math,
# records and boxes, the option declarations, the output contract (layout, schemas, sink, ledger), inputs and the
# rules, in well under 3 minutes on 2 cores. Every other module (whole Beam jobs, the command lines in fresh
# processes, runners, S3, the browser) is marked `slow` here, and so is any new module until it is listed; a test
# in a fast module that is slow itself carries @pytest.mark.slow. CI (`.ci/run`) runs everything.
FAST_MODULES = frozenset({
    "test_score_math", "test_records", "test_coords", "test_decode", "test_settings", "test_options_page",
    "test_layout", "test_sink", "test_ledger", "test_messages", "test_cache", "test_uri_io", "test_webdataset",
    "test_input_files", "test_calibration", "test_filtering",
})


# How the suite runs in several processes (scripts/test.sh: pytest-xdist, `-n 3 --dist loadscope
# --no-loadscope-reorder`). Most of its time is runners starting and streams waiting, which overlap well even on 2
# cores, but the CPU is the bound: a module's fixtures (module scope: jobs run once for all its tests) would run
# again in every process that takes one of its tests, so each module is one unit of work (ModuleUnits below),
# except the modules in SPREAD, whose tests are each long and whose fixtures are cheap: their tests are handed out
# one by one. Units are handed out in this order: HEAVY_FIRST (longest first), then the others, the fast tier
# last, so that the long ones overlap with the many short ones instead of ending the run alone.
HEAVY_FIRST = ("test_restart", "test_flink_cli", "test_s3", "test_faults", "test_streaming_cli", "test_shards_cli",
               "test_runners", "test_determinism", "test_reuse", "test_pipeline", "test_user_trips", "test_box_health",
               "test_filter_cli", "test_packaging")
SPREAD = frozenset({"test_restart", "test_s3", "test_faults", "test_streaming_cli"})


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist; without it (`-p no:xdist`) nothing asks for it
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope``: one unit of work per module, one per test in the SPREAD modules (pytest-xdist's
    ``xdist_group`` marks do not reach its scheduler with pytest 9's node ids)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if pathlib.PurePath(module).stem in SPREAD else module

    return ModuleUnits(config, log)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    def module(item) -> str:
        return item.module.__name__.rpartition(".")[2]

    def order(item) -> int:
        name = module(item)
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST) + (name in FAST_MODULES)

    for item in items:
        if module(item) not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)
    items.sort(key=order)  # stable: within a module, the file's order
