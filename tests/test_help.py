"""Every command has help text, and the CLI starts without importing torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["encode", "decode", "roundtrip", "video", "info", "models", "weights", "compare"]


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

    commands = [c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == name]
    groups = [g.typer_instance for g in app.registered_groups if (g.name or g.typer_instance.info.name) == name]
    callbacks = commands or [c.callback for g in groups for c in g.registered_commands]
    assert callbacks, f"{name} is not registered"
    for callback in callbacks:  # a group (`vae weights`): each of its subcommands
        assert callback.__doc__ and len(callback.__doc__.strip()) > 20


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


def _huge_pages_after_cli(env_value: str | None) -> tuple[str, int]:
    """Run the CLI entry point (`vae models`) in a fresh process, then allocate 64 MB with torch; returns the
    THP_MEM_ALLOC_ENABLE value the process saw and its AnonHugePages in kB."""
    code = ("import os, sys\nfrom vaecli.cli import run\nsys.argv = ['vae', 'models']\ntry:\n    run()\n"
            "except SystemExit:\n    pass\nimport torch\nx = torch.ones(16 << 20)\n"
            "kb = next(int(line.split()[1]) for line in open('/proc/self/smaps_rollup') "
            "if line.startswith('AnonHugePages'))\nprint(os.environ['THP_MEM_ALLOC_ENABLE'], kb)\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    value, kb = proc.stdout.split()[-2:]
    return value, int(kb)


def test_cli_backs_large_tensors_with_huge_pages():
    """The entry point asks torch for transparent huge pages before torch's first allocation (fewer page faults
    on large activations); where the kernel allows THP at all, a large tensor then lands on huge pages."""
    value, kb = _huge_pages_after_cli(None)
    assert value == "1"
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" not in mode:
        assert kb > 0


def test_huge_pages_setting_is_the_users_to_override():
    assert _huge_pages_after_cli("0") == ("0", 0)
