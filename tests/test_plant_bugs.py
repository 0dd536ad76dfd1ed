"""scripts/plant_bugs.py stays runnable: every planted bug's text occurs exactly once in the
eager reference (a reference edit left one bug unplantable since the thirtieth session: the
script stopped at it before planting anything) and its tests exist. The planting itself (the
suite run once per bug and seed) is the script's job, not CI's."""
import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plant_bugs():
    spec = importlib.util.spec_from_file_location(
        "plant_bugs", os.path.join(ROOT, "scripts", "plant_bugs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUGS = _plant_bugs().BUGS
REFERENCE = open(os.path.join(ROOT, "python", "attnkit", "reference.py")).read()


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_bug_applies(bug):
    assert REFERENCE.count(bug.old) == 1, f"{bug.name}: the text to mutate is not in reference.py once"
    assert bug.new != bug.old, f"{bug.name}: planting changes nothing"
    for pattern in bug.tests:
        assert glob.glob(os.path.join(ROOT, "tests", pattern)), f"{bug.name}: no tests match {pattern}"


def test_bug_names_unique():
    names = [b.name for b in BUGS]
    assert len(names) == len(set(names))
