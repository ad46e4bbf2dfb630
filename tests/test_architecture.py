"""The floors of the package (docs/architecture.md): what each layer may import."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "monai_amat"
GROUND = ("utils", "random_state", "attacks", "criteria", "margins", "losses", "metrics")


def _imports(path):
    """The modules a file imports (absolute names), at any depth, ``TYPE_CHECKING`` blocks included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(*parts):
    return [
        p
        for part in parts
        for p in ([PACKAGE / f"{part}.py"] if (PACKAGE / f"{part}.py").exists() else (PACKAGE / part).glob("*.py"))
    ]


def test_ground_floor_imports_no_ignite_and_nothing_above_it():
    for path in _files(*GROUND):
        bad = {
            m
            for m in _imports(path)
            if m.split(".")[0] == "ignite"
            or m.startswith(("monai.engines", "monai.handlers"))
            or (m.startswith("monai_amat.") and m.split(".")[1] not in GROUND)
        }
        assert not bad, (path.name, bad)


def test_engines_and_handlers_keep_to_their_floors():
    for path in _files("engines"):
        bad = {
            m
            for m in _imports(path)
            if m.startswith(("monai_amat.data", "monai_amat.networks", "monai_amat.transforms", "monai_amat.handlers"))
        }
        assert not bad, (path.name, bad)
    for path in _files("handlers"):
        bad = {m for m in _imports(path) if m.startswith(("monai_amat.engines", "monai_amat.data"))}
        assert not bad, (path.name, bad)
    for path in _files("data", "transforms", "networks"):
        bad = {m for m in _imports(path) if m.startswith(("monai_amat.engines", "monai_amat.handlers"))}
        assert not bad, (path.name, bad)


def test_only_the_applications_import_the_applications():
    """``monai_amat.apps`` is the top floor: nothing below it imports it."""
    below = [p for p in PACKAGE.rglob("*.py") if "apps" not in p.relative_to(PACKAGE).parts]
    assert len(below) > 20
    for path in below:
        bad = {m for m in _imports(path) if m.startswith("monai_amat.apps")}
        assert not bad, (path.relative_to(PACKAGE), bad)
