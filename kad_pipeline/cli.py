"""The ``kad`` command line: labeling, evaluation and the offline demo without the Dagster UI."""

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    """Build the ``kad`` parser with one subcommand per task."""
    from kad_pipeline.evaluation import cli as evaluation_cli
    from kad_pipeline.extraction import cli as extraction_cli
    from kad_pipeline import demo

    parser = argparse.ArgumentParser(
        prog="kad", description="Label reports, evaluate scores and run the offline demo of kad-pipeline."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True)

    label = subparsers.add_parser("label", help="extract entities and presence labels from reports")
    extraction_cli.add_label_arguments(label)
    label.set_defaults(handler=extraction_cli.run_label)

    evaluate = subparsers.add_parser("evaluate", help="compute metrics with confidence intervals")
    evaluation_cli.add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=evaluation_cli.run_evaluate)

    demo_parser = subparsers.add_parser("demo", help="materialize the whole asset graph offline")
    demo.add_demo_arguments(demo_parser)
    demo_parser.set_defaults(handler=demo.run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``kad`` command line and return its exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        # The demo's Dagster instance already prints library logs with its run and step ids.
        return int(args.handler(args) or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
