"""Every command has help text, and the CLI starts without importing torch."""

import subprocess
import sys

import pytest

COMMANDS = ["encode", "decode", "roundtrip", "video", "info", "models"]


def test_top_level_help_lists_every_command(vae):
    result = vae("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(vae, name):
    result = vae(name, "--help")
    assert result.exit_code == 0
    assert "Usage: vae " + name in " ".join(result.stdout.split())
    from vaecli.cli import app

    command = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == name)
    assert command.callback.__doc__ and len(command.callback.__doc__.strip()) > 20


def test_no_arguments_shows_help(vae):
    result = vae()
    assert "Usage: vae" in result.stdout + result.stderr


def test_version(vae):
    from vaecli import __version__

    result = vae("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"vaecli {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["models"], ["encode", "--help"]])
def test_fast_start_does_not_import_torch(args):
    code = (f"import sys\nfrom vaecli.cli import app\ntry:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "vaecli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.startswith("vaecli ")
