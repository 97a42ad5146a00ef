"""The README's optimizer snippet is a complete script: extracted from README.md and run as is
(issue 16, item 6)."""
import os
import re
import subprocess
import sys

from repo_paths import REPO

ANCHOR = "As a drop-in torch optimizer"


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(ANCHOR):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_optimizer_snippet_runs_as_written(tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(readme_snippet())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "2 snapshots of the weights", run.stdout
