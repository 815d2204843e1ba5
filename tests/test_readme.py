"""README.md's set-up and test commands are what CI runs (.ci/run), as written."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    """The lines of the first code block under "## Set up and test"."""
    section = (ROOT / "README.md").read_text().split("## Set up and test\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands():
    headings = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("## ")]
    assert headings[0] == "## Set up and test"
    assert [line.split()[0] for line in readme_commands()] == ["(python", "python"]  # set-up, then test
    assert readme_commands()[1] == "python -m pytest -q"


def test_ci_runs_exactly_the_readme_lines_after_its_own_set_up():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    own = ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "pip install torch==2.13.0"]
    assert ci == own + readme_commands()
