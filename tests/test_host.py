"""The machine named in benchmarks and study records: processor, cores and the vector ISA that sets its matmul
peak, read from cpuinfo as Linux writes it on x86 and on ARM."""
import os

from flaxtag import host

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
