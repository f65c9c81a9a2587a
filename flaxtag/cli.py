"""How the `python -m flaxtag.X` commands start: absl flags, quiet library logs, user errors without tracebacks."""
import sys

from absl import app
from absl import logging

from flaxtag.errors import FlaxtagError


def run(main):
  """Runs `main(argv)` under absl; a FlaxtagError prints `error: <message>` and exits with status 2."""

  def guarded(argv):
    # Orbax and JAX log every save and restore (and read-only opens as warnings); commands print their own
    # progress, so library logs show only errors unless --verbosity is given.
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
      logging.set_verbosity(logging.ERROR)
    try:
      return main(argv)
    except FlaxtagError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)
