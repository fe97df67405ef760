"""Every public function, class and method of embedtl (at module and class level, methods of
private classes included) says what it is: a docstring (issue "Structure, second pass")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embedtl"


def _public(name: str) -> bool:
    return not name.startswith("_")


def undocumented(root: Path = PACKAGE) -> list[str]:
    """``path:line name`` of each public definition without a docstring."""
    missing = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(root.parent)
        defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        for node in tree.body:
            if not isinstance(node, defs):
                continue
            if _public(node.name) and ast.get_docstring(node) is None:
                missing.append(f"{rel}:{node.lineno} {node.name}")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if (
                        isinstance(sub, defs)
                        and _public(sub.name)
                        and ast.get_docstring(sub) is None
                        and not _is_overload_or_property_setter(sub)
                    ):
                        missing.append(f"{rel}:{sub.lineno} {node.name}.{sub.name}")
    return missing


def _is_overload_or_property_setter(node) -> bool:
    for d in getattr(node, "decorator_list", []):
        if isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter"):
            return True
    return False


def test_every_public_name_has_a_docstring():
    missing = undocumented()
    assert not missing, f"{len(missing)} public definitions without a docstring:\n" + "\n".join(
        missing
    )


def test_the_walk_finds_a_missing_docstring(tmp_path):
    pkg = tmp_path / "embedtl"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        '"""m."""\n\ndef f():\n    pass\n\n\nclass _C:\n    def run(self):\n        pass\n\n'
        '    def _hidden(self):\n        pass\n\n\ndef g():\n    """g."""\n'
    )
    assert undocumented(pkg) == ["embedtl/m.py:3 f", "embedtl/m.py:8 _C.run"]
