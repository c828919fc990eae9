"""transforms.settings: an option declared once feeds the command line, the checks and ScoreLPIPS's keywords."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Optional

import pytest

from lpips_pipe.pipeline.flags import CONFIGS
from lpips_pipe.pipeline.options import LpipsPipeOptions, config_of, parse_options
from lpips_pipe.transforms import settings
from lpips_pipe.transforms.model.masked import masked_lpips
from lpips_pipe.transforms.records.pairs import RecordConfig
from lpips_pipe.transforms.beam.scoring import ScoringConfig
from lpips_pipe.transforms.beam.stage import ScoreLPIPS
from lpips_pipe.transforms.model.weights import ModelConfig


@dataclass(frozen=True)
class _Example:
    """A config made only for this test: one option of each kind."""

    size: int = settings.option(3, "A size.", settings.count(1))
    mode: str = settings.option("a", "A mode.", settings.one_of(("a", "b")))
    name: Optional[str] = settings.option(None, "A name.")
    on: bool = settings.option(False, "A switch.", settings.switch())
    wait: float = settings.option(0.5, "Seconds.", settings.seconds())
    threads: Optional[int] = settings.option(None, "Threads.", settings.auto_or_count(0), metavar="N|auto")
    hidden: int = settings.option(7, "Python only.", settings.count(0), cli=False)

    def __post_init__(self) -> None:
        settings.check(self)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="example", exit_on_error=False)
    settings.add_arguments(parser, _Example)
    return parser.parse_args(argv)


def test_one_declaration_makes_the_flags_their_parsing_and_the_config():
    parsed = _parse(["--size", "5", "--mode", "b", "--name", "x", "--on", "--wait", "2", "--threads", "auto"])
    config = settings.from_values(_Example, parsed)
    assert config == _Example(size=5, mode="b", name="x", on=True, wait=2.0, threads=None)
    assert settings.from_values(_Example, _parse([])) == _Example()  # the defaults are the declaration's
    assert not hasattr(_parse([]), "hidden")  # a Python-only option has no flag


@pytest.mark.parametrize("argv, words", [
    (["--size", "0"], "must be a whole number >= 1"), (["--size", "x"], "must be a whole number"),
    (["--wait", "inf"], "finite number >= 0"), (["--threads", "-1"], "auto or a whole number"),
])
def test_the_command_line_and_python_give_one_message(argv, words):
    with pytest.raises(argparse.ArgumentError, match=words):
        _parse(argv)
    name, text = argv[0][2:], argv[1]
    rule = {field.name: field.metadata["rule"] for field in settings.options_of(_Example)}[name]
    try:
        value = rule.parse(text)
    except ValueError:
        value = text
    with pytest.raises(ValueError, match=f"{name} .*{words}"):
        _Example(**{name: value})


def test_choices_are_argparses_own_and_checked_in_python():
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'c'"):
        _parse(["--mode", "c"])
    with pytest.raises(ValueError, match="mode must be one of"):
        _Example(mode="c")


def test_parameters_and_binding_act_like_a_function_signature():
    signature = inspect.Signature(settings.parameters([_Example], positional=("mode", "size")))
    assert list(signature.parameters)[:2] == ["mode", "size"]
    assert signature.parameters["hidden"].kind == inspect.Parameter.KEYWORD_ONLY
    assert settings.bind(signature, ["b"], {"on": True})["mode"] == "b"
    with pytest.raises(TypeError):
        settings.bind(signature, [], {"nope": 1})
    with pytest.raises(TypeError):
        settings.bind(signature, ["b", 2, 3], {})


def test_score_lpips_keywords_are_the_configs_options_with_their_defaults():
    """A public promise: the five positional options first, in order, then every record, model and scoring
    option as a keyword with the declaration's default; unknown keywords are a TypeError."""
    parameters = inspect.signature(ScoreLPIPS).parameters
    assert list(parameters)[:5] == ["scope", "net", "max_side", "precision", "device"]
    declared = {field.name: field.default for config in (RecordConfig, ModelConfig, ScoringConfig)
                for field in settings.options_of(config)}
    assert {name: parameters[name].default for name in declared} == declared
    score = ScoreLPIPS("full", "alex", 64, check=False, coords_scale="qwen1000", batch_pixels=4096)
    assert (score.record_config.scope, score.record_config.max_side, score.record_config.coords_scale) == \
        ("full", 64, "qwen1000")
    assert score.scoring_config.batch_pixels == 4096 and score.workers.batch_pixels == 4096
    with pytest.raises(TypeError):
        ScoreLPIPS(no_such_option=1, check=False)
    with pytest.raises(ValueError, match="max_side must be a whole number >= 0"):
        ScoreLPIPS(max_side=-1, check=False)
    assert list(inspect.signature(masked_lpips).parameters)[:6] == ["ref", "edited", "coords", "scope", "net",
                                                                     "max_side"]


def test_the_command_line_has_every_declared_option_and_reads_it_back():
    options = parse_options(["--input", "x", "--output", "y", "--max_side", "64", "--reference_cache_mb", "0",
                             "--decode_threads", "auto", "--report_k", "3"]).view_as(LpipsPipeOptions)
    for config in CONFIGS:
        built = config_of(config, options)
        for field in settings.options_of(config):
            if field.metadata["cli"]:
                assert hasattr(options, field.name), field.name
        assert dataclasses.is_dataclass(built)
    assert config_of(RecordConfig, options).max_side == 64
    assert config_of(ScoringConfig, options).reference_cache_mb == 0
    assert config_of(ScoringConfig, options).decode_threads is None
