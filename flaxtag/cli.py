"""How the `python -m flaxtag.X` commands start: absl flags, quiet library logs, user errors without tracebacks."""
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
# The module behind ml_collections.config_flags, which does not re-export the parser of config-file flags.
from ml_collections.config_flags import config_flags

from flaxtag.errors import FlaxtagError


class _ConfigFileError(Exception):
  """A config file given on the command line is missing, or its code failed; the message names file and line.

  Not a ValueError or TypeError: absl would wrap those into a message about the flag, traceback included."""


class _ConfigFileParser(flags.ArgumentParser):
  """Wraps ml_collections' parser of a `--config FILE[:ARG]` flag so that a missing file, a syntax error, or an
  exception raised while the file's code runs becomes one _ConfigFileError naming the file and line."""

  def __init__(self, parser: config_flags.ConfigFileFlagParser):
    self._parser = parser

  def flag_type(self):
    return self._parser.flag_type()

  def parse(self, argument):
    path = argument.split(":", 1)[0]  # what ml_collections loads; after the colon comes get_config's argument
    if not os.path.isfile(path):
      raise _ConfigFileError(f"{path}: no such config file")
    try:
      config = self._parser.parse(argument)
      # ml_collections keeps an OSError raised while loading (say get_config() opens a missing file) until the
      # config is first used, then raises it from that first use; use it now.
      getattr(config, "lock", None)
    except Exception as e:  # pylint: disable=broad-except: the config file is user code and may raise anything
      raise _ConfigFileError(_describe_config_error(e, path)) from e
    return config


def _describe_config_error(error: BaseException, path: str) -> str:
  """'FILE:LINE: Type: message' of the error's cause, at the innermost line of the config file it passed through.

  ml_collections re-raises a config's TypeError or ValueError as a new one holding the traceback as text; the
  original is found along __cause__ / __context__."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  for candidate in chain:
    if isinstance(candidate, SyntaxError):
      return f"{candidate.filename}:{candidate.lineno}: {type(candidate).__name__}: {candidate.msg}"
    lines = [frame.lineno for frame in traceback.extract_tb(candidate.__traceback__)
             if os.path.realpath(frame.filename) == os.path.realpath(path)]
    if lines:
      return f"{path}:{lines[-1]}: {_one_line(candidate)}"
  return f"{path}: {_one_line(chain[-1])}"


def _one_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {_message(error)}"


def _message(error: BaseException) -> str:
  """The error's message on one line. ConfigDict raises AttributeError(KeyError(message)), and a KeyError's str()
  is the repr of its message."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if isinstance(error, KeyError) and error.args else error
  return " ".join(str(text).split())


def _parse_flags_or_exit(argv):
  """Parses the flags, returning the positional arguments. Errors of config files are reported with their file and
  line; a mistyped `--config.x.y=...` raises KeyError/AttributeError from inside ml_collections, reported as a bad
  flag. Each is one line."""
  app.define_help_flags()
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if isinstance(flag.parser, config_flags.ConfigFileFlagParser):
      flag.parser = _ConfigFileParser(flag.parser)
  try:
    return flags.FLAGS(argv)
  except _ConfigFileError as e:
    _fail(e)
  except flags.Error as e:
    _fail(f"{e}\nPass --helpshort for the flags of this command.")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    _fail(f"bad command-line flag: {_message(e)}")


def make_output_folder(path: str) -> None:
  """Makes the folders an output file goes in. Commands call it before their work, so that a path that cannot be
  written fails at once, not after an evaluation."""
  if os.path.isdir(path):
    raise FlaxtagError(f"cannot write {path}: it is a folder; give a file name.")
  folder = os.path.dirname(os.path.abspath(path))
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise FlaxtagError(f"cannot write {path}: {existing} is a file, not a folder.")
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise FlaxtagError(f"cannot write {path}: cannot make the folder {folder} ({e.strerror}).") from e
  if not os.access(folder, os.W_OK):
    raise FlaxtagError(f"cannot write {path}: no permission to write in {folder}.")


def _fail(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run(main):
  """Parses absl flags and runs `main(argv)`, exiting with its return value (None: 0); bad flags, config files that
  fail, and FlaxtagErrors print `error: <message>` and exit with status 2."""
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
