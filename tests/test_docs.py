"""The docs name real code: every `path` of the repository's source folders and every `path::name` (a function,
class or Class.method defined in that file) in README.md and docs/ exists, so a page fails the suite when the
code moves without it."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "benchmarks/README.md", *sorted((REPO / "docs").rglob("*.md"))]
SOURCE = r"(?:engine|kernels|recipes|tools|benchmarks|tests|docs|scripts)/[\w./-]*\w"
REFERENCE = re.compile(rf"`({SOURCE})(?:::([\w.]+))?`")


def _defined(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{item.name}" for item in node.body
                          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _references():
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for path, name in REFERENCE.findall(line):
                yield f"{page.relative_to(REPO)}:{number}", path, name


REFERENCES = list(_references())


def test_the_pages_name_code():
    assert len(REFERENCES) > 50 and sum(1 for _, _, name in REFERENCES if name) > 30


@pytest.mark.parametrize("where,path,name", REFERENCES, ids=[f"{w} {p}::{n}" if n else f"{w} {p}"
                                                             for w, p, n in REFERENCES])
def test_named_code_exists(where, path, name):
    target = REPO / path
    assert target.exists(), f"{where}: {path} does not exist"
    if name:
        assert name in _defined(target), f"{where}: {path} defines no {name}"
