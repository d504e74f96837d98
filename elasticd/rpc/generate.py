"""Regenerate the committed gRPC modules from the .proto sources in proto/.

The sources are mapped into the virtual directory ``elasticd/rpc`` so that the
generated modules import each other as ``elasticd.rpc.*``.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = ("ps.proto", "job.proto", "agent.proto")


def generate(out_dir: Path, proto_dir: Path) -> None:
    from grpc_tools import protoc

    for name in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-Ielasticd/rpc={proto_dir}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"elasticd/rpc/{name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {name}")


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root
    generate(out, root / "proto")


if __name__ == "__main__":
    main()
