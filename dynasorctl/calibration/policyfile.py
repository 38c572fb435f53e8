"""Writing policy files (TOML), with each field's documentation as a comment.

Reading and validation live with the policy models in `proxy.core.policy`, so the proxy
loads files without this package; errors become UserErrors here, at the CLI's edge.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel

from dynasorctl.errors import UserError
from proxy.core.policy import (
    PolicyFile,
    PolicyFileError,
    load_policy_file,
    parse_policy_file,
)

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("policy values must be finite")
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to a policy file")


def _table(name: str, model: BaseModel) -> list[str]:
    lines = [f"[{name}]"]
    nested = []
    for field_name, info in type(model).model_fields.items():
        value = getattr(model, field_name)
        if value is None:
            continue  # TOML has no null: an absent field takes its default
        if isinstance(value, BaseModel):
            nested.append((f"{name}.{field_name}", value))
            continue
        if info.description:
            lines.append(f"# {info.description}")
        lines.append(f"{field_name} = {_value(value)}")
    for sub_name, sub in nested:
        lines += ["", *_table(sub_name, sub)]
    return lines


def dump_policy_file(policy: PolicyFile) -> str:
    """The policy file's TOML text; `parse_policy_file` reads it back unchanged."""
    lines = [
        f"# dynasor policy file, format version {policy.version}.",
        "# Fields are documented in docs/policy-files.md and docs/reference/policy.md.",
        f"version = {policy.version}",
        "# cot: chain-of-thought, sc: self-consistency",
        f"kind = {_string(policy.kind)}",
        '# the model it applies to, "*" for all',
        f"model = {_string(policy.model)}",
        "",
    ]
    section = policy.cot if policy.kind == "cot" else policy.sc
    assert section is not None
    lines += _table(policy.kind, section)
    if policy.provenance:
        lines += ["", "# how the policy was made (informational only)", "[provenance]"]
        lines += [f"{k} = {_value(v)}" for k, v in policy.provenance.items()]
    text = "\n".join(lines) + "\n"
    if parse_policy_file(text) != policy:  # never write what would not read back
        raise ValueError("policy file does not round-trip")
    return text


def write_policy_file(path: Path, policy: PolicyFile) -> None:
    try:
        path.write_text(dump_policy_file(policy), encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot write the policy file ({exc.strerror})") from exc


def read_policy_file(path: Path) -> PolicyFile:
    """A policy file, or a UserError saying what is wrong with it."""
    try:
        return load_policy_file(path)
    except PolicyFileError as exc:
        raise UserError(str(exc)) from exc
