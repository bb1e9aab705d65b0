"""The import graph points one way: ``_utils`` -> ``pp`` -> ``dropout``, ``simulate`` -> ``methods``
-> ``evaluate`` -> ``cli``.

Every ``import``/``from ... import`` in ``src/screpair`` (module level or inside a function: a
lazy import still makes a cycle) is parsed with :mod:`ast`, each module is mapped to its layer,
and an import of a higher layer, or of a different package on the same layer, fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import screpair

ROOT = Path(screpair.__file__).parent

#: Layer of each top-level part of the package (``screpair`` itself: the lazy root, which only
#: provides ``__version__`` to the modules below it).
LAYERS: dict[str, int] = {
    "screpair": 0,
    "_logging": 0,
    "_utils": 0,
    "_norm": 0,
    "_chunks": 0,
    "_parallel": 0,
    "io": 0,
    "datasets": 0,
    "pp": 1,
    "dropout": 2,
    "simulate": 2,
    "methods": 3,
    "evaluate": 4,
    "cli": 5,
}


def _module_name(path: Path) -> str:
    parts = ["screpair", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """The top-level part of ``screpair.<part>...`` (``"screpair"`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "screpair"


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every screpair import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "screpair"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "screpair":
                continue
            if target == "screpair":  # `from screpair import pp` names subpackages
                out += [(node.lineno, f"screpair.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


FILES = sorted(ROOT.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {_part(_module_name(f)) for f in FILES}
    assert parts <= set(LAYERS), f"give these a layer: {sorted(parts - set(LAYERS))}"


def test_parser_resolves_relative_imports():
    got = dict((m, ln) for ln, m in _imports(ROOT / "methods" / "alra.py"))
    assert "screpair._utils" in got and "screpair._norm" in got
    assert "screpair.methods._base" in got


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(ROOT)) for f in FILES])
def test_imports_point_down(path):
    here = _part(_module_name(path))
    bad = []
    for line, target in _imports(path):
        there = _part(target)
        if there not in LAYERS:  # `from screpair import __version__` and other root names
            there = "screpair"
        if there == here:
            continue
        if LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here] and there != "screpair"
                                            and here != "screpair" and LAYERS[here] > 0):
            bad.append(f"line {line}: {here} (layer {LAYERS[here]}) imports {target} "
                       f"(layer {LAYERS[there]})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_private_pp_imports_outside_pp():
    """Other parts use :mod:`screpair.pp`'s public names, not ``pp._pp``."""
    bad = [
        f"{f.relative_to(ROOT)}:{line}"
        for f in FILES
        if _part(_module_name(f)) != "pp"
        for line, target in _imports(f)
        if target.startswith("screpair.pp._")
    ]
    assert not bad, bad
