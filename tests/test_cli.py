"""How commands report a config file that cannot be used: one `error:` line naming file and line, exit status 2."""
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test runs a command in a process of its own

REPO = pathlib.Path(__file__).resolve().parents[1]

# name → (config file text, the line it fails on (None: no line), the error after "FILE:LINE: ")
BAD_CONFIGS = {
    "syntax_error": ("def get_config():\n  return dict(\n", 2, "SyntaxError: '(' was never closed"),
    "raises": ("def get_config():\n  raise ValueError('data.name is required')\n", 2,
               "ValueError: data.name is required"),
    # A bug in the config (no such field), not a mistyped --config.x.y flag: KeyError/AttributeError inside
    # ml_collections either way.
    "wrong_field": ("from configs import base\n\n\ndef get_config():\n  config = base.get_config()\n"
                    "  config.model.conv_channels = 2 * config.model.conv_chanels\n  return config\n", 6,
                    "AttributeError: 'conv_chanels' Did you mean \"conv_channels\" instead of \"conv_chanels\"?"),
    "opens_a_missing_file": ("def get_config():\n  open('/nonexistent/tags.txt')\n", 2,
                             "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/tags.txt'"),
    "fails_to_import": ("import no_such_module_here\n", 1, "ModuleNotFoundError: No module named 'no_such_module_here'"),
}


def _run(command, *args):
  return subprocess.run([sys.executable, "-m", f"flaxtag.{command}", *map(str, args)], capture_output=True, text=True,
                        cwd=REPO, check=False)


@pytest.mark.parametrize("command", ["train", "summary"])
@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_a_bad_config_file_is_one_error_line_naming_file_and_line(tmp_path, command, name):
  text, line, message = BAD_CONFIGS[name]
  path = tmp_path / f"{name}.py"
  path.write_text(text)
  done = _run(command, "--config", path, "--workdir", tmp_path / "w") if command == "train" else _run(
      command, "--config", path)
  assert done.returncode == 2, done.stderr
  assert len(done.stderr.splitlines()) == 1, done.stderr
  assert done.stderr.startswith(f"error: {path}:{line}: {message}"), done.stderr
  assert not (tmp_path / "w").exists()


def test_a_missing_config_file_and_a_wrong_get_config_argument(tmp_path):
  done = _run("train", "--config", tmp_path / "nowhere.py", "--workdir", tmp_path / "w")
  assert (done.returncode, done.stderr) == (2, f"error: {tmp_path / 'nowhere.py'}: no such config file\n")
  done = _run("summary", "--config", "configs/demo.py:small")
  assert (done.returncode, done.stderr) == (
      2, "error: configs/demo.py: TypeError: get_config() takes 0 positional arguments but 1 was given\n")
  done = _run("summary", "--config", "configs/mtat.py:small")
  assert done.returncode == 2
  assert re.fullmatch(r"error: configs/mtat\.py:\d+: ConfigError: bad config argument 'small': valid variants are "
                      r"\['spec_att', 'raw_att', 'spec_cnnp', 'raw_cnnl'\] \(default 'spec_att'\), optionally followed "
                      r"by ',runlocal' to shrink the run for a laptop\n", done.stderr), done.stderr


def test_a_mistyped_override_is_still_a_bad_flag(tmp_path):
  done = _run("train", "--config", "configs/mtat.py:raw_cnnl", "--config.model.conv_chanels=8", "--workdir",
              tmp_path / "w")
  assert done.returncode == 2
  assert done.stderr == ("error: bad command-line flag: 'conv_chanels' Did you mean \"conv_channels\" instead of "
                         "\"conv_chanels\"?\n")
