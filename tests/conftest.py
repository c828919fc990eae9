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
    from lpips_pipe.transforms.weights import ModelConfig, resolve_weights

    return resolve_weights(ModelConfig(net="alex"))


@pytest.fixture(scope="session")
def alex_scorer():
    from lpips_pipe.transforms.scorer import LpipsScorer
    from lpips_pipe.transforms.weights import ModelConfig

    return LpipsScorer(ModelConfig(net="alex", device="cpu"))


@pytest.fixture(scope="session")
def seed_alex(alex_weights):
    from tests.seed_reference import SeedLPIPSPipe

    return SeedLPIPSPipe(alex_weights.state_dict, net="alex")
