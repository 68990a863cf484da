"""The README and docs/: short README, links that resolve, no paths of this repository's development setup, every
draftsmith command in a code block accepted by its parser (and its config with its overrides), and the README's
headline table equal to the benchmark results it names."""
import argparse
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

from inference.bench_report import method_table
from train.config import load_config, load_dataclass
from train.pipeline import Pipeline
from train.pipeline_config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PACKAGES = ("target", "drafters", "data", "inference", "train")


class Parsed(Exception):
    """Raised right after a command's arguments parsed: nothing of the command runs."""


def commands(page: Path) -> list[str]:
    """The shell commands in the page's ```bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                found += [part.strip() for part in line.split("&&")]
    return found


def draftsmith_argv(command: str) -> tuple[str, list[str]] | None:
    """(module, argv) of a draftsmith command, after env assignments and a deepspeed / torchrun launcher."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words.pop(0)
    for i, word in enumerate(words):
        if word.endswith(".py") and word.split("/")[0] in PACKAGES:
            return word[:-3].replace("/", "."), words[i + 1:]
        if word == "-m" and i + 1 < len(words) and words[i + 1].split(".")[0] in PACKAGES:
            return words[i + 1], words[i + 2:]
    return None


DOC_COMMANDS = [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in commands(page)
                if draftsmith_argv(c) and "[--" not in c]  # "[--flag X]": a synopsis, not a command


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)} links to {target}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in headings(file), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def headings(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    titles = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in titles}


def test_no_development_paths():
    results = ROOT / "docs" / "results"
    for page in PAGES:
        text = page.read_text()
        # a benchmark's record names the question file it ran on, by name (never by path)
        names = () if results in page.parents else ("spec_bench_dev", "train_conversations.jsonl")
        for path in ("../shared", "/work/", *names):
            assert path not in text, f"{page.relative_to(ROOT)} names {path}, which users do not have"


@pytest.mark.parametrize("page, command", DOC_COMMANDS)
def test_doc_commands_parse(page, command, monkeypatch):
    module, argv = draftsmith_argv(command)
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.chdir(ROOT)
    with pytest.raises(Parsed) as parsed:
        importlib.import_module(module).main(argv)
    args = parsed.value.args[0]
    if getattr(args, "config", None) and module == "train.pipeline":  # its config and every drafter's
        Pipeline(load_dataclass(PipelineConfig, args.config, args.overrides))
    elif getattr(args, "config", None):
        load_config(args.config, args.overrides)  # the config file and every key=value override are valid


def test_readme_headline_table_is_the_benchmarks():
    readme = (ROOT / "README.md").read_text()
    source = re.search(r"<!-- headline: (\S+)", readme).group(1)
    if source == "none":
        assert not list((ROOT / "docs" / "results").rglob("results.json")), \
            "docs/results holds benchmark results: put the headline table into the README"
        return
    table = method_table(json.loads((ROOT / source).read_text()))
    assert "\n".join(table) in readme, f"the README's headline table differs from {source}"
