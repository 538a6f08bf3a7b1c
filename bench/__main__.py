"""`python -m bench [--sizes 100k,1M] [--seed N] [--keep] [--quick] [--profile]`."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from bench.exports import parse_size
from bench.runner import Options, command_line, elapsed, run

QUICK = "20k"


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput of import-chat through Kafka against a direct path and COPY.",
    )
    parser.add_argument(
        "--sizes",
        default="100k,1M",
        help="comma-separated export sizes in documents (default 100k,1M)",
    )
    parser.add_argument(
        "--shapes",
        default="default,edge-cases",
        help="export shapes: default (generate's), edge-cases (generate --edge-cases: repeated"
        " keys, bad lines, keyless documents; first import and re-import only)"
        " (default: both)",
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke run: --sizes {QUICK}")
    parser.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the databases and the PostgreSQL data directory (the server is stopped)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run the first import under py-spy at the smallest size and summarise it",
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="leave PostgreSQL's test settings (fsync, synchronous_commit off)",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="give up on one measured step after this long (default 3600)",
    )
    args = parser.parse_args(args_list)
    try:
        sizes = [parse_size(s) for s in (QUICK if args.quick else args.sizes).split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
    if not shapes or set(shapes) - {"default", "edge-cases"}:
        parser.error(f"--shapes: choose from default, edge-cases (got {args.shapes!r})")
    # SIGTERM unwinds like Ctrl-C, so the broker, PostgreSQL and any child are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    run(
        Options(
            sizes=sorted(set(sizes)),
            seed=args.seed,
            keep=args.keep,
            durable=not args.no_fsync,
            profile=args.profile,
            step_timeout=args.step_timeout,
            command=command_line(args_list),
            shapes=shapes,
        )
    )
    print(f"total {elapsed(began)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
