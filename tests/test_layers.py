"""The package's layers (docs/architecture.md): a module's folder is its layer, and no module imports a layer above
its own or takes part in an import cycle inside its layer.

Every `import` counts wherever it stands: at module level, inside a function (a lazy import still loads the layer
when it runs) and under `if TYPE_CHECKING:`; so does a "bitdeploy.module:object" string (`targets.import_object`,
`cli.COMMANDS`), which must also name an object that exists. The experiment scripts in benchmarks/experiments/ are
not in the package and not checked.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The folders, bottom to top. pipeline/ itself holds only the package root (`__version__`, below every layer) and
# `__main__` (above every layer).
LAYERS = (
    "pipeline/core",
    "runtimes",
    "training",
    "converters",
    "benchmarks",
    "pipeline/emulation",
    "pipeline/builder",
    "pipeline/cli",
)
ROOT_MODULES = {"__init__": -1, "__main__": len(LAYERS)}
# The target records are the plug-in registry: they name each target's converter and backend as strings, which the
# kernel resolves only when a caller of those layers asks. No other string may point upwards.
PLUGIN_REGISTRY = {"pipeline/core/targets.py": {"runtimes", "converters"}}
STRING_REF = re.compile(r"^(bitdeploy(?:\.\w+)+):(\w+)$")


def folder_of(package: str, root: Path) -> str:
    """The folder of `bitdeploy...` package or module `package` (pipeline/ is `bitdeploy`)."""
    parts = package.split(".")[1:]
    if parts and (root / parts[0]).is_dir() and parts[0] != "pipeline":
        return "/".join(parts)
    return "/".join(["pipeline", *parts])


def module_file(name: str, root: Path) -> Path | None:
    """The source file of `bitdeploy...` module `name`, or None when it is not a module of the tree."""
    base = root / folder_of(name, root)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def layer_index(path: Path, root: Path) -> int | None:
    rel = path.relative_to(root)
    if rel.parent == Path("pipeline"):
        return ROOT_MODULES.get(rel.stem)
    for folder in (rel.parent, *rel.parent.parents):  # a layer's sub-package (runtimes/engines/) is in that layer
        if folder.as_posix() in LAYERS:
            return LAYERS.index(folder.as_posix())
    return None


def package_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).parent.as_posix()
    inner = rel.removeprefix("pipeline").strip("/")
    return ".".join(["bitdeploy", *inner.split("/")]) if inner else "bitdeploy"


def imports(path: Path, package: str) -> Iterator[tuple[int, str, str | None]]:
    """(line, module, attribute or None) of every import and "bitdeploy.module:object" string in the file, at any
    depth, relative imports resolved against `package`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                yield node.lineno, base, alias.name  # `from base import name`: a submodule or an attribute of base
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and STRING_REF.match(node.value):
            match = STRING_REF.match(node.value)
            assert match is not None
            yield node.lineno, match[1], f":{match[2]}"


def top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def sources(root: Path) -> list[Path]:
    folders = [root / "pipeline", *(p for p in root.iterdir() if (p / "__init__.py").exists() and p.name != "tests")]
    found = {f for folder in folders for f in folder.rglob("*.py") if "experiments" not in f.parts}
    return sorted(found)


def resolve(name: str, attr: str | None, root: Path) -> Path | None:
    """The tree's module file an import loads: the submodule `name.attr` where there is one, else `name`."""
    if attr is not None and not attr.startswith(":"):
        sub = module_file(f"{name}.{attr}", root)
        if sub is not None:
            return sub
    return module_file(name, root)


def violations(root: Path) -> list[str]:
    """Every module outside a layer folder, every import of a higher layer, every string that names a missing
    object and every import cycle inside a layer; empty when the tree keeps its layers."""
    found, edges = [], {}
    for path in sources(root):
        rel = path.relative_to(root).as_posix()
        layer = layer_index(path, root)
        if layer is None:
            found.append(f"{rel} is in no layer: move it into one of {', '.join(LAYERS)}")
            continue
        edges[path] = set()
        for line, name, attr in imports(path, package_of(path, root)):
            if name.split(".")[0] != "bitdeploy":
                continue
            target = resolve(name, attr, root)
            shown = f"{name}{attr}" if attr and attr.startswith(":") else f"{name}.{attr}" if attr else name
            if target is None:
                if attr and attr.startswith(":"):
                    found.append(f"{rel}:{line} names {shown}, which does not exist")
                continue
            if attr and attr.startswith(":") and attr[1:] not in top_level_names(target):
                found.append(f"{rel}:{line} names {shown}, which does not exist")
            to = layer_index(target, root)
            if to is None:
                continue  # reported on its own
            upward = to > layer and not (attr and attr.startswith(":") and _plugin(rel, to))
            if upward:
                found.append(f"{rel}:{line} ({_name(layer)}) imports {shown} ({_name(to)})")
            elif to == layer and target != path:
                edges[path].add(target)
    found += [
        f"import cycle in {c.split('/')[0] if not c.startswith('pipeline') else '/'.join(c.split('/')[:2])}: {c}"
        for c in cycles(edges, root)
    ]
    return sorted(found)


def _plugin(rel: str, to: int) -> bool:
    return 0 <= to < len(LAYERS) and LAYERS[to] in PLUGIN_REGISTRY.get(rel, set())


def _name(layer: int | None) -> str:
    if layer is None:
        return "no layer"
    return "the package root" if layer < 0 else "__main__" if layer >= len(LAYERS) else LAYERS[layer]


def cycles(edges: dict[Path, set[Path]], root: Path) -> list[str]:
    """One "a -> b -> a" line per strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    groups: list[list[Path]] = []

    def visit(v: Path) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    names = [[p.relative_to(root).as_posix() for p in g] for g in groups]
    return sorted(" -> ".join([*g, g[0]]) for g in names)


def test_the_package_keeps_its_layers() -> None:
    assert violations(ROOT) == []


def test_every_layer_folder_exists_and_is_a_package() -> None:
    for folder in LAYERS:
        assert (ROOT / folder / "__init__.py").is_file(), folder
    assert {p.name for p in (ROOT / "pipeline").glob("*.py")} == {"__init__.py", "__main__.py"}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for folder in LAYERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
    for rel, text in {"pipeline/__init__.py": "", "pipeline/core/errors.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_checker_sees_module_level_and_lazy_imports_of_a_higher_layer(tmp_path: Path) -> None:
    tree = _tree(
        tmp_path,
        {
            "runtimes/backend.py": "from bitdeploy.converters import base\n",
            "converters/base.py": "",
            "runtimes/lazy.py": "def f():\n    import bitdeploy.converters.base\n",
            "runtimes/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bitdeploy.cli import main\n",
            "converters/rel.py": "from ..benchmarks import latency\n",
            "benchmarks/latency.py": "",
            "pipeline/core/errors.py": "def hint():\n    from bitdeploy.cli import cmd_build\n",
            "pipeline/cli/cmd_build.py": "",
            "pipeline/extra.py": "",
            "runtimes/engines/__init__.py": "",
            "runtimes/engines/deep.py": "from bitdeploy.converters import base\n",
        },
    )
    assert violations(tree) == sorted(
        [
            "runtimes/engines/deep.py:1 (runtimes) imports bitdeploy.converters.base (converters)",
            "pipeline/core/errors.py:2 (pipeline/core) imports bitdeploy.cli.cmd_build (pipeline/cli)",
            "pipeline/extra.py is in no layer: move it into one of " + ", ".join(LAYERS),
            "runtimes/backend.py:1 (runtimes) imports bitdeploy.converters.base (converters)",
            "runtimes/lazy.py:2 (runtimes) imports bitdeploy.converters.base (converters)",
            "runtimes/typed.py:3 (runtimes) imports bitdeploy.cli.main (pipeline/cli)",
            "converters/rel.py:1 (converters) imports bitdeploy.benchmarks.latency (benchmarks)",
        ]
    )


def test_checker_sees_cycles_inside_a_layer_and_strings_that_point_up_or_nowhere(tmp_path: Path) -> None:
    tree = _tree(
        tmp_path,
        {
            "benchmarks/bench.py": "def f():\n    from bitdeploy.benchmarks import baseline\n",
            "benchmarks/baseline.py": "from bitdeploy.benchmarks.bench import f\n",
            "runtimes/plugins.py": 'BACKEND = "bitdeploy.converters.conv:convert"\n',
            "converters/conv.py": "def convert(): ...\n",
            "pipeline/cli/__init__.py": 'COMMANDS = {"go": "bitdeploy.cli.cmd_go:go", "x": "bitdeploy.cli.gone:x"}\n',
            "pipeline/cli/cmd_go.py": "def other(): ...\n",
            "pipeline/core/targets.py": 'CONVERTER = "bitdeploy.converters.conv:convert"\n',  # the plug-in registry
        },
    )
    assert violations(tree) == sorted(
        [
            "pipeline/cli/__init__.py:1 names bitdeploy.cli.cmd_go:go, which does not exist",
            "pipeline/cli/__init__.py:1 names bitdeploy.cli.gone:x, which does not exist",
            "runtimes/plugins.py:1 (runtimes) imports bitdeploy.converters.conv:convert (converters)",
            "import cycle in benchmarks: benchmarks/baseline.py -> benchmarks/bench.py -> benchmarks/baseline.py",
        ]
    )


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        (
            "pipeline/cli/__init__.py",
            "def run():\n    from bitdeploy.benchmarks import bench\n    import bitdeploy.converters\n",
        ),
        ("converters/conv.py", "from bitdeploy import __version__\nfrom bitdeploy.core import errors\n"),
        ("runtimes/ok.py", "import numpy\nfrom bitdeploy.core.errors import BundleError\nfrom . import manifest\n"),
        ("pipeline/__main__.py", "from bitdeploy.cli import main\n"),
    ],
)
def test_checker_allows_imports_downwards(tmp_path: Path, rel: str, source: str) -> None:
    assert violations(_tree(tmp_path, {rel: source})) == []
