"""Every generation command the README shows runs as written on the embedded default model.

The commands are read from the README itself, so an example that stops working, or a new one that never
worked (a layout the default model cannot take, a flag that does not exist), fails here."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    """``dist-infer generate`` commands (also under ``torchrun``) in the README's bash blocks, each as argv. Commands
    on a model the reader supplies (``--model PATH``) are left out: there is no such path here."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                command = part.strip()
                if command.startswith("dist-infer generate") or (command.startswith("torchrun")
                                                                  and " generate " in command):
                    argv = shlex.split(part, comments=True)
                    if "--model" not in argv:
                        commands.append(argv)
    return commands


def test_the_readme_shows_the_main_layouts():
    shown = [" ".join(argv) for argv in readme_commands()]
    assert any(a.startswith("torchrun") for a in shown) and any("--executor ray" in a for a in shown), shown
    assert len(shown) >= 5, shown


@pytest.fixture(scope="module")
def run_command(default_model_path):
    """Runs a README command once per module (the layout comparison below reuses the answers)."""
    answers: dict[tuple[str, ...], subprocess.CompletedProcess] = {}

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        if tuple(argv) not in answers:
            answers[tuple(argv)] = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        return answers[tuple(argv)]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("argv", readme_commands(), ids=lambda argv: " ".join(argv[1:])[:60])
def test_readme_command_runs_as_written(argv, run_command):
    result = run_command(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), result.stderr[-3000:]
    if argv[-1] == "What is the capital of France?":  # the set-up command's question has one right answer
        assert "Paris" in result.stdout, result.stdout


@pytest.mark.slow
def test_every_layout_the_readme_shows_answers_alike(run_command):
    """The README's layouts (mp tensor and pipeline parallel with replicas, Ray, torchrun) answer the same
    greedy prompt with the same text on the default model (9 heads, 3 KV heads: tp=3 splits them)."""
    same_prompt = [argv for argv in readme_commands() if argv[-1] == "Hello" and "--temperature" not in argv]
    assert len(same_prompt) >= 4 and any("ray" in argv for argv in same_prompt), same_prompt
    answers = {" ".join(argv): run_command(argv).stdout.strip() for argv in same_prompt}
    assert len(set(answers.values())) == 1 and all(answers.values()), answers
