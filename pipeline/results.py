"""`make results`: the README's results table on Fashion-MNIST, produced end to end by this file.

    python -m pipeline.results [--epochs 5] [--seeds 0,1,2] [--write-readme]

Uses the default teacher (data/teachers/default.pt, trained by `make teacher`), caches it once with the layers the
methods need, trains one student per (method, seed) from that single cache, and writes data/results/results.json,
data/results/results.md and (with --write-readme) the table between the README's results markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Callable

from pipeline.data import data_root

METHODS = [  # (row name, train-student overrides)
    ("student, labels only (CE)", {"loss": "ce=1"}),
    ("student + KD (T=4, alpha=0.1)", {"loss": "kd=1"}),
    ("student + KD, labels hidden (soft targets only)", {"loss": "kd=1", "no_labels": True}),
    ("student + FitNets (hint stage, then KD)", {"loss": "fitnets=1", "fitnets_schedule": "two-stage"}),
    ("student + RKD (+ CE)", {"loss": "rkd=1,ce=1"}),
    ("student + KD + RKD", {"loss": "kd=1,rkd=1"}),
]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def machine() -> str:
    import os

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores, no GPU"
    return (f"{platform.machine()}, {dev}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def reuse_or_run(cfg, fn, log=print) -> dict:
    """Run `fn(cfg)` unless `cfg.out` already holds a finished run of exactly this config (then reuse its summary):
    a results command that was interrupted, or extended with new rows, resumes instead of starting over."""
    from dataclasses import MISSING, asdict, fields, replace

    from pipeline.augment import REPLAY_VERSION
    from pipeline.errors import KDCacheError
    from pipeline.online import STUDENT_INIT
    from pipeline.store import open_store
    from pipeline.train_student import same_run

    out = Path(cfg.out)
    if (out / "summary.json").exists() and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        # The store by its key, as --resume compares it: wherever it lies now, and rerun when it was rebuilt since.
        try:
            key = open_store(cfg.cache).manifest["key"] if cfg.cache else None
        except KDCacheError:  # no store there (any more): no key matches a cached run's, and rerunning says why
            key = None
        # A setting added to kdcache after the run was made, at its default, is what that run did.
        added = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
        recorded = same_run(added | (saved.get("config") or {}), (saved.get("cache") or {}).get("key"))
        # Online runs draw fresh views with this kdcache's replay: one made by another replay saw other pixels.
        # (Cached runs carry it in their cache's key.)
        augmented_online = saved.get("online") and saved.get("augment") not in (None, "none")
        stale_views = augmented_online and saved.get("replay", 1) != REPLAY_VERSION
        # ... and one whose student started from other weights than the cached runs of its seed is no pair to them
        stale_views = stale_views or (saved.get("online") and saved.get("student_init", 1) != STUDENT_INIT)
        if not stale_views and recorded == same_run(json.loads(json.dumps(asdict(cfg), default=str)), key) and (
                # ... nor one taught by another teacher (retrained under the same name) or on other data: a cached
                # run's store key covers both, an online run records them (`online.identity`)
                not saved.get("online") or saved.get("identity") == _online_identity(cfg)):
            log(f"reusing the finished run in {out}")
            return json.loads((out / "summary.json").read_text())
    return fn(replace(cfg, overwrite=True), log=lambda m: None)  # a stale or unfinished run there is redone


def _online_identity(cfg) -> dict | None:
    """The teacher and data an online run with `cfg` would have now (None when they cannot be opened: the rerun
    says why)."""
    from pipeline.errors import KDCacheError
    from pipeline.online import identity

    try:
        return identity(cfg)
    except KDCacheError:
        return None


def cache_seconds(manifest: dict) -> tuple[float | None, bool]:
    """(seconds, extrapolated) the store's teacher-cache took, from its manifest. The manifest times the run that
    finished the store; when that run resumed an interrupted one, the units it found done are not in its time, so
    the time is scaled to the whole store (per computed sample) and flagged. (None, False) when not recorded."""
    stats = manifest.get("stats") or {}
    seconds, computed = stats.get("seconds"), stats.get("samples_computed")
    if seconds is None:
        return None, False
    views = (manifest.get("views") or {}).get("count") or 1
    total = manifest["data"]["num_samples"] * views
    if computed == 0 and total:  # finished by a run that only marked it complete: its time says nothing
        return None, False
    if computed and computed < total:
        return seconds * total / computed, True
    return float(seconds), False


def fmt_seconds(seconds: float | None, extrapolated: bool = False) -> str:
    return "-" if seconds is None else f"{'≈' if extrapolated else ''}{seconds:.0f}"


def schedule(cfg) -> str:
    """The student schedule a table's rows share, from the config they ran with (not restated by hand)."""
    opt = "SGD (Nesterov)" if cfg.optimizer == "sgd" else cfg.optimizer
    return f"batch {cfg.batch_size}, {opt} + cosine, lr {cfg.lr:g}"


def _fmt(accs: list[float]) -> str:
    if len(accs) == 1:
        return f"{100 * accs[0]:.2f}"
    return f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}"


def run(epochs: int, seeds: list[int], workers: int, log=print) -> dict:
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import StudentConfig, run_train_student

    out_dir = data_root() / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = run_teacher_cache(CacheConfig(data="fashion-mnist:train", layers=["layer3", "avgpool"]), log=log)
    teacher_meta = json.loads(saved(data_root() / "teachers" / "default.json", "run `make teacher`"))
    from pipeline.store import open_store

    seconds, extrapolated = cache_seconds(open_store(cache).manifest)
    rows = []
    for name, overrides in METHODS:
        runs = []
        for seed in seeds:
            cfg = StudentConfig(cache=cache, epochs=epochs, seed=seed, workers=workers,
                                out=str(out_dir / "runs" / f"{overrides['loss'].replace('=', '')}"
                                                           f"{'-nolabels' if overrides.get('no_labels') else ''}-s{seed}"),
                                **overrides)
            s = reuse_or_run(cfg, run_train_student, log)
            log(f"{name}  seed {seed}: test acc {s['test_acc']:.4f}  ({s['seconds']:.0f}s)")
            runs.append(s)
        rows.append({"method": name, "config": overrides, "test_acc": [r["test_acc"] for r in runs],
                     "seconds": statistics.mean(r["seconds"] for r in runs),
                     "samples_per_s": statistics.mean(r["samples_per_s"] for r in runs)})
    result = {"teacher": {"test_acc": teacher_meta["test_accuracy"], "train_seconds": teacher_meta["train_seconds"],
                          "epochs": teacher_meta["config"]["epochs"]},
              "cache": {"path": cache, "seconds": seconds, "extrapolated": extrapolated}, "epochs": epochs,
              "seeds": seeds, "rows": rows, "schedule": schedule(cfg), "machine": machine()}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(table(result))
    return result


def table(r: dict) -> str:
    lines = [f"Fashion-MNIST test accuracy (%), mean ± sample std (n − 1) over seeds "
             f"{', '.join(map(str, r['seeds']))}; "
             f"students: `default-student`, {r['epochs']} epochs each, {r.get('schedule', 'batch 128, SGD + cosine')};"
             f" machine: {r['machine']}."
             + (" ≈: the cache's run was resumed; its time is scaled to the whole store." if r["cache"].get(
                 "extrapolated") else ""), "",
             "| model | test acc (%) | time per run (s) | student samples/s |", "| --- | --- | --- | --- |",
             f"| teacher (`default-teacher`, {r['teacher']['epochs']} epochs, trained once) | "
             f"{100 * r['teacher']['test_acc']:.2f} | {r['teacher']['train_seconds']:.0f} | - |",
             f"| teacher-cache (60k samples: logits + layer3 + avgpool, fp16), once | - | "
             f"{fmt_seconds(r['cache']['seconds'], r['cache'].get('extrapolated', False))} | - |"]
    for row in r["rows"]:
        lines.append(f"| {row['method']} | {_fmt(row['test_acc'])} | {row['seconds']:.0f} | "
                     f"{row['samples_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def check_readme(start: str = START, end: str = END, readme: Path = Path("README.md")) -> str:
    """The README's text, refused (before a long run, not after it) when it lacks the section's markers, the end
    marker after the start marker (what `write_readme` replaces)."""
    from pipeline.errors import KDCacheError

    text = readme.read_text() if readme.is_file() else ""
    if start not in text or end not in text.split(start, 1)[1]:
        raise KDCacheError(f"{readme.resolve()} has no {start} ... {end} markers; run from the project's folder, or "
                           "leave out --write-readme")
    return text


def write_readme(md: str, start: str = START, end: str = END, readme: Path = Path("README.md")) -> None:
    """Replace what stands between the two markers in the README with `md`."""
    text = check_readme(start, end, readme)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{md}{end}{tail}")


def publish(render: Callable[[], str], to_readme: bool, start: str = START, end: str = END) -> None:
    """Print the table `render()` makes; with `to_readme` (--write-readme) also put it between the README's
    markers, which are checked before `render()` runs: a README without them fails now, not after hours of runs."""
    if to_readme:
        check_readme(start, end)
    md = render()
    print(md)
    if to_readme:
        write_readme(md, start, end)


def numbers(flag: str, text: str, least: int) -> list[int]:
    """A comma-separated list of whole numbers from `least` (--seeds 0,1,2, --views 4,16), refused in one line
    before any run: it was int()'s ValueError traceback, or (-1) a refusal after the teacher-cache run."""
    from pipeline.errors import KDCacheError

    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise KDCacheError(f"{flag} takes whole numbers from {least} separated by commas, e.g. {least},{least + 1} "
                           f"(got '{text}')")
    return values


def check_counts(epochs: int, workers: int) -> None:
    """--epochs and --workers, before any run (each student run would refuse them, after the teacher-cache run)."""
    from pipeline.errors import KDCacheError

    if epochs < 1 or workers < 0:
        raise KDCacheError(f"--epochs must be at least 1 and --workers at least 0 (got {epochs} and {workers})")


def saved(path: Path, then: str) -> str:
    """The text of a file an earlier step wrote (a run's results for --table-only, the teacher's metadata): its
    absence is one line saying which step makes it, not a FileNotFoundError traceback."""
    from pipeline.errors import KDCacheError

    if not path.is_file():
        raise KDCacheError(f"{path} does not exist; {then}")
    return path.read_text()


def one_line_errors(main) -> None:
    """Run a results command's `main` as the kdcache CLI runs a command (`cli.user_errors`): a refusal, a full
    disk or Ctrl-C is one line on stderr with what to do, not a traceback. `make results*` run these modules
    directly, not through the CLI, and take hours: after an interruption the runs that finished are reused."""
    import typer

    from pipeline.cli import user_errors

    try:
        with user_errors("re-run the same command: the runs that finished are kept and it goes on from there"):
            main()
    except typer.Exit as e:
        raise SystemExit(e.exit_code) from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="Re-render the table from data/results/results.json.")
    a = ap.parse_args()
    if not a.table_only:  # before the README's markers are checked and any run starts
        seeds = numbers("--seeds", a.seeds, 0)
        check_counts(a.epochs, a.workers)

    def result() -> dict:
        if a.table_only:
            return json.loads(saved(data_root() / "results" / "results.json", "run without --table-only first"))
        return run(a.epochs, seeds, a.workers)

    publish(lambda: table(result()), a.write_readme)


if __name__ == "__main__":
    one_line_errors(main)
