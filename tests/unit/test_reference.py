"""The generated reference names everything the code has: settings, policy fields, metrics, commands."""

from __future__ import annotations

import typer

from dynasorctl import reference
from dynasorctl.cli import app
from proxy.core.policy import PolicyFile
from proxy.metrics import specs
from proxy.settings import Settings


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
