"""Benchmarks: ``python -m bench NAME [--json]``.

Every figure is reported next to a baseline measured in the same run on the
same machine (raw loopback socket, plain torch DDP, memcpy), as a ratio:
these machines are shared and noisy, so absolute numbers mean little alone.
The last line of ``--json`` output is one JSON object.
"""
