"""The layers of DESIGN.md point one way, read from the imports of every module (no import runs):

    engine / entry points -> models, matcher, criterion -> fastmaskformer.ops -> kernels/ and _C

- kernels/ imports only torch, triton, numpy, the standard library and its own helpers;
- fastmaskformer.ops imports nothing above it (models, matcher, criterion, engine, data);
- the models, matcher and criterion reach kernels and _C only through fastmaskformer.ops.
"""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastmaskformer")


def imports(path):
    """Absolute module names imported by ``path`` (relative imports resolved against its package)."""
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    if package.startswith("kernels"):
        package = "fastmaskformer." + package
    tree = ast.parse(open(path).read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names += [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def modules(folder):
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def _top(name):
    return name.split(".")[0]


@pytest.mark.parametrize("path", sorted(modules(os.path.join(ROOT, "kernels"))), ids=os.path.basename)
def test_kernels_import_only_torch_triton_and_their_helpers(path):
    allowed = {"torch", "triton", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for name in imports(path):
        if name.startswith("fastmaskformer.kernels"):
            continue
        assert not name.startswith("fastmaskformer"), f"{path} imports {name}"
        assert _top(name) in allowed, f"{path} imports {name}"


@pytest.mark.parametrize("path", sorted(modules(os.path.join(PKG, "ops"))), ids=lambda p: os.path.relpath(p, PKG))
def test_ops_import_nothing_above_them(path):
    above = ("fastmaskformer.modeling", "fastmaskformer.engine", "fastmaskformer.data", "fastmaskformer.evaluation",
             "fastmaskformer.matcher", "fastmaskformer.criterion", "fastmaskformer.train", "fastmaskformer.evaluate",
             "fastmaskformer.convert", "fastmaskformer.integrations", "fastmaskformer.config")
    for name in imports(path):
        assert not name.startswith(above), f"{path} imports {name}"


MODELS = [os.path.join(PKG, "matcher.py"), os.path.join(PKG, "criterion.py"), os.path.join(PKG, "inference.py"),
          *sorted(modules(os.path.join(PKG, "modeling")))]


@pytest.mark.parametrize("path", MODELS, ids=lambda p: os.path.relpath(p, PKG))
def test_models_reach_kernels_only_through_ops(path):
    for name in imports(path):
        assert not name.startswith(("fastmaskformer.kernels", "fastmaskformer._C", "fastmaskformer._ext")), \
            f"{path} imports {name}"


def test_the_scan_sees_imports():
    """The checks above would pass on a scan that found nothing: it finds the known imports."""
    assert "fastmaskformer.ops._dispatch" in imports(os.path.join(PKG, "ops", "_mask_loss.py"))
    assert "fastmaskformer.kernels._common" in imports(os.path.join(ROOT, "kernels", "mask_loss.py"))
    assert "fastmaskformer.ops" in imports(os.path.join(PKG, "matcher.py"))
