"""The documents cannot drift from the code: every `python X.py ...` and `torchrun ... X.py ...` command in a fenced
code block of README.md and docs/*.md is parsed by that script's own argparse parser (its main() is stopped right
after parsing, so nothing runs), and the commands inline in the text name scripts that exist."""
import argparse
import importlib
import re
import shlex
import sys

import pytest

from conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_commands():
    """(document, line number, script, arguments) of every command in a fenced block that runs a script of ours."""
    found = []
    for path in DOCUMENTS:
        lines, fenced, k = path.read_text().splitlines(), False, 0
        while k < len(lines):
            start, line = k, lines[k]
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced and line.split()[:1] in (["python"], ["torchrun"]):
                while line.rstrip().endswith("\\") and k + 1 < len(lines):  # continuation lines
                    k += 1
                    line = line.rstrip()[:-1] + " " + lines[k]
                words = shlex.split(line, comments=True)
                script = next(w for w in words if w.endswith(".py"))
                found.append((path.relative_to(ROOT), start + 1, script, words[words.index(script) + 1:]))
            k += 1
    return found


COMMANDS = fenced_commands()


class Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once a command line has parsed."""


def test_the_documents_hold_commands_of_every_script():  # the extraction itself: a test that cannot find none
    scripts = {script for *_, script, _ in COMMANDS}
    assert {"download.py", "dataset.py", "train_genie.py", "train_vae.py", "train_lam.py", "train_dit.py",
            "generate.py", "play.py", "evaluate.py", "bench.py"} <= scripts, scripts
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("document, line, script, arguments", COMMANDS,
                         ids=[f"{d}:{n}" for d, n, *_ in COMMANDS])
def test_a_documented_command_parses(document, line, script, arguments, monkeypatch):
    assert (ROOT / script).is_file(), f"{document}:{line}: no {script}"
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    module = importlib.import_module(script[:-3])
    try:
        module.main()
    except SystemExit as e:  # argparse's error: it printed the reason to stderr
        pytest.fail(f"{document}:{line}: `{script} {shlex.join(arguments)}` does not parse (exit {e.code})")
    except Parsed:
        return
    pytest.fail(f"{document}:{line}: {script}'s main() never parsed its arguments")


def test_inline_commands_name_existing_scripts():
    for path in DOCUMENTS:
        for script in re.findall(r"`(?:python|torchrun[^`]*?) ([\w/]+\.py)", path.read_text()):
            assert (ROOT / script).is_file(), f"{path.name}: `{script}` does not exist"


def test_a_command_that_no_longer_parses_is_caught(monkeypatch):  # the check above could not fail otherwise
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        test_a_documented_command_parses("README.md", 0, "train_dit.py", ["DATA", "--no_such_flag"], monkeypatch)
