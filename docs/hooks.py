"""MkDocs hook: the reference pages are written from the code when the site is built.

Each `<!-- reference:NAME -->` marker in a page becomes that reference
(`dynasorctl.reference`: settings, policy, metrics, cli); an unknown NAME fails the build.
"""

from __future__ import annotations

from typing import Any

from mkdocs.exceptions import PluginError

from dynasorctl.reference import UnknownReference, render


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    try:
        return render(markdown)
    except UnknownReference as exc:
        raise PluginError(f"{page.file.src_path}: {exc}") from exc
