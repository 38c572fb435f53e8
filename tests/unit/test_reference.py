"""The generated reference names everything the code has: settings, policy fields, metrics, commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from dynasorctl import reference
from dynasorctl.cli import app
from proxy.core.policy import PolicyFile
from proxy.metrics import specs
from proxy.settings import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_with_its_environment_variable():
    table = reference.settings_table()
    for name in Settings.model_fields:
        assert f"| `{name}` | `DYNASOR_{name.upper()}` |" in table
    assert "| `guardrails." in table  # nested settings are listed field by field


def test_every_policy_field_by_its_dotted_name():
    table = reference.policy_table()
    names = [name for name, _ in reference.model_fields(PolicyFile)]
    assert {"kind", "cot.interval", "sc.threshold"} <= set(names)
    for name in names:
        assert f"| `{name}` |" in table


def test_every_declared_metric():
    table = reference.metrics_table()
    for _, spec in specs():
        assert spec is not None and f"| `{spec.name}` | {spec.kind} |" in table


def test_every_command_and_option_and_no_machine_paths():
    text = reference.cli_reference()

    def walk(group, path):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command, f"{path} {name}")
            elif not command.hidden:
                yield f"{path} {name}", command

    commands = list(walk(typer.main.get_command(app), "dynasorctl"))
    assert len(commands) > 20
    for full, command in commands:
        assert f"### `{full}`" in text
        for param in command.params:
            if param.param_type_name == "option":
                assert f"`{', '.join(param.opts + param.secondary_opts)}`" in text
    assert "/work/" not in text and "dynasorctl/data/cot-sample.jsonl.gz" in text


def test_markers_are_replaced_and_other_text_kept():
    page = "# Settings\n\n<!-- reference:settings -->\n\nEnd.\n"
    out = reference.render(page)
    assert out.startswith("# Settings") and out.endswith("End.\n") and "<!--" not in out
    assert "DYNASOR_UPSTREAM_URL" in out


def test_an_unknown_marker_fails_and_one_named_in_prose_is_left_alone():
    with pytest.raises(reference.UnknownReference, match="reference:setings"):
        reference.render("# Settings\n\n<!-- reference:setings -->\n")
    prose = "a page holding `<!-- reference:NAME -->` on a line of its own\n"
    assert reference.render(prose) == prose


def test_every_marker_in_the_docs_is_known():
    pages = sorted(DOCS.rglob("*.md"))
    markers = [m for page in pages for m in reference.MARKER.findall(page.read_text())]
    assert {"settings", "policy", "metrics", "cli"} <= set(markers)
    for page in pages:
        reference.render(page.read_text())  # raises on an unknown one


def test_the_readme_links_resolve():
    """GitHub shows the README outside the site: its relative links must name real files."""
    readme = (DOCS.parent / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) > 10
    for link in local:
        assert (DOCS.parent / link).is_file(), link
