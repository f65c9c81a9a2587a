"""The host machine: what it is, in words, and how a flaxtag process uses its memory.

`describe`: figures from different machine kinds differ by more than the changes they measure (the same CPU family
with and without AVX-512, or with another BLAS, doubles a matmul), so records and benchmarks name the machine.
`restart_with_allocator_settings`: XLA:CPU's steps page-fault their buffers in afresh unless the C library
keeps them.
"""

import os
import platform
import sys

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


# What a flaxtag command tells glibc's malloc (GLIBC_TUNABLES): back large blocks with transparent huge pages, and
# never hand freed memory back to the kernel (no mmap'd blocks, no trimming of the heap).
ALLOCATOR_TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=4294967296")
KEEP_FREED_MEMORY_VARIABLE = "FLAXTAG_KEEP_FREED_MEMORY"


def allocator_environment(environ, libc_version: str | None) -> dict | None:
  """`environ` with ALLOCATOR_TUNABLES before any GLIBC_TUNABLES of its own (a user's settings come later and win),
  or None where it needs no change: the tunables are there, FLAXTAG_KEEP_FREED_MEMORY=0, or `libc_version` (as
  os.confstr('CS_GNU_LIBC_VERSION') gives it) is not glibc's."""
  if environ.get(KEEP_FREED_MEMORY_VARIABLE, "1") == "0" or not (libc_version or "").startswith("glibc"):
    return None
  present = environ.get("GLIBC_TUNABLES", "")
  if all(tunable in present.split(":") for tunable in ALLOCATOR_TUNABLES):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(ALLOCATOR_TUNABLES + ((present,) if present else ()))}


def libc_version() -> str | None:
  """E.g. 'glibc 2.36'; None where the C library does not say (macOS, musl, Windows)."""
  try:
    return os.confstr("CS_GNU_LIBC_VERSION")
  except (AttributeError, ValueError, OSError):  # no confstr, or no such name on this system
    return None


def runs_command(orig_argv: list[str]) -> bool:
  """Whether the interpreter was started as `python [options] -m flaxtag.COMMAND ...`."""
  arguments = iter(orig_argv[1:])
  for argument in arguments:
    if argument == "-m":
      return next(arguments, "").startswith("flaxtag.")
    if argument in ("-X", "-W"):  # the interpreter's options that take a value
      next(arguments, None)
    elif argument == "-c" or not argument.startswith("-"):  # code or a script: what follows is its own
      return False
  return False


def restart_with_allocator_settings() -> None:
  """Replaces this process by itself (same pid, arguments and environment) with ALLOCATOR_TUNABLES, where
  `allocator_environment` says it lacks them; returns where it has them or needs none.

  XLA:CPU allocates a step's intermediate buffers (839 MB for Spec+Att at batch 16) and frees them when the step
  ends. glibc serves blocks that large with mmap, even with mmap disabled when the thread's arena is not the main
  one, so each step's buffers come back from the kernel as fresh 4-KiB pages, faulted in and zeroed one by one:
  about 240,000 page faults and 0.3 s of system time in a 1.25-s step on a 2-core Xeon. Huge pages and a heap that
  keeps what is freed remove nearly all of them (BENCHMARKS.md: training steps 1.13-1.24x faster); the resident
  memory then stays at the process's peak. glibc reads its tunables only at start-up, hence the restart, which must
  come before anything that should happen once: flaxtag/__init__.py does it first thing for `python -m
  flaxtag.COMMAND`.
  """
  environ = allocator_environment(os.environ, libc_version())
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)
