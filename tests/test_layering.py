"""The layout's arrows (DESIGN.md): no package imports one that sits on top of it.

Every import in every module is read from its source (module level and inside functions,
absolute and relative), so a lazy import cannot hide a dependency.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

FORBIDDEN = {
    "encdec.engine": ("encdec.whisper", "encdec.bench", "encdec.serving", "encdec.cli"),
    "encdec.models": ("encdec.engine", "encdec.cache", "encdec.whisper", "encdec.bench", "encdec.lora"),
    "encdec.cache": ("encdec.engine", "encdec.whisper", "encdec.bench", "encdec.lora"),
    "encdec.checkpoints": ("encdec.engine", "encdec.whisper", "encdec.bench"),
    "encdec.whisper": ("encdec.bench", "encdec.cli"),
    "encdec.lora": ("encdec.bench", "encdec.whisper", "encdec.cli"),
    "encdec.serving": ("encdec.bench", "encdec.cli"),
    "pallas_kernels": ("encdec",),
}
"""package -> packages none of its modules may import."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module ``source`` (module ``module``) imports, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _modules(package: str):
    folder = ROOT.joinpath(*package.split("."))
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up_the_layout(package):
    modules = _modules(package)
    assert modules, f"no modules under {package}"
    bad = [
        f"{_module_name(m)} imports {name}"
        for m in modules
        for name in sorted(imports_of(m.read_text(), _module_name(m), m.name == "__init__.py"))
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_the_walk_sees_lazy_and_relative_imports():
    source = "def f():\n    from ..whisper import frontend\n    import encdec.bench.run\n"
    names = imports_of(source, "encdec.engine.probe")
    assert {"encdec.whisper", "encdec.whisper.frontend", "encdec.bench.run"} <= names
    assert "encdec.engine.steps" in imports_of("from . import steps\n", "encdec.engine", is_package=True)
