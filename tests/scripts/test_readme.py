"""The README and the docs pages stay true: the README is a short front page whose set-up blocks are the ones CI
runs, it indexes every page of docs/, every link between them lands on a page and a heading that exist, and the
field table of docs/spec.md is the one the dataclasses generate."""

import re
from pathlib import Path

from specifications import markdown_table
from tests.helpers.runs import REPO

SETUP_BLOCKS = [
    "# 1. Install, then run the whole pipeline on the embedded Portuguese sample (offline, under a minute on 2 CPU "
    "cores)\npip install torch==2.13.0 && pip install -r requirements.txt && python quickstart.py\n",
    "# 2. Run the tests (offline, CPU only)\npip install -r requirements-dev.txt && python -m pytest\n",
]
MAX_README_BYTES = 12_000


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def docs_pages() -> list[Path]:
    return sorted((REPO / "docs").glob("*.md"))


def test_field_table_matches_the_dataclasses():
    page = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- spec-table -->\n(.*?)\n<!-- end: spec-table -->", page, re.S)
    assert table, "docs/spec.md lost its spec-table markers"
    assert table.group(1) == markdown_table(), "docs/spec.md's field table is stale: paste `python specifications.py`"


def test_setup_blocks_are_the_ones_ci_runs():
    section = readme().split("\n## Set-up: two commands\n", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M) == SETUP_BLOCKS
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "## Set-up: two commands" in ci, ".ci/run no longer reads the README's set-up blocks"
    for script in ("train-sentencepiece.py", "Utilities/tokenize-dataset.py", "pre-training.py", "quickstart.py"):
        assert script in readme() and (REPO / script).is_file(), script


def test_the_readme_is_a_short_front_page():
    size = len((REPO / "README.md").read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size:,} bytes; move detail into a page of docs/"


def test_the_readme_indexes_every_docs_page():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme()))
    pages = {p.relative_to(REPO).as_posix() for p in docs_pages()}
    assert linked, "the README links no docs page"
    assert not linked - pages, f"pages the README links that do not exist: {sorted(linked - pages)}"
    assert not pages - linked, f"pages of docs/ the README does not link: {sorted(pages - linked)}"


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_every_link_between_the_pages_lands():
    broken = []
    for page in [REPO / "README.md", *docs_pages()]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_file():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "links that land nowhere:\n" + "\n".join(broken)


def test_the_anchors_are_githubs():
    assert heading_anchors("# Several corpora: `data_args.mixture`\n```\n# not a heading\n```\n## Largest on 80 GB: "
                           "estimates\n") == {"several-corpora-data_argsmixture", "largest-on-80-gb-estimates"}
