"""`make results-views`: does caching K augmented views recover what online KD gets? (Beyer et al. 2022)

    python -m pipeline.results_views [--epochs 15] [--seeds 0,1,2] [--views 4,16] [--augment P ...] [--write-readme]

On Fashion-MNIST with the default teacher (data/teachers/default.pt) and the default student, the same KD loss,
schedule and seeds in every arm:
  (a) a fixed cache: one view per sample, no augmentation;
  (b) caches of K augmented views (per policy --augment), the student reading one view per sample per epoch (cycle);
  (c) online KD: the teacher in the loop on a fresh view of the same policy every step (the reference).
Finished runs are reused (`reuse_or_run`), so the command resumes where it stopped and extends with new policies.
Writes data/results/views.json, data/results/views.md and, with --write-readme, the README's table between the
views markers: test accuracy (mean ± std), total time (cache + training), the cache's bytes per sample, and how much
of the gap between (a) and (c) each cache closes
(when online KD beats the fixed cache; otherwise there is no gap to close, and the table says so).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pipeline.data import data_root
from pipeline.results import (_fmt, cache_seconds, check_counts, fmt_seconds, machine, numbers, one_line_errors,
                              publish, reuse_or_run, saved, schedule)

START, END = "<!-- views:start -->", "<!-- views:end -->"
# Random-resized crops on top of the teacher's own training augmentation (translate=2,flip): the kind of policy
# FKD and Beyer et al. cache views for; and that milder training augmentation alone.
POLICIES = ["translate=2,flip,crop=0.6-1", "translate=2,flip"]


def slug(policy: str) -> str:
    from pipeline.augment import AugmentPolicy

    return "".join(c if c.isalnum() else "_" for c in AugmentPolicy.parse(policy).spec())


def run(epochs: int, seeds: list[int], views: list[int], policies: list[str], loss: str, workers: int,
        log=print) -> dict:
    from pipeline.catalog import disk_bytes
    from pipeline.online import OnlineConfig, run_online_kd
    from pipeline.store import open_store
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import StudentConfig, run_train_student

    out_dir = data_root() / "results"
    runs_dir = out_dir / "views-runs"
    out_dir.mkdir(parents=True, exist_ok=True)

    def cached_arm(name: str, k: int, policy: str | None) -> dict:
        path = run_teacher_cache(CacheConfig(data="fashion-mnist:train", views=k, augment=policy), log=log)
        man = open_store(path).manifest
        runs = []
        for seed in seeds:
            tag = f"views{k}-{slug(policy) if policy else 'plain'}-s{seed}"
            cfg = StudentConfig(cache=path, loss=loss, epochs=epochs, seed=seed, workers=workers,
                                out=str(runs_dir / tag))
            runs.append(reuse_or_run(cfg, run_train_student, log))
            log(f"{name}  seed {seed}: test acc {runs[-1]['test_acc']:.4f}  ({runs[-1]['seconds']:.0f}s)")
        seconds, extrapolated = cache_seconds(man)
        return {"arm": name, "views": k, "augment": policy, "test_acc": [r["test_acc"] for r in runs],
                "cache_seconds": seconds, "cache_extrapolated": extrapolated,
                "train_seconds": statistics.mean(r["seconds"] for r in runs),
                "bytes_per_sample": disk_bytes(Path(path)) / man["data"]["num_samples"]}

    rows = [cached_arm("(a) fixed cache: 1 view, no augmentation", 1, None)]
    for policy in policies:
        group = [cached_arm(f"(b) cache of K = {k} views of `{policy}`", k, policy) for k in views]
        runs = []
        for seed in seeds:
            cfg = OnlineConfig(data="fashion-mnist:train", loss=loss, epochs=epochs, seed=seed, workers=workers,
                               augment=policy, out=str(runs_dir / f"online-{slug(policy)}-s{seed}"))
            runs.append(reuse_or_run(cfg, run_online_kd, log))
            log(f"(c) online KD, {policy}  seed {seed}: test acc {runs[-1]['test_acc']:.4f}  "
                f"({runs[-1]['seconds']:.0f}s)")
        group.append({"arm": f"(c) online KD on `{policy}`: teacher in the loop, a fresh view every step",
                      "views": None, "augment": policy, "test_acc": [r["test_acc"] for r in runs],
                      "cache_seconds": 0.0, "train_seconds": statistics.mean(r["seconds"] for r in runs),
                      "bytes_per_sample": 0.0})
        rows += group
    result = {"epochs": epochs, "seeds": seeds, "policies": policies, "loss": loss, "rows": rows,
              "temperature": StudentConfig().temperature, "schedule": schedule(StudentConfig()), "machine": machine()}
    (out_dir / "views.json").write_text(json.dumps(result, indent=2))
    (out_dir / "views.md").write_text(table(result))
    return result


def gap_closed(arm: float, fixed: float, online: float) -> str:
    """The share of the (a) -> (c) gap an arm closes, when there is a gap: online KD above the fixed cache."""
    if online <= fixed:
        return "no gap: (c) ≤ (a)"
    return f"{100 * (arm - fixed) / (online - fixed):.0f}%"


def table(r: dict) -> str:
    mean = {i: 100 * statistics.mean(row["test_acc"]) for i, row in enumerate(r["rows"])}
    fixed = mean[0]
    online = {row["augment"]: mean[i] for i, row in enumerate(r["rows"]) if row["views"] is None}
    lines = [f"Fashion-MNIST test accuracy (%), mean ± sample std (n − 1) over seeds "
             f"{', '.join(map(str, r['seeds']))}; "
             f"`default-student`, `--loss {r['loss']}` (T={r.get('temperature', 4):g}), {r['epochs']} epochs, "
             f"{r.get('schedule', 'batch 128, SGD + cosine')}; machine: {r['machine']}. Total time = the cache's "
             "teacher-cache run + one student run (one cache serves every seed and every later experiment). Δ: test "
             "accuracy points against (a) and against the "
             "online KD (c) of the same augmentation; gap closed: (arm − (a)) / ((c) − (a))."
             + (" ≈: a cache whose run was resumed, its time scaled to the whole store." if any(
                 row.get("cache_extrapolated") for row in r["rows"]) else ""), "",
             "| arm | test acc (%) | Δ vs (a) | Δ vs (c) | gap closed | total (s) | cache (s) | student run (s) | "
             "cache B/sample |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(r["rows"]):
        ref = online.get(row["augment"]) if row["views"] is not None else None  # cached arms with an online twin
        vs_c = "-" if ref is None else f"{mean[i] - ref:+.2f}"
        gap = "-" if ref is None else gap_closed(mean[i], fixed, ref)
        cache, approx = row["cache_seconds"], row.get("cache_extrapolated", False)
        total = None if cache is None else cache + row["train_seconds"]
        lines.append(f"| {row['arm']} | {_fmt(row['test_acc'])} | {'-' if i == 0 else f'{mean[i] - fixed:+.2f}'} | "
                     f"{vs_c} | {gap} | {fmt_seconds(total, approx)} | {fmt_seconds(cache, approx)} | "
                     f"{row['train_seconds']:.0f} | "
                     f"{row['bytes_per_sample']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--views", default="4,16")
    ap.add_argument("--augment", action="append", help=f"Augmentation policy; repeatable (default: {POLICIES}).")
    ap.add_argument("--loss", default="kd=1")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="Re-render the table from data/results/views.json.")
    a = ap.parse_args()
    if not a.table_only:  # before the README's markers are checked and any run starts
        seeds, views = numbers("--seeds", a.seeds, 0), numbers("--views", a.views, 1)
        check_counts(a.epochs, a.workers)

    def result() -> dict:
        if a.table_only:
            return json.loads(saved(data_root() / "results" / "views.json", "run without --table-only first"))
        return run(a.epochs, seeds, views, a.augment or POLICIES, a.loss, a.workers)

    publish(lambda: table(result()), a.write_readme, START, END)


if __name__ == "__main__":
    one_line_errors(main)
