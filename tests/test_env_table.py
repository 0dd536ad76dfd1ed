"""Every environment variable the C++ side reads is an entry of csrc/cuda/env_table.h (issue #16):
no other getenv call in csrc/, no ATTNKIT_* name in a string literal outside the table, and
docs/env.md's kernel-choice table lists exactly the table's names."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLE = ROOT / "csrc" / "cuda" / "env_table.h"
SOURCES = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in {".h", ".cuh", ".cu", ".cpp", ".inc"}]
NAME = re.compile(r'"(ATTNKIT_[A-Z0-9_]+)"')


def table_names():
    names = NAME.findall(TABLE.read_text())
    assert names, "no entries parsed from env_table.h"
    return names


def test_table_names_unique():
    names = table_names()
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_only_the_table_reads_the_environment():
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES
                 if p != TABLE and re.search(r"\bgetenv\s*\(", p.read_text())]
    assert offenders == [], f"getenv outside env_table.h: {offenders}"


def test_no_variable_name_outside_the_table():
    offenders = {}
    for p in SOURCES:
        if p == TABLE:
            continue
        found = NAME.findall(p.read_text())
        if found:
            offenders[str(p.relative_to(ROOT))] = sorted(set(found))
    assert offenders == {}, f"ATTNKIT_* string literals outside env_table.h: {offenders}"


def test_docs_list_exactly_the_table():
    doc = (ROOT / "docs" / "env.md").read_text()
    section = doc.split("## Kernel choice", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(ATTNKIT_[A-Z0-9_]+)`", section))
    assert documented == set(table_names()), (
        f"only in docs: {sorted(documented - set(table_names()))}, "
        f"only in the table: {sorted(set(table_names()) - documented)}")
