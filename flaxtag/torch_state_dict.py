"""Reading PyTorch `state_dict` files (`torch.save` zip format) into numpy, without torch and without running code.

A `.pth` file is a zip holding `data.pkl` and one raw little-endian buffer per storage. `torch.load` unpickles
`data.pkl` with a full unpickler, which can execute arbitrary code from an untrusted file. Here the unpickler only
admits the handful of names a state_dict needs (OrderedDict, the tensor rebuild functions, typed storages); any
other global is refused with its name.

The file is not trusted either: unpickling only records what each tensor claims (storage, offset, size, stride).
Each claim is then checked against the storage as read from the archive (dtype and byte count as declared,
uncompressed, every element the view reaches inside it, no more elements than the storage holds) before a view is
made and copied out, so a lying file is one `CheckpointError` naming the file and the tensor, never a read past a
buffer. Legacy (pre-1.6, non-zip) files fall back to `torch.load(weights_only=True)` when the optional `torch`
extra is installed.
"""
import collections
import io
import math
import pickle
import pickletools
import reprlib
import zipfile
import zlib
from typing import Any, NamedTuple

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
# What a damaged archive or pickle raises from zipfile and the unpickler (the pickle may hold any opcode sequence).
_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError,
               KeyError, IndexError, AttributeError, OverflowError, NotImplementedError, RuntimeError)
# Messages quote values read from the file, shortened (reprlib), whatever their size.
_quote = reprlib.repr


# Tuples, not classes with a __dict__: a pickle's BUILD opcode can set attributes on what the unpickler returns, and
# must not be able to change a storage type or a tensor's claim after it is made.
class _StorageType(NamedTuple):
  name: str  # a key of _STORAGE_DTYPES


class _StorageRecord(NamedTuple):
  key: str  # the archive member <prefix>/data/<key>
  storage_type: _StorageType
  numel: Any  # as the file claims it


class _TensorRecord(NamedTuple):
  """What torch._utils._rebuild_tensor_v2 would be called with: a strided view of `storage`, as the file claims it."""
  storage: Any
  offset: Any
  size: Any
  stride: Any


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):

  def __init__(self, file, path):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name.endswith("Storage"):
      raise CheckpointError(f"{self._path}: tensors of torch.{name} are not supported; supported storages: "
                            f"{', '.join(_STORAGE_DTYPES)}.")
    raise CheckpointError(
        f"{self._path}: refusing to load '{module}.{name}': a state_dict file holds only tensors in dicts. "
        "Save the model with torch.save(model.state_dict(), path) and convert that file.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise CheckpointError(f"{self._path}: unsupported storage record {_quote(pid)}.")
    return _StorageRecord(key=pid[2], storage_type=pid[1], numel=pid[4])


def _member(storage_key: str) -> str:
  return repr(f"data/{storage_key}")  # repr: a key read from the file may hold any character


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _TensorReader:
  """Turns the tensor claims of one archive into arrays, reading each storage once and checking every claim."""

  def __init__(self, zip_file: zipfile.ZipFile, prefix: str, path: str):
    self._zip = zip_file
    self._prefix = prefix
    self._path = path
    self._storages = {}  # key → (its record, the array read)

  def read(self, key: str, claim: _TensorRecord) -> np.ndarray:
    def refuse(reason):
      raise CheckpointError(f"{self._path}: tensor {key!r}: {reason}; the file is damaged or was not written by "
                            "torch.save.")

    storage, offset, size, stride = claim
    if not isinstance(storage, _StorageRecord):
      refuse(f"its storage is {_quote(storage)}, not a storage record")
    if not (_is_count(offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) and all(map(_is_count, (*size, *stride)))):
      refuse(f"offset {_quote(offset)}, size {_quote(size)} and stride {_quote(stride)} must be non-negative "
             "integers, one stride per dimension")
    array = self._storage(storage, refuse)
    numel = math.prod(size)
    where = f"storage {_member(storage.key)} ({array.size:,} elements)"
    if numel > array.size:
      refuse(f"size {_quote(tuple(size))} has {numel:,} elements, more than its {where}")
    if numel == 0:
      if offset > array.size:
        refuse(f"offset {offset:,} lies past the end of its {where}")
      try:
        return np.zeros(tuple(size), array.dtype)
      except ValueError as e:
        refuse(f"size {_quote(tuple(size))} is no array shape ({e})")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= array.size:
      refuse(f"offset {offset:,}, size {tuple(size)} and stride {_quote(tuple(stride))} reach element {last:,} of "
             f"its {where}")
    # A dimension of size 1 never steps along its stride, which may then be any number (torch keeps it as is).
    strides = tuple(s * array.itemsize if n > 1 else 0 for n, s in zip(size, stride))
    try:
      view = np.lib.stride_tricks.as_strided(array[offset:], shape=tuple(size), strides=strides)
    except ValueError as e:  # more dimensions than numpy allows
      refuse(f"size {_quote(tuple(size))} is no array shape ({e})")
    copy = np.array(view)
    # A bool is one byte that torch reads as true when non-zero; numpy keeps other bytes than 0 and 1 as they are.
    return copy.view(np.uint8) != 0 if copy.dtype == np.bool_ else copy

  def _storage(self, record: _StorageRecord, refuse) -> np.ndarray:
    """The storage's elements, after checking that the archive member holds exactly what the record declares."""
    if record.key in self._storages:
      first, array = self._storages[record.key]
      if first != record:
        refuse(f"storage {_member(record.key)} is declared as {_quote(record.numel)} x {record.storage_type.name} "
               f"here and as {first.numel} x {first.storage_type.name} by another tensor")
      return array
    member = f"{self._prefix}/data/{record.key}"
    dtype = np.dtype(_STORAGE_DTYPES[record.storage_type.name]).newbyteorder("<")
    try:
      info = self._zip.getinfo(member)
    except KeyError:
      refuse(f"its storage {_member(record.key)} is not in the archive")
    if not _is_count(record.numel) or info.file_size != record.numel * dtype.itemsize:
      refuse(f"its storage {_member(record.key)} holds {info.file_size:,} bytes, not {_quote(record.numel)} "
             f"elements of {dtype.itemsize} bytes ({record.storage_type.name})")
    # torch.save stores storages uncompressed; a compressed member could expand to any size before being checked.
    if info.compress_type != zipfile.ZIP_STORED:
      refuse(f"its storage {_member(record.key)} is compressed, which torch.save never does")
    raw = self._zip.read(member)
    if len(raw) != info.file_size:  # the local header may contradict the central directory
      refuse(f"its storage {_member(record.key)} reads as {len(raw):,} bytes, not the {info.file_size:,} declared")
    array = np.frombuffer(raw, dtype=dtype)
    self._storages[record.key] = (record, array)
    return array


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Returns the {key: numpy array} content of a PyTorch state_dict file (or of a checkpoint dict holding one)."""
  path = str(path)
  try:
    zip_file = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such file.") from None
  except zipfile.BadZipFile as e:
    with open(path, "rb") as f:
      if f.read(4) != b"PK\x03\x04":  # not a zip at all, rather than a damaged one
        return _load_legacy(path)
    raise _unreadable(path, e) from e
  except _UNREADABLE as e:
    raise _unreadable(path, e) from e
  try:
    with zip_file:
      return _load_archive(zip_file, path)
  except _UNREADABLE as e:
    raise _unreadable(path, e) from e


def _unreadable(path: str, error: Exception) -> CheckpointError:
  return CheckpointError(f"{path}: not a readable torch.save file, damaged or incomplete ({type(error).__name__}: "
                         f"{error}).")


def _load_archive(zip_file: zipfile.ZipFile, path: str) -> dict[str, np.ndarray]:
  pickles = [n for n in zip_file.namelist() if n.endswith("/data.pkl")]
  if len(pickles) != 1:
    raise CheckpointError(f"{path}: not a torch.save archive (expected one data.pkl, found {len(pickles)}).")
  prefix = pickles[0][: -len("/data.pkl")]
  byteorder = f"{prefix}/byteorder"
  if byteorder in zip_file.namelist():
    with zip_file.open(byteorder) as f:
      if f.read(16).strip() != b"little":
        raise CheckpointError(f"{path}: big-endian torch archives are not supported.")
  info = zip_file.getinfo(pickles[0])
  if info.compress_type != zipfile.ZIP_STORED:  # see _TensorReader._storage
    raise CheckpointError(f"{path}: {pickles[0]} is compressed, which torch.save never does.")
  data = zip_file.read(info)
  _check_memo_indices(data, path)
  content = _StateDictUnpickler(io.BytesIO(data), path).load()
  claims = _state_dict_part(content, path)
  reader = _TensorReader(zip_file, prefix, path)
  arrays = {}
  for key, claim in claims.items():
    if not isinstance(claim, _TensorRecord):
      raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors); {key!r} holds {_quote(claim)}.")
    arrays[key] = reader.read(key, claim)
  return _without_module_prefix(arrays)


def _check_memo_indices(data: bytes, path: str) -> None:
  """Refuses memo indices larger than the pickle. The unpickler grows its memo to an index before storing at it
  (16 bytes per index), so one flipped byte (BINPUT → LONG_BINPUT) can make it fill gigabytes; a real pickle never
  has more memo entries than bytes. pickletools only parses the opcodes, running nothing."""
  for opcode, arg, position in pickletools.genops(data):
    if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) >= len(data):
      raise CheckpointError(f"{path}: data.pkl is damaged: memo index {int(arg):,} at byte {position} is larger than "
                            "the pickle.")


def _load_legacy(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(
        f"{path}: not a zip-format torch.save file. Legacy files need PyTorch: pip install 'flaxtag[torch]'."
    ) from None
  content = _state_dict_part(torch.load(path, map_location="cpu", weights_only=True), path)
  arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in content.items()}
  if not all(isinstance(v, np.ndarray) for v in arrays.values()):
    raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors).")
  return _without_module_prefix(arrays)


def _state_dict_part(content, path) -> dict:
  """The file's {key: tensor} dict: the file's content itself, or its 'state_dict' entry (a training checkpoint)."""
  if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
    content = content["state_dict"]
  if not isinstance(content, dict) or not all(isinstance(k, str) for k in content):
    raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors named by strings).")
  return content


def _without_module_prefix(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
  return {k.removeprefix("module."): v for k, v in arrays.items()}
