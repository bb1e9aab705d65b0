"""scanpy's package-structure test, ported: the public AnnData functions follow one signature.

Covers functions whose first parameter is ``adata`` (an AnnData) and, as scanpy's does, those
whose first parameter is ``data`` (an AnnData or a bare matrix, e.g. ``pp.normalize``).
"""

from __future__ import annotations

import importlib
import inspect
import typing

import pytest

import screpair

MODULES = ["screpair", "screpair.pp", "screpair.dropout", "screpair.simulate", "screpair.evaluate"]
FIRST = ("adata", "data")


def _public_adata_functions():
    seen = {}
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name in getattr(mod, "__all__", dir(mod)):
            try:
                fn = getattr(mod, name, None)
            except ImportError:  # a lazy export whose module is missing: see the test below
                continue
            if inspect.isfunction(fn) and not name.startswith("_"):
                params = list(inspect.signature(fn).parameters.values())
                if params and params[0].name in FIRST:
                    seen[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return sorted(seen.items())


FUNCS = _public_adata_functions()


def test_found_functions():
    names = [n for n, _ in FUNCS]
    assert any(n.endswith("impute") for n in names)
    assert any(n.endswith("pp._pp.normalize") for n in names)  # a `data`-first function


@pytest.mark.parametrize(("name", "fn"), FUNCS, ids=[n for n, _ in FUNCS])
def test_adata_function_signature(name, fn):
    assert fn.__doc__, f"{name} has no docstring"
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if params[0].name == "data":  # an AnnData or a bare matrix
        first = str(typing.get_type_hints(fn).get("data"))
        assert "AnnData" in first and "ndarray" in first, f"{name}: data must take AnnData, arrays"
    n_pos = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    assert n_pos <= 3, "Public functions should have <= 3 positional parameters"
    if "copy" in sig.parameters:
        copy = sig.parameters["copy"]
        assert copy.kind is copy.KEYWORD_ONLY, f"{name}: copy must be keyword-only"
        assert copy.default is False, f"{name}: copy must default to False"
        hints = typing.get_type_hints(fn)
        assert "AnnData" in str(hints.get("return")) and "None" in str(hints.get("return")), (
            f"{name}: return type must be AnnData | None"
        )
    for kw in ("layer", "key_added", "rng"):
        if kw in sig.parameters:
            assert sig.parameters[kw].kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: {kw} keyword-only"


def test_public_namespace_lazy():
    for name in screpair._LAZY:
        assert getattr(screpair, name) is not None, name
    assert callable(screpair.read) and callable(screpair.impute)
    assert "knn" in screpair.available_methods()
