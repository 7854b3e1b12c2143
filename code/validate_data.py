"""Validate a stage's data: every record parses, every medium exists and decodes (or has a cached ImageBind
feature), every caption embedding exists with the shape the configured decoder needs; the values of every caption
embedding and cached feature are read: the manifest's dtype, all finite (--no-decode skips media decoding and
value reads).

    python code/validate_data.py --config code/config/stage_2.yaml [--datasets cc3m_dec ...] [--no-decode]
    python code/validate_data.py --config code/config/stage_3.yaml --report [PNG]     # + the data report

Prints a table per dataset (records, ok, missing, corrupt) and every bad record (file + record index + reason).
Exit 0: all good; 1: problems found; 2: the check could not run (bad config, unknown dataset name, unreadable
file system: one `error:` line, the traceback in a log file it names).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    from nextgpt import cli

    return cli.run(lambda: _main(argv), "validate_data")


def _main(argv: list[str] | None) -> int:
    from nextgpt.config import add_config_args, from_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="catalog names (default: the config's data.datasets)")
    p.add_argument("--no-decode", action="store_true",
                   help="cheap mode (as train.py): existence and .npy header checks only, no media decoding")
    p.add_argument("--max-problems", type=int, default=None, help="print at most this many bad records")
    p.add_argument("--report", nargs="?", const="auto", default=None, metavar="PNG",
                   help="also print the data report (nextgpt.data.report: modality mix, counts, word/token lengths, "
                        "missing/corrupt list) and write its histograms (default: runs/data_report/<config>.png)")
    args = p.parse_args(argv)
    from nextgpt.data.validate import validate

    cfg = from_args(args)
    report = validate(cfg, args.datasets, decode=not args.no_decode)  # a failure: one `error:` line, exit 2
    print(report.format(args.max_problems))
    if report.errors and not report.datasets:
        return 2
    if args.report is not None:
        from pathlib import Path

        from nextgpt.data.report import data_report

        png = (Path(args.report) if args.report != "auto" else
               cfg.path(f"runs/data_report/{Path(cfg.source).stem if cfg.source else 'data'}.png"))
        print(data_report(cfg, args.datasets, png, validation=report))
    print("data OK" if report.ok else "data has problems (see above)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
