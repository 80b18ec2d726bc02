"""README.md and docs/ stay true to the code: every relative link and anchor resolves, and every
`python -m MODULE --flag` (or torchrun -m) in a code block names a module that exists and flags its
parser takes (argparse parsers read by introspection; the trainer's flags are TrainConfig fields)."""

import argparse
import importlib
import importlib.util
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page):
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to -."""
    out = set()
    for line in page.read_text().splitlines():
        if m := re.match(r"#+\s+(.*)", line):
            out.add(re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-"))
    return out


def prose(page):
    """The page without its code blocks (a link inside code is not a link)."""
    text = page.read_text()
    for block in re.findall(r"^```.*?^```", text, flags=re.S | re.M):
        text = text.replace(block, "")
    return text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no {file})")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.name}: {broken}"


def shell_blocks(page):
    """The text of each ```bash (or unlabelled) fenced block."""
    blocks, current = [], None
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current = [] if line.strip("`").strip() in ("", "bash", "sh") else False
            else:
                if current is not False:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current:
            current.append(line)
        elif current == []:
            current.append(line)
    return blocks


def commands(page):
    """(module, [arguments]) of every python -m / torchrun -m command in the page's code blocks."""
    out = []
    for block in shell_blocks(page):
        text = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in text.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # quotes kept, && ; | split off
            lexer.whitespace_split, lexer.commenters = True, "#"
            words, parts = list(lexer), [[]]
            for word in words:
                parts.append([]) if word in ("&&", ";", "|", "||", "&") else parts[-1].append(word)
            for words in parts:
                if "-m" in words and words[0] in ("python", "torchrun") and "pytest" not in words:
                    i = words.index("-m")
                    out.append((words[i + 1], words[i + 2:]))
    return out


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(module):
    """The argparse parser a command's main builds, caught at its parse_args / parse_known_args."""
    main = importlib.import_module(module).main

    def capture(self, *args, **kwargs):
        raise Captured(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        main() if module == "data.classifier" else main([])
    except Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise AssertionError(f"{module}.main parsed no arguments")


def flags(args):
    return [a.split("=")[0] for a in args if a.startswith("--")]


TRAINER = {"train.dreambooth", "train.demo"}  # their --field=value are TrainConfig fields (train.demo passes them on)


def test_the_docs_hold_commands():
    """The check below has something to check: the pages name every command the project has."""
    named = {module for page in PAGES for module, _ in commands(page)}
    assert {"sampling.generate", "sampling.ablate", "train.dreambooth", "models.convert", "models.init",
            "data.evaluate", "train.demo", "models.merge"} <= named, named


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_name_modules_and_flags_that_exist(page):
    from train.config import TrainConfig

    fields_ = {"config"} | {f.name for f in fields(TrainConfig)}
    wrong = []
    for module, args in commands(page):
        if importlib.util.find_spec(module) is None:
            wrong.append(f"python -m {module}: no such module")
            continue
        parser = parser_of(module) if module != "train.dreambooth" else None
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None) if parser else None
        if sub is not None and args and args[0] in sub.choices:  # a subcommand's own flags (models.merge sum ...)
            parser = sub.choices[args[0]]
        known = set(parser._option_string_actions) if parser else set()
        for flag in flags(args):
            if flag not in known and not (module in TRAINER and flag[2:] in fields_):
                wrong.append(f"python -m {module} {flag}: no such flag")
    assert not wrong, f"{page.name}: {wrong}"
