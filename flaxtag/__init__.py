"""flaxtag: music auto-tagging in JAX/Flax (CNN front-ends, Transformer back-end, hierarchical heads)."""
import sys

from flaxtag import host

__version__ = "0.1.0"

# First thing in a `python -m flaxtag.COMMAND` process: the allocator settings that XLA:CPU's steps need, which glibc
# reads only at start-up (a restart, before any of the command's imports; host.py says why).
if host.runs_command(sys.orig_argv):
  host.restart_with_allocator_settings()


def __getattr__(name):
  # Lazy, so that `import flaxtag` (and the data tools) do not pay for building the inference stack.
  if name == "Tagger":
    from flaxtag.inference import Tagger  # pylint: disable=g-import-not-at-top
    return Tagger
  raise AttributeError(f"module 'flaxtag' has no attribute {name!r}")
