"""Reading PyTorch `state_dict` files (`torch.save` zip format) into numpy, without torch and without running code.

A `.pth` file is a zip holding `data.pkl` and one raw little-endian buffer per storage. `torch.load` unpickles
`data.pkl` with a full unpickler, which can execute arbitrary code from an untrusted file. Here the unpickler only
admits the handful of names a state_dict needs (OrderedDict, the tensor rebuild functions, typed storages); any
other global is refused with its name. Legacy (pre-1.6, non-zip) files fall back to `torch.load(weights_only=True)`
when the optional `torch` extra is installed.
"""
import collections
import pickle
import zipfile

import numpy as np

from flaxtag.errors import CheckpointError

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:

  def __init__(self, name):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """Equivalent of torch._utils._rebuild_tensor_v2: a strided view into a flat storage, copied out."""
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):

  def __init__(self, file, zip_file, prefix, path):
    super().__init__(file)
    self._zip = zip_file
    self._prefix = prefix
    self._path = path

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise CheckpointError(
        f"{self._path}: refusing to load '{module}.{name}': a state_dict file holds only tensors in dicts. "
        "Save the model with torch.save(model.state_dict(), path) and convert that file.")

  def persistent_load(self, pid):
    kind, storage_type, key, unused_location, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"{self._path}: unsupported storage record {pid!r}.")
    raw = self._zip.read(f"{self._prefix}/data/{key}")
    return np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"), count=numel)


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Returns the {key: numpy array} content of a PyTorch state_dict file (or of a checkpoint dict holding one)."""
  path = str(path)
  try:
    zip_file = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such file.") from None
  except zipfile.BadZipFile:
    return _load_legacy(path)
  with zip_file:
    pickles = [n for n in zip_file.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: not a torch.save archive (expected one data.pkl, found {len(pickles)}).")
    prefix = pickles[0][: -len("/data.pkl")]
    byteorder = f"{prefix}/byteorder"
    if byteorder in zip_file.namelist() and zip_file.read(byteorder).strip() != b"little":
      raise CheckpointError(f"{path}: big-endian torch archives are not supported.")
    with zip_file.open(pickles[0]) as f:
      content = _StateDictUnpickler(f, zip_file, prefix, path).load()
  return _as_state_dict(content, path)


def _load_legacy(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(
        f"{path}: not a zip-format torch.save file. Legacy files need PyTorch: pip install 'flaxtag[torch]'."
    ) from None
  content = torch.load(path, map_location="cpu", weights_only=True)
  return _as_state_dict({k: v.numpy() if hasattr(v, "numpy") else v for k, v in content.items()}, path)


def _as_state_dict(content, path):
  if isinstance(content, dict) and "state_dict" in content and isinstance(content["state_dict"], dict):
    content = content["state_dict"]
  if not isinstance(content, dict) or not all(isinstance(v, np.ndarray) for v in content.values()):
    raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors).")
  # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
  return {k.removeprefix("module."): v for k, v in content.items()}
