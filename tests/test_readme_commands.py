"""The README and the docs/ pages: every pipeline command shown in them (the upstream README's commands among them)
parses with our scripts, as written; the README stays short and links every docs page; every relative link in them
points at a file (and heading) that exists.

A new docs page needs nothing here: every ``docs/*.md`` is picked up, must be linked from the README, and its
commands and links are checked like the README's.
"""

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from tiny_run import REPO_ROOT

from ddpm_ood.cli.options import refuse_unsupported

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250  # issue 25: a new user reads what it is, two commands, one table, the pipeline and links
SCRIPTS = {
    "train_ddpm.py": "train_ddpm",
    "train_vqvae.py": "train_vqvae",
    "reconstruct.py": "reconstruct",
    "ood_detection.py": "ood_detection",
    "score.py": "score",
    "get_datasets.py": "get_datasets",
    "src/data/get_computer_vision_datasets.py": "get_datasets",
    "src/data/get_mednist_datasets.py": "get_mednist_datasets",
    "src/data/get_decathlon_datasets.py": "get_decathlon_datasets",
    "src/data/get_3dmedmnist.py": "get_3dmedmnist",
}
SHELL_LANGUAGES = {"bash", "sh", "shell"}
# The paper's pipeline, in the order the README must show it: data -> train (python and torchrun) -> reconstruct ->
# detect -> score new inputs.
README_PIPELINE = [
    ("python", "get_datasets.py"),
    ("python", "train_ddpm.py"),
    ("torchrun", "train_ddpm.py"),
    ("python", "reconstruct.py"),
    ("python", "ood_detection.py"),
    ("python", "score.py"),
]


def rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def split_fences(text: str) -> tuple[list[tuple[str, int, list[str]]], list[str]]:
    """The fenced code blocks of a markdown text as (language, line number of the first body line, body lines), and
    the text's lines outside them (blocks blanked, so line numbers stay)."""
    blocks, prose = [], []
    language, start, body = None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if language is None:
                language, start, body = line.lstrip()[3:].strip(), n + 1, []
            else:
                blocks.append((language, start, body))
                language = None
            prose.append("")
        elif language is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert language is None, f"unclosed ``` block from line {start - 1}"
    return blocks, prose


def shell_lines(text: str) -> list[tuple[int, list[str]]]:
    """Every logical line (backslash continuations joined) of the shell blocks, as (line number, words)."""
    lines = []
    for language, start, body in split_fences(text)[0]:
        if language not in SHELL_LANGUAGES:
            continue
        joined, first = "", None
        for n, line in enumerate(body, start):
            first = n if first is None else first
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            words = shlex.split(joined + line, comments=True)
            if words:
                lines.append((first, words))
            joined, first = "", None
        assert not joined, f"block at line {start}: a continuation line ends the block"
    return lines


def launched_script(words: list[str]) -> tuple[str, int] | None:
    """(launcher, index of the script) when the line runs one of SCRIPTS with python/python3 or torchrun."""
    for i, word in enumerate(words):
        if word.removeprefix("./") not in SCRIPTS or i == 0:
            continue
        if words[i - 1] in ("python", "python3"):
            return "python", i
        launcher = next((j for j in range(i - 1, -1, -1) if not words[j].startswith("-")), None)
        if launcher is not None and words[launcher] == "torchrun":
            return "torchrun", i
    return None


def page_commands(path: Path) -> list[tuple[int, str, str, list[str]]]:
    """(line, launcher, script, argv) for every command of the page that runs one of SCRIPTS."""
    commands = []
    for line, words in shell_lines(path.read_text()):
        found = launched_script(words)
        if found:
            launcher, i = found
            commands.append((line, launcher, words[i].removeprefix("./"), words[i + 1:]))
    return commands


COMMANDS = [(rel(page), *command) for page in PAGES for command in page_commands(page)]


@pytest.mark.parametrize("page,line,launcher,script,argv", COMMANDS,
                         ids=[f"{c[0]}:{c[1]} {c[3]}" for c in COMMANDS])
def test_command_parses(page, line, launcher, script, argv):
    module = importlib.import_module(f"ddpm_ood.cli.{SCRIPTS[script]}")
    argv = [w.replace("${data_root}", "/data").replace("${output_root}", "/out") for w in argv]
    args = module.build_parser().parse_args(argv)
    refuse_unsupported(args)


def test_pages_run_every_script():
    """The upstream README's commands (and ours) stay somewhere: every entry script is shown in README or docs/."""
    shown = {c[3] for c in COMMANDS}
    assert set(SCRIPTS) <= shown, f"no page shows a command for {sorted(set(SCRIPTS) - shown)}"


def test_readme_shows_the_papers_pipeline_in_order():
    shown = [(launcher, "get_datasets.py" if SCRIPTS[script] == "get_datasets" else script)
             for _, launcher, script, _ in page_commands(README)]
    missing = [step for step in README_PIPELINE if step not in shown]
    assert not missing, f"README lacks the pipeline commands {missing}"
    firsts = [shown.index(step) for step in README_PIPELINE]
    assert firsts == sorted(firsts), f"README shows the pipeline out of order: {[shown[i] for i in sorted(firsts)]}"


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_every_named_script_is_run_as_a_command_and_exists(page):
    """A script named in a shell block is launched in a way the parse test sees (not silently skipped), and every
    file or `python -m` module a shell block names exists."""
    problems = []
    for line, words in shell_lines(page.read_text()):
        for i, word in enumerate(words):
            if word.removeprefix("./") in SCRIPTS and launched_script(words) is None:
                problems.append(f"line {line}: {word} is not run with python/python3/torchrun")
            if re.fullmatch(r"[\w./-]+\.(py|sh)", word) and not (REPO_ROOT / word).is_file():
                problems.append(f"line {line}: {word} does not exist")
            if word == "-m" and i > 0 and words[i - 1] in ("python", "python3"):
                module = words[i + 1]
                if module.split(".")[0] == "ddpm_ood" and importlib.util.find_spec(module) is None:
                    problems.append(f"line {line}: python -m {module}: no such module")
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to a docs/ page"


# [text](target "title") and ![alt](target), a reference definition [label]: target, and HTML src="" / href="".
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^()\s>]+)>?(?:\s+"[^"]*")?\s*\)'
                  r"|^\s*\[[^\]]+\]:\s*(\S+)"
                  r'|(?:src|href)="([^"]+)"', re.M)


def links(path: Path) -> list[str]:
    """The link and image targets of a markdown page, outside code blocks and inline code."""
    prose = "\n".join(split_fences(path.read_text())[1])
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return [next(g for g in m.groups() if g) for m in LINK.finditer(prose)]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (a repeated heading gets -1, -2, ...)."""
    found, counts = set(), {}
    for line in split_fences(path.read_text())[1]:
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def is_external(target: str) -> bool:
    return re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) is not None  # https:, mailto:, ...: not checked offline


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_relative_links_point_at_existing_files(page):
    broken = []
    for target in links(page):
        if is_external(target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {rel(resolved)}")
    assert not broken, f"{rel(page)}: broken links\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README) if not is_external(t)}
    unlinked = [rel(p) for p in pages if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"
