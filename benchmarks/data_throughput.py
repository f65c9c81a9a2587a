r"""Data throughput: dataset build (clips/s) and training input pipeline (crops/s).

  python benchmarks/data_throughput.py --work_dir /tmp/flaxtag_bench [--num_clips 256] [--steps 300]

1. Builds a miniature MTAT (`--num_clips` 29.1 s MP3 clips, the real clip length) with data_prep: MP3 decoding
   and writing, clips/s.
2. Reads its train split with `input_pipeline.train_iterator` (batch 16 crops of 65,280 samples, as for the Spec
   front-end) for `--steps` batches, for each worker count of `--worker_counts`: training crops/s. The clips fit in
   the page cache, so this measures decoding and cropping, not the disk.
3. With --synth_clips N, builds N clips of synth_instruments (10 s, FluidSynth rendering): clips/s.
Pass --data_dir to time the pipeline on an existing dataset (--name, e.g. mtat/top50_clean) instead.
"""
import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import fixtures_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from flaxtag import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position


def build_mtat(work_dir: str, num_clips: int, num_workers: int) -> tuple[str, dict]:
  raw, data = os.path.join(work_dir, "raw_mtat"), os.path.join(work_dir, "data")
  if not os.path.exists(os.path.join(raw, "annotations_final.csv")):
    print(f"writing {num_clips} MP3 clips of 29.1 s ...", flush=True)
    fixtures_data.make_mtat_tree(raw, n_per_folder=max(4, num_clips // 16), seconds=(29.1, 29.1))
  summary = build.build("mtat/top50_full", data, raw, overwrite=True, num_workers=num_workers)
  return data, summary


def time_pipeline(data_dir: str, name: str, steps: int, worker_count: int, batch_size: int, crop_len: int,
                  read_threads: int) -> float:
  it = input_pipeline.train_iterator(data_dir, name, batch_size=batch_size, crop_len=crop_len, seed=0,
                                     worker_count=worker_count, read_threads=read_threads)
  for _ in range(min(20, steps // 5)):  # worker start-up and first reads
    next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    batch = next(it)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  assert batch["audio"].shape == (batch_size, crop_len)
  if hasattr(it, "close"):
    it.close()
  # CPU time is this process's only: meaningful with worker_count=0, where all the work is done here.
  return steps * batch_size / seconds, steps * batch_size / cpu


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--work_dir", default="/tmp/flaxtag_bench")
  parser.add_argument("--num_clips", type=int, default=256)
  parser.add_argument("--build_workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--data_dir", help="time the pipeline on this existing dataset instead of building one")
  parser.add_argument("--name", default="mtat/top50_full")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--crop_len", type=int, default=65280)
  parser.add_argument("--worker_counts", default="0,2")
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--synth_clips", type=int, default=0)
  parser.add_argument("--keep", action="store_true", help="keep work_dir")
  args = parser.parse_args(argv)

  data_dir = args.data_dir
  if data_dir is None:
    data_dir, summary = build_mtat(args.work_dir, args.num_clips, args.build_workers)
    print(f"build mtat ({args.build_workers} workers): {summary['total_examples'] + summary['skipped']} clips in "
          f"{summary['seconds']:.1f} s = {summary['clips_per_second']:.1f} clips/s", flush=True)
  for workers in (int(w) for w in args.worker_counts.split(",")):
    rates = [time_pipeline(data_dir, args.name, args.steps, workers, args.batch_size, args.crop_len,
                           args.read_threads) for _ in range(args.repeats)]
    wall = sorted(r[0] for r in rates)
    per_cpu = f", {max(r[1] for r in rates):,.0f} per CPU-second" if workers == 0 else ""
    print(f"pipeline: {workers} worker processes, {args.read_threads} threads each, batch {args.batch_size} x "
          f"{args.crop_len}: {wall[len(wall) // 2]:,.0f} training crops/s (median of {args.repeats}, best "
          f"{wall[-1]:,.0f}){per_cpu}", flush=True)
  if args.synth_clips:
    summary = build.build("synth_instruments", os.path.join(args.work_dir, "synth"), overwrite=True,
                          num_train=args.synth_clips, num_valid=1, num_test=1, num_workers=args.build_workers)
    print(f"build synth_instruments ({args.build_workers} workers): {summary['clips_per_second']:.2f} clips/s "
          f"({summary['total_examples']} clips of 10 s in {summary['seconds']:.1f} s)", flush=True)
  if not args.keep and args.data_dir is None:
    shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
