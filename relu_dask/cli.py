"""The command line: dispatch and all printing. ``main(argv) -> int``; the grammar (every
option, as argparse tables) is :mod:`relu_dask.commandline`;
the ``relu-dask`` command and ``python -m relu_dask`` run it through
:mod:`relu_dask.__main__`, which sets up the process first and exits quickly after.

Exit codes: 0 done, 1 failed while processing, 2 bad usage or input (nothing written),
3 DEST in use by another run, 130 and 143 stopped by Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relu_dask.chunking import parse_bytes
from relu_dask.commandline import PROG, build_parser
from relu_dask.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, InputError, ReluDaskError, RunStopped
from relu_dask.execution import deliver, run_with
from relu_dask.following import follow_with
from relu_dask.jobfile import FileJob, read_job_file
from relu_dask.mask_stats import stats_of_masks
from relu_dask.options import RunOptions
from relu_dask.planning import plan_run
from relu_dask.report import RunReport, render_summary
from relu_dask.results import planned_report
from relu_dask.resume import job_status
from relu_dask.schedulers import (
    parse_scheduler,
)

__all__ = ["main"]

log = logging.getLogger("relu_dask.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _configure_logging(debug=args.debug, quiet=args.quiet, json_lines=args.log_format == "json")
    try:
        return _dispatch(args)
    except ReluDaskError as exc:
        if args.debug:
            raise
        _say_error(str(exc), exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt as stop:
        code, message = _how_stopped(stop)
        _say_error(message, code)
        return code
    except BrokenPipeError:  # `relu-dask status DEST | head -1`: the reader has what it wanted
        _stdout_gone()
        return EXIT_PIPE_CLOSED
    except Exception as exc:
        if args.debug:
            raise
        _say_error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", EXIT_FAILED)
        return EXIT_FAILED


#: The exit code when stdout was closed early (``| head``): 128 + SIGPIPE, as a shell's own commands.
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _how_stopped(stop: KeyboardInterrupt) -> tuple[int, str]:
    """The exit code and the line for a run stopped by SIGTERM or Ctrl-C."""
    if isinstance(stop, RunStopped):  # stopped while tasks ran: it says how far it got
        return stop.exit_code, str(stop)
    signum = getattr(stop, "signum", signal.SIGINT)
    return 128 + signum, f"stopped by {signal.Signals(signum).name}; rerun the same command to finish the rest"


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "status":
        return _status(args.dest, as_json=args.json, storage_options=args.storage_options)
    if args.command == "verify":
        return _verify(args.dest, args.storage_options, against_source=args.source, sample=args.sample)
    if args.command == "stats":
        report = stats_of_masks(
            args.dest,
            unit_axis=args.unit_axis,
            unit_dim=args.unit_dim,
            scheduler=args.scheduler,
            report_path=args.report,
            plot_path=args.plot,
            storage_options=args.storage_options,
        )
        _print_summary(report)
        return EXIT_OK
    if args.command in ("run", "plan") and args.config is not None:
        return _run_job_file(args)
    values = _option_values(args)
    if args.command == "demo":
        from relu_dask.demo import run_demo

        size = parse_bytes(args.size, what="--size")
        report, checked = run_demo(args.data_dir, size, **values)
        _print_summary(report)
        print(f"  checked {checked:,} mask values against numpy: all equal")
        return EXIT_OK
    if args.source is None or args.dest is None:
        raise InputError(f"{args.command} needs SOURCE and DEST (or --config JOBS.toml)")
    options = RunOptions.create(
        args.source,
        args.dest,
        overwrite=args.overwrite,
        append_axis=args.append_axis,
        settle_s=args.settle_time,
        **values,
    )
    if args.command == "plan":
        plan = plan_run(options)
        report = deliver(planned_report(plan), options, plot=False)
        _print_summary(report, plan.describe(report))
        return EXIT_OK
    if args.follow is not None:
        if args.verify:
            raise InputError("--verify checks a finished DEST: run relu-dask verify DEST once --follow has stopped")
        return _follow(options, args.follow, args.follow_idle)
    if args.follow_idle is not None:
        raise InputError("--follow-idle needs --follow SECONDS")
    report = run_with(options)
    _print_summary(report)
    if args.verify:
        waiting = max((a.rows_waiting for a in report.arrays), default=0)
        return _verify(args.dest, args.storage_options, rows_waiting=waiting)
    return EXIT_OK


def _follow(options: RunOptions, every_s: float, idle_s: float | None) -> int:
    """``run --follow``: every pass that processed new rows prints its summary; a stop by
    SIGTERM or Ctrl-C, or ``--follow-idle``, ends it with exit 0 and one line."""
    state = follow_with(options, every_s, idle_s, on_pass=lambda report, _state: _print_summary(report))
    why = "no growth for --follow-idle" if state.stopped_by == "idle" else f"stopped by {state.stopped_by}"
    print(f"follow ended ({why}): {state.describe()}; DEST's lock released")
    return EXIT_OK


def _verify(
    dest: str,
    storage_options: str | None,
    *,
    against_source: bool = False,
    sample: float | None = None,
    rows_waiting: int = 0,
) -> int:
    """``verify`` (and ``run --verify``, where the run left ``rows_waiting`` rows of SOURCE
    for the next: then DEST is not called verified, and the exit code is 1)."""
    from relu_dask.verify import verify_dest

    result = verify_dest(dest, storage_options=storage_options, against_source=against_source, sample=sample)
    for problem in result.problems:
        print(f"{PROG}: verify: {problem}", file=sys.stderr)
    if not result.ok:
        blocks = sum(map(len, result.damaged.values()))
        then = f"; rerun the same relu-dask run command to recompute the {blocks} damaged block(s)" if blocks else ""
        found = f"{len(result.problems)} problem(s) in {result.num_chunks_read} chunk(s) read"
        print(f"{dest}: NOT verified: {found}{then}")
        return EXIT_FAILED
    compared = f"; {result.num_blocks_compared} block(s) equal SOURCE's masks" if against_source else ""
    if rows_waiting:  # what DEST holds is right, but it is not all of SOURCE
        print(
            f"{dest}: not complete: {rows_waiting} more rows of SOURCE looked half-written and wait for the next run "
            f"(rerun the same command); what DEST holds decodes and matches the journal ({result.num_blocks} block(s))"
        )
        return EXIT_FAILED
    print(
        f"{dest}: verified: {result.num_arrays} array(s), {result.num_blocks} block(s), "
        f"{result.num_chunks_read} chunk(s) read, every one decodes and matches the journal{compared}"
    )
    return EXIT_OK


def _run_job_file(args: argparse.Namespace) -> int:
    """Run (or plan, for ``relu-dask plan --config``) every job of ``--config`` in order;
    return the worst exit code."""
    if args.source is not None:
        raise InputError("give either SOURCE and DEST or --config JOBS.toml, not both")
    jobs = read_job_file(args.config)
    worst = EXIT_OK
    outcomes = []
    parsed = [_parse_job(job, args) for job in jobs]  # every job's options are checked before any job runs
    if args.command == "run" and any(not isinstance(p, int) and p.follow is not None for p in parsed):
        raise InputError(
            f"{args.config}: follow keeps one job going: use it on the command line (run SOURCE DEST --follow N)"
        )
    for number, (job, job_args) in enumerate(zip(jobs, parsed), start=1):
        log.info(
            "job %d/%d (%s): relu-dask %s %s",
            number,
            len(jobs),
            job.name,
            args.command,
            " ".join(job.argv),
            extra={"event": "job", "fields": {"job": job.name, "number": number}},
        )
        try:
            code = job_args if isinstance(job_args, int) else _run_one_job(job.name, job_args)
        except KeyboardInterrupt as stop:  # SIGTERM or Ctrl-C stops the whole job file
            stopped = _how_stopped(stop)[0]
            outcomes.append(f"  job {number} {job.name}: stopped (exit {stopped})")
            outcomes.extend(f"  job {n} {j.name}: not run" for n, j in enumerate(jobs[number:], start=number + 1))
            _print_job_outcomes(args.config, outcomes, stopped)
            raise
        outcomes.append(f"  job {number} {job.name}: {'ok' if code == 0 else 'failed'} (exit {code})")
        worst = max(worst, code)
    _print_job_outcomes(args.config, outcomes, worst)
    return worst


def _parse_job(job: FileJob, command_line: argparse.Namespace) -> argparse.Namespace | int:
    """One job's options: the job file's, else the command line's, else the defaults; or the
    exit code of argparse's one-line complaint about them."""
    parser = build_parser()
    defaults = vars(parser.parse_args(["run"]))
    unknown = sorted(job.keys - set(defaults))
    if unknown:  # argparse would take a prefix (dest_chunk) for the option, and the merge would miss it
        _say_error(
            f"job {job.name}: unknown option(s) {', '.join(unknown)}: spell out an option of relu-dask run", EXIT_USAGE
        )
        return EXIT_USAGE
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # argparse's one line, said again naming the job
            own = parser.parse_args(["run", *job.argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
        message = said.getvalue().strip().removeprefix(f"{PROG}: error: ")
        if message:
            _say_error(f"job {job.name}: {message}", code)
        return code
    merged = {
        key: value if key in job.keys or command_line_value == defaults[key] else command_line_value
        for key, value in vars(own).items()
        for command_line_value in [getattr(command_line, key, defaults[key])]
    }
    return argparse.Namespace(**{**merged, "config": None})


def _print_job_outcomes(config: Path, outcomes: list[str], worst: int) -> None:
    print(f"{len(outcomes)} job(s) from {config}, worst exit code {worst}:")
    for line in outcomes:
        print(line)


def _run_one_job(name: str, args: argparse.Namespace) -> int:
    """One job of a job file; whatever it raises, its exit code (the next job runs anyway)."""
    try:
        return _dispatch(args)
    except ReluDaskError as exc:
        _say_error(f"job {name}: {exc}", exc.exit_code)
        return exc.exit_code
    except Exception as exc:  # one job's failure must not stop the others
        log.debug("job %s failed", name, exc_info=True)
        _say_error(
            f"job {name}: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", EXIT_FAILED
        )
        return EXIT_FAILED


def _status(dest: str, *, as_json: bool, storage_options: str | None = None) -> int:
    status = job_status(dest, storage_options)
    if as_json:
        print(json.dumps(status.to_dict()))
        return EXIT_OK
    state = status.state
    if state == "partial" and status.missing:
        print(f"{dest}: partial (masks missing: {', '.join(status.missing)}; rerun the same command to redo them)")
    elif state == "partial":
        print(f"{dest}: partial ({status.tasks_done} of {status.num_tasks} tasks done, {status.rows_text()})")
    elif state == "complete" and status.damaged:
        print(
            f"{dest}: damaged ({status.rows_text()}, {status.num_tasks} tasks; relu-dask verify found "
            f"{status.damaged} block(s) wrong: rerun the same relu-dask run command to recompute them)"
        )
    elif state == "complete" and status.verified_utc:
        print(f"{dest}: complete ({status.rows_text()}, {status.num_tasks} tasks; verified {status.verified_utc})")
    elif state == "complete":
        print(f"{dest}: complete ({status.rows_text()}, {status.num_tasks} tasks)")
    elif state == "absent":
        print(f"{dest}: absent")
    elif status.replacing:
        print(f"{dest}: unknown (a run replacing it was stopped part way: rerun with --overwrite)")
    else:
        print(f"{dest}: unknown (it exists but holds no relu-dask job record)")
    if status.waiting_text():
        print(f"  {status.waiting_text()}")
    if status.running:
        print(f"  running now: {status.running}")
    fingerprint = status.fingerprint
    if fingerprint:
        print(f"  source: {fingerprint['source']}")
        print(f"  rule: {fingerprint['rule']}, nan: {fingerprint['nan']}")
        for array in fingerprint["arrays"]:
            shape = "x".join(map(str, array["shape"])) or "scalar"
            print(f"  array {array['path'] or '(array)'}: {shape} {array['dtype']}, chunks {array['chunk_shape']}")
    return EXIT_OK


def _option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``run``, ``plan`` and ``demo`` but SOURCE, DEST and ``--overwrite``,
    as :meth:`RunOptions.create` takes them."""
    scheduler = parse_scheduler(
        args.scheduler,
        num_workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        dashboard_address=args.dashboard_address,
        connect_timeout_s=args.connect_timeout,
        scheduler_file=args.scheduler_file,
        retries=args.retries,
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
        "metrics_path": args.metrics_file,
        "performance_report": args.performance_report,
        "stats": args.stats,
        "unit_axis": args.unit_axis,
        "unit_dim": args.unit_dim,
        "plot_path": args.plot,
        "storage_options": args.storage_options,
        "dest_compressor": args.dest_compressor,
    }


def _print_summary(report: RunReport, lines: list[str] | None = None) -> None:
    """Print ``lines`` (default: the report's summary) and log the finish event."""
    for line in render_summary(report) if lines is None else lines:
        print(line)
    if report.outcome == "stats":
        return
    log.info(
        "finish: %s, %d task(s) done now, %d skipped as already done, %.2f s",
        report.outcome,
        report.tasks_done_now,
        report.tasks_skipped,
        report.wall_s,
        extra={
            "event": "finish",
            "fields": {
                "outcome": report.outcome,
                "dest": report.dest,
                "num_tasks": report.num_tasks,
                "tasks_done_now": report.tasks_done_now,
                "tasks_skipped": report.tasks_skipped,
                "wall_s": report.wall_s,
                "cpu_s": report.cpu_s,
                "bytes_read": report.bytes_read,
                "bytes_written": report.bytes_written,
            },
        },
    )


def _say_error(message: str, exit_code: int) -> None:
    text = " ".join(message.split())  # one line, whatever the exception held
    if _JSON_LINES[0]:
        print(
            json.dumps(
                {"time": time.time(), "level": "ERROR", "event": "error", "message": text, "exit_code": exit_code}
            ),
            file=sys.stderr,
        )
    else:
        print(f"{PROG}: error: {text}", file=sys.stderr)


_JSON_LINES = [False]


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, event, message, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}))
        return json.dumps(data, default=str)


def _configure_logging(*, debug: bool, quiet: bool, json_lines: bool = False) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_lines else logging.Formatter(f"{PROG}: %(message)s"))
    _JSON_LINES[0] = json_lines
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
