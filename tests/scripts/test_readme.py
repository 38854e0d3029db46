"""The README stays true: its field table is the one the dataclasses generate, its commands exist."""

import re

from specifications import markdown_table
from tests.helpers.runs import REPO


def test_field_table_matches_the_dataclasses():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- spec-table -->\n(.*?)\n<!-- end: spec-table -->", readme, re.S)
    assert table, "README.md lost its spec-table markers"
    assert table.group(1) == markdown_table(), "README.md's field table is stale: paste `python specifications.py`"


def test_setup_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 && pip install -r requirements.txt" in readme
    assert "python -m pytest" in readme and "python3 -m pytest" in ci
    assert "pip install torch==2.13.0" in ci and "requirements.txt" in ci
    for script in ("train-sentencepiece.py", "Utilities/tokenize-dataset.py", "pre-training.py", "quickstart.py"):
        assert script in readme and (REPO / script).is_file(), script
