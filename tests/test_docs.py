"""The documentation runs and states the present.

- docs/tutorial.md and the README's tour: every ```python block runs, in order, in one namespace per document
  (blocks share state, as in a notebook), in a process of its own with one CPU device, as a reader runs it;
  ```text and ```bash blocks are not run, and a deprecated jaxcnn name in a block is an error.
- No file in README.md, docs/, benchmarks/, experiments/, examples/ or jaxcnn/ speaks of the project's own
  development history (sessions, issue numbers, "earlier code", "before the speed work", ...): figures carry their
  date, machine and versions, and the history lives in git.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------
# Runnable documents
# ---------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block of a markdown text, in order."""
    blocks = []
    for m in _FENCE.finditer(markdown):
        if m.group(1) == "python":
            line = markdown.count("\n", 0, m.start(2)) + 1
            blocks.append((line, m.group(2)))
    return blocks


# Each document runs in its own interpreter from the repository root, so that its state (files it writes, JAX's
# configuration) stays out of the test process; the child prints which block failed.
_RUNNER = r"""
import sys, time, traceback, warnings
path = sys.argv[1]
sys.path.insert(0, '.')
from tests.test_docs import python_blocks
# A deprecated jaxcnn name used by the document's own code is an error: the documents show the current API.
warnings.filterwarnings("error", category=DeprecationWarning, module="__doc__")
namespace = {"__name__": "__doc__"}
t0 = time.perf_counter()
for line, code in python_blocks(open(path, encoding="utf-8").read()):
    t = time.perf_counter()
    try:
        exec(compile(code, f"{path}:{line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the python block at {path}:{line}", file=sys.stderr)
        sys.exit(1)
    print(f"block at line {line}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
print(f"all blocks: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
"""


def run_markdown(relpath: str, timeout: float) -> str:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # a reader's process has one CPU device, not the suite's eight
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, relpath], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{relpath}: a code block failed after {time.perf_counter() - t0:.0f} s\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stderr


def test_python_blocks_are_found_and_text_blocks_skipped():
    md = "intro\n```python\nx = 1\n```\n\n```text\nnot run\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(md) == [(3, "x = 1\n"), (10, "y = x + 1\n")]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tutorial_runs():
    """docs/tutorial.md from the first block to the last (about a minute on 2 cores); it writes the pictures it
    shows into docs/tutorial_images/."""
    path = ROOT / "docs" / "tutorial.md"
    assert len(python_blocks(path.read_text(encoding="utf-8"))) >= 10
    run_markdown("docs/tutorial.md", timeout=600)
    for name in re.findall(r"\]\((tutorial_images/[\w.-]+\.png)\)", path.read_text(encoding="utf-8")):
        assert (ROOT / "docs" / name).stat().st_size > 1000, f"docs/{name} was not written by the tutorial"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_readme_tour_runs():
    assert python_blocks((ROOT / "README.md").read_text(encoding="utf-8")), "README.md has no python block"
    run_markdown("README.md", timeout=600)


# ---------------------------------------------------------------------------------------------------------
# No development history
# ---------------------------------------------------------------------------------------------------------

SCANNED = ["README.md", "docs", "benchmarks", "experiments", "examples", "jaxcnn"]
SUFFIXES = {".py", ".md", ".sh", ".cc", ".h"}

# Phrases that tell the story of the work instead of the present. Each is precise enough not to catch ordinary
# technical English ("the mask used to select", "now()", "earlier layers").
HISTORY = [
    (r"\bsessions?\b", "a work session"),
    (r"\bissues? #?\d+", "an issue number"),
    (r"\b(earlier|older|old|previous|first|second|initial) (code|version|implementation)s?\b",
     "an earlier version of the code"),
    (r"\bbefore the\b[^.;:()]{0,40}?\b(work|change|rewrite|refactor)s?\b", "before a piece of work"),
    (r"\b(the|a|this) (speed|refactor|docs?) work\b", "a piece of work"),
    (r"\bpreviously\b", "previously"),
    (r"\bformerly\b", "formerly"),
    (r"(?<!\bis )(?<!\bare )(?<!\bbe )(?<!\bwas )(?<!\bwere )(?<!\bbeen )(?<!\bbeing )\bused to (be|run|take|have|"
     r"call|give|make|do|live|read|write)\b", "used to"),
    (r"\bno longer\b", "no longer"),
    (r"\b(is|are|was) now\b", "is now"),
    (r"\d(%|×| ?ms| ?µs| ?s)\s+now\b", "a figure now"),
    (r"\bnow (uses|runs|takes|holds|lives|calls|gives|keeps|reads|writes|has|goes|sets)\b", "now does"),
    (r"\bwe (changed|replaced|removed|added|moved|switched|rewrote|fixed|tried)\b", "we changed"),
    (r"\b(has|have) been (replaced|removed|moved|rewritten|changed|renamed)\b", "has been replaced"),
    (r"\bsince the\b[^.;:()]{0,30}?\b(change|rewrite|work|version)\b", "since a change"),
    (r"\b(this|that|the) (commit|pull request|PR)\b", "a commit or pull request"),
]
_HISTORY = [(re.compile(p, re.I), what) for p, what in HISTORY]
_NUMBER = re.compile(r"(?<![\w&#])#\d+\b")  # '#25'; not '&#39;', '#1f77b4' or '#include'
_UPSTREAM = re.compile(r"[\w.-]+/[\w.-]+$")  # 'jax-ml/jax' right before '#13800'


def _bare_issue_number(text: str) -> bool:
    return any(not _UPSTREAM.search(text[: m.start()]) for m in _NUMBER.finditer(text))

# Legitimate uses, each tied to one file and one exact wording.
ALLOWED = {
    # The sweep's progress line estimates the time left from the runs it has finished while it runs.
    "jaxcnn/results/sweep.py": ["runs finished in this session", "(no longer valid: "],
    # A saved config that the current schema rejects, named in the resume error.
    "jaxcnn/train/checkpoint.py": ["(no longer valid: "],
}
ALLOWED_EVERYWHERE = ['scope="session"', "scope='session'"]


def history_lines(root: Path = ROOT) -> list[str]:
    """'path:line: what: text' for every line that speaks of development history."""
    found = []
    for top in SCANNED:
        base = root / top
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.suffix in SUFFIXES)
        for path in files:
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in rel or not path.is_file():
                continue
            allowed = ALLOWED_EVERYWHERE + ALLOWED.get(rel, [])
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                text = line
                for ok in allowed:
                    text = text.replace(ok, " ")
                what = next((what for pattern, what in _HISTORY if pattern.search(text)), None)
                if what is None and _bare_issue_number(text):
                    what = "an issue number (write upstream ones as owner/repo#N)"
                if what:
                    found.append(f"{rel}:{n}: {what}: {line.strip()[:140]}")
    return found


@pytest.mark.parametrize("text, caught", [
    ("measured in the ninth session", True),
    ("issue 8's goal", True),
    ("see #25 for the plan", True),
    ("(jax-ml/jax#13800, jax-ml/jax#23713)", False),
    ("fixed upstream by google/grain#1362", False),
    ("15.5 min for the first version of the code", True),
    ("133 s before the fifth speed work", True),
    ("earlier code, whose sums ran in another order", True),
    ("it used to take 3 s", True),
    ("the mask used to select the element", False),
    ("the kernel is used to run the product", False),
    ("XLA no longer fuses it", True),
    ("It is now `fused_sgd`", True),
    ("datetime.datetime.now()", False),
    ("the guard took 15.6% of the step that way, 8.7% now", True),
    ("stop now, without a checkpoint", False),
    ("@pytest.fixture(scope=\"session\")", False),
    ("A TensorBoard SessionLog.START event", False),
    ("earlier layers see a smaller window", False),
    ("#include <cstdint>", False),
    ("color='#1f77b4'", False),
])
def test_history_patterns(tmp_path, text, caught):
    (tmp_path / "README.md").write_text(f"# title\n{text}\n")
    assert bool(history_lines(tmp_path)) == caught, history_lines(tmp_path)


def test_no_development_history():
    found = history_lines()
    assert not found, ("documentation and comments state the present (figures with date, machine and versions); "
                       "development history belongs in git. Rewrite these lines:\n" + "\n".join(found))
