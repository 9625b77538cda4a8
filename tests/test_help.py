"""Every command has help text, and the CLI starts without importing torch."""

import json
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


def _help_texts(command) -> list[str]:
    """Every help text a click command (or group, with its subcommands) shows: its own and its parameters'."""
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    for sub in getattr(command, "commands", {}).values():
        texts += _help_texts(sub)
    return texts


def test_no_help_text_holds_brackets_rich_would_swallow():
    """Rich markup takes '[frames, channels, h, w]' or '[default: ...]' for a style tag and drops it from the help
    ('into a latent video , streaming'); a bracket that is meant must be escaped, as in 'vaecli\\[ray]'."""
    import re

    import typer

    from vaecli.cli import app

    swallowed = [text for text in _help_texts(typer.main.get_command(app))
                 if re.search(r"(?<!\\)\[[a-z/][^\]]*\]", text)]
    assert swallowed == []


def test_help_paragraphs_are_not_cut_at_the_sources_line_breaks():
    """Typer's rich help keeps a docstring's line breaks: a paragraph wrapped at 120 columns in the source came out
    cut mid-sentence ('outlined (the' / '64x64 window ...'); every paragraph is one line for the terminal to wrap."""
    import re

    import typer

    from vaecli.cli import app

    cut = [text for text in _help_texts(typer.main.get_command(app)) if re.search(r"[^\n]\n[^\n]", text)]
    assert cut == []


@pytest.mark.parametrize("name", [*(c for c in COMMANDS if c != "weights"), "weights pull", "weights list"])
def test_options_show_plain_value_names(vae, name):
    """Typer 0.29 showed '<bool>' beside every flag, '<str>', '<list[Path]>', and the 22 model names wrapped in a
    narrow column: options show nothing for a flag, TEXT, PATH, MODEL (Typer's own --help keeps its '<bool>',
    arguments their type)."""
    result = vae(*name.split(), "--help")
    assert result.exit_code == 0
    options = result.stdout.split("Options ─")[1]  # after the Arguments panel, whose types Typer always shows
    options = "\n".join(line for line in options.splitlines() if "--help" not in line)
    assert "--quiet" in options
    for typer_type in ("<bool>", "<str>", "<int>", "<float>", "<Path>", "<list[Path]>", "|taesdxl|"):
        assert typer_type not in options, options
    assert "|taesdxl|" not in result.stdout  # nor in the Arguments panel ('vae weights pull MODEL...')


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
    code = ("import os, sys\nfrom vaecli.console import main\nsys.argv = ['vae', 'models']\ntry:\n    main()\n"
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


def _entry(*args: str) -> subprocess.CompletedProcess:
    """The console script's entry point (`vaecli.console.main`), as `vae ARGS...` runs it."""
    code = "import sys\nfrom vaecli.console import main\nsys.argv = ['vae', *sys.argv[1:]]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["encode"], "Error: Missing argument 'inputs'. (see 'vae encode --help')"),
    (["encode", "x.png", "--bogus"], "Error: No such option: --bogus (see 'vae encode --help')"),
    (["nosuchcmd"], "Error: No such command 'nosuchcmd'. (see 'vae --help')"),
    (["decode", "x.latent", "--dtype", "fp64"],
     "Error: Invalid value for '--dtype': 'fp64' is not one of 'fp32', 'fp16', 'bf16'. (see 'vae decode --help')"),
])
def test_usage_errors_are_one_error_line_and_exit_2(args, message):
    proc = _entry(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [message]
    assert proc.stdout == ""


def test_usage_error_under_json_is_also_a_record():
    proc = _entry("encode", "x.png", "-m", "nosuch", "--json")
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("Error: Invalid value for '-m' / '--model': 'nosuch' is not one of 'taesd', ")
    assert json.loads(proc.stdout) == {"input": None, "output": None, "status": "error", "error": line[7:]}


def test_failure_before_the_batch_under_json_is_a_record(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    proc = _entry("encode", str(image), "-o", str(image), "--json")
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line == f"Error: refusing to overwrite input {image} (choose another -o)"
    assert json.loads(proc.stdout) == {"input": None, "output": None, "status": "error", "error": line[7:]}


def test_no_arguments_prints_the_help_and_exits_2():
    proc = _entry()
    assert proc.returncode == 2
    assert "Usage: vae" in proc.stdout + proc.stderr
    assert "Error" not in proc.stderr
