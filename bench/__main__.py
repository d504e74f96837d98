"""Run one benchmark by name: ``python -m bench membership|ps|allreduce|checkpoint|recovery|goodput [--json]``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHMARKS = ("membership", "ps", "allreduce", "checkpoint", "recovery", "goodput")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON on the last line"
    )
    args, rest = parser.parse_known_args()
    module = importlib.import_module(f"bench.{args.name}")
    result = module.run(rest)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in sorted(result.items()):
            print(f"{key:32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
