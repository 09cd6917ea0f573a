"""Issue 11, "keep the layers clean": nothing below the CLI imports ``hcdiag.cli``; library errors do not name
command-line flags (the CLI translates); the CLI parses and prints only.

A library message names a flag through :func:`hcdiag.errors.flag`, which marks both of its forms; ``str()`` of
an error or warning shows the library form (parameter names), the command line prints :func:`cli_text`
(its flags, byte for byte what it printed before the markers existed).
"""

from __future__ import annotations

import ast
import errno
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hcdiag.cli import main
from hcdiag.errors import HcdiagWarning, InputError, NumericalError, cli_text, flag, marked, render

PACKAGE = Path(__file__).resolve().parents[1] / "hcdiag"
# the command-line layer: it may name flags (its own) and import hcdiag.cli
CLI_LAYER = ("cli/", "pytest_plugin.py", "__main__.py")
# command-line code inside a library module, judged one by one: (module, function) -> why it may name flags
COMMAND_LINE_CODE = {
    ("artefacts.py", "script_main"): "the verification scripts' whole command line (verification/<name>.py): its "
                                     "argparse parser, and the option names it passes to _conventions for its "
                                     "messages; it prints library errors with cli_text",
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def _library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if not str(p.relative_to(PACKAGE)).startswith(CLI_LAYER))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (or other bare string statements)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _skipped(tree: ast.AST, module: str) -> set[int]:
    """ids of every node inside a ``flag(...)`` call or inside exempted command-line code."""
    out = set()
    for node in ast.walk(tree):
        inside_flag = isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "flag"
        exempt = isinstance(node, ast.FunctionDef) and (module, node.name) in COMMAND_LINE_CODE
        if inside_flag or exempt:
            out.update(id(n) for n in ast.walk(node))
    return out


def test_the_exemptions_name_real_code():
    for (module, function), why in COMMAND_LINE_CODE.items():
        tree = ast.parse((PACKAGE / module).read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == function for n in ast.walk(tree)), (module, function)
        assert why


def test_library_strings_name_no_flag_outside_flag_markers():
    """(a) No string literal of a library module (docstrings and comments aside) holds a ``--flag``, except
    inside ``flag(...)`` and the command-line code listed in COMMAND_LINE_CODE."""
    found = []
    for path in _library_modules():
        module = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _docstrings(tree) | _skipped(tree, module)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                    and FLAG.search(node.value)):
                found.append(f"hcdiag/{module}:{node.lineno}: {node.value!r}")
    assert not found, "library messages naming command-line flags (use hcdiag.errors.flag):\n" + "\n".join(found)


def test_the_scan_sees_flags_it_must_refuse():
    tree = ast.parse('def f(out):\n    """--out in a docstring"""\n    raise InputError(f"--out {out} exists; '
                     'pass {flag(\'--resume\', \'resume=True\')}")\n')
    skip = _docstrings(tree) | _skipped(tree, "x.py")
    hits = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in skip and FLAG.search(n.value)]
    assert hits == ["--out "]


def test_no_library_module_imports_the_cli():
    found = []
    for path in _library_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {n}" for n in names
                      if n == "hcdiag.cli" or n.startswith("hcdiag.cli.")]
    assert not found, found


def test_library_code_embeds_caught_errors_explicitly():
    """A library message embedding a caught exception says which form it wants: ``marked(exc)`` (its flags
    kept for whoever prints the new message) or ``str(exc)`` (the library's words, for records); a bare
    ``{exc}`` would silently drop the markers of an hcdiag error."""
    found = []
    for path in _library_modules():
        for handler in ast.walk(ast.parse(path.read_text())):
            if isinstance(handler, ast.ExceptHandler) and handler.name:
                found += [f"{path.relative_to(PACKAGE)}:{n.lineno}" for n in ast.walk(handler)
                          if isinstance(n, ast.FormattedValue) and isinstance(n.value, ast.Name)
                          and n.value.id == handler.name]
    assert not found, found


# ---------------------------------------------------------------------------------------------------
# the markers


def test_render_without_markers_is_the_identity():
    """(d)"""
    for text in ["", "plain", "--out x.pt exists; pass --resume", "a | b ⟫ c ⟪ d", "ünïcode ⟪ only an opening"]:
        assert render(text, cli=True) == text and render(text, cli=False) == text


def test_both_forms_of_a_marked_message():
    text = f"{flag('--out', 'out')} x.pt exists; pass {flag('--resume', 'resume=True')}{flag(' (see --help)', '')}."
    assert render(text, cli=True) == "--out x.pt exists; pass --resume (see --help)."
    assert render(text, cli=False) == "out x.pt exists; pass resume=True."
    exc = InputError(text)
    assert str(exc) == f"{exc}" == format(exc, "") == "out x.pt exists; pass resume=True."
    assert cli_text(exc) == "--out x.pt exists; pass --resume (see --help)."
    assert marked(exc) == text and cli_text(text) == cli_text(exc)
    assert str(NumericalError(text)) == "out x.pt exists; pass resume=True."
    assert marked(ValueError("--x")) == cli_text(ValueError("--x")) == "--x"  # not hcdiag's: as it is
    with pytest.raises(ValueError, match="marker"):
        flag("--out", "⟪out⟫")


def test_a_warning_shows_the_library_form_where_python_prints_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(f"{flag('--resume', 'resume')}: kept.", HcdiagWarning)
    (w,) = caught
    assert str(w.message) == "resume: kept." and cli_text(w.message) == "--resume: kept."
    shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, line="")  # f"{message}" inside
    assert "resume: kept." in shown and "⟪" not in shown and "--resume" not in shown


# ---------------------------------------------------------------------------------------------------
# (b) one message, both forms: the library call and the same command


def test_an_existing_out_in_the_library_and_on_the_command_line(tmp_path, capsys, seed):
    from hcdiag.train import Trainer, make_config

    x = np.random.default_rng(seed).normal(size=(60, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    with pytest.raises(InputError) as lib:
        Trainer(make_config(None, seed=seed, references=()), x, out).run()
    assert str(lib.value) == (f"out {out} already exists; pass resume=True to continue it, overwrite=True to "
                              "replace it, or choose another out.")
    cli = (f"--out {out} already exists; pass --resume to continue it, --overwrite to replace it, or choose "
           "another --out.")
    assert cli_text(lib.value) == cli
    assert main(["train", str(tmp_path / "x.npy"), "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == f"hcdiag train: error: {cli}\n"
    assert out.read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------------
# (c) a wrapped error keeps its markers through the message that embeds it


def test_a_full_disk_while_writing_keeps_the_markers_of_the_writer(tmp_path, monkeypatch):
    from hcdiag.runfile import example_run
    from hcdiag.train.writer import RunWriter

    def disk_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run.pt"
    writer = RunWriter(example_run(complete=False), out, None, None)
    writer.has_save = True
    with pytest.raises(InputError) as info:
        writer.write()
    lib, cli = str(info.value), cli_text(info.value)
    assert re.fullmatch(rf"{re.escape(str(out))}: could not write the run file \(No space left on device\); .*"
                        r"Training stopped before stage 'stage1'; once there is room, run it again with resume=True "
                        r"to continue from the last save\.", lib), lib
    assert cli == lib.replace("run it again with resume=True", "run the same command with --resume")
    assert not out.exists()


def test_a_wrapped_error_renders_its_inner_flags_both_ways(tmp_path, capsys):
    """load_run embeds the run's own refusal (``f"{where}: {marked(exc)}"``); its partial=True hint keeps the
    command line's words for the command line only."""
    from hcdiag.runfile import example_run, load_run, save_run

    path = save_run(example_run(complete=False), tmp_path / "run.pt")
    with pytest.raises(InputError) as info:
        load_run(path)
    head = f"{path}: status says the run is not complete (it stopped at stage 'stage1'); wait for training to finish, "
    assert str(info.value) == head + "or load it with partial=True to check a run still training."
    assert cli_text(info.value) == (head + "or load it with partial=True (on the command line: hcdiag check-barrier "
                                    "--partial) to check a run still training.")
    assert main(["check-barrier", str(path)]) == 2
    assert capsys.readouterr().err == f"hcdiag check-barrier: error: {cli_text(info.value)}\n"
    # and once more through another hcdiag message
    outer = InputError(f"while checking: {marked(info.value)}")
    assert str(outer) == f"while checking: {info.value}" and cli_text(outer) == f"while checking: {cli_text(info.value)}"
