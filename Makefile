# The two commands of a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
# Python 3.12 where the machine has one (on PATH, or pyenv's), else python3: JAX 0.12 needs Python >= 3.12, and its
# one-device Spec+Att training step holds 55-57 % of the matmul peak where 0.10's (the newest for 3.11) swings between
# 40 and 53 %; on one device per core the two train alike (BENCHMARKS.md). `make PYTHON=...` chooses.
PYTHON ?= $(or $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12; do \
  "$$p" -c "" 2>/dev/null && echo "$$p" && break; done),python3)
VENV := .venv
PY := $(VENV)/bin/python
TEST_EXTRAS := dev,synth,beam
DEMO_EXTRAS := synth

.PHONY: demo study test test-fast system-deps soundfonts clean

# One stamp per set of extras, redone when the package metadata changes.
$(VENV)/.installed-%: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$*]"
	@touch $@

# FluidSynth renders the synthetic multi-instrument dataset. Installed here when run as root (Debian/Ubuntu).
system-deps:
	@if ldconfig -p 2>/dev/null | grep -q libfluidsynth; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing libfluidsynth3 (FluidSynth) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfluidsynth3 >/dev/null; \
	else \
	  echo "flaxtag needs the FluidSynth library for the synthetic dataset; install it, e.g."; \
	  echo "  sudo apt-get install libfluidsynth3   (Debian/Ubuntu)   or   brew install fluid-synth   (macOS)"; \
	  exit 1; \
	fi

# SoundFonts besides pretty_midi's TimGM6mb: csound's General-MIDI bank (the demo trains on both) and FluidR3_GM,
# held out (only measured on). Installed here when run as root; without them the demo trains on TimGM6mb alone and
# skips the held-out measurement, and the tests that need them are skipped.
SOUNDFONTS := /usr/share/sounds/sf2/sf_GMbank.sf2 /usr/share/sounds/sf2/FluidR3_GM.sf2
soundfonts:
	@if ls $(SOUNDFONTS) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing csound-soundfont and fluid-soundfont-gm (SoundFonts) with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq csound-soundfont \
	    fluid-soundfont-gm >/dev/null) || echo "note: the SoundFonts could not be installed; using TimGM6mb alone"; \
	else \
	  echo "note: csound's GM bank and FluidR3_GM are not installed (sudo apt-get install csound-soundfont"; \
	  echo "  fluid-soundfont-gm); the demo trains on TimGM6mb alone and skips the held-out SoundFont"; \
	fi

# Two pytest-xdist workers, whole test files at a time: most tests wait on compiles and subprocesses, so two share
# the 2 cores well (14–18 min against 25–27 in one process). PYTEST_WORKERS=0 runs them in this process.
# --no-loadscope-reorder: in the order of tests/conftest.py, longest files first; xdist's default order (most tests
# first) left the one-test SLURM file, 3 minutes long, to the end, with one worker idle.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(VENV)/.installed-$(TEST_EXTRAS) system-deps soundfonts
	$(PYTEST) tests

# While editing: every test but those marked slow (`@pytest.mark.slow`), about 5 min on 2 cores (6 in one process).
test-fast: $(VENV)/.installed-$(TEST_EXTRAS) system-deps soundfonts
	$(PYTEST) -m "not slow" tests

demo: $(VENV)/.installed-$(DEMO_EXTRAS) system-deps soundfonts
	$(PY) -m flaxtag.demo

# The heads study of RESULTS.md (71 runs, about a day on a 2-core CPU; resumable: rerun to continue, also on another
# machine from the records kept in study_out/).
study: $(VENV)/.installed-$(DEMO_EXTRAS) system-deps
	$(PY) -m flaxtag.study

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
