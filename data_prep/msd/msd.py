"""Million Song Dataset, top-50 tags (SPEC §6), as a tfds builder.

Splits and labels come from the public Python 2 pickles of the usual split: the first `num_train` (201,680) ids of
the train list are train, the next `num_valid` (default: the rest, 11,774) valid, the test list test. Previews (any
sample rate, mono or stereo) are decoded to 16 kHz mono; unreadable ones are skipped and listed.
"""
import codecs
import io
import os
import pickle
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_prep import common
from flaxtag.errors import DatasetError

TAGS = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s", "alternative rock",
    "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock", "soul", "indie rock", "Mellow",
    "electronica", "80s", "folk", "90s", "chill", "instrumental", "punk", "oldies", "blues", "hard rock", "ambient",
    "acoustic", "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country", "easy listening",
    "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb", "indie pop", "sad",
    "House", "happy")
TRAIN_LIST, TEST_LIST, TAG_MAP = "filtered_list_train.cP", "filtered_list_test.cP", "msd_id_to_tag_vector.cP"
PATH_MAPS = ("MSD_id_to_7D_id.pkl", "7D_id_to_path.pkl")  # optional: previews named by 7digital id
AUDIO_DIR = "audio"
NUM_TRAIN = 201680
HOW_TO_GET = ("The pickles are in https://github.com/minzwon/sota-music-tagging-models (split/msd); the 30 s "
              "7digital previews are not distributed: put yours under <manual_dir>/audio/ as "
              "<id[2]>/<id[3]>/<id[4]>/<MSD track id>.mp3, or as 7digital paths with MSD_id_to_7D_id.pkl and "
              "7D_id_to_path.pkl beside the pickles. See data_prep/msd/README.md.")

# (module, name) pairs that may appear in the split pickles: containers, strings and numbers need no global at all.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
    ("numpy.core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
    ("numpy._core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("builtins", "frozenset"): frozenset,
    # Python 3's protocol 2 writes bytes as _codecs.encode(str, 'latin1').
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise DatasetError(f"{self.source}: refusing to unpickle {module}.{name}: the MSD split pickles hold only "
                         f"lists, dicts, strings, numbers and numpy arrays. Is this the right file?")
    return _ALLOWED_GLOBALS[(module, name)]


def load_pickle(path: epath.PathLike):
  """Loads a Python 2 pickle (str as bytes) allowing only plain containers, strings, numbers and numpy arrays."""
  unpickler = _RestrictedUnpickler(io.BytesIO(epath.Path(path).read_bytes()), encoding="bytes")
  unpickler.source = os.fspath(path)
  try:
    return unpickler.load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise DatasetError(f"{path}: not a readable pickle ({e})") from e


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


class Msd(common.Builder):
  """Million Song Dataset previews (16 kHz mono int16) with the top-50 last.fm tags."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First flaxtag release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET
  BUILD_ARGS = ("num_train", "num_valid", "num_test")

  def __init__(self, *, num_train: int = NUM_TRAIN, num_valid: Optional[int] = None,
               num_test: Optional[int] = None, **kwargs):
    self._sizes = (num_train, num_valid, num_test)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return common.tagging_info(
        self, TAGS, "Million Song Dataset 30 s previews, 16 kHz mono, multi-hot top-50 last.fm tags.", "MSD track id",
        homepage="http://millionsongdataset.com/",
        citation="Bertin-Mahieux et al., The Million Song Dataset, ISMIR 2011.",
    )

  def _split_items(self, manual_dir: Optional[epath.Path]):
    root = common.require_manual_files(manual_dir, [TRAIN_LIST, TEST_LIST, TAG_MAP, AUDIO_DIR], "msd", HOW_TO_GET)
    num_train, num_valid, num_test = self._sizes
    train_list = [_text(t) for t in load_pickle(root / TRAIN_LIST)]
    test_list = [_text(t) for t in load_pickle(root / TEST_LIST)]
    if num_train > len(train_list):
      raise DatasetError(f"msd: num_train={num_train} but {root / TRAIN_LIST} lists {len(train_list)} ids")
    ids = {
        "train": train_list[:num_train],
        "valid": train_list[num_train:None if num_valid is None else num_train + num_valid],
        "test": test_list[:num_test],
    }
    tag_map = {_text(k): v for k, v in load_pickle(root / TAG_MAP).items()}
    audio_root = os.fspath(root / AUDIO_DIR)
    relative_path = self._path_function(root)
    items, missing = {}, []
    for split, tracks in ids.items():
      items[split] = []
      for track in tracks:
        if track not in tag_map:
          raise DatasetError(f"msd: track {track} of the {split} list has no tag vector in {root / TAG_MAP}")
        labels = np.asarray(tag_map[track]).reshape(-1)
        if labels.shape != (len(TAGS),):
          raise DatasetError(f"msd: the tag vector of {track} has {labels.size} entries, expected {len(TAGS)}")
        relative = relative_path(track)
        if relative is None:  # not in the path maps
          missing.append(track)
          self.record_skipped(track, split, common.MISSING)
          continue
        try:
          path = common.resolve_path_inside(audio_root, relative)
        except common.PathOutsideRootError as e:
          self.record_skipped(os.path.join(audio_root, relative), split, str(e))
          continue
        if not os.path.exists(path):
          missing.append(track)
          self.record_skipped(path, split, common.MISSING)
          continue
        items[split].append(common.Item(track, path, ((labels != 0).astype(common.LABEL_DTYPE), track, None)))
    common.check_missing_audio(missing, sum(map(len, ids.values())), "msd",
                               f"{root / AUDIO_DIR}/<id[2]>/<id[3]>/<id[4]>/<id>.mp3, or the 7digital path maps")
    return {split: (split_items, common.example_from_file) for split, split_items in items.items()}

  def _path_function(self, root: epath.Path):
    """track id -> its preview's path relative to the audio dir (None: not in the path maps)."""
    present = [(root / p).exists() for p in PATH_MAPS]
    if any(present) and not all(present):
      common.require_manual_files(root, PATH_MAPS, "msd", HOW_TO_GET)
    if all(present):
      to_7d = {_text(k): _text(v) for k, v in load_pickle(root / PATH_MAPS[0]).items()}
      to_path = {_text(k): _text(v) for k, v in load_pickle(root / PATH_MAPS[1]).items()}
      return lambda t: to_path.get(to_7d.get(t)) or None
    return lambda t: os.path.join(t[2], t[3], t[4], t + ".mp3")
