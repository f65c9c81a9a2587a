"""The host: the machine named in benchmarks and study records (processor, cores and the vector ISA that sets its
matmul peak, read from cpuinfo as Linux writes it on x86 and on ARM), and the allocator settings a flaxtag command
restarts itself with, checked in real processes: a command gets them, and with them a jit-compiled function's large
intermediate buffer is no longer faulted in afresh at every call."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from flaxtag import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNABLES = ":".join(host.ALLOCATOR_TUNABLES)
GLIBC = (host.libc_version() or "").startswith("glibc")

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw amx_bf16 amx_tile
"""
AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes\nCPU implementer\t: 0x41\n"


def test_names_the_processor_its_cores_and_its_widest_vector_and_matrix_extensions(tmp_path):
  cores = os.cpu_count()
  for text, expected in ((X86, f"Intel(R) Xeon(R) Processor, {cores} cores, AVX-512, AMX"),
                         (AVX2_ONLY, f"AMD EPYC 7B13, {cores} cores, AVX2")):
    (tmp_path / "cpuinfo").write_text(text)
    assert host.describe(str(tmp_path / "cpuinfo")) == expected
  (tmp_path / "cpuinfo").write_text(ARM)  # no model name: the architecture stands for it
  assert host.describe(str(tmp_path / "cpuinfo")).endswith(f", {cores} cores, NEON")
  assert host.describe(str(tmp_path / "missing")).endswith(f", {cores} cores")


def test_the_allocator_environment_adds_the_tunables_once_before_a_users_own_and_only_under_glibc():
  assert host.allocator_environment({"A": "1"}, "glibc 2.36") == {"A": "1", "GLIBC_TUNABLES": TUNABLES}
  user = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=5"}  # later in the list, so the user's value wins
  assert host.allocator_environment(user, "glibc 2.36")["GLIBC_TUNABLES"] == TUNABLES + ":glibc.malloc.mmap_max=5"
  assert host.allocator_environment({"GLIBC_TUNABLES": TUNABLES + ":x=1"}, "glibc 2.36") is None  # no second restart
  assert host.allocator_environment({"FLAXTAG_KEEP_FREED_MEMORY": "0"}, "glibc 2.36") is None
  assert host.allocator_environment({}, None) is None  # macOS, musl: nothing to set
  assert host.runs_command(["python", "-u", "-m", "flaxtag.train", "--config", "c.py"])
  assert host.runs_command(["python", "-X", "importtime", "-m", "flaxtag.tag", "music/"])
  assert not host.runs_command(["python", "-m", "pytest", "tests"])
  assert not host.runs_command(["python", "script.py", "-m", "flaxtag.train"])  # the script's own arguments


def test_the_libc_version_is_none_where_the_system_does_not_name_it(monkeypatch):
  def unknown_name(name):
    raise ValueError(f"unrecognized configuration name {name}")  # what macOS's os.confstr raises
  monkeypatch.setattr(os, "confstr", unknown_name)
  assert host.libc_version() is None
  monkeypatch.delattr(os, "confstr")  # Windows
  assert host.libc_version() is None


def _interpreter_starts(tmp_path, environ) -> list[str]:
  """GLIBC_TUNABLES of every interpreter start of `python -m flaxtag.summary --help` (a sitecustomize records it)."""
  log = tmp_path / "starts.txt"
  (tmp_path / "sitecustomize.py").write_text(
      "import os\nwith open(os.environ['STARTS_LOG'], 'a') as f:\n"
      "  f.write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n')\n")
  env = {**environ, "STARTS_LOG": str(log), "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])}
  done = subprocess.run([sys.executable, "-m", "flaxtag.summary", "--help"], env=env, capture_output=True, text=True,
                        cwd=REPO)
  assert "--depth" in done.stdout, done.stderr  # the command's own help: it ran to the end
  return log.read_text().splitlines()


@pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's")
def test_a_command_restarts_once_with_the_tunables_unless_told_not_to(tmp_path):
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  assert _interpreter_starts(tmp_path, environ) == ["-", TUNABLES]
  (tmp_path / "starts.txt").unlink()
  assert _interpreter_starts(tmp_path, {**environ, "FLAXTAG_KEEP_FREED_MEMORY": "0"}) == ["-"]


FAULTS = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    from flaxtag import host
    host.restart_with_allocator_settings()
    import jax, jax.numpy as jnp
    # A 256-MiB intermediate (glibc serves blocks that large with mmap unless told otherwise), between small arrays.
    f = jax.jit(lambda x: jax.lax.optimization_barrier(jnp.outer(x, x)).sum(axis=0))
    x = jnp.ones(8192, jnp.float32)
    f(x).block_until_ready()
    faults = []
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(faults))
""")


def _transparent_huge_pages() -> str:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return "never"


@pytest.mark.skipif(not GLIBC or _transparent_huge_pages() == "never",
                    reason="needs glibc and transparent huge pages (madvise or always)")
def test_with_the_tunables_a_large_buffer_is_not_faulted_in_again_at_every_call(tmp_path):
  script = tmp_path / "faults.py"
  script.write_text(FAULTS)
  faults = {}
  for keep in ("1", "0"):
    env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, "FLAXTAG_KEEP_FREED_MEMORY": keep,
           "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, str(script), REPO], env=env, check=True, capture_output=True, text=True)
    faults[keep] = json.loads(done.stdout.strip().splitlines()[-1])
  # 256 MiB is 65,536 faults per call in 4-KiB pages (16,384 where the kernel faults in 16-KiB folios); kept (or in
  # 2-MiB pages), a few hundred at most.
  assert min(faults["0"]) > 10_000, faults
  assert max(faults["1"]) < 1_000, faults
