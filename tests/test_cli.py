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


@pytest.mark.parametrize("argv, shown", [([], "up"), (["models"], "synth"), (["bench"], "coldstart")])
def test_an_incomplete_command_prints_its_group_help(argv, shown, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert shown in err and "usage: c2cserve" in err
    assert "command_" not in err  # never argparse's internal dest name


def test_up_has_a_timeout_flag():
    import argparse

    from services import launcher

    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    assert parser.parse_args(["--timeout", "42"]).timeout == 42


def test_up_banner_names_the_api_key_variable_never_the_key():
    from services.launcher import banner

    with_key = "\n".join(banner("http://127.0.0.1:8000", ["m"], 1, "host", has_api_key=True))
    assert '-H "Authorization: Bearer $C2C_API_KEY"' in with_key  # double quotes: the shell expands it
    without = "\n".join(banner("http://127.0.0.1:8000", ["m"], 1, "host", has_api_key=False))
    assert "Authorization" not in without and '"model": "m"' in without
