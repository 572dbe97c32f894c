"""jobfile: a TOML job file as the argv of each job's ``relu-dask run``."""

from __future__ import annotations

from pathlib import Path

from relu_dask.jobfile import read_job_file


def test_paths_are_taken_from_the_files_folder_and_options_become_flags(tmp_path: Path) -> None:
    (tmp_path / "jobs.toml").write_text(
        """
[defaults]
report = "reports/{name}.json"
plot = "plots/{name}.png"
stats = true
overwrite = false
dest_chunks = [4, 3]
storage_options = { anon = true }

[[job]]
source = "a.zarr"
dest = "/abs/a-masks.zarr"

[[job]]
name = "second"
source = "b.zarr"
dest = "b-masks.zarr"
at_zero = 0
stats = false
"""
    )
    first, second = read_job_file(tmp_path / "jobs.toml")
    assert first.name == "a-masks"
    assert first.argv[:2] == [str(tmp_path / "a.zarr"), "/abs/a-masks.zarr"]
    assert first.argv[2:] == [
        "--report",
        str(tmp_path / "reports" / "a-masks.json"),
        "--plot",
        str(tmp_path / "plots" / "a-masks.png"),
        "--stats",
        "--dest-chunks",
        "4,3",
        "--storage-options",
        '{"anon": true}',
    ]
    assert second.name == "second"
    assert "--stats" not in second.argv and "--overwrite" not in second.argv
    assert second.argv[-2:] == ["--at-zero", "0"]
    assert str(tmp_path / "reports" / "second.json") in second.argv
