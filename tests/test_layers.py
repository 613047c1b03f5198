"""The package's layers point down only (docs/layout.md): no module imports a higher layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower number, lower layer. A module may import its own layer and those below it.
LAYERS = {
    "tff_privseg.errors": 0,
    "tff_privseg.io": 0,
    "tff_privseg.losses": 0,
    "tff_privseg.metrics": 0,
    "tff_privseg.config": 1,
    "tff_privseg.data": 2,
    "tff_privseg.models": 2,
    "tff_privseg.privacy": 3,
    "tff_privseg.runtime": 3,
    "tff_privseg.rundir": 4,
    "tff_privseg.federated": 5,
    "tff_privseg.evaluate": 6,
    "tff_privseg.export": 6,
    "tff_privseg.silo": 6,
    "tff_privseg.attack": 7,
    "tff_privseg.report": 7,
    "tff_privseg.parity": 7,
    "cli": 9,
    "benchmarks": 9,
}


def layer(module: str) -> tuple[str, int] | None:
    """The longest LAYERS prefix of a dotted module name, with its layer."""
    found = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return (max(found, key=len), LAYERS[max(found, key=len)]) if found else None


def imports(path: Path) -> list[str]:
    """Absolute imports of the package's own modules (`from tff_privseg import x` -> x's path)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tff_privseg":
                out += [f"tff_privseg.{a.name}" for a in node.names]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m.split(".")[0] in ("tff_privseg", "cli", "benchmarks")]


def modules() -> list[Path]:
    """Every module but the package's own __init__ (its version, nothing else)."""
    paths = [
        *ROOT.glob("tff_privseg/**/*.py"),
        *ROOT.glob("cli/*.py"),
        *ROOT.glob("benchmarks/*.py"),
    ]
    return sorted(p for p in paths if p != ROOT / "tff_privseg" / "__init__.py")


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    own = layer(name)
    assert own is not None, f"{name} has no layer in LAYERS (docs/layout.md)"
    for target in imports(path):
        other = layer(target)
        if other is None or target == "tff_privseg.__version__":
            continue
        assert other[1] <= own[1], f"{name} (layer {own[1]}) imports {target} (layer {other[1]})"


def test_every_package_has_a_layer() -> None:
    top = {p.name.removesuffix(".py") for p in (ROOT / "tff_privseg").iterdir()}
    top -= {"__init__", "__pycache__"}
    assert {f"tff_privseg.{t}" for t in top} <= set(LAYERS)
