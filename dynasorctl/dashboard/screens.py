"""The confirmation dialog every rollout change goes through: what, where, and why.

A change to the rollout reaches every proxy on the store within a second, so each
key opens this dialog first; the reason it asks for is kept in the audit trail,
exactly as `dynasorctl rollout --reason` keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


@dataclass(frozen=True)
class Confirmation:
    reason: str
    scope: str | None = None
    value: str | None = None  # the percentage or the policy asked for, as typed


@dataclass(frozen=True)
class Ask:
    """A value the dialog asks for besides the reason (a percentage, a policy)."""

    placeholder: str
    initial: str = ""


class ConfirmScreen(ModalScreen[Confirmation | None]):
    """Asks for a reason (and a scope, and a value, when given); dismissed with None on cancel."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, scope: str | None = None, ask: Ask | None = None) -> None:
        super().__init__()
        self._title = title
        self._scope = scope
        self._ask = ask

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="question")
            if self._scope is not None:
                yield Input(self._scope, placeholder='scope: "*", model:NAME or key:NAME', id="scope")
            if self._ask is not None:
                yield Input(self._ask.initial, placeholder=self._ask.placeholder, id="value")
            yield Input(placeholder="reason (kept in the audit trail)", id="reason")
            with Horizontal(id="buttons"):
                yield Button("Confirm", variant="error", id="confirm")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        # The value is what the operator came to type; the reason comes after it.
        self.query_one("#value" if self._ask is not None else "#reason", Input).focus()

    def _confirm(self) -> None:
        scope = self.query_one("#scope", Input).value.strip() if self._scope is not None else None
        value = self.query_one("#value", Input).value.strip() if self._ask is not None else None
        self.dismiss(Confirmation(self.query_one("#reason", Input).value, scope, value))

    @on(Input.Submitted, "#value")
    def _value_submitted(self) -> None:
        self.query_one("#reason", Input).focus()

    @on(Input.Submitted, "#reason")
    def _submitted(self) -> None:
        self._confirm()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "confirm":
            self._confirm()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
