"""lmlab.parse_errors: jsonargparse's multi-line errors (as jsonargparse words them) become one line.

The same message is named as flags for the verbs (``--model.config.n_layerz``) and as config keys for
``lmlab fit`` (``model.config.n_layerz``); the hints inside a ``class_path`` come from the class, at any depth.
"""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

from lmlab.parse_errors import config_error_from_parse

NESTED_TWICE = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lmlab.modules.PretrainModule':
        Parser key "settings":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'lmlab.modules.optim.TrainingSettings'>, <class 'NoneType'>]
          Errors:
            - Problem with given class_path 'lmlab.modules.TrainingSettings':
                unrecognized arguments: --optimizer.lrr=0.1
            - Expected a <class 'NoneType'>
          Given value type: <class 'jsonargparse._util.NestedArg'>
          Given value: NestedArg(key='optimizer.lrr', val='0.1')
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='settings.optimizer.lrr', val='0.1')"""

NESTED_OPTION = """Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.datamodule.LightningDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lmlab.data.PretrainDataModule':
        Option 'seq_lenn' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='seq_lenn', val='16')"""

UNION = """Parser key "world_size":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'int'>, <class 'NoneType'>]
  Errors:
    - Expected a <class 'int'>
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>
  Given value: x"""

LITERAL = """Parser key "engine.kind":
  Expected a typing.Literal['local', 'slurm']. Got value: slurn"""


def _toy(name: str, world_size: int = 1, max_steps: int = 1, max_epochs: int = 1) -> None:
    """A toy verb."""


@pytest.fixture(scope="module")
def parser():
    p = ArgumentParser(exit_on_error=False)
    p.add_function_arguments(_toy)
    return p


@pytest.mark.parametrize(
    "message, flags, field, problem, fix",
    [
        (NESTED_TWICE, True, "--model.settings.optimizer.lrr", "unknown option", "did you mean --model.settings.optimizer.lr?"),
        (NESTED_TWICE, False, "model.settings.optimizer.lrr", "unknown key", "did you mean model.settings.optimizer.lr?"),
        (NESTED_OPTION, True, "--data.seq_lenn", "unknown key", "did you mean --data.seq_len?"),
        (NESTED_OPTION, False, "data.seq_lenn", "unknown key", "did you mean data.seq_len?"),
        (UNION, True, "--world_size", "expected int, got 'x'", "give --world_size a value of type int"),
        (UNION, False, "world_size", "expected int, got 'x'", "give world_size a value of type int"),
        (LITERAL, True, "--engine.kind", "invalid choice: expected one of 'local', 'slurm', got slurn", "did you mean slurm?"),
        ("Parser key \"config\": File does not exist: 'no/such.yaml'", False, "--config", "no/such.yaml does not exist",
         "give an existing YAML file (--print_config writes one)"),
    ],
)
def test_one_line_in_both_styles(message, flags, field, problem, fix):
    err = config_error_from_parse(message, flags=flags, prog="lmlab fit")
    assert (err.field, err.problem, err.fix) == (field, problem, fix)


def test_unknown_flags_get_the_closest_key_of_the_parser(parser):
    err = config_error_from_parse("unrecognized arguments: --max_stepz=3", parser, flags=False, prog="lmlab fit")
    assert (err.field, err.problem, err.fix) == ("max_stepz", "unknown key", "did you mean max_steps?")
    err = config_error_from_parse("unrecognized arguments: --world_sise 8", parser, prog="lmlab toy")
    assert (err.field, err.problem, err.fix) == ("--world_sise", "unknown option", "did you mean --world_size?")
    err = config_error_from_parse("unrecognized arguments: --colour=red", parser, prog="lmlab toy")
    assert err.fix == "see `lmlab toy --help`"


def test_a_key_of_a_settings_file_is_named_as_written(parser):
    err = config_error_from_parse("Subcommand 'toy' does not accept option 'max_epoch'", parser, prog="lmlab toy")
    assert (err.field, err.problem, err.fix) == ("max_epoch", "unknown key", "did you mean max_epochs?")
