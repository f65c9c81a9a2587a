"""The machine a run or a measurement happened on, in words: figures from different machine kinds differ by more
than the changes they measure (the same CPU family with and without AVX-512, or with another BLAS, doubles a matmul),
so records and benchmarks name it."""

import os
import platform

# The widest vector and matrix extensions, which decide a CPU's matmul peak; first match of each group wins.
_ISA_GROUPS = ((("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON")), (("amx_tile", "AMX"),))


def describe(cpuinfo: str = "/proc/cpuinfo") -> str:
  """E.g. 'Intel(R) Xeon(R) Processor, 2 cores, AVX-512, AMX'; the processor's name from `cpuinfo` where there is
  one, else what `platform` knows."""
  try:
    with open(cpuinfo) as f:
      lines = f.read().splitlines()
  except OSError:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
  fields = {}
  for line in lines:
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())  # the first processor's
  name = fields.get("model name") or platform.machine()
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  isa = [next((label for flag, label in group if flag in flags), None) for group in _ISA_GROUPS]
  return ", ".join([name, f"{os.cpu_count()} cores"] + [label for label in isa if label])
