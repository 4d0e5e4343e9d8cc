"""The documentation runs as written, and its links lead somewhere.

Pages: README.md, CONTRIBUTING.md and docs/*.md. Fence convention (the words after a block's opening ```):

    ```python            run by test_python_block: as written, on the CPU, offline, with the built-in default
                         model (`mrrm.load()` / `mrrm.score(...)` with no path), in a fresh namespace with a
                         temporary directory as the working directory. It must take seconds. A block that
                         raises fails the test.
    ```python slow       the same, marked `slow` (a block over ~1 s on its own, once torch is imported)
    ```python no-run     shown, never run: it needs a GPU, a Hub download, a real checkpoint or data path,
                         another framework (TRL, veRL) or several machines. It must still compile.
    ```bash, ```text ... never run (commands, outputs, trees)

Any other word after ```python is an error (test_fences_follow_the_convention), so a typo cannot turn a
block off. test_relative_links: every link that is not a URL (http, https, mailto) names a file or folder
inside the repository that exists, and a #fragment names a heading of the page it points to (GitHub's
anchors); no link leaves the repository.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
LINKED_PAGES = PAGES + [ROOT / "bench_perf" / "RESULTS.md"]  # links checked here too
RUN_MODES = {"": "run", "slow": "slow", "no-run": "no-run"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`]*?)\s*$")


@dataclass
class Block:
    page: Path
    line: int          # 1-based line of the opening fence
    lang: str          # the first word after the fence ("" when none)
    words: str         # the rest of the info string
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page (indented fences inside list items included, dedented)."""
    out, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        lang, _, words = info.partition(" ")
        out.append(Block(page, i + 1, lang, words.strip(), "\n".join(body) + "\n"))
        i = j + 1
    return out


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]
RUNNABLE = [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.words == "slow" else [])
            for b in PYTHON if b.words in ("", "slow")]
NO_RUN = [pytest.param(b, id=b.id) for b in PYTHON if b.words == "no-run"]


def test_fences_follow_the_convention():
    bad = [f"{b.id}: ```python {b.words}" for b in PYTHON if b.words not in RUN_MODES]
    assert not bad, "unknown words after ```python (use nothing, 'slow' or 'no-run'): " + "; ".join(bad)
    assert any(b.page.name == "README.md" and b.words in ("", "slow") for b in PYTHON), \
        "README.md has no runnable ```python block (its scoring example)"
    assert len(RUNNABLE) >= 8, f"only {len(RUNNABLE)} runnable python blocks found: is the parser broken?"


@pytest.fixture
def offline(monkeypatch):
    """No network for a block: connections other than loopback and Unix sockets are refused."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"tests/test_docs.py: a documentation block tried to reach {address!r} (no network)")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("block", RUNNABLE)
def test_python_block(block: Block, tmp_path, monkeypatch, offline):
    """Runs one ```python block as written: a fresh namespace, the CPU, a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code = compile(block.code, f"{block.id} (```python block)", "exec")
    exec(code, {"__name__": "__docs__"})  # the repository's own documentation, as a reader would run it


@pytest.mark.parametrize("block", NO_RUN)
def test_no_run_block_compiles(block: Block):
    compile(block.code, f"{block.id} (```python no-run block)", "exec")


# ---------------------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def outside_fences(page: Path) -> list[tuple[int, str]]:
    """(line number, line) of a page outside its fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
        elif fence is not None:
            if re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
                fence = None
        else:
            out.append((n, line))
    return out


def prose(page: Path) -> list[tuple[int, str]]:
    """The lines outside code blocks with inline code spans blanked (a link inside backticks is no link)."""
    return [(n, re.sub(r"(`+)(?:(?!\1).)+?\1", lambda s: " " * len(s.group(0)), line)) for n, line in outside_fences(page)]


def links(page: Path) -> list[tuple[int, str]]:
    found = []
    for n, text in prose(page):
        found += [(n, m.group(1)) for m in LINK.finditer(text)]
        found += [(n, m.group(1)) for m in REFERENCE.finditer(text)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    out, count = set(), {}
    for _, line in outside_fences(page):
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            k = count.get(base, 0)
            count[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
    return out


def test_link_checker_finds_links_and_anchors():
    readme = ROOT / "README.md"
    targets = [t for _, t in links(readme)]
    assert "docs/scoring.md" in targets and "bench_perf/speedup.png" in targets
    assert slug("Scoring a file (`python -m mrrm.score`, `mrrm score`)") == "scoring-a-file-python--m-mrrmscore-mrrm-score"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links(page: Path):
    """Every relative link resolves to a file or folder inside the repository; #fragments name a heading."""
    problems = []
    for n, target in links(page):
        if URL.match(target):
            continue
        where = f"{page.relative_to(ROOT)}:{n}: {target}"
        path_part, _, fragment = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{where}: an absolute path (links are relative to the page)")
            continue
        dest = (page.parent / path_part).resolve() if path_part else page
        if dest != ROOT and ROOT not in dest.parents:
            problems.append(f"{where}: leaves the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{where}: no heading with the anchor #{fragment} in {dest.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_pages_list_is_what_readme_links():
    """Every page of docs/ is reachable from README.md."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md") if not URL.match(t)}
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"
