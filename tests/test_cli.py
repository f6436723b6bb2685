"""The command line: every registered command resolves to a module with the contract."""

import importlib

import pytest

from services.cli import COMMANDS, build_parser, main


def test_parser_lists_every_command():
    parser = build_parser()
    help_text = parser.format_help()
    for path in COMMANDS:
        assert path[0] in help_text


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_command_module_has_contract(path):
    module = importlib.import_module(COMMANDS[path][0])
    assert callable(module.add_arguments) and callable(module.run)


def test_unknown_command_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code != 0
