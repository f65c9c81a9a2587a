"""The `.pth` reader trusts nothing a file claims: lying tensors are one clear error, never bytes from past a buffer.

Files are written here the way torch.save writes them (a zip of data.pkl and raw storages, the pickle spelled out
opcode by opcode), so that no torch is needed and every claim can be made to lie. The fuzz runs in a subprocess
(`python tests/test_torch_state_dict.py SEED`), so that a crash of the reader shows as a failed test.
"""
import dataclasses
import itertools
import os
import pathlib
import pickle
import random
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

import numpy as np
import pytest

from flaxtag.errors import CheckpointError
from flaxtag.torch_state_dict import load_state_dict

REFERENCE_FILE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "lee_lee_c16.pth"
REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
          "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
          "ByteStorage": np.uint8, "BoolStorage": np.bool_}


# ---------------------------------------------------------------------------------------------------------------------
# torch.save archives, written by hand


@dataclasses.dataclass(frozen=True)
class Global:
  module: str
  name: str


@dataclasses.dataclass(frozen=True)
class Call:
  function: Global
  args: tuple


@dataclasses.dataclass(frozen=True)
class StorageRef:
  pid: tuple


def opcodes(value) -> bytes:
  """Protocol-2 pickle opcodes of the values a state_dict pickle holds."""
  if isinstance(value, bool):
    return b"\x88" if value else b"\x89"  # NEWTRUE / NEWFALSE
  if isinstance(value, int):
    data = pickle.encode_long(value)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1: any size, any sign
  if isinstance(value, float):
    return b"G" + struct.pack(">d", value)  # BINFLOAT
  if isinstance(value, str):
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
  if isinstance(value, tuple):
    return b"(" + b"".join(map(opcodes, value)) + b"t"  # MARK ... TUPLE
  if isinstance(value, Global):
    return b"c" + f"{value.module}\n{value.name}\n".encode()  # GLOBAL
  if isinstance(value, Call):
    return opcodes(value.function) + opcodes(value.args) + b"R"  # REDUCE
  if isinstance(value, StorageRef):
    return opcodes(value.pid) + b"Q"  # BINPERSID
  raise TypeError(value)


ORDERED_DICT = Global("collections", "OrderedDict")


@dataclasses.dataclass(frozen=True)
class Claim:
  """What data.pkl says of one tensor: storage record (key, type, element count) and the view into it."""
  storage: str
  storage_type: str
  numel: Any
  offset: Any
  size: Any
  stride: Any

  def call(self) -> Call:
    pid = ("storage", Global("torch", self.storage_type), self.storage, "cpu", self.numel)
    return Call(Global("torch._utils", "_rebuild_tensor_v2"),
                (StorageRef(pid), self.offset, self.size, self.stride, False, Call(ORDERED_DICT, ())))


def state_dict_pickle(claims: dict[str, Claim]) -> bytes:
  items = b"".join(opcodes(key) + opcodes(claim.call()) for key, claim in claims.items())
  return b"\x80\x02" + opcodes(Call(ORDERED_DICT, ())) + b"(" + items + b"u."  # PROTO, OrderedDict, SETITEMS, STOP


def write_archive(path, data_pkl: bytes, storages: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    archive.writestr("archive/byteorder", "little")
    for key, data in storages.items():
      archive.writestr(f"archive/data/{key}", data, compress_type=compression)


def write_state_dict(path, claims: dict[str, Claim], storages: dict[str, bytes], **kwargs) -> None:
  write_archive(path, state_dict_pickle(claims), storages, **kwargs)


def designated_elements(storage: np.ndarray, claim: Claim) -> np.ndarray:
  """The elements a claim names, index by index (the reference the reader must equal); fails on any index outside
  the storage."""
  elements = []
  for index in itertools.product(*map(range, claim.size)):
    position = claim.offset + sum(i * s for i, s in zip(index, claim.stride))
    assert 0 <= position < storage.size, f"{claim} reaches element {position} of {storage.size}"
    elements.append(storage[position])
  return np.array(elements, storage.dtype).reshape(claim.size)


# ---------------------------------------------------------------------------------------------------------------------
# Tests


FLOATS = np.arange(12, dtype=np.float32) + 0.5


def test_views_are_read_as_torch_defines_them(tmp_path):
  claims = {
      "matrix": Claim("0", "FloatStorage", 12, 0, (3, 4), (4, 1)),
      "transposed": Claim("0", "FloatStorage", 12, 1, (3, 2), (1, 3)),
      "one_row_any_stride": Claim("0", "FloatStorage", 12, 11, (1, 1), (2**70, 7)),
      "empty": Claim("0", "FloatStorage", 12, 12, (0, 5), (5, 1)),
      "module.counts": Claim("1", "LongStorage", 1, 0, (), ()),
  }
  storages = {"0": FLOATS.tobytes(), "1": np.int64(7).tobytes()}
  write_state_dict(tmp_path / "ok.pth", claims, storages)
  loaded = load_state_dict(tmp_path / "ok.pth")
  assert list(loaded) == ["matrix", "transposed", "one_row_any_stride", "empty", "counts"]
  np.testing.assert_array_equal(loaded["matrix"], FLOATS.reshape(3, 4))
  np.testing.assert_array_equal(loaded["transposed"], [[1.5, 4.5], [2.5, 5.5], [3.5, 6.5]])
  for key in ("matrix", "transposed", "one_row_any_stride", "empty"):
    np.testing.assert_array_equal(loaded[key], designated_elements(FLOATS, claims[key]))
  assert loaded["empty"].shape == (0, 5) and loaded["counts"].dtype == np.int64 and loaded["counts"] == 7


def _lie(**changes) -> Claim:
  return dataclasses.replace(Claim("0", "FloatStorage", 12, 0, (12,), (1,)), **changes)


@pytest.mark.parametrize("claim,storage,message", [
    # The case of issue 16: 4,092 elements of a 4-element storage came back from process memory.
    (_lie(numel=4, size=(4092,)), FLOATS[:4], r"size \(4092,\) has 4,092 elements, more than its storage 'data/0' "
                                              r"\(4 elements\)"),
    (_lie(size=(4,), stride=(100_000_000,)), FLOATS, r"offset 0, size \(4,\) and stride \(100000000,\) reach element "
                                                     r"300,000,000 of its storage 'data/0' \(12 elements\)"),
    (_lie(offset=9, size=(2, 2)), FLOATS, r"offset 9, size \(2, 2\) and stride \(1,\) must be non-negative integers, "
                                          "one stride per dimension"),
    (_lie(offset=9, size=(2, 2), stride=(2, 1)), FLOATS, "reach element 12 of its storage"),
    (_lie(offset=13, size=(0,)), FLOATS, "offset 13 lies past the end of its storage 'data/0'"),
    (_lie(offset=-1), FLOATS, "offset -1, size"),
    (_lie(size=(3, 4), stride=(-4, 1)), FLOATS, r"stride \(-4, 1\) must be non-negative integers"),
    (_lie(size=(2**62,), stride=(0,)), FLOATS, "has 4,611,686,018,427,387,904 elements, more than its storage"),
    (_lie(size=(0, 2**70), stride=(1, 1)), FLOATS, r"size \(0, 1180591620717411303424\) is no array shape"),
    (_lie(size=(1,) * 100, stride=(1,) * 100), FLOATS, "is no array shape"),
    (_lie(size=(12.0,)), FLOATS, r"size \(12.0,\)"),
    (_lie(numel=13), FLOATS, r"its storage 'data/0' holds 48 bytes, not 13 elements of 4 bytes \(FloatStorage\)"),
    (_lie(storage_type="DoubleStorage"), FLOATS, "holds 48 bytes, not 12 elements of 8 bytes"),
    (_lie(numel=2**64), FLOATS, "holds 48 bytes, not 18446744073709551616 elements"),
    (_lie(storage="7"), FLOATS, "its storage 'data/7' is not in the archive"),
    (_lie(storage="../data.pkl"), FLOATS, "its storage 'data/../data.pkl' is not in the archive"),
])
def test_a_lying_tensor_is_one_error_naming_file_and_tensor(tmp_path, claim, storage, message):
  path = tmp_path / "lying.pth"
  write_state_dict(path, {"front_end.conv.weight": claim}, {"0": storage.tobytes()})
  with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: tensor 'front_end.conv.weight': .*{message}"):
    load_state_dict(path)


def test_storages_must_hold_what_their_records_say(tmp_path):
  path = tmp_path / "lying.pth"
  shared = {"a": _lie(size=(6,)), "b": _lie(storage_type="IntStorage", size=(6,))}
  write_state_dict(path, shared, {"0": FLOATS.tobytes()})
  with pytest.raises(CheckpointError, match=r"tensor 'b': storage 'data/0' is declared as 12 x IntStorage here and as "
                                            "12 x FloatStorage by another tensor"):
    load_state_dict(path)
  write_state_dict(path, {"w": _lie()}, {"0": FLOATS.tobytes()}, compression=zipfile.ZIP_DEFLATED)
  with pytest.raises(CheckpointError, match="tensor 'w': its storage 'data/0' is compressed, which torch.save never"):
    load_state_dict(path)
  write_state_dict(path, {"w": _lie(storage_type="ComplexFloatStorage")}, {"0": FLOATS.tobytes()})
  with pytest.raises(CheckpointError, match="tensors of torch.ComplexFloatStorage are not supported"):
    load_state_dict(path)
  write_archive(path, b"\x80\x02" + opcodes(Call(ORDERED_DICT, ())) + opcodes("w") + opcodes(("x", 1)) + b"s.", {})
  with pytest.raises(CheckpointError, match=r"expected a state_dict \(a dict of tensors\); 'w' holds \('x', 1\)"):
    load_state_dict(path)


def test_a_truncated_archive_is_one_error(tmp_path):
  path = tmp_path / "cut.pth"
  write_state_dict(path, {"w": _lie()}, {"0": FLOATS.tobytes()})
  whole = path.read_bytes()
  path.write_bytes(whole[:-30])
  with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: not a readable torch.save file"):
    load_state_dict(path)


def test_convert_reports_a_lying_file_in_one_line(tmp_path):
  """Today's segfault (exit 139): a stride that reaches far past the storage, through the command."""
  path = tmp_path / "lying.pth"
  write_state_dict(path, {"front_end.init_conv.conv.weight": _lie(size=(4,), stride=(100_000_000,))},
                   {"0": FLOATS.tobytes()})
  done = subprocess.run([sys.executable, "-m", "flaxtag.convert", str(path), "--config",
                         f"{REPO / 'configs' / 'mtat.py'}:raw_cnnl", "--workdir", str(tmp_path / "w")],
                        capture_output=True, text=True, cwd=REPO, check=False)
  assert done.returncode == 2, done.stderr
  assert done.stderr.splitlines() == [
      f"error: {path}: tensor 'front_end.init_conv.conv.weight': offset 0, size (4,) and stride (100000000,) reach "
      "element 300,000,000 of its storage 'data/0' (12 elements); the file is damaged or was not written by torch.save."]
  assert not (tmp_path / "w").exists()


def test_fuzzed_files_never_crash_nor_read_outside_their_storage():
  done = subprocess.run([sys.executable, __file__, "0"], capture_output=True, text=True, cwd=REPO, check=False,
                        timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  outcomes = dict(line.split(": ") for line in done.stdout.splitlines())
  # Both ways out were taken many times: the fuzz reaches the reading of views, not only the early refusals.
  assert int(outcomes["generated read"]) >= 50 and int(outcomes["generated refused"]) >= 50, outcomes
  if REFERENCE_FILE.exists():
    assert int(outcomes["mutated pickle read"]) >= 10 and int(outcomes["mutated pickle refused"]) >= 10, outcomes
    assert int(outcomes["mutated archive refused"]) >= 10, outcomes


# ---------------------------------------------------------------------------------------------------------------------
# The fuzz (run as a program by the test above)


def _pick(rng: random.Random, usual: list, odd: list):
  return rng.choice(odd) if rng.random() < 0.15 else rng.choice(usual)


def random_claims(rng: random.Random) -> tuple[dict[str, Claim], dict[str, bytes]]:
  """One to three storages and tensors; any claim may lie about any field, most tell the truth."""
  types = list(DTYPES)
  storages, kinds = {}, {}
  for key in map(str, range(rng.randint(1, 3))):
    kinds[key] = _pick(rng, types, ["QInt8Storage", "BFloat16Storage"])
    numel = rng.randint(0, 24)
    size_in_bytes = numel * np.dtype(DTYPES.get(kinds[key], np.uint8)).itemsize + _pick(rng, [0], [-1, 1, 3])
    storages[key] = rng.randbytes(max(0, size_in_bytes))
  claims = {}
  for name in (f"t{i}" for i in range(rng.randint(1, 3))):
    key = rng.choice(list(storages))
    storage_type = _pick(rng, [kinds[key]], types)
    itemsize = np.dtype(DTYPES.get(storage_type, np.uint8)).itemsize
    numel = len(storages[key]) // itemsize
    dims = rng.randint(0, 3)
    size = tuple(_pick(rng, [1, 2, 3, 4], [0, numel, numel + 1, -1, 2**31, 2**63]) for _ in range(dims))
    stride = tuple(_pick(rng, [0, 1, 2, 3, 5], [-1, -2, numel, 2**62, 2**64]) for _ in range(dims))
    offset = _pick(rng, [0, 0, 1, 2], [-1, numel, numel - 1, numel + 1, 2**64])
    claims[name] = Claim(key, storage_type, _pick(rng, [numel], [numel + 1, -1, 2**64, "12"]), offset, size, stride)
  if rng.random() < 0.1:
    storages.pop(rng.choice(list(storages)))
  return claims, storages


def _flip_bytes(rng: random.Random, data: bytes, count: int) -> bytes:
  data = bytearray(data)
  for _ in range(count):
    data[rng.randrange(len(data))] = rng.randrange(256)
  return bytes(data)


def _check_generated(loaded, claims, storages):
  assert list(loaded) == list(claims)
  for name, claim in claims.items():
    storage = np.frombuffer(storages[claim.storage], DTYPES[claim.storage_type])
    assert loaded[name].tobytes() == designated_elements(storage, claim).tobytes(), (name, claim)


def _elements_by_width(storages: list[bytes]) -> dict[int, set[int]]:
  """Every element of the storages, read at each width (1, 2, 4, 8 bytes) as an unsigned integer."""
  return {width: {v for s in storages for v in np.frombuffer(s[:len(s) // width * width], f"u{width}").tolist()}
          for width in (1, 2, 4, 8)}


def fuzz(seed: int, path: str) -> dict[str, int]:
  """Loads generated and mutated files; every load either returns exactly what the claims designate or raises
  CheckpointError (any other exception, a crash or a hang fails the test). Returns the count of each outcome."""
  rng = random.Random(seed)
  counts = {}

  def load(kind):
    try:
      loaded = load_state_dict(path)
    except CheckpointError:
      counts[f"{kind} refused"] = counts.get(f"{kind} refused", 0) + 1
      return None
    counts[f"{kind} read"] = counts.get(f"{kind} read", 0) + 1
    return loaded

  for case in range(600):
    claims, storages = random_claims(rng)
    write_state_dict(path, claims, storages)
    if case % 10 == 0:  # a truncated archive
      whole = pathlib.Path(path).read_bytes()
      pathlib.Path(path).write_bytes(whole[:rng.randrange(len(whole))])
    loaded = load("generated")
    if loaded is not None:
      _check_generated(loaded, claims, storages)

  if REFERENCE_FILE.exists():
    original = load_state_dict(REFERENCE_FILE)
    whole = REFERENCE_FILE.read_bytes()
    with zipfile.ZipFile(REFERENCE_FILE) as archive:
      members = {n: archive.read(n) for n in archive.namelist()}
    data_pkl = members.pop("lee_lee_c16/data.pkl")
    storage_elements = _elements_by_width([data for name, data in members.items() if "/data/" in name])
    for _ in range(150):  # bytes of the archive: headers, directory, storages (CRCs guard the members' contents)
      mutated = _flip_bytes(rng, whole, rng.randint(1, 8))
      pathlib.Path(path).write_bytes(mutated[:len(mutated) - _pick(rng, [0], [1, 100, len(mutated) // 2])])
      loaded = load("mutated archive")
      if loaded is not None:
        assert loaded.keys() == original.keys()
        assert all(loaded[k].tobytes() == original[k].tobytes() for k in original)
    for _ in range(300):  # bytes of data.pkl, in an otherwise valid archive: every claim and opcode may change
      with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("lee_lee_c16/data.pkl", _flip_bytes(rng, data_pkl, rng.randint(1, 4)))
        for name, data in members.items():
          archive.writestr(name, data)
      loaded = load("mutated pickle")
      for array in (loaded or {}).values():
        values = set(array.reshape(-1).view(f"u{array.itemsize}").tolist())
        assert values <= storage_elements[array.itemsize], "bytes from outside the storages"
  return counts


if __name__ == "__main__":
  with tempfile.TemporaryDirectory() as directory:
    for outcome, count in sorted(fuzz(int(sys.argv[1]), os.path.join(directory, "fuzzed.pth")).items()):
      print(f"{outcome}: {count}")
