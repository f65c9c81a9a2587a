"""User-facing errors.

Every error a user can cause (a bad config, an unreadable file, a checkpoint that does not fit) is raised as a
`FlaxtagError` whose message says what went wrong, where (file, key), and what to do. Command-line entry points
print that message and exit with status 2 instead of showing a traceback (see `flaxtag.cli`).
"""


class FlaxtagError(Exception):
  """Base class of errors caused by user input, with a message meant for the user."""


class ConfigError(FlaxtagError, ValueError):
  """A config value is unknown, impossible, or inconsistent with another."""


class AudioError(FlaxtagError, ValueError):
  """An audio file cannot be decoded, or its content cannot be used (silent, too short)."""


class HierarchyError(FlaxtagError, ValueError):
  """A coarse→fine tag hierarchy file is malformed or names unknown tags."""


class CheckpointError(FlaxtagError):
  """A checkpoint is missing, unreadable, or does not fit the model described by the config."""


class DatasetError(FlaxtagError):
  """A dataset is missing, incomplete, or its raw files are not where they should be."""
