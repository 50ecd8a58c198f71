"""The layers point one way: no module of nabla imports from a layer above its own.

Read from the source with `ast`, so the rule is checked, not just written down
(docs/ARCHITECTURE.md draws the same picture). Imports inside functions count
too: a lazy import is still a dependency. Also: no module imports another
module's private names.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nabla"

# Lower numbers are lower layers; a module may import from its own layer or below.
LAYERS = {
    "errors": 0, "jsonfile": 0,
    "device": 1,
    "model": 2, "tokenizer": 2,
    "checkpoint": 3,
    "distributed": 4,
    "generation": 5,
    "api": 6,
    "explain": 7, "bench": 7, "server": 7, "training": 7, "network": 7,
    "cli": 8, "__main__": 8,
}
# The one upward call, kept for the public API: `Llama.explain` hands over to nabla.explain.
ALLOWED = {("api", "explain")}


def area(module: str) -> str:
    """'nabla.model.llama' -> 'model'; the package root itself is 'errors' (it re-exports them)."""
    parts = module.split(".")
    if parts[0] != "nabla":
        return ""
    return parts[1] if len(parts) > 1 else "errors"


def imports(path: Path):
    """(imported module, names) for every import of nabla in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "nabla":  # `from nabla import device`: a submodule, or the root's names
                for alias in node.names:
                    sub = SRC / alias.name
                    yield ("nabla." + alias.name if sub.is_dir() or sub.with_suffix(".py").is_file()
                           else "nabla"), [alias.name]
            else:
                yield node.module, [a.name for a in node.names]


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        yield path, ".".join(p for p in rel.parts if p != "__init__")


def test_every_area_has_a_layer():
    areas = {area(m) for _, m in modules()} - {"errors"}
    assert areas <= set(LAYERS), f"give these a layer in LAYERS: {sorted(areas - set(LAYERS))}"


@pytest.mark.parametrize("path,module", list(modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_point_down(path, module):
    own = area(module)
    if module == "nabla":
        return  # the package root re-exports the public names lazily
    for target, names in imports(path):
        other = area(target)
        if not other:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module} imports private names {private} from {target}"
        assert other == own or LAYERS[other] <= LAYERS[own] or (own, other) in ALLOWED, \
            f"{module} ({own}, layer {LAYERS[own]}) imports {target} ({other}, layer {LAYERS[other]})"
