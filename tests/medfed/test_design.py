"""docs/design.md holds: dependencies point one way, and every test the design names exists.

The import rules are read from the source with ast (imports inside functions
count too), so a lazy import cannot slip a layer violation past the test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"

#: What every medfed part shares (settings, the wire format, file and process helpers): imports only itself.
CORE = ("medfed.hardening", "medfed.settings", "medfed.protocol", "medfed.wire", "medfed.files", "medfed.fab",
        "medfed.node_keys", "medfed.processes", "medfed.logs", "medfed.signing",
        "medfed.labelling")
#: The top: the command line (the medfed.cli package) and the demo; nothing imports it.
TOP = ("medfed.cli", "medfed.demo", "medfed.synth", "medfed.studies")
#: Our own top-level packages (an import of anything else is a third-party or standard one).
OURS = ("medfed", "anonymization", "models", "site_client", "coordinator", "tests", "bench")

#: layer -> the modules of ours it may import (by prefix), as docs/design.md's "Parts" draws it.
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": CORE,
    "anonymization": ("anonymization",) + CORE,
    "models": ("models",) + CORE,
    "site_client": ("site_client", "anonymization", "models") + CORE,
    # The coordinator has no business with DICOM or the site: only the anchor format both ends must agree on.
    "coordinator": ("coordinator", "models", "anonymization.audit.anchors") + CORE,
    "top": OURS,
}
#: Third-party packages a layer must never import, and why.
FORBIDDEN_THIRD_PARTY = {
    # de-identification runs beside the PACS on machines without torch or Flower
    "anonymization": ("torch", "flwr", "opacus", "monai"),
}


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_top(module: str) -> bool:
    return _matches(module, TOP)


def _allowed(name: str, layer: str) -> bool:
    """``import medfed`` (the package: its hardening) is fine anywhere; the rest as ALLOWED says."""
    return name == "medfed" or layer == "top" or (not _is_top(name) and _matches(name, ALLOWED[layer]))


def _layer(module: str) -> str:
    if _is_top(module):
        return "top"
    if _matches(module, CORE) or module == "medfed":
        return "core"
    return module.split(".")[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, top level or not."""
    tree = ast.parse(path.read_text("utf-8"), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from medfed import hardening` imports the submodule medfed.hardening
            out += [(node.lineno, f"{module}.{alias.name}") if module in OURS else (node.lineno, module)
                    for alias in node.names]
    return out


def _sources() -> list[Path]:
    return sorted(p for pkg in ("medfed", "anonymization", "models", "site_client", "coordinator")
                  for p in (ROOT / pkg).rglob("*.py"))


def _violations() -> list[str]:
    problems = []
    for path in _sources():
        module = _module_name(path)
        layer = _layer(module)
        for line, name in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if _matches(name, OURS) and not _allowed(name, layer):
                problems.append(f"{where}: the {layer} layer may not import it (docs/design.md, Parts)")
            if _matches(name, FORBIDDEN_THIRD_PARTY.get(layer, ())):
                problems.append(f"{where}: the {layer} layer must run without it (docs/design.md, Parts)")
    return problems


def test_dependencies_point_one_way() -> None:
    assert _violations() == []


@pytest.mark.parametrize(("module", "source", "layer"), [
    ("anonymization/engine.py", "import site_client.task\n", "anonymization"),
    ("anonymization/engine.py", "def f():\n    from coordinator import strategy\n", "anonymization"),
    ("anonymization/engine.py", "import torch\n", "anonymization"),
    ("models/training.py", "from coordinator.history import RunHistory\n", "models"),
    ("models/training.py", "from anonymization.engine import Deidentifier\n", "models"),
    ("coordinator/strategy.py", "from site_client import egress\n", "coordinator"),
    ("coordinator/strategy.py", "from anonymization.engine import Deidentifier\n", "coordinator"),
    ("site_client/task.py", "from medfed.cli import app\n", "site_client"),
    ("anonymization/batch.py", "from medfed.cli.output import fail\n", "anonymization"),
    ("medfed/settings.py", "from models import network\n", "core"),
    ("medfed/files.py", "from . import demo\n", "core"),
])
def test_the_check_catches_an_import_against_the_direction(
    module: str, source: str, layer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each planted import is reported: the rule is not vacuous."""
    planted = ROOT / module
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        text = real(self, *args, **kwargs)  # type: ignore[arg-type]
        return text + "\n" + source if self == planted else text

    monkeypatch.setattr(Path, "read_text", read_text)
    problems = _violations()
    assert len(problems) == 1 and problems[0].startswith(module) and f"the {layer} layer" in problems[0]


def _import_cycle(package: str) -> list[str]:
    """The first import cycle among ``package``'s modules (its ``__init__`` included), or []; lazy imports count."""
    folder = ROOT.joinpath(*package.split("."))
    modules = {_module_name(path): path for path in sorted(folder.glob("*.py"))}
    graph = {}
    for module, path in modules.items():
        # an import of a submodule (or a name in it) is an edge to that module; of the package, to its __init__
        graph[module] = {max((m for m in modules if _matches(name, (m,))), key=len)
                         for _line, name in _imports(path) if _matches(name, (package,))}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for nxt in sorted(graph[module]):
            if cycle := visit(nxt, [*path, module]):
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        if cycle := visit(module, []):
            return cycle
    return []


def test_the_audit_subpackage_has_no_import_cycle() -> None:
    """The verifier reads the trail's format without the writer: no module of anonymization.audit imports back."""
    assert _import_cycle("anonymization.audit") == []


@pytest.mark.parametrize("source", [
    "from anonymization.audit.trail import AuditTrail\n",
    "def f():\n    from anonymization.audit import AuditTrail\n",
])
def test_the_cycle_check_catches_the_verifier_importing_the_writer(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted import back from verify.py (top level or lazy, as the writer's lazy one once was) is a cycle."""
    planted = ROOT / "anonymization" / "audit" / "verify.py"
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        text = real(self, *args, **kwargs)  # type: ignore[arg-type]
        return text + "\n" + source if self == planted else text

    monkeypatch.setattr(Path, "read_text", read_text)
    cycle = _import_cycle("anonymization.audit")
    assert "anonymization.audit.verify" in cycle and cycle[0] == cycle[-1]


#: A test file or test named in a document: `tests/<package>/test_x.py` or `tests/<package>/test_x.py::test_y`.
_NAMED_TEST = re.compile(r"(tests/(?:\w+/)*test_\w+\.py)(?:::(test_\w+))?")


def test_every_test_the_design_names_exists() -> None:
    """docs/design.md names the tests that enforce each invariant; a renamed or deleted test breaks this."""
    assert len([m for m in _NAMED_TEST.finditer(DESIGN.read_text("utf-8")) if m.group(2)]) >= 30
    missing = []
    for doc in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md")), *sorted(ROOT.glob("deploy/*.md"))]:
        for m in _NAMED_TEST.finditer(doc.read_text("utf-8")):
            file, name = m.groups()
            path = ROOT / file
            if not path.is_file() or (name and not re.search(rf"(?m)^(async )?def {name}\(", path.read_text("utf-8"))):
                missing.append(f"{doc.relative_to(ROOT)}: {m.group(0)}")
    assert missing == []


def test_every_invariant_names_a_test_and_every_citation_points_at_one() -> None:
    """Each numbered invariant names at least one test; code citing "invariant N" cites one that exists."""
    text = DESIGN.read_text("utf-8")
    section = text.split("## Invariants", 1)[1].split("\n## ", 1)[0]
    items = re.split(r"(?m)^(?=\d+\. )", section)[1:]
    numbers = [int(item.split(".", 1)[0]) for item in items]
    assert numbers == list(range(1, len(items) + 1))
    assert all(_NAMED_TEST.search(item) for item in items), "an invariant without a test"
    cited = set()
    for path in [*_sources(), ROOT / "Makefile", *ROOT.glob("docs/*.md"), *ROOT.glob("tests/**/*.py")]:
        for m in re.finditer(r"(DESIGN\.md|design\.md),? invariants? (\d+)", path.read_text("utf-8")):
            assert m.group(1) == "design.md", f"{path}: cites the old DESIGN.md"
            cited.add(int(m.group(2)))
    assert cited and cited <= set(numbers)
