"""The `lvd` command: run, ablate-data, stage, manifest, export, verify, serve, report, demo-data.

User errors (bad config, missing inputs, unknown manifests) print one line and exit with status 2;
only real bugs print a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from flows.curate_and_train import ABLATE_DATA, CURATE_AND_TRAIN
from flows.dag import DagError, UnknownStageError, UpstreamMissingError, open_store, run_single_stage
from flows.summary import print_runs
from pipelines.stage import StageRun
from pipelines.validation import UserInputError

USER_ERROR_EXIT = 2
SIGTERM_EXIT = 128 + signal.SIGTERM
# Writes a store or disk refuses: full, over quota or a size limit, read-only, not permitted.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
# The loggers Prefect reports task and flow run failures on.
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
DEFAULT_HEAD_ROWS = 10
DEFAULT_DEMO_DATA_DIR = "build/demo-data"
DEFAULT_REPORT_PATH = "build/report.html"
EXPORTS_OUTPUT = "exports"  # the output name of stages that export backbones
# Kept here (not imported from training.interop) so `lvd --help` stays fast; a test checks they agree.
EXPORT_FORMATS = ("transformers", "timm", "onnx")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="named preset from configs/ (default: demo)")
    parser.add_argument("--config", dest="config_file", help="YAML or JSON file merged over the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one value, e.g. --set ingest.max_pixels=1000000 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd", description="Curate an image crawl, pretrain and distill ViTs."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run curate-and-train in this process, recorded by $PREFECT_API_URL's server or by a private "
        "local Prefect server that stops with the run",
    )
    _add_config_options(run)
    run.add_argument("--until", metavar="STAGE", help="stop after this stage (default: run the whole DAG)")
    run.add_argument(
        "--ablate-data",
        action="store_true",
        help="then pretrain on a random pool sample of the curated set's size and compare (paper Table 2)",
    )

    ablate = commands.add_parser(
        "ablate-data",
        help="curate, pretrain on the curated set and on a same-size random pool sample, evaluate both",
    )
    _add_config_options(ablate)

    stage = commands.add_parser("stage", help="run one stage against committed upstream outputs")
    stage.add_argument("name")
    _add_config_options(stage)

    manifest = commands.add_parser("manifest", help="inspect a manifest")
    actions = manifest.add_subparsers(dest="action", required=True)
    for action, text in (
        ("show", "schema, rows, per-column summary"),
        ("head", "first rows"),
        ("stats", "stage stats"),
    ):
        sub = actions.add_parser(action, help=text)
        sub.add_argument(
            "target", help="manifest/stage folder, or a stage name like ingest or ingest/rejected"
        )
        sub.add_argument("--store", help="store root for stage names (default: the preset's store)")
        if action == "head":
            sub.add_argument("-n", "--rows", type=int, default=DEFAULT_HEAD_ROWS)

    export = commands.add_parser(
        "export", help="write backbones as transformers / timm / ONNX files, with a manifest of sha256s"
    )
    export.add_argument(
        "target", help="a stage with an exports output (pretrain, distill, ...) or an exports manifest path"
    )
    export.add_argument(
        "--out", required=True, help="folder for <model>/<format>/ files and format_exports.parquet"
    )
    export.add_argument(
        "--formats",
        default=",".join(EXPORT_FORMATS),
        help=f"comma-separated (default: {','.join(EXPORT_FORMATS)})",
    )
    export.add_argument(
        "--model", action="append", help="only this exported model, e.g. teacher (repeatable)"
    )
    export.add_argument("--store", help="store root (default: the demo preset's store)")

    verify = commands.add_parser(
        "verify", help="check every committed part against its recorded size and sha256 (exit 1 on damage)"
    )
    verify.add_argument("stage", nargs="?", help="one stage (default: every stage in the store)")
    verify.add_argument("--store", help="store root (default: the demo preset's store)")

    serve = commands.add_parser("serve", help="serve the Prefect deployments (needs PREFECT_API_URL)")
    _add_config_options(serve)

    report = commands.add_parser("report", help="write one self-contained HTML page of the committed runs")
    _add_config_options(report)
    report.add_argument(
        "--out", default=DEFAULT_REPORT_PATH, help=f"the page (default: {DEFAULT_REPORT_PATH})"
    )

    demo = commands.add_parser("demo-data", help="build the demo scenario from real offline images")
    demo.add_argument("--out", default=DEFAULT_DEMO_DATA_DIR)
    return parser


_TERMINATED = threading.Event()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    _TERMINATED.set()
    raise SystemExit(SIGTERM_EXIT)


class UserErrorsWithoutTraceback(logging.Filter):
    """Keeps Prefect's log line about a failed run, without a traceback, when what failed is the user's
    input: `lvd` says what is wrong in its own one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserInputError):
            record.exc_info = record.exc_text = None
        return True


def main(argv: Sequence[str] | None = None) -> int:
    # Why: Prefect's telemetry calls home at server start; offline machines only get errors from it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for logger_name in PREFECT_RUN_LOGGERS:
        prefect_logger = logging.getLogger(logger_name)
        if not any(isinstance(found, UserErrorsWithoutTraceback) for found in prefect_logger.filters):
            prefect_logger.addFilter(UserErrorsWithoutTraceback())
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return _dispatch(args, console)
    except (UserInputError, DagError, FileNotFoundError, UpstreamMissingError, UnknownStageError) as err:
        print(f"lvd: error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        # A store (or disk) that cannot take more: the stage that hit it committed nothing; rerun resumes.
        print(f"lvd: error: {err.filename or 'the store'}: {err.strerror}", file=sys.stderr)
        return USER_ERROR_EXIT


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command == "manifest":
        return _manifest(args, console)
    if args.command == "export":
        return _export(args, console)
    if args.command == "verify":
        from flows.verify import verify
        from pipelines.store import Store

        return verify(Store(args.store or CURATE_AND_TRAIN.resolve_config("demo").store), args.stage, console)
    if args.command == "demo-data":
        from curation.demo import DemoDataConfig, build_demo_data

        out = build_demo_data(Path(args.out), DemoDataConfig())
        console.print(f"demo data in {out}")
        return 0
    # Why: resolve and validate the whole config once, before importing Prefect or touching any data; the
    # flow takes the resolved config as it is.
    cfg = CURATE_AND_TRAIN.resolve_config(args.preset, args.config_file, args.overrides)
    if args.command in ("run", "ablate-data"):
        ablate = args.command == "ablate-data" or args.ablate_data
        until = CURATE_AND_TRAIN.branch_upstream(ABLATE_DATA) if args.command == "ablate-data" else args.until
        CURATE_AND_TRAIN.nodes_until(until)  # an unknown stage name fails here, before Prefect starts
        from flows.local_server import run_server
        from flows.prefect_flows import curate_and_train

        open_store(cfg)  # a store that cannot take files fails here, before any server or work starts
        # Why: SIGTERM's default ends the process at once; as SystemExit it unwinds `finally` blocks, so
        # the run's private Prefect server (and Ray) are stopped too.
        _TERMINATED.clear()
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            with run_server():
                runs = curate_and_train(until=until, ablate_data=ablate, config=cfg)
        except BaseException:
            # Prefect may wrap the unwinding SystemExit (a crash state, its own TerminationSignal): a
            # terminated run ends as one, whatever shape the exception took on its way out.
            if _TERMINATED.is_set():
                return SIGTERM_EXIT
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        _print_summary(runs, cfg, console)
        return 0
    if args.command == "stage":
        print_runs({args.name: run_single_stage(CURATE_AND_TRAIN, args.name, cfg)}, console)
        return 0
    if args.command == "report":
        from flows.report import build_report

        console.print(f"report written to {build_report(cfg, args.out)}", soft_wrap=True, highlight=False)
        return 0
    if args.command == "serve":
        from flows.prefect_flows import serve_deployments

        serve_deployments(args.preset, args.config_file, args.overrides)
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def _print_summary(runs: dict[str, StageRun], cfg: Any, console: Console) -> None:
    """The run summary (with every stage's tables) and where the flow wrote the report."""
    from flows.report import store_report_path

    print_runs(runs, console)
    report = store_report_path(cfg)
    if report is not None:
        console.print(f"report: {report}", soft_wrap=True, highlight=False)


def _export(args: argparse.Namespace, console: Console) -> int:
    from flows import inspect
    from pipelines.store import Store
    from training.exports import read_exports_at
    from training.interop.export import MANIFEST_FILE, check_formats, export_formats

    store_root = args.store or CURATE_AND_TRAIN.resolve_config("demo").store
    target = (
        args.target if Path(args.target).exists() else f"{args.target.partition('/')[0]}/{EXPORTS_OUTPUT}"
    )
    manifests = inspect.resolve_target(target, Store(store_root)).manifests
    rows = [row for location in manifests.values() for row in read_exports_at(location)]
    if args.model:
        rows = [row for row in rows if row["model"] in args.model]
    if not rows:
        raise UserInputError(
            f"{args.target}: no exported backbone{' named ' + ', '.join(args.model) if args.model else ''}"
        )
    formats = [name for name in args.formats.split(",") if name]
    try:
        check_formats(formats)
    except ValueError as err:
        raise UserInputError(str(err)) from err
    table = export_formats(rows, formats, Path(args.out))
    for row in table.to_pylist():
        line = f"{row['model']:<24} {row['format']:<13} {row['sha256'][:16]}  {row['path']}"
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"manifest: {Path(args.out) / MANIFEST_FILE}", soft_wrap=True, highlight=False)
    return 0


def _manifest(args: argparse.Namespace, console: Console) -> int:
    from flows import inspect
    from pipelines.store import Store

    store_root = args.store or CURATE_AND_TRAIN.resolve_config("demo").store
    target = inspect.resolve_target(args.target, Store(store_root))
    if args.action == "show":
        inspect.show(target, console)
    elif args.action == "head":
        inspect.head(target, args.rows, console)
    else:
        inspect.stats(target, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
