"""The docs stay true: every relative link in README.md, docs/ and the other Markdown pages points at a file that
exists (and at a heading there, for `#anchor`), and every `vlmcache ...` command they quote names a real
subcommand and only flags that its `--help` lists. Read from typer's click objects directly: no process, no torch.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from vlmcache.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "FIDELITY.md", ROOT / "pipelines" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
)
# pages that other branches write, linked from here before they merge: a missing one is a skip naming it, never a
# pass; once they exist, their links are checked like any other
WRITTEN_ELSEWHERE = {"docs/outputs.md", "docs/tail.md"}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a Markdown text (outside code blocks), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """Link targets outside code blocks and code spans."""
    prose = INLINE.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def broken_links(page: Path, text: str | None = None) -> tuple[list[str], list[str]]:
    """(what is wrong with the page's relative links, the targets written on other branches and not here yet)."""
    text = page.read_text() if text is None else text
    wrong, pending = [], []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            rel = _rel(dest)
            (pending if rel in WRITTEN_ELSEWHERE else wrong).append(f"{target} (no file {rel})")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            wrong.append(f"{target} (no heading #{anchor} in {_rel(dest)})")
    return wrong, pending


def commands(text: str) -> list[str]:
    """Every `vlmcache ...` command line quoted in code blocks (continuations joined) and in code spans, from the
    word vlmcache on (also after `python -m` or `torchrun ... -m`)."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line)
    found += [span for span in INLINE.findall(FENCE.sub("", text)) if span.startswith("vlmcache ")]
    out = []
    for line in found:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: not a shell line
            continue
        starts = [i for i, w in enumerate(words) if w == "vlmcache" and (i == 0 or words[i - 1] == "-m")]
        if starts:
            out.append(shlex.join(words[starts[0] :]))
    return out


def command_problem(line: str, root=None) -> str | None:
    """Why a quoted `vlmcache ...` line would not parse (an unknown subcommand or a flag its --help lacks). Groups
    are told by their `commands` (typer vendors its own click, so no isinstance against click's classes)."""
    cmd = root or typer.main.get_command(app)
    words = shlex.split(line)[1:]
    path = ["vlmcache"]
    while hasattr(cmd, "commands") and words and not words[0].startswith("-"):
        sub = cmd.commands.get(words[0])
        if sub is None:
            if words[0] == "...":
                return None  # an elided command ("vlmcache ...")
            return f"`{' '.join(path)}` has no subcommand '{words[0]}'; it has: {', '.join(sorted(cmd.commands))}"
        path.append(words.pop(0))
        cmd = sub
    flags = {"--help"}
    for param in cmd.params:
        flags.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("-"))
    for word in words:
        if not word.startswith("-") or word == "-" or re.fullmatch(r"-[\d.]+", word):
            continue
        flag = word.split("=", 1)[0]
        if flag not in flags:
            return f"`{' '.join(path)}` has no flag {flag} (its flags: {', '.join(sorted(flags))})"
    return None


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_files_and_headings(page):
    wrong, pending = broken_links(page)
    assert not wrong, f"{_rel(page)}: broken links: {'; '.join(wrong)}"
    if pending:
        pytest.skip(f"{_rel(page)} links pages written on other branches, not here yet: {'; '.join(pending)}")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_quoted_commands_parse(page):
    root = typer.main.get_command(app)
    quoted = commands(page.read_text())
    problems = [f"{line}\n    {p}" for line in quoted if (p := command_problem(line, root))]
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


def test_the_docs_quote_commands_and_link_each_page():
    """The checks above check something: the README and docs quote commands, and the README links every page."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    assert sum(len(commands(p.read_text())) for p in PAGES) > 40
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    for name in WRITTEN_ELSEWHERE:
        assert f"({name})" in readme


def test_the_checks_catch_what_they_should(tmp_path):
    """A broken link, a missing heading, an unknown subcommand and an unknown flag are each found."""
    (tmp_path / "there.md").write_text("# Here it is\n\n## Fine-tuning (`vlmcache finetune`)\n")
    page = tmp_path / "page.md"
    text = (
        "[ok](there.md) [ok](there.md#here-it-is) [ok](there.md#fine-tuning-vlmcache-finetune) [web](https://x.org)\n"
        "[gone](missing.md) [no heading](there.md#nowhere)\n\n"
        "```bash\nvlmcache train-head --loss focal \\\n    --epochs 3   # a comment --not-a-flag\n"
        "torchrun --nproc_per_node 2 -m vlmcache extract --dataset digits_lt\nvlmcache trian-head --loss ce\n"
        "vlmcache cache verify --repiar\n```\n\nand `vlmcache knn --kk 5` inline.\n"
    )
    wrong, pending = broken_links(page, text)
    assert [w.split(" ")[0] for w in wrong] == ["missing.md", "there.md#nowhere"]
    assert not pending
    quoted = commands(text)
    assert quoted[:2] == ["vlmcache train-head --loss focal --epochs 3", "vlmcache extract --dataset digits_lt"]
    root = typer.main.get_command(app)
    problems = [command_problem(line, root) for line in quoted]
    assert problems[:2] == [None, None]
    assert "no subcommand 'trian-head'" in problems[2]
    assert "`vlmcache cache verify` has no flag --repiar" in problems[3]
    assert "`vlmcache knn` has no flag --kk" in problems[4]
    assert slug("7. Measured by hand") == "7-measured-by-hand"
