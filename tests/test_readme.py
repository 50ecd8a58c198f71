"""The README's two commands stay true: CI runs the README's test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(pip install [^\n]+)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    install_and_run, install_and_test = readme_commands()[:2]
    assert "nabla generate" in install_and_run
    assert "pytest" in install_and_test
    test_part = install_and_test.split("&& ", 1)[1]  # after the torch pin, which .ci/run does first
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in ci
    assert test_part in ci.splitlines()
