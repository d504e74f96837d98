"""The probe's limits and their defaults, importable without torch (for `--help`)."""

PROBE_TIMEOUT_S = 60.0  # a task's import and build_model together, in the probe
PROBE_MEMORY_MIB = 4096  # the probe child's address space, torch included (~0.6 GiB of it)
MIN_MEMORY_MIB = 1024  # below this, torch itself may not fit (OpenBLAS fails at 512)
RESULT_LIMIT = 8 << 20  # bytes of answer a child may write; more is refused
LOG_TAIL = 4096  # bytes of a child's output kept for the error message
# What torch and the allocators say when an allocation fails under the limit.
OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory")
