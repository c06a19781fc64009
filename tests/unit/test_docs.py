"""The docs stay true to the tree: the generated configuration reference matches
adapterswap/config.py, every link in README.md and docs/ lands on a file (and heading) of
this repository, every setting they name exists, and docs/cli.md names every command and
flag the CLI has."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from adapterswap.config import AdapterSwapConfig

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _links(page: Path) -> list[str]:
    """Every Markdown link target of ``page``, outside code blocks and code spans."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def _anchors(page: Path) -> set[str]:
    """The heading anchors GitHub gives ``page``: lower case, punctuation dropped, - for spaces."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = counts.get(slug, 0)
        anchors.add(f"{slug}-{count}" if count else slug)  # a repeated heading gets -1, -2, ...
        counts[slug] = count + 1
    return anchors


def test_configuration_reference_is_current():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", ROOT / "docs" / "gen_config_reference.py"
    )
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == generator.render_reference(), (
        "docs/configuration.md is stale: run .venv/bin/python docs/gen_config_reference.py"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_lands_in_the_repository(page):
    assert _links(page), f"{page.name} links nowhere"
    for target in _links(page):
        # No link leaves the repository: it would break in a clone, or drift unseen.
        assert not re.match(r"[a-z]+:", target), f"{page.name}: external link {target}"
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: no heading #{anchor} in {path}"


def test_every_setting_the_docs_name_exists():
    sections = {
        name: set(field.annotation.model_fields)
        for name, field in AdapterSwapConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }
    # `serve.port`, `lora.rank=8`; not `ray.init(...)` or `ray.cluster_utils.Cluster`.
    setting = re.compile(rf"(?<![\w@./-])({'|'.join(sections)})\.([a-z_]+)(?![\w(.])")
    for page in PAGES:
        for span in _CODE_SPAN.findall(page.read_text(encoding="utf-8")):
            for section, name in setting.findall(span):
                assert name in sections[section], f"{page.name}: no setting {section}.{name}"


def _help(argv: list[str]) -> str:
    """What ``adapterswap <argv> --help`` prints, run through the installed entry point."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["adapterswap"].partition(":")
    main = getattr(importlib.import_module(module), name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def _subcommands(help_text: str) -> list[str]:
    """The subcommands argparse lists, each on a line of its own indented by four spaces."""
    return re.findall(r"^ {4}([a-z][a-z-]*)(?:\s|$)", help_text, re.M)


def test_cli_doc_names_every_command_and_flag():
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    commands = [[name] for name in _subcommands(_help([]))]
    assert ["ingest"] in commands and ["keys"] in commands
    commands += [["keys", action] for action in _subcommands(_help(["keys"]))]
    for argv in commands:
        assert f"adapterswap {' '.join(argv)}" in doc, f"docs/cli.md lacks {' '.join(argv)}"
        for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", _help(argv))):
            named = re.search(rf"(?<![\w-]){flag}(?![\w-])", doc)
            assert named, f"docs/cli.md lacks {flag} of {' '.join(argv)}"


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, "README.md is a landing page: move reference material to docs/"
