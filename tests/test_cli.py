"""`instructglm <command>`: the command table, every command's help, and how user errors end."""

from __future__ import annotations

import importlib

import pytest

from instructglm.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {name}" in usage for name in COMMANDS)


def test_unknown_command_is_refused(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    assert module.ARGUMENTS and callable(module.main)
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert f"usage: instructglm {name}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "--model_name_or_path", "{tmp}/no-model", "--adapter", "{tmp}/no-adapter", "--output", "{tmp}/out"],
        ["predict", "--model_name_or_path", "{tmp}/no-model", "--input", "{tmp}/no.jsonl", "--output", "{tmp}/o.jsonl"],
        ["tokenize", "--jsonl_path", "{tmp}/no.jsonl", "--save_path", "{tmp}/ds", "--model_name_or_path", "{tmp}/no-model"],
        ["convert", "--data_path", "{tmp}/no.json", "--save_path", "{tmp}/o.jsonl"],
    ],
    ids=lambda argv: argv[0],
)
def test_user_errors_end_in_one_line_not_a_traceback(argv, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"instructglm {argv[0]}: error: ") and "Traceback" not in err
    assert str(tmp_path) in err  # the message names the path that is wrong


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "--bogus", "1"],
        ["serve", "--trust_remote_code", "true"],
        ["web", "--bogus=1"],
        ["predict", "--input", "i.jsonl", "--output", "o.jsonl", "--bogus", "1"],
        ["merge", "--adapter", "a", "--output", "o", "--trust_remote_code", "true"],
        ["eval", "--model_name_or_path", "m", "--data", "d", "--output_dir", "o", "--bogus", "1"],
        ["train", "--dataset_path", "d", "--output_dir", "o", "--bogus", "1"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_unknown_flag_is_one_line_naming_it(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    flag = next(a for a in argv if a.startswith(("--bogus", "--trust"))).split("=")[0]
    assert err.startswith(f"instructglm {argv[0]}: error: unknown flag(s) {flag}") and err.count("\n") == 1
