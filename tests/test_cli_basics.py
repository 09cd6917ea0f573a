import subprocess
import sys

from hcdiag.cli import main


def test_help_lists_commands_and_does_not_import_torch():
    code = "import sys; from hcdiag.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_command_exits_2(capsys):
    assert main([]) == 2


def test_unknown_option_is_one_line_exit_2(capsys):
    try:
        main(["--no-such-option"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments" in err[0]
