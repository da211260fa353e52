"""Routes share code through app.crud and app.api (deps, owned, images), never through another
route module: read from the source, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROUTES = Path(__file__).resolve().parents[2] / "app" / "api" / "routes"


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:  # from . import jobs
            names.update(f"app.api.routes.{node.module or alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            if node.module == "app.api.routes":  # from app.api.routes import jobs
                names.update(f"app.api.routes.{alias.name}" for alias in node.names)
    return names


def test_no_route_imports_another_route() -> None:
    modules = sorted(p for p in ROUTES.glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in modules} >= {"jobs", "results", "gallery", "datasets"}
    offending = {
        path.name: sorted(name for name in _imported_modules(path) if "app.api.routes" in name)
        for path in modules
    }
    assert not {name: found for name, found in offending.items() if found}
