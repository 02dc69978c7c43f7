"""The command line's flags agree with themselves: a flag that several subcommands take has
one name, one set of choices and one help; every option says its default."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re

import pytest

from galorax.app import cli
from galorax.app.config import (
    GALORE_CHOICES,
    GALORE_DEFAULTS,
    GALORE_FLAGS,
    GALORE_OFF,
    RunConfig,
    TrainConfig,
)
from galorax.app.flags import SHARED_OPTIONS, parse_bool
from galorax.app.optimizers import _galore_keywords
from galorax.options import OPTION, galore_options

# A switch (store_true...) is off unless given: it has no default to show.
_SWITCHES = (
    argparse._StoreTrueAction,
    argparse._StoreConstAction,
    argparse._HelpAction,
    argparse._VersionAction,
)
_DEFAULT = re.compile(r"\s*\(default: [^()]*(\([^()]*\)[^()]*)*\)$")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers, as ``galorax.app.cli`` builds them."""
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _meaning(action: argparse.Action) -> tuple[object, ...]:
    """What must agree between subcommands: choices, value type, help without its default."""
    choices = None if action.choices is None else tuple(action.choices)
    return choices, action.type, _DEFAULT.sub("", action.help or ""), type(action)


def test_shared_flags_have_the_same_choices_and_help():
    parsers = {name: _options(p) for name, p in _subparsers().items()}
    shared: set[str] = set()
    for (a, opts_a), (b, opts_b) in itertools.combinations(parsers.items(), 2):
        for flag in opts_a.keys() & opts_b.keys():
            shared.add(flag)
            assert _meaning(opts_a[flag]) == _meaning(opts_b[flag]), (flag, a, b)
    # The flags the issue found disagreeing are among those now checked.
    assert {"--preset", "--dtype", "--side", "--optimizer", "--projector-bits"} <= shared
    assert set(SHARED_OPTIONS) - {"--debug"} <= shared


@pytest.mark.parametrize("command", ["train", "compare", "memory"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = _subparsers()[command]
    for action in parser._actions:
        assert action.help, action.option_strings
        if not isinstance(action, _SWITCHES):
            assert "(default: " in action.help, action.option_strings
    text = parser.format_help()  # every %-escape in the helps is well formed
    assert "%(" not in text and "None" not in text


def test_defaults_are_rendered_per_subcommand():
    parsers = _subparsers()
    train, memory = parsers["train"].format_help(), parsers["memory"].format_help()
    flat = " ".join(train.split()), " ".join(memory.split())
    assert "(default: tiny)" in flat[0] and "(default: float32)" in flat[0]
    assert "(default: bfloat16)" in flat[1] and "(default: 32000)" in flat[1]
    assert "micro" in flat[1]  # memory --preset lists every preset too
    assert "optax-galore" in flat[1]


def test_data_help_names_the_c4_extra():
    data = _options(_subparsers()["train"])["--data"].help or ""
    assert 'pip install -e ".[c4]"' in data and "pip install datasets" not in data


@pytest.mark.parametrize("command", ["train", "memory"])
def test_dtype_short_names_are_accepted_everywhere(command):
    args = _subparsers()[command].parse_args(["--dtype", "bf16"])
    assert args.dtype == "bfloat16"


def test_galore_flags_are_the_library_declarations():
    """Each GaLore flag is a declared option of the library's (galorax.options.OPTIONS), with
    its choices (or true/false) and default: a new flag needs its name in GALORE_FLAGS, its
    help and its config fields."""
    for config in (TrainConfig, RunConfig):
        assert set(GALORE_FLAGS) <= {f.name for f in dataclasses.fields(config)}, config
    parsers = {name: _options(p) for name, p in _subparsers().items()}
    for name in GALORE_FLAGS:
        o, flag = OPTION[name], "--" + name.replace("_", "-")
        default = GALORE_OFF[name] if o.default is None else o.default
        assert GALORE_DEFAULTS[name] == default, name
        for command in ("train", "compare"):
            action = parsers[command][flag]
            if isinstance(default, bool):
                assert action.type is parse_bool, (command, flag)
            elif o.choices:
                assert tuple(action.choices) == o.choices, (command, flag)
            assert f"(default: {str(default).lower()}" in action.help or name in GALORE_OFF
    assert set(GALORE_OFF) <= set(GALORE_FLAGS)


def test_galore_flags_reach_the_library_as_declared():
    """A run's defaults are the library's; a flag set otherwise changes its option."""
    library = galore_options()
    assert galore_options(**_galore_keywords(GALORE_DEFAULTS, None, False)) == library
    for name, value in [("residual", "matrix"), ("adaptive", True), ("projector_bits", 8)]:
        given = _galore_keywords({**GALORE_DEFAULTS, name: value}, None, False)
        assert getattr(galore_options(**given), name) != getattr(library, name), name
    for name in GALORE_CHOICES.keys() - {"residual"}:
        other = next(c for c in GALORE_CHOICES[name] if c != GALORE_DEFAULTS[name])
        given = _galore_keywords({**GALORE_DEFAULTS, name: other}, None, False)
        assert getattr(galore_options(**given), name) != getattr(library, name), name
