"""The dtypes a tensor may have in elasticd, by name, with their sizes in bytes.

Torch-free, so the controller can size and place a job's parameters without
importing torch; :data:`elasticd.wire.DTYPES` maps the same names to torch's
dtypes (tests/test_wire.py checks that the two agree).
"""

ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
