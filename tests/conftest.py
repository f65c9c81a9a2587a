"""Test set-up: 8 CPU devices, so that meshes and sharding are real, before JAX initialises its backend; and one XLA
compilation cache for the session and every command it starts."""
import os
import shutil
import tempfile

# XLA's backend optimisation off, unless XLA_FLAGS sets a level (XLA's default is 2): the tests' models are tiny, so
# compiling them is most of the suite's time, and level 0 cut its CPU time by a quarter with every test passing at
# both levels. Commands the tests start keep it (train_runs.xla_flags_without_device_count).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile the same tiny models again and again, in this process and in the commands they run (most of the
# suite's time was compiling). JAX's persistent cache, in a directory of this session only, keeps one compilation of
# each program; the environment carries it to the subprocesses.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE = tempfile.mkdtemp(prefix="flaxtag-tests-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
else:
  _SESSION_CACHE = None

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


# `make test` shares whole files between two pytest-xdist workers in collection order (--no-loadscope-reorder,
# pytest-xdist >= 3.6): the longest files go first, so that none of them starts last and runs alone.
LONGEST_FILES_FIRST = ("test_slurm.py", "test_train.py", "test_topology.py", "test_study.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_data_dir(tmp_path_factory):
  """A tiny synthetic multi-instrument dataset built by the real builder: 16 / 8 / 8 clips of 5 s, TimGM6mb alone and
  not augmented (the clips of synth_instruments 1.0.0, on which the training tests' expectations were set)."""
  import fixtures_data  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("synth")
  return fixtures_data.build_dataset("synth_instruments", None, root / "data", num_train=16, num_valid=8, num_test=8,
                                     clip_seconds=5.0, seed=1, num_workers=1, augment=False)


@pytest.fixture(scope="session")
def trained_run(synth_data_dir, tmp_path_factory):
  """An uninterrupted 3-epoch run of a tiny GMP model (1 process × 8 devices): (workdir, last validation scalars)."""
  import train_runs  # pylint: disable=g-import-not-at-top
  from flaxtag import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("trained")
  scalars = train.train_and_evaluate(train_runs.run_config(synth_data_dir), str(workdir))
  return workdir, scalars


@pytest.fixture(scope="session")
def sgd_run(synth_data_dir, tmp_path_factory):
  """The uninterrupted reference of the runs resumed on other topologies: 1 process × 8 devices, SGD, 12 steps."""
  import train_runs  # pylint: disable=g-import-not-at-top
  from flaxtag import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("sgd_reference")
  train.train_and_evaluate(train_runs.run_config(synth_data_dir, **train_runs.SGD), str(workdir))
  return workdir
