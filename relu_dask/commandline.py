"""The command line's grammar: every subcommand and option, as argparse tables.

:func:`build_parser` is all there is to it; :mod:`relu_dask.cli` parses with it, dispatches
and prints. A usage error is one line on stderr and exit code 2 (:class:`Parser`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from relu_dask import __version__
from relu_dask.computing import PROGRESS_INTERVAL_S
from relu_dask.errors import EXIT_USAGE
from relu_dask.kernel import ENGINES
from relu_dask.outputs import COMPRESSORS, DEFAULT_COMPRESSOR
from relu_dask.schedulers import (
    CONNECT_TIMEOUT_S,
    DASHBOARD_ADDRESS,
    DEFAULT_RETRIES,
)

__all__ = ["EXIT_CODES", "PROG", "Parser", "build_parser"]


PROG = "relu-dask"


EXIT_CODES = """\
exit codes:
  0  done
  1  failed while processing (I/O error, disk full, a failed task)
  2  bad usage or input: nothing was written, SOURCE and DEST untouched
  3  DEST is in use by another run
  130 stopped by Ctrl-C, 143 by SIGTERM: the running tasks finished and were recorded,
      DEST's lock released; rerun the same command to finish the rest
  141 stdout closed before all was printed (relu-dask status DEST | head -1): nothing wrong
"""


UNIT_AXIS_HELP = (
    "the axis whose indices are the units (default: the axis of a dimension named unit, channel, feature, "
    "hidden or neuron where an array has one, else -1, the last)"
)
UNIT_DIM_HELP = "the units by dimension name (several, comma-separated, for variables named differently)"

MASK_RULE = "the mask is int8: 1 where x >= 0 (or x > 0 with --at-zero 0), else 0; NaN gives 0."


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``relu-dask`` argument parser."""
    parser = Parser(
        prog=PROG,
        description="Out-of-core ReLU derivative masks of chunked Zarr arrays, with dask. " + MASK_RULE,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, help_text in (
        ("run", "compute the ReLU derivative masks of SOURCE into DEST"),
        ("plan", "dry run: validate and print the plan, write nothing"),
    ):
        sub = commands.add_parser(
            name,
            help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}. {MASK_RULE}",
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("source", metavar="SOURCE", nargs="?", help="Zarr array or group (format 2 or 3) to read")
        sub.add_argument("dest", metavar="DEST", nargs="?", help="where to write the int8 masks (Zarr v3)")
        sub.add_argument(
            "--overwrite",
            action="store_true",
            help="replace DEST and start over (once inputs are validated); without it, rerunning the same "
            "command resumes a partial DEST",
        )
        sub.add_argument(
            "--append-axis",
            default="0",
            metavar="N|none",
            help="the axis along which SOURCE grows between runs (default: 0); a rerun over a grown SOURCE "
            "computes only the new rows. none: growth is refused like any change (exit 2)",
        )
        sub.add_argument(
            "--settle-time",
            type=float,
            default=None,
            metavar="SECONDS",
            help="how long to wait for rows a writer is still appending to SOURCE (its shape grown, its chunks "
            "not all written) before leaving them for the next run (default: $RELU_DASK_SETTLE_TIME, else 2)",
        )
        if name == "run":
            sub.add_argument(
                "--follow",
                type=float,
                metavar="SECONDS",
                help="keep going: after the run, check SOURCE every SECONDS and process new rows as they land, "
                "with DEST's lock held (and the dashboard up) throughout; SIGTERM or Ctrl-C stops it cleanly, exit 0",
            )
            sub.add_argument(
                "--follow-idle",
                type=float,
                metavar="SECONDS",
                help="with --follow: stop (exit 0) once SOURCE has not grown for SECONDS",
            )
            sub.add_argument(
                "--verify",
                action="store_true",
                help="at the end, read every mask chunk back and check it against the journal (relu-dask verify)",
            )
        sub.add_argument(
            "--config",
            type=Path,
            metavar="JOBS.toml",
            help="run the jobs of a TOML job file in order (see docs/cli.md); the exit code is the worst of them",
        )
        _add_job_options(sub)
    stats = _add_dest_command(
        commands,
        "stats",
        "unit activity (dead, always-on units) of masks already written in DEST",
        "Compute from the masks in DEST what `run --stats` computes while writing them: per array the "
        "active fraction, per unit along --unit-axis the active fraction, the dead and always-on units. "
        "NaN and exact-zero counts need the source: `run --stats` gives them.",
    )
    stats.add_argument("--unit-axis", type=int, default=None, help=UNIT_AXIS_HELP)
    stats.add_argument("--unit-dim", metavar="NAME[,NAME]", help=UNIT_DIM_HELP)
    stats.add_argument("--plot", metavar="PATH.png", help="draw the per-unit active fractions")
    stats.add_argument("--report", type=Path, metavar="PATH", help="also write the statistics as JSON")
    stats.add_argument("--scheduler", default="threads", help="synchronous | threads (default) | processes | local")
    status = commands.add_parser(
        "status",
        help="is DEST complete, partial (n of m tasks) or absent; and its job's fingerprint",
        description="Say whether DEST is complete, partial (n of m tasks done), absent, or unknown (not made by "
        "relu-dask), whether a run holds it now, and the fingerprint of its job.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("dest", metavar="DEST")
    status.add_argument("--storage-options", metavar="JSON", help="fsspec storage options for a URL DEST")
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")
    status.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    status.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    status.add_argument("--log-format", default="text", help=argparse.SUPPRESS)
    verify = _add_dest_command(
        commands,
        "verify",
        "read every mask chunk of DEST back and check it against the job's journal",
        "Read every chunk of every mask array in DEST, check that each decodes and that each block's masks "
        "are those its task wrote (the CRC-32 it recorded). Exit 0 only if all hold; else a line per "
        "problem and exit 1 (the same `relu-dask run` command then recomputes the damaged blocks). "
        "`relu-dask status` then says `complete (verified ...)`.",
    )
    verify.add_argument(
        "--source",
        action="store_true",
        help="also compute the masks again from SOURCE and compare them value for value (reads SOURCE: as "
        "long as a run); for DESTs an older relu-dask wrote, and doubts about the data itself",
    )
    verify.add_argument(
        "--sample",
        type=float,
        default=None,
        metavar="FRACTION",
        help="with --source: compare only this fraction of each array's blocks (at least one), chosen at random",
    )
    demo = commands.add_parser(
        "demo",
        help="the built-in job on synthetic data, for a first try",
        description="Create seeded synthetic float32 activations under --data-dir (if not there), compute their "
        "masks with a progress bar, check a sample against numpy and print the summary. "
        "The demo's own mask output is replaced on every run.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--size", default="1GiB", help="size of the synthetic float32 array (default: 1GiB)")
    demo.add_argument("--data-dir", default="data", type=Path, help="where the demo's data goes (default: ./data)")
    _add_job_options(demo)
    return parser


def _add_dest_command(commands: Any, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A command on DEST alone (``stats``, ``verify``), with the options every such command takes."""
    sub: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("dest", metavar="DEST")
    sub.add_argument("--storage-options", metavar="JSON", help="fsspec storage options for a URL DEST")
    sub.add_argument("--log-format", choices=("text", "json"), default="text", help="text or json log lines")
    sub.add_argument("--quiet", action="store_true", help="print only warnings, errors and the result")
    sub.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return sub


def _add_job_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--storage-options",
        metavar="JSON",
        help='fsspec storage options for s3://, gs://, ... URLs, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )
    chunking = sub.add_argument_group("chunking")
    chunking.add_argument(
        "--chunks",
        default="auto",
        help="processing block: auto (about 64MiB, aligned; 8MiB on an object store), a byte size like 256MiB, "
        "or a shape like 8192,4096 (default: auto)",
    )
    chunking.add_argument("--dest-chunks", help="chunk shape of the masks, like 4096,4096 (default: the source's)")
    chunking.add_argument(
        "--dest-shards",
        help="shard shape of the masks, a multiple of --dest-chunks (default: none, or the source's shards)",
    )
    chunking.add_argument(
        "--dest-compressor",
        choices=COMPRESSORS,
        default=DEFAULT_COMPRESSOR,
        help="the masks' compressor: blosc-lz4 (default; bit-shuffled, fast and small, a core Zarr v3 codec), "
        "blosc-zstd, zstd (zarr's default) or none",
    )
    rule = sub.add_argument_group("mask")
    rule.add_argument(
        "--at-zero",
        type=int,
        choices=(0, 1),
        default=1,
        help="mask value where x == 0: 1 for the rule x >= 0 (default), 0 for x > 0 (PyTorch's backward)",
    )
    rule.add_argument(
        "--nan",
        choices=("zero", "error"),
        default="zero",
        help="zero: NaN gives 0 (default); error: stop with exit code 2 naming the array and chunk holding a NaN",
    )
    rule.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="kernel: numpy, numexpr, or auto (numexpr where it has 4+ threads per task; default)",
    )
    sched = sub.add_argument_group("scheduler")
    sched.add_argument(
        "--scheduler",
        default="threads",
        help="synchronous | threads (default) | processes | local (a dask.distributed LocalCluster) "
        "| tcp://HOST:PORT (an existing scheduler)",
    )
    sched.add_argument(
        "--workers",
        type=int,
        help="threads/processes pool size (default: the cores; threads: at least 8 on an object store), "
        "or LocalCluster workers",
    )
    sched.add_argument("--threads-per-worker", type=int, help="threads per LocalCluster worker")
    sched.add_argument("--memory-limit", help="memory limit per LocalCluster worker, like 4GiB (default: auto)")
    sched.add_argument(
        "--scheduler-file",
        metavar="PATH",
        help="connect to the cluster whose scheduler wrote PATH (dask scheduler --scheduler-file, dask-jobqueue)",
    )
    sched.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="distributed only: tries again of a task that failed (default: %(default)s; a lost worker's tasks are "
        "rescheduled anyway)",
    )
    sched.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help="how long to wait for a tcp:// scheduler before giving up (default: %(default)g)",
    )
    sched.add_argument(
        "--dashboard-address",
        metavar="HOST:PORT",
        help=f"where a LocalCluster serves its dashboard (default: {DASHBOARD_ADDRESS}) with the live page at "
        "/relu-dask; with another scheduler, where relu-dask serves the live page itself (default: nowhere)",
    )
    out = sub.add_argument_group("output")
    out.add_argument("--report", type=Path, metavar="PATH", help="also write the run report as JSON to PATH")
    out.add_argument(
        "--metrics-file",
        type=Path,
        metavar="PATH.prom",
        help="also write the run's figures in Prometheus' text format, atomically (node_exporter's textfile collector)",
    )
    out.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "none"),
        default="auto",
        help="a bar on a terminal, periodic log lines otherwise (default: auto)",
    )
    out.add_argument(
        "--progress-interval",
        type=float,
        default=PROGRESS_INTERVAL_S,
        metavar="SECONDS",
        help="seconds between progress log lines when not on a terminal (default: %(default)g)",
    )
    out.add_argument(
        "--stats",
        action="store_true",
        help="also count, in the same pass, each unit's activity: dead and always-on units, per-unit active "
        "fraction (summary and report)",
    )
    out.add_argument("--unit-axis", type=int, default=None, help=UNIT_AXIS_HELP)
    out.add_argument("--unit-dim", metavar="NAME[,NAME]", help=UNIT_DIM_HELP)
    out.add_argument("--plot", metavar="PATH.png", help="draw the per-unit active fractions (implies --stats)")
    out.add_argument(
        "--performance-report",
        metavar="PATH.html",
        help="save dask's performance report of the run (distributed schedulers), for jobs nobody watched",
    )
    out.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text, or json: one JSON object a line on stderr (events start, progress, finish, error)",
    )
    out.add_argument("--quiet", action="store_true", help="print only warnings, errors and the summary")
    out.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
