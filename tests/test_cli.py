"""The command line as a whole: entry points, help, lazy imports, the error boundary."""

import os
import subprocess
import sys

from typer.testing import CliRunner

from sara_cli import __version__
from sara_cli.cli.app import app

COMMANDS = ("analyze", "train", "merge", "eval", "route-map", "chat")


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    for command in COMMANDS:
        assert CliRunner().invoke(app, [command, "--help"]).exit_code == 0


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_torch_or_transformers():
    code = ("import sys; sys.argv = ['sara', '--help']\n"
            "from sara_cli.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'matplotlib', 'lm_eval') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_python_dash_m_and_console_script_agree():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    module = subprocess.run([sys.executable, "-m", "sara_cli", "--version"], capture_output=True,
                            text=True, env=env)
    assert module.returncode == 0 and __version__ in module.stdout


def test_error_boundary_one_line_and_debug_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    missing = str(tmp_path / "nope")
    plain = subprocess.run([sys.executable, "-m", "sara_cli", "analyze", missing], capture_output=True,
                           text=True, env=env)
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and plain.stderr.startswith("error:")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "sara_cli", "analyze", missing, "--debug"],
                           capture_output=True, text=True, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "SaraError" in debug.stderr


def test_error_messages_are_text_not_markup(tmp_path):
    """A message with brackets (an extra's name, a path) is printed as written."""
    from conftest import one_line_error

    missing = tmp_path / "run[1]"
    line = one_line_error(CliRunner().invoke(app, ["merge", str(missing), "--out", str(tmp_path / "out")]))
    assert f"{missing} does not exist" in line
