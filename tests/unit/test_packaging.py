"""`pip install .` (or its wheel) carries everything `dynasorctl` needs at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_migrations_shipped_traces_and_the_entry_point(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("dynasor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "migrations").rglob("*")
              if p.is_file() and p.suffix in (".py", ".mako", ".ini") and "__pycache__" not in p.parts}
    wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / "dynasorctl" / "data").iterdir() if p.is_file()}
    assert "migrations/versions/0001_initial_schema.py" in wanted  # the glob found them
    assert wanted - names == set()
    assert not any(n.startswith("tests/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dynasorctl = dynasorctl.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
