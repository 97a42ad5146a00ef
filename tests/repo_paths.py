"""Where the repository's pieces are, for tests that run scripts or read docs."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
