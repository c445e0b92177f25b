"""The README opens with the two commands, and .ci/run runs exactly the README's test command."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip().startswith("./setup.sh")]


def test_readme_opens_with_train_and_test_commands():
    cmds = _readme_commands()
    assert len(cmds) >= 2
    assert "jaxcnn train experiments/fashion_mnist_lenet5.py" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [ln.strip() for ln in ci]
