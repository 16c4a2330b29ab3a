"""The README stays a newcomer's page: under 200 lines, exactly two set-up commands (the second is what
``.ci/run`` runs), and every relative link in it and in docs/ points at a file that exists."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install "


def test_readme_is_short_and_its_second_command_is_what_ci_runs():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    commands = [line for line in text.splitlines() if line.startswith(SETUP)]
    assert len(commands) == 2, commands
    assert commands[0].endswith("fst-plugin demo")
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci, (commands[1], ci)


def test_every_relative_link_in_the_readme_and_docs_exists():
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_the_config_reference_is_the_table_derived_from_the_config():
    from fst_plugin.defense.config import DefenseConfig
    from fst_plugin.options import options_table

    assert options_table(DefenseConfig) in (REPO / "docs" / "config.md").read_text()
