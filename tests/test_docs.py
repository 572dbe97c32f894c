"""The docs' Python examples run as pasted: every ``python`` block of README.md and docs/*.md
marked ``<!-- runnable -->`` (or ``<!-- runnable: ds -->``: given ``ds``, an xarray Dataset of
activations) runs as a script in a folder holding ``acts.zarr``, as a user would run it."""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from _support import PYTHON, activations, cli_env, write_zarr

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^<!-- runnable(?:: (?P<given>\w+))? -->\n```python\n(?P<code>.*?)^```", re.M | re.S)

#: What a ``<!-- runnable: ds -->`` block is given: a Dataset as a training job writes it.
GIVEN_DS = """\
import numpy as np, xarray as xr
_rng = np.random.default_rng(0)
ds = xr.Dataset(
    {"fc1": (("step", "unit"), _rng.standard_normal((40, 16)).astype("float32"))},
    coords={"step": np.arange(40), "unit": [f"u{i}" for i in range(16)], "epoch": ("step", np.arange(40) // 10)},
    attrs={"model": "toy"},
)
"""


def _blocks() -> list[tuple[str, str, str]]:
    """(where, given, code) of every runnable block."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", match["given"] or "", match["code"]))
    return found


def test_the_docs_mark_their_examples_runnable() -> None:
    """A marker misspelt must not leave the test below with nothing to run."""
    where = [w.split(":")[0] for w, _, _ in _blocks()]
    assert where.count("README.md") >= 2 and "docs/python-api.md" in where and "docs/cli.md" in where


@pytest.mark.parametrize(("where", "given", "code"), _blocks(), ids=[w for w, _, _ in _blocks()])
def test_a_docs_example_runs_as_pasted(tmp_path: Path, where: str, given: str, code: str) -> None:
    if given == "ds":
        pytest.importorskip("xarray")
        prefix = GIVEN_DS
    else:
        write_zarr(tmp_path / "acts.zarr", activations((64, 32), seed=3), (16, 32))
        prefix = ""
    script = tmp_path / "example.py"
    script.write_text(prefix + textwrap.dedent(code))
    proc = subprocess.run(
        [PYTHON, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=cli_env()
    )
    assert proc.returncode == 0, f"{where}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "Warning" in line]
    assert [w for w in warned if not any(own in w for own in USERS_OWN)] == [], proc.stderr


#: What ``ds.to_zarr(...)`` itself says in Zarr v3 (the user's call, not relu-dask's): fixed
#: width text and consolidated metadata are not in the v3 specification.
USERS_OWN = ("does not have a Zarr V3 specification", "Consolidated metadata is currently not part")
