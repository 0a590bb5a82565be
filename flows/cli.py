"""The `lvd` command: run, ablate-data, stage, manifest, serve, report, demo-data.

User errors (bad config, missing inputs, unknown manifests) print one line and exit with status 2;
only real bugs print a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from flows.curate_and_train import ABLATE_DATA, CURATE_AND_TRAIN
from flows.dag import DagError, UnknownStageError, UpstreamMissingError, run_single_stage
from flows.summary import print_runs
from pipelines.stage import StageRun
from pipelines.validation import UserInputError

USER_ERROR_EXIT = 2
DEFAULT_HEAD_ROWS = 10
DEFAULT_DEMO_DATA_DIR = "build/demo-data"
DEFAULT_REPORT_PATH = "build/report.html"


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

    run = commands.add_parser("run", help="run curate-and-train in this process (Prefect flow, no server)")
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


def main(argv: Sequence[str] | None = None) -> int:
    # Why: Prefect's telemetry calls home at server start; offline machines only get errors from it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return _dispatch(args, console)
    except (UserInputError, DagError, FileNotFoundError, UpstreamMissingError, UnknownStageError) as err:
        print(f"lvd: error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command == "manifest":
        return _manifest(args, console)
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
        from flows.prefect_flows import curate_and_train

        runs = curate_and_train(until=until, ablate_data=ablate, config=cfg)
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
