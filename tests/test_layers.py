"""The package's shape, enforced: layers import only downward, no import cycles, light commands stay light.

The import graph is read from the source (every ``import``, module-level or inside a function), so
a lazy import that reaches upward or closes a cycle fails here too. A new module must be given a
layer below; see the README's "Layout" section.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "simsearch"

# (module prefix, layer): the longest matching prefix decides. Lower layers never import higher ones.
LAYERS: list[tuple[str, int]] = [
    ("simsearch", 0),  # the package's __init__ (version only)
    ("simsearch.errors", 0),
    ("simsearch.store", 1),
    ("simsearch.images", 1),
    ("simsearch.labelled", 1),
    ("simsearch.models", 2),
    ("simsearch.embed", 3),
    ("simsearch.indexer", 4),
    ("simsearch.search", 4),
    ("simsearch.cluster", 4),
    ("simsearch.evaluate", 4),
    ("simsearch.vector_import", 4),
    ("simsearch.vector_export", 4),
    ("simsearch.train", 4),
    ("simsearch.duplicates", 4),
    ("simsearch.calibrate", 4),
    ("simsearch.verify", 4),
    ("simsearch.report", 4),
    ("simsearch.labels", 4),
    ("simsearch.classify", 4),
    ("simsearch.cli", 5),
    ("simsearch.serve", 5),
    ("simsearch.__main__", 5),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = max((prefix for prefix, _ in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name} and the README's layout")
    return dict(LAYERS)[best]


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports (resolving relative imports)."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import simsearch.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def component(module: str) -> str:
    """The top-level part a module belongs to (``simsearch.train.loop`` -> ``simsearch.train``)."""
    return ".".join(module.split(".")[:2])


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_upward_imports():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in import_graph().items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for m, targets in import_graph().items():
        graph.setdefault(component(m), set()).update(component(t) for t in targets if component(t) != component(m))
    assert cycles(graph) == []


def test_the_graph_sees_relative_and_lazy_imports():
    """Guard the reader itself: a known lazy, relative import is found."""
    graph = import_graph()
    assert "simsearch.indexer" in graph["simsearch.cli"]
    assert any(t.startswith("simsearch.store") for t in graph["simsearch.indexer"])


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """A real (tiny) index with a stored clustering, so the light commands do their whole job."""
    from conftest import make_collection, run_index

    from simsearch.cluster import cluster_index

    root = tmp_path_factory.mktemp("light")
    make_collection(root / "photos", n=6)
    run_index(root / "photos", root / "idx")
    cluster_index(root / "idx", k=2)
    return root / "idx"


LIGHT = [
    ["-c", "import simsearch.store"],
    ["-c", "import simsearch.cli"],
    ["--help"],
    ["info", "--index", "{index}"],
    ["info", "--json", "--index", "{index}"],
    ["cluster", "--index", "{index}"],
    ["cluster", "--show", "0", "--index", "{index}"],
    ["duplicates", "--threshold", "0.9", "--verify", "off", "--index", "{index}"],
    ["labels", "--index", "{index}"],
    ["export-vectors", "{index}/../light-export.npz", "--index", "{index}"],
]


@pytest.mark.parametrize("argv", LIGHT, ids=[" ".join(a) for a in LIGHT])
def test_light_commands_do_not_import_torch(argv, small_index):
    """Start-up stays fast: these commands never import torch (and they succeed)."""
    args = [a.replace("{index}", str(small_index)) for a in argv]
    if args[0] == "-c":
        run = args[1]
    else:
        run = (
            "import sys\n"
            "from simsearch.cli import main\n"
            f"sys.argv = ['simsearch'] + {args!r}\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
        )
    code = run + "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\nprint('light')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("light"), proc.stdout[-500:] + proc.stderr[-2000:]


@pytest.mark.parametrize("command", ["query", "index"])
def test_embedding_commands_do_not_import_torchvision(command, small_index, tmp_path):
    """A cold query of a new image, or an index run, pays for torch, not for torchvision (whose ops
    package imports torch._dynamo: as much CPU time again as torch): the ResNets and the crop are
    built without it."""
    import shutil

    from PIL import Image

    image = tmp_path / "new" / "new.jpg"
    image.parent.mkdir()
    Image.new("RGB", (90, 70), (200, 30, 60)).save(image)
    index = tmp_path / "idx"
    shutil.copytree(small_index, index)
    argv = {
        "query": ["query", str(image), "--device", "cpu", "--index", str(index)],
        "index": ["index", str(image.parent), "--device", "cpu", "--workers", "0", "-q", "--index", str(index)],
    }[command]
    code = (  # the click group, not main(): main ends the process at once once torch is loaded
        "import sys\n"
        "from simsearch.cli import cli\n"
        f"sys.argv = ['simsearch'] + {argv!r}\n"
        "try:\n"
        "    cli()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "assert 'torch' in sys.modules\n"
        "heavy = sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('light')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("light"), proc.stdout[-500:] + proc.stderr[-2000:]
