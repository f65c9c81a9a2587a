"""launch/local_multiprocess.sh, the one-machine multi-process launcher, run for real: when one of its processes
dies, it stops the others and exits with the failure's status at once, as `srun --kill-on-bad-exit` does; before,
the survivor waited minutes at its next collective for the coordination service to notice."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import train_runs

LAUNCHER = train_runs.REPO / "launch" / "local_multiprocess.sh"


def _children(pid: int) -> dict[int, int]:
  """{process id of the run: OS pid} of the launcher's python children."""
  found = {}
  for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
    for child in (task / "children").read_text().split():
      argv = pathlib.Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
      if b"--process_id" in argv:
        found[int(argv[argv.index(b"--process_id") + 1])] = int(child)
  return found


def test_a_process_that_dies_stops_the_other_and_the_launcher_exits_with_its_status(synth_data_dir, tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "FLAXTAG_PROCESSES": "2", "FLAXTAG_CPU_DEVICES": "1", "FLAXTAG_PORT": str(train_runs.free_port()),
         "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
         "XLA_FLAGS": train_runs.xla_flags_without_device_count()}
  flags = train_runs.config_flags(synth_data_dir, **{"train.num_epochs": 500})  # far longer than the test
  with open(tmp_path / "launcher.log", "w") as log:
    launcher = subprocess.Popen(["bash", str(LAUNCHER), f"{train_runs.REPO / 'configs' / 'synth.py'}:gmp",
                                 str(workdir), *flags], cwd=train_runs.REPO, env=env, stderr=log, text=True)
  try:
    deadline = time.monotonic() + 300
    while not (workdir / "metrics.jsonl").exists() or not train_runs.records(workdir, "train"):
      assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()[-3000:]
      time.sleep(0.5)
    children = _children(launcher.pid)
    assert sorted(children) == [0, 1]
    os.kill(children[1], signal.SIGKILL)  # both are training: process 1 dies between two collectives
    killed_at = time.monotonic()
    code = launcher.wait(timeout=120)
    stopped_in = time.monotonic() - killed_at
  finally:
    if launcher.poll() is None:
      launcher.kill()
  log = (tmp_path / "launcher.log").read_text()
  assert code == 128 + signal.SIGKILL, log[-3000:]
  assert "process 1 exited with status 137; stopping the other processes" in log
  assert stopped_in < 30, stopped_in  # the 10-s grace at most, not the coordination service's minutes
  assert not pathlib.Path(f"/proc/{children[0]}").exists() or \
      pathlib.Path(f"/proc/{children[0]}/stat").read_text().split()[2] == "Z"
