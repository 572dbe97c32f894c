"""Print pip constraints pinning every runtime dependency to the lowest version pyproject.toml declares.

The CI's lowest-versions lane installs with them (``pip install -c``), so that the lower
bounds we publish are bounds we have tested. Test-only dependencies are left free.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)\s*(,\s*<[^,;]+)?", requirement)
    if match is None:
        raise SystemExit(f"no lower bound to pin in {requirement!r}: write it as name>=version")
    print(f"{match.group(1)}=={match.group(3)}")
