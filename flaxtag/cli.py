"""How the `python -m flaxtag.X` commands start: absl flags, quiet library logs, user errors without tracebacks."""
import sys

from absl import app
from absl import flags
from absl import logging

from flaxtag.errors import FlaxtagError


def _parse_flags_or_exit(argv):
  """Parses the flags, returning the positional arguments. A mistyped `--config.x.y=...` raises
  KeyError/AttributeError from inside ml_collections; it is reported in one line instead."""
  app.define_help_flags()
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}\nPass --helpshort for the flags of this command.")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    reason = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    _fail(f"bad command-line flag: {reason}")


def _fail(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run(main):
  """Parses absl flags and runs `main(argv)`, exiting with its return value (None: 0); bad flags and
  FlaxtagErrors print `error: <message>` and exit with status 2."""
  argv = _parse_flags_or_exit(sys.argv)
  # Orbax and JAX log every save and restore (and read-only opens as warnings); commands print their own
  # progress, so library logs show only errors unless --verbosity is given.
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.ERROR)
  try:
    status = main(argv)
  except app.UsageError as e:
    _fail(e)
  except FlaxtagError as e:
    _fail(e)
  sys.exit(status)
