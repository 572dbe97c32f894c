"""The command line: all parsing of user strings and all printing. ``main(argv) -> int``.

Exit codes: 0 done, 1 failed while processing, 2 bad usage or input (nothing written),
3 DEST in use by another run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from relu_dask import __version__
from relu_dask.chunking import format_bytes, parse_bytes
from relu_dask.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ReluDaskError
from relu_dask.execution import run
from relu_dask.kernel import ENGINES
from relu_dask.report import RunReport, render_summary
from relu_dask.schedulers import parse_scheduler

__all__ = ["build_parser", "main"]

PROG = "relu-dask"
EXIT_INTERRUPTED = 130

EXIT_CODES = """\
exit codes:
  0  done
  1  failed while processing (I/O error, disk full, a failed task)
  2  bad usage or input: nothing was written, SOURCE and DEST untouched
  3  DEST is in use by another run
  130 interrupted (Ctrl-C)
"""

MASK_RULE = "the mask is int8: 1 where x >= 0 (or x > 0 with --at-zero 0), else 0; NaN gives 0."


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``relu-dask`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Out-of-core ReLU derivative masks of chunked Zarr arrays, with dask. " + MASK_RULE,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
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
        sub.add_argument("source", metavar="SOURCE", help="Zarr array or group (format 2 or 3) to read")
        sub.add_argument("dest", metavar="DEST", help="where to write the int8 masks (Zarr v3)")
        sub.add_argument(
            "--overwrite", action="store_true", help="replace DEST if it exists (once inputs are validated)"
        )
        _add_job_options(sub)
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


def _add_job_options(sub: argparse.ArgumentParser) -> None:
    chunking = sub.add_argument_group("chunking")
    chunking.add_argument(
        "--chunks",
        default="auto",
        help="processing block: auto (about 64MiB, aligned), a byte size like 256MiB, "
        "or a shape like 8192,4096 (default: auto)",
    )
    chunking.add_argument("--dest-chunks", help="chunk shape of the masks, like 4096,4096 (default: the source's)")
    chunking.add_argument(
        "--dest-shards",
        help="shard shape of the masks, a multiple of --dest-chunks (default: none, or the source's shards)",
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
    sched.add_argument("--workers", type=int, help="threads/processes pool size, or LocalCluster workers")
    sched.add_argument("--threads-per-worker", type=int, help="threads per LocalCluster worker")
    sched.add_argument("--memory-limit", help="memory limit per LocalCluster worker, like 4GiB (default: auto)")
    sched.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a tcp:// scheduler before giving up (default: 10)",
    )
    sched.add_argument(
        "--dashboard-address",
        default="127.0.0.1:8787",
        help="where a LocalCluster serves its dashboard (default: 127.0.0.1:8787)",
    )
    out = sub.add_argument_group("output")
    out.add_argument("--report", type=Path, metavar="PATH", help="also write the run report as JSON to PATH")
    out.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "none"),
        default="auto",
        help="a bar on a terminal, periodic log lines otherwise (default: auto)",
    )
    out.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress log lines when not on a terminal (default: 10)",
    )
    out.add_argument("--quiet", action="store_true", help="print only warnings, errors and the summary")
    out.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(debug=args.debug, quiet=args.quiet)
    try:
        return _dispatch(args)
    except ReluDaskError as exc:
        if args.debug:
            raise
        _say_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _say_error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        _say_error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    options = _job_options(args)
    if args.command == "demo":
        from relu_dask.demo import run_demo

        size = parse_bytes(args.size, what="--size")
        report, checked = run_demo(args.data_dir, size, **options)
        _print_summary(report)
        print(f"  checked {checked:,} mask values against numpy: all equal")
        return EXIT_OK
    report = run(args.source, args.dest, overwrite=args.overwrite, dry_run=args.command == "plan", **options)
    _print_summary(report)
    return EXIT_OK


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    scheduler = parse_scheduler(
        args.scheduler,
        num_workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        dashboard_address=args.dashboard_address,
        connect_timeout_s=args.connect_timeout,
    )
    progress = "none" if args.quiet and args.progress == "auto" else args.progress
    return {
        "chunks": args.chunks,
        "dest_chunks": args.dest_chunks,
        "dest_shards": args.dest_shards,
        "at_zero": args.at_zero,
        "nan": args.nan,
        "engine": args.engine,
        "scheduler": scheduler,
        "progress": progress,
        "progress_interval_s": args.progress_interval,
        "report_path": args.report,
    }


def _print_summary(report: RunReport) -> None:
    for line in render_summary(report):
        print(line)
    if report.outcome == "planned":
        print(
            f"  nothing written; about {format_bytes(max((a.memory_per_task_bytes for a in report.arrays), default=0))}"
            f" per task at most, {report.num_threads or 'all the cluster'} task(s) at once"
        )


def _say_error(message: str) -> None:
    text = " ".join(message.split())  # one line, whatever the exception held
    print(f"{PROG}: error: {text}", file=sys.stderr)


def _configure_logging(*, debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    root = logging.getLogger("relu_dask")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # After a failure (a full disk, say) zarr's event loop may still hold pending writes,
    # which asyncio reports with tracebacks at exit: the error was already said in one line.
    logging.getLogger("asyncio").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler]
    warnings_log.propagate = False
