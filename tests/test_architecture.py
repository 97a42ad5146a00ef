"""The package's rooms and the one-way arrows between them (docs/architecture.md), checked on
the source: every `import` statement of every module, also those inside functions."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repo_paths import REPO

PACKAGE = REPO / "rtllm"

# The layers of docs/architecture.md, top to bottom: a room may import rooms of lower layers
# only (and itself). Rooms of one layer do not import each other.
LAYERS = [["cli"], ["run", "evaluation", "plan"], ["samplers", "lm", "store"], ["state"], ["kernels"]]
LAYER = {room: depth for depth, rooms in enumerate(LAYERS) for room in rooms}


def _module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = _module_files()


def _imports(name: str, path: Path) -> set[str]:
    """The rtllm modules `name` imports: absolute and relative, at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod where one exists
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "rtllm" or t.startswith("rtllm."))
    return found


def _resolve(target: str) -> str:
    while target not in MODULES:  # `import rtllm.x.y.attr` style names: the longest module prefix
        target = target.rpartition(".")[0]
    return target


GRAPH = {name: {_resolve(t) for t in _imports(name, path)} - {name} for name, path in MODULES.items()}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__ (the lazy API)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walker_sees_imports_of_every_kind():
    # the checks below are only as good as the import walker: it must see function-level and
    # relative imports, and `from package import module`
    assert "rtllm.kernels.reference" in GRAPH["rtllm.state.backends"]
    assert "rtllm.kernels.philox" in GRAPH["rtllm.kernels.reference"]  # relative: from .philox
    assert "rtllm.samplers.rules" in GRAPH["rtllm.samplers.optimizers"]  # from rtllm.samplers import rules
    assert "rtllm.run.sampling" in GRAPH["rtllm.run.chains"]
    assert "rtllm.lm.presets" in GRAPH["rtllm.cli.plan"]  # inside cmd_plan
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_in_a_room_and_every_room_is_a_layer():
    rooms = {room(m) for m in MODULES} - {None}
    assert rooms == set(LAYER), f"rooms on disk {sorted(rooms)} vs layers {sorted(LAYER)}: update " \
                                f"docs/architecture.md and LAYERS together"
    top = [m for m in MODULES if room(m) is None]
    assert top == ["rtllm"], f"modules outside every room: {top}"


def test_no_import_circle_between_modules():
    assert _find_cycle(GRAPH) is None, f"import circle: {' -> '.join(_find_cycle(GRAPH))}"


def test_no_import_circle_between_rooms():
    rooms: dict[str, set[str]] = {}
    for src, targets in GRAPH.items():
        for dst in targets:
            if room(src) and room(dst) and room(src) != room(dst):
                rooms.setdefault(room(src), set()).add(room(dst))
    assert _find_cycle(rooms) is None, f"circle between rooms: {' -> '.join(_find_cycle(rooms))}"


def test_arrows_point_down_the_layers():
    wrong = sorted(f"{src} imports {dst}" for src, targets in GRAPH.items() for dst in targets
                   if room(src) and room(dst) and room(src) != room(dst)
                   and LAYER[room(src)] >= LAYER[room(dst)])
    assert not wrong, "imports against the layers of docs/architecture.md:\n" + "\n".join(wrong)


def test_nothing_outside_the_cli_imports_it():
    users = sorted(src for src, targets in GRAPH.items() for dst in targets
                   if room(dst) == "cli" and room(src) != "cli")
    assert not users, f"the CLI is imported by {users}"


def test_every_room_says_what_it_is_for_and_what_it_may_import():
    for name in sorted({f"rtllm.{room(m)}" for m in MODULES if room(m)}):
        doc = ast.get_docstring(ast.parse(MODULES[name].read_text())) or ""
        assert "May import" in doc, f"{name}/__init__.py: say what the room is for and what it may import"


def test_no_package_in_the_repository_root_shadows_an_installed_one():
    # transformers >= 5.25 imports the PyPI package `kernels`; a `kernels/` package in the root
    # took its place in every Python started there and every GPT-2 load failed (docs/architecture.md).
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert not Path(found.stdout.strip()).is_relative_to(REPO / "kernels"), "a root kernels/ shadows PyPI's"
    packages = sorted(d.name for d in REPO.iterdir() if (d / "__init__.py").is_file())
    assert packages == ["rtllm"], f"packages in the repository root besides rtllm: {packages}"
    # Folders that land on sys.path (the root, tests/ under pytest, scripts/ for `python scripts/x.py`):
    # none of their modules or packages may take the name of an installed distribution's module.
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions()) - {"rtllm"}
    for folder in (REPO, REPO / "tests", REPO / "scripts"):
        names = {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}
        assert not names & installed, f"{folder} shadows installed modules: {sorted(names & installed)}"


@pytest.mark.parametrize("module", ["rtllm.samplers", "rtllm.state"])
def test_sampler_rooms_import_and_step_without_transformers(module):
    rooms = sorted(m for m in MODULES if m.startswith(module))
    code = textwrap.dedent(f"""
        import importlib, sys
        sys.modules["transformers"] = None  # any import of it raises ImportError
        for name in {rooms!r}:
            importlib.import_module(name)
        import torch, rtllm
        w = torch.nn.Parameter(torch.ones(17))
        opt = rtllm.RayTracer([w], dt=1e-3, seed=0)
        (w ** 2).sum().backward()
        opt.step()
        assert "transformers" not in {{k for k, v in sys.modules.items() if v is not None}}
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_command_line_parser_imports_nothing_heavy():
    code = ("import sys; from rtllm.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"building the parser imported {out.stdout.strip()}"


def test_modules_stay_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these modules (~400 lines each at most): {long}"
