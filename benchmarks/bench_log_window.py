"""A monitoring check on a bounded, rotated inference log costs the window, not the log.

Prints, measured in one run on this machine: the median seconds (of --repeats) and bytes read of
`read_log_window` (the monitor stage's window of --window newest rows, default 1,000) on
  (a) a 10 MB log (one file), and
  (b) a ~1 GB log set: the live file and nine rotated ones of ~100 MB each, as the service leaves
      them at `serve.log_max_bytes: 100 MiB`, `serve.log_backups: 9` (the rotated files are hard
      links of one written file: same bytes on disk once, read as nine files),
the ratio (b)/(a) (goal: about 1), and, for scale, one full parse of every line of (a) and (b)
(what a check cost before it read from the end). Lines are synthetic, in the service's record
format (`bench_monitoring.write_log`).

Usage: uv run python benchmarks/bench_log_window.py [--window 1000] [--repeats 5] [--quick]
(--quick: a ~200 MB set of two files instead of ~1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monitoring import EMBEDDING_DIMS, bytes_read, write_log  # noqa: E402

VERSION = "tumorscope-kidney-ct/1"


def lines_for(target_bytes: int, tmp: Path) -> int:
    """Lines that make about ``target_bytes`` (measured on a 2,000-line sample)."""
    sample = tmp / "sample.jsonl"
    write_log(sample, 2000, VERSION, seed=99)
    per_line = sample.stat().st_size / 2000
    sample.unlink()
    return max(1, round(target_bytes / per_line))


def make_set(folder: Path, file_bytes: int, rotated: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    live = folder / "inference.jsonl"
    write_log(live, lines_for(file_bytes, folder), VERSION, seed)
    if rotated:
        first = folder / "inference.jsonl.1"
        write_log(first, lines_for(file_bytes, folder), VERSION, seed + 1)
        for n in range(2, rotated + 1):
            os.link(first, folder / f"inference.jsonl.{n}")
    return live


def set_bytes(live: Path) -> int:
    return sum(p.stat().st_size for p in live.parent.iterdir())


def windowed(live: Path, window: int, repeats: int) -> tuple[float, int, int]:
    """Median seconds, bytes read, rows in the window."""
    from tumorscope.monitoring.windows import read_log_window

    seconds, read, rows = [], 0, 0
    for _ in range(repeats):
        before = bytes_read() or 0
        started = time.perf_counter()
        found = read_log_window(live, VERSION, window, EMBEDDING_DIMS)
        seconds.append(time.perf_counter() - started)
        read, rows = (bytes_read() or 0) - before, len(found.frame)
    return statistics.median(seconds), read, rows


def full_parse(live: Path) -> tuple[float, int]:
    """Seconds to parse every line of every file of the set (no window), and the lines."""
    started, lines = time.perf_counter(), 0
    for path in sorted(live.parent.iterdir()):
        with path.open("rb") as file:
            for raw in file:
                json.loads(raw)
                lines += 1
    return time.perf_counter() - started, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-log-window-") as tmp:
        started = time.perf_counter()
        small = make_set(Path(tmp) / "small", 10_000_000, 0, seed=1)
        large = make_set(Path(tmp) / "large", 100_000_000, 1 if args.quick else 9, seed=3)
        print(f"log sets written in {time.perf_counter() - started:.0f} s: {set_bytes(small) / 1e6:.1f} MB in 1 file, "
              f"{set_bytes(large) / 1e6:.0f} MB in {len(list(large.parent.iterdir()))} files")
        results = {}
        for name, live in (("10 MB", small), ("large", large)):
            seconds, read, rows = windowed(live, args.window, args.repeats)
            results[name] = seconds
            print(f"  window of {args.window} rows, {name} log ({set_bytes(live) / 1e6:.0f} MB): {seconds * 1000:.1f} ms "
                  f"(median of {args.repeats}), {read / 1e6:.2f} MB read, {rows} rows")
        print(f"ratio large / 10 MB: {results['large'] / results['10 MB']:.2f} (goal: about 1)")
        for name, live in (("10 MB", small), ("large", large)):
            seconds, lines = full_parse(live)
            print(f"  for scale, parsing every line of the {name} log: {seconds:.2f} s ({lines} lines), "
                  f"{seconds / results[name]:.0f}x the windowed read")


if __name__ == "__main__":
    main()
