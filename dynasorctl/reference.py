"""The reference pages, written from the code so they cannot drift from it.

Every setting (the settings model), every policy-file field (the policy models), every
metric (the declared `Metrics` fields) and every CLI command (the Typer app) as Markdown.
The documentation site's build hook (`docs/hooks.py`) puts them in the pages; the tests
check that each names everything the code has.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value: object) -> str:
    return "`" + _cell(value).replace("`", "'") + "`" if value not in ("", None) else ""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "none"
    if annotation is Ellipsis:
        return "..."
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _shown(value: object) -> str:
    """A default as a reader writes it: strings quoted, enums by value, models below."""
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, Enum):
        value = value.value
    return _code(repr(value) if isinstance(value, str) else value) if value is not None else "unset"


def _default(info: FieldInfo) -> object:
    """The field's default value, or `PydanticUndefined` when it is required."""
    if info.default is not PydanticUndefined:
        return info.default
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return PydanticUndefined


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds (a model, or one inside an optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models(a)]


def model_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field of `model` and of the models inside it, by dotted name."""
    for name, info, _ in _fields_with_defaults(model, prefix, None):
        yield name, info


def _fields_with_defaults(
    model: type[BaseModel], prefix: str, instance: BaseModel | None
) -> Iterator[tuple[str, FieldInfo, str]]:
    """Each field by dotted name with its default as shown. Inside a model whose default is
    an instance (a trial's probe settings), the defaults are that instance's values."""
    for name, info in model.model_fields.items():
        value = getattr(instance, name) if instance is not None else _default(info)
        yield prefix + name, info, "required" if value is PydanticUndefined else _shown(value)
        for inner in _models(info.annotation):
            inside = value if isinstance(value, inner) else None
            yield from _fields_with_defaults(inner, f"{prefix}{name}.", inside)


def settings_table() -> str:
    """Every setting: its name in the TOML file, its environment variable, default, meaning."""
    from proxy.settings import Settings

    rows = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    for name, info, default in _fields_with_defaults(Settings, "", None):
        env = "DYNASOR_" + name.split(".")[0].upper() if "." not in name else ""
        rows.append(f"| `{name}` | {_code(env)} | {default} | {_cell(info.description or '')} |")
    return "\n".join(rows)


def policy_table() -> str:
    """Every field of a policy file, sections by their TOML table."""
    from proxy.core.policy import PolicyFile

    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, info, default in _fields_with_defaults(PolicyFile, "", None):
        rows.append(f"| `{name}` | {_cell(_type_name(info.annotation))} | {default} | "
                    f"{_cell(info.description or '')} |")
    return "\n".join(rows)


def metrics_table() -> str:
    """Every metric `/metrics` exports (beside the process collector's)."""
    from proxy.metrics import specs

    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    seen: set[str] = set()
    for _, spec in specs():
        if spec is None or spec.name in seen:
            continue
        seen.add(spec.name)
        rows.append(f"| `{spec.name}` | {spec.kind} | {', '.join(spec.label_names)} | {_cell(spec.help)} |")
    return "\n".join(rows)


def _commands(group: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(full name, command) of every command under a group (Typer's click objects)."""
    for name, command in group.commands.items():
        if command.hidden:
            continue
        full = f"{path} {name}"
        if hasattr(command, "commands"):
            yield from _commands(command, full)
        else:
            yield full, command


def _shipped(path: Path) -> str:
    package = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(package))
    except ValueError:
        return str(path)


def cli_reference() -> str:
    """Every command of `dynasorctl`, with its arguments and options."""
    import typer

    from dynasorctl.cli import app

    root = typer.main.get_command(app)
    out: list[str] = []
    for full, command in _commands(root, "dynasorctl"):
        out += [f"### `{full}`", "", (command.help or "").strip(), ""]
        params = [p for p in command.params if not getattr(p, "hidden", False)]
        if not params:
            continue
        out += ["| argument or option | default | meaning |", "|---|---|---|"]
        for p in params:
            if p.param_type_name == "option":
                names = ", ".join(p.opts + p.secondary_opts)
            else:
                names = (p.name or "").upper()
            default = p.default if p.default not in (None, (), []) and not callable(p.default) else ""
            if isinstance(default, Enum):
                default = default.value
            if isinstance(default, Path):  # a file shipped with dynasor: not this machine's path
                default = _shipped(default)
            if getattr(p, "is_flag", False) and not getattr(p, "secondary_opts", None) and default is False:
                default = ""
            out.append(f"| {_code(names)} | {_code(default)} | {_cell(getattr(p, 'help', '') or '')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


SECTIONS = {
    "settings": settings_table,
    "policy": policy_table,
    "metrics": metrics_table,
    "cli": cli_reference,
}


# A marker stands on a line of its own, so prose can name one in backticks.
MARKER = re.compile(r"^<!--\s*reference:([^\s>]*)\s*-->[ \t]*$", re.MULTILINE)


class UnknownReference(ValueError):
    """A page asks for a reference that does not exist (a typo would leave the page empty)."""


def render(markdown: str) -> str:
    """Replace each `<!-- reference:NAME -->` line with that reference; an unknown NAME raises."""

    def one(match: re.Match[str]) -> str:
        name = match[1]
        if name not in SECTIONS:
            raise UnknownReference(f"unknown reference marker {match[0]!r}: "
                                   f"known are {', '.join(SECTIONS)}")
        return SECTIONS[name]()

    return MARKER.sub(one, markdown)
