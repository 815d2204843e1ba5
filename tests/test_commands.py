"""The console commands that `pip install` puts on the PATH, one per `python -m llama.*` tool."""

import shutil
import subprocess

import pytest

COMMANDS = {
    "llama-server": "python -m llama.server", "llama-convert": "python -m llama.convert",
    "llama-reshard": "python -m llama.reshard", "llama-quantize": "python -m llama.quantize",
    "llama-memory": "python -m llama.memory", "llama-tiny": "python -m llama.tiny",
}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_is_installed_and_answers_help(command):
    path = shutil.which(command)
    assert path, f"{command} is not on the PATH: install the package (pip install -e '.[test]')"
    run = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"usage: {COMMANDS[command]}")
