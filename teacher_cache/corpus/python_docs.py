"""The built-in `python-docs` corpus: the Python standard library's docstrings and the
language-reference topics that `pydoc` ships (pydoc_data/topics.py).

Real English prose present on every machine with Python, read with `ast` (nothing is
imported or executed). Documents come in sorted file order, so the corpus is deterministic
for a given Python build; its fingerprint is the hash of the collected text.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

MIN_WORDS = 8
"""Shorter docstrings ("Return x.") carry little language and are skipped."""
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_python_docs(root: Path | None = None) -> Iterator[str]:
    """Docstrings, then the pydoc topics split into paragraphs (each a document)."""
    root = root or stdlib_root()
    yield from iter_docstrings(root)
    yield from iter_pydoc_topics(root)


def iter_pydoc_topics(root: Path) -> Iterator[str]:
    """Paragraphs of the language reference bundled as pydoc_data/topics.py (if present)."""
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                for para in topics[name].split("\n\n"):
                    if len(para.split()) >= MIN_WORDS:
                        yield para
            return


def iter_docstrings(root: Path | None = None) -> Iterator[str]:
    """Module, class and function docstrings of every stdlib source file, in sorted path order."""
    root = root or stdlib_root()
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc.split()) >= MIN_WORDS:
                    yield doc
