"""How the `python -m flaxtag.X` commands start: absl flags, quiet library logs, user errors without tracebacks."""
import sys

from absl import app
from absl import logging

from flaxtag.errors import FlaxtagError


def run(main):
  """Runs `main(argv)` under absl; a FlaxtagError prints `error: <message>` and exits with status 2."""

  def guarded(argv):
    # Orbax and JAX log every step of a save or restore at INFO; a user wants our progress lines only.
    if "--verbosity" not in " ".join(sys.argv) and "-v" not in sys.argv:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except FlaxtagError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)
