"""flaxtag: music auto-tagging in JAX/Flax (CNN front-ends, Transformer back-end, hierarchical heads)."""
__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so that `import flaxtag` (and the data tools) do not pay for building the inference stack.
  if name == "Tagger":
    from flaxtag.inference import Tagger  # pylint: disable=g-import-not-at-top
    return Tagger
  raise AttributeError(f"module 'flaxtag' has no attribute {name!r}")
