"""`mrrm <command> --help` (issue 31 item 2): one program name in every usage line, a help line with its
default for every flag, epilogs that are whole sentences. Built from each command's build_parser(), no
subprocess.

The rule for a flag (an optional action other than -h):
  * it has a non-empty help line;
  * a flag that takes a value shows its default: its help contains "default" (argparse's "(default: X)",
    or a sentence saying what the default is or what leaving it out means);
  * a required flag has no default to show: its help says what to give;
  * an on/off switch (store_true, store_const: off unless given) says what it turns on; a
    --x/--no-x pair (BooleanOptionalAction, either may be the default) shows its default.
"""
import argparse
import dataclasses
import importlib

import pytest

from mrrm import cli


def _parser(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(cli.COMMANDS[command]).build_parser()


def help_problems(parser: argparse.ArgumentParser) -> list[str]:
    """Every breach of the module doc's rule, one line each."""
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = action.help or ""
        if not text.strip() or text == argparse.SUPPRESS:
            problems.append(f"{name}: no help line")
        elif isinstance(action, argparse.BooleanOptionalAction) or (action.nargs != 0 and not action.required):
            if "default" not in text.lower():
                problems.append(f"{name}: the help does not show the default: {text!r}")
    return problems


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_flag_has_a_help_line_with_its_default(command):
    parser = _parser(command)
    assert parser.prog == f"mrrm {command}"
    assert help_problems(parser) == []
    text = parser.format_help()  # renders: no stray % in a help line
    assert text.startswith(f"usage: mrrm {command} ")
    assert "python -m" not in text.split("\n\n", 1)[0]  # one program name in the usage line
    if parser.epilog:
        assert parser.epilog[0].isupper(), parser.epilog[:60]
        assert parser.epilog.rstrip()[-1] in ".)", parser.epilog[-60:]


def test_the_rule_catches_a_flag_without_its_default():
    ap = argparse.ArgumentParser(prog="mrrm x")
    ap.add_argument("--size", type=int, default=3, help="how big")
    ap.add_argument("--name", required=True, help="who")
    ap.add_argument("--fast", action="store_true", help="go fast")
    ap.add_argument("--loud", action=argparse.BooleanOptionalAction, default=None, help="shout")
    ap.add_argument("--quiet", action="store_true")
    assert help_problems(ap) == ["--size: the help does not show the default: 'how big'",
                                 "--loud/--no-loud: the help does not show the default: 'shout'",
                                 "--quiet: no help line"]


def test_every_train_config_field_has_its_own_help_line():
    """`mrrm train`'s flags are generated from TrainConfig; a field added without a line in recipe.HELP
    would show only its bare default."""
    from mrrm.train import recipe

    fields = {f.name for f in dataclasses.fields(recipe.TrainConfig)}
    assert sorted(fields - set(recipe.HELP)) == []
    assert sorted(set(recipe.HELP) - fields) == []
    lr = next(a for a in recipe.build_parser()._actions if a.dest == "lr")
    assert "default: 1e-4 with LoRA on a base model, 7e-4 from scratch" in lr.help


def test_the_same_usage_line_under_both_names(capsys):
    """`mrrm score --help` and `python -m mrrm.score --help` (the module's own main) print one usage line."""
    from mrrm.cli import score_file

    for run in (lambda: cli.main(["score", "--help"]), lambda: score_file.main(["--help"])):
        with pytest.raises(SystemExit) as e:
            run()
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith("usage: mrrm score ")
