"""`python -m elasticd.shape_probe --timeout S --memory-mib M`: the probe process.

Started by the controller (:class:`elasticd.shape_probe.client.ShapeProbe`);
it speaks the line protocol of :mod:`.forkserver` on stdin and stdout.
"""

from __future__ import annotations

import argparse
import sys

import torch  # imported once here, so that every child starts with it

from elasticd.shape_probe.forkserver import serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elasticd.shape_probe")
    p.add_argument("--timeout", type=float, required=True, help="seconds a child may run")
    p.add_argument("--memory-mib", type=int, required=True, help="address space of a child, MiB")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a meta-device build computes nothing
    return serve(args.timeout, args.memory_mib)


if __name__ == "__main__":
    sys.exit(main())
