"""`kdcache bench` / `make bench`: where the time goes, measured in one run on synthetic inputs.

    (a) teacher forward only (inputs already on the device: the compute ceiling)
    (b) teacher-cache writing logits only            -> b/a
    (c) teacher-cache writing logits + a hint layer  -> c/a, and write MB/s against the disk's own bandwidth
    (d) student training alone (labels only, no teacher, no cache)
    (e) student with KD (and with FitNets) streaming targets from the on-disk cache  -> e/d, e/f
    (f) online KD: the teacher in the loop
plus two ceilings: (d0) the student's training step on a batch already on the device, and the student stage's
loader alone (no training), for KD and FitNets targets: what (d) and (e) would reach if input or training cost nothing.
(d), (e) and (f) run the same training loop (`train_student.fit`) with the same DataLoader workers, batch and
student; only where the targets come from differs. Each is timed on its second epoch (workers and caches warm).

Every measurement is repeated in `--repeat` interleaved rounds (a, b, c, a, b, c, ... then d, e, f, d, e, f, ...):
a shared machine's speed drifts by 10-25% over tens of seconds, so each number is the median of its rounds and
each ratio the median of the rounds' ratios, each taken from measurements seconds apart.
The shuffle table measures the reader's order against a uniform shuffle for several buffer sizes (no data read).

Presets: `cpu` (default-teacher -> default-student, 28x28, minutes on 2 cores), `gpu` (torchvision resnet50 ->
resnet18 at 224x224, batch 256, layer3 hint) and `tiny` (the default pair on 8x8 inputs: seconds, a smoke test).
`--scaling 10000,100000,1000000` repeats (b) and (e) with tiny tensors to show the per-sample cost stays flat with
dataset size. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAX_REPEAT = 1000  # rounds of --repeat

PRESETS = {
    "cpu": dict(teacher="default-teacher", student="default-student", shape="1x28x28", classes=10, samples=16384,
                batch=256, hint="layer2", guided="block1", workers=1, chunk=1024),
    "gpu": dict(teacher="torchvision:resnet50", student="torchvision:resnet18", shape="3x224x224", classes=1000,
                samples=40960, batch=256, hint="layer3", guided="layer3", workers=12, chunk=256),
    "tiny": dict(teacher="default-teacher", student="default-student", shape="1x8x8", classes=10, samples=10000,
                 batch=1024, hint="layer2", guided="block1", workers=1, chunk=4096),
}


@dataclass
class BenchConfig:
    preset: str = "cpu"
    samples: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    repeat: int = 3                    # interleaved rounds; numbers are medians over them
    scaling: str | None = None         # e.g. "10000,100000,1000000": (b) and (e) at each size, tiny tensors
    out: str | None = None             # JSON path; default data/bench/bench-<preset>.json
    work_dir: str | None = None        # where caches are written (default: a temp folder under data/bench)

    def __post_init__(self):
        from pipeline.data import plain_fields

        plain_fields(self)


def disk_write_bandwidth(folder: Path, mb: int = 512) -> float:
    """MB/s (10^6 bytes, as (c)'s rate) of a large sequential write with fsync: what the disk sustains, for
    comparison with (c). `mb` is in MiB, written in 8 MiB blocks."""
    block = os.urandom(8 << 20)
    blocks = max(1, mb // 8)
    path = folder / "disk-probe.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(blocks):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return blocks * len(block) / dt / 1e6


def store_read_bandwidth(store: Path) -> dict:
    """MB/s of reading every chunk file of a store in one thread, first with its pages dropped from the page cache
    (posix_fadvise DONTNEED: the disk itself, where the file system honours it), then again (warm): what bounds a
    student that streams features from a store read for the first time, or from one larger than RAM."""
    files = [f for f in sorted(store.rglob("*")) if f.is_file() and "/c/" in f.as_posix()]
    total = sum(f.stat().st_size for f in files)

    def each(fn):
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                fn(fd)
            finally:
                os.close(fd)

    def drain(fd):
        while os.read(fd, 1 << 20):
            pass

    def read_all() -> float:
        t0 = time.perf_counter()
        each(drain)
        return total / max(time.perf_counter() - t0, 1e-9) / 1e6

    if hasattr(os, "posix_fadvise"):  # clean pages (the store was fsynced) are dropped; reads then go to the disk
        each(lambda fd: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED))
    cold = read_all()
    return {"cold_MB_s": cold, "warm_MB_s": read_all(), "bytes": total}


def busy(fn):
    """fn's result and how many CPU cores this process kept busy meanwhile (CPU seconds of all its threads / wall
    seconds): ~all cores means compute-bound; fewer means something waited."""
    import resource

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    out = fn()
    return out, (cpu() - c0) / (time.perf_counter() - t0)


def last_epoch_img_s(run_dir: Path) -> float:
    """Student img/s of a run's last (second) epoch. Epoch 1 also pays the workers' start and the first steps'
    warm-up: a fixed cost that would make short runs and small datasets look slower for reasons unrelated to size."""
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["samples_per_s"]


def teacher_forward(teacher, x: torch.Tensor, n: int, device) -> float:
    """img/s of forward passes on a resident batch (no input pipeline, no copies back)."""
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    steps = max(1, n // len(x))
    with torch.inference_mode(), autocast:
        teacher(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            teacher(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - t0)


def student_step(arch: str, classes: int, x: torch.Tensor, n: int, device) -> float:
    """img/s of the student's training step (forward, backward, SGD) on a batch already on the device, in the
    training loop's precision and layout: the ceiling that (d) and (e) approach when their input costs nothing."""
    from pipeline.loops import sgd
    from pipeline.models import build_model

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(arch, classes, x.shape[1], x.shape[2]).to(
        device, memory_format=torch.channels_last if cuda else torch.contiguous_format).train()
    opt = sgd(model.parameters(), 0.01)
    y = torch.randint(0, classes, (len(x),), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up
        step()
    steps = max(1, n // len(x))
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - t0)


def loader_alone(store: str, data: str, targets: list[str], batch: int, workers: int, device) -> float:
    """img/s of the student stage's loader with nothing to train: DataLoader workers streaming the store, pinned
    batches copied to the device. Timed on the second epoch, as the student runs are: the rate the reader could
    feed a student that cost nothing."""
    from pipeline.data import open_source
    from pipeline.loops import to_device_ahead
    from pipeline.reader import CacheStream, make_loader
    from pipeline.store import open_store

    stream = CacheStream(open_store(store), open_source(data), targets, batch, use_labels=True)
    loader = make_loader(stream, workers, pin_memory=device.type == "cuda")
    for epoch in range(2):
        stream.set_epoch(epoch)
        seen, t0 = 0, time.perf_counter()
        for b in to_device_ahead(loader, device):
            seen += len(b["index"])
        if device.type == "cuda":
            torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


MIN_BATCHES = 16  # per epoch, for student-stage throughput that is not mostly start-up


def _is_bench_json(path: Path) -> bool:
    """Whether `path` holds results an earlier bench wrote (a JSON object naming its preset and pair)."""
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):  # not readable, not text, not JSON
        return False
    return isinstance(r, dict) and "preset" in r and "pair" in r


def run_bench(cfg: BenchConfig, log=print) -> dict:
    from pipeline.catalog import disk_bytes
    from pipeline.data import Synthetic, data_root, default_transform, local_output, open_source
    from pipeline.errors import KDCacheError
    from pipeline.loops import MAX_PROCESSES, check_writable, pick_device, too_many_workers
    from pipeline.models import build_model
    from pipeline.store import versions
    from pipeline.online import OnlineConfig, run_online_kd
    from pipeline.ranks import one_process_only
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import StudentConfig, run_train_student

    # (each rank made its own scratch folder, and rank 1 failed to open rank 0's store there)
    one_process_only("kdcache bench measures one process, not {ranks} torchrun ranks; run it without torchrun")
    if cfg.repeat < 1:
        raise KDCacheError(f"--repeat must be at least 1 (got {cfg.repeat})")
    # each round runs every measurement again (seconds on tiny, minutes on cpu): a typo of many digits ran for ever
    if cfg.repeat > MAX_REPEAT:
        raise KDCacheError(f"--repeat must be at most {MAX_REPEAT} (got {cfg.repeat}); a median settles within a "
                           "few rounds (default 3)")
    if cfg.samples is not None and cfg.samples < 1:
        raise KDCacheError(f"--samples must be at least 1 (got {cfg.samples})")
    if cfg.scaling:  # checked now, not after the whole benchmark has run
        try:
            sizes = [int(s) for s in cfg.scaling.split(",")]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise KDCacheError(f"--scaling takes sample counts separated by commas, e.g. 10000,100000 "
                               f"(got '{cfg.scaling}')")
        tiny = PRESETS["tiny"]
        for size in sizes:  # a size too large to hold (synthetic data's limit) was refused only after every round
            open_source(f"synthetic:{size}:{tiny['shape']}:{tiny['classes']}")
    for flag, value, least in (("--batch-size", cfg.batch_size, 1), ("--workers", cfg.workers, 0)):
        if value is not None and value < least:
            raise KDCacheError(f"{flag} must be at least {least} (got {value})")
    # else refused only by the first student run, after the cache rounds had been measured
    if cfg.workers is not None and cfg.workers > MAX_PROCESSES:
        raise KDCacheError(too_many_workers(cfg.workers))
    # The test data is one batch of synthetic samples (the training data --samples of them): past what synthetic
    # data holds, the error named a spec the user never wrote, 'synthetic:<batch>:1x8x8:10:1 has ... samples'
    most = Synthetic.MAX_BYTES // 8
    for flag, value in (("--samples", cfg.samples), ("--batch-size", cfg.batch_size)):
        if value is not None and value > most:
            raise KDCacheError(f"{flag} must be at most {most:,}, the most samples bench's synthetic data holds "
                               f"(got {value})")
    p = dict(PRESETS[cfg.preset])
    base = Path(local_output(cfg.work_dir, "work_dir")) if cfg.work_dir else data_root() / "bench"
    out = Path(local_output(cfg.out, "--out")) if cfg.out else base / f"bench-{cfg.preset}.json"
    if out.is_dir():  # checked now, not after minutes of measuring
        raise KDCacheError(f"--out {out} is a folder; give the JSON file's path, e.g. {out / 'bench.json'}")
    if out.exists() and not _is_bench_json(out):  # a bench's own results are replaced; anyone else's file is not
        raise KDCacheError(f"--out {out} exists and holds no bench results; choose another --out (bench replaces "
                           "only a file an earlier bench wrote)")
    check_writable(out.parent, "--out")
    n = cfg.samples or p["samples"]
    batch = cfg.batch_size or p["batch"]
    workers = p["workers"] if cfg.workers is None else cfg.workers
    device = pick_device(cfg.device)
    c, h, w = (int(v) for v in p["shape"].split("x"))
    data = f"synthetic:{n}:{p['shape']}:{p['classes']}"
    test = f"synthetic:{max(batch, 256)}:{p['shape']}:{p['classes']}:1"
    source = open_source(data)
    tf = default_transform(source)
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{cfg.preset}-", dir=base))
    results: dict = {"preset": cfg.preset, "samples": n, "batch": batch, "workers": workers, "repeat": cfg.repeat,
                     "pair": f"{p['teacher']} -> {p['student']}", "input": p["shape"], "hint": p["hint"],
                     "device": torch.cuda.get_device_name(0) if device.type == "cuda" else
                     f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
                     "versions": versions(), "platform": platform.platform()}
    if n // batch < MIN_BATCHES:  # the student rows time one epoch: a few batches time the loader's start
        results["note"] = (f"{n // batch} batches per epoch: worker start-up and per-epoch costs dominate the student "
                           f"rows, so their ratios mean little; use --samples {MIN_BATCHES * batch} or more")
        log(f"note: {results['note']}")
    try:
        torch.manual_seed(0)
        teacher = build_model(p["teacher"], p["classes"], c, h).eval()
        weights = work / "teacher.pt"
        torch.save(teacher.state_dict(), weights)
        x = source.load(np.arange(min(batch, n)), tf).to(device)
        if device.type == "cuda":  # the layout teacher-cache uses on a GPU
            teacher, x = (t.to(device, memory_format=torch.channels_last) for t in (teacher, x))
        results["disk_write_MB_s"] = disk_write_bandwidth(work, 2048 if device.type == "cuda" else 256)
        log(f"    disk sequential write    {results['disk_write_MB_s']:10,.0f} MB/s")

        def cache(layers, tag):
            shutil.rmtree(work / f"{tag}.zarr", ignore_errors=True)  # the previous round's store: disk stays flat
            ccfg = CacheConfig(data=data, teacher=p["teacher"], weights=str(weights), layers=layers,
                               out=str(work / f"{tag}.zarr"), batch_size=batch, chunk_samples=p["chunk"],
                               device=cfg.device)
            path, cores = busy(lambda: run_teacher_cache(ccfg, log=lambda *_: None))
            from pipeline.store import open_store

            stats = open_store(path).manifest["stats"]
            secs = stats["seconds"]
            size = disk_bytes(Path(path))
            return path, {"img_s": n / secs, "seconds": secs, "MB_s": size / secs / 1e6,
                          "bytes_per_sample": size / n, "cores_busy": cores,
                          "writer_cores": stats["writer_seconds"] / secs}

        def student(loss, tag, online=False, **kw):
            common = dict(student=p["student"], loss=loss, epochs=2, batch_size=batch, workers=workers,
                          device=cfg.device, test_data=test, out=str(work / f"run-{tag}"), overwrite=True, **kw)
            if online:
                run_online_kd(OnlineConfig(data=data, teacher=p["teacher"], weights=str(weights), **common),
                              log=lambda *_: None)
                return {"img_s": last_epoch_img_s(work / f"run-{tag}")}
            run_train_student(StudentConfig(cache=store, **common), log=lambda *_: None)
            img_s = last_epoch_img_s(work / f"run-{tag}")
            reader = json.loads((work / f"run-{tag}" / "config.json").read_text())["reader"]
            # The stored (compressed) bytes of what the student streams, at the rate it consumes samples. Arrays
            # under 64 MiB (logits) are read once per worker and held in memory; feature chunks are read every epoch
            # (from the page cache when the store fits in RAM, as in any multi-epoch run).
            streamed = sum(disk_bytes(Path(store) / name) for name in reader["streamed_arrays"])
            return {"img_s": img_s, "MB_s": streamed / n * img_s / 1e6, "buffer_chunks": reader["buffer_chunks"]}

        rounds: dict[str, list[dict]] = {}
        for r in range(cfg.repeat):
            img_s, cores = busy(lambda: teacher_forward(teacher, x, n, device))
            rounds.setdefault("a_teacher_forward", []).append({"img_s": img_s, "cores_busy": cores})
            rounds.setdefault("b_cache_logits", []).append(cache([], "logits")[1])
            store, with_hint = cache([p["hint"]], "hint")
            rounds.setdefault("c_cache_logits_hint", []).append(with_hint)
            log(f"round {r + 1}/{cfg.repeat}: (a) {rounds['a_teacher_forward'][-1]['img_s']:,.0f} "
                f"(b) {rounds['b_cache_logits'][-1]['img_s']:,.0f} (c) {with_hint['img_s']:,.0f} img/s")
        for r in range(cfg.repeat):  # the student steps on (a)'s resident batch (channels_last on a GPU too)
            rounds.setdefault("d0_student_step", []).append({"img_s": student_step(p["student"], p["classes"], x,
                                                                                   n, device)})
            for key, args, kw in [("d_student_alone", ("ce=1", "alone"), {"online": True}),
                                  ("e_student_kd", ("kd=1", "kd"), {}),
                                  ("e_student_fitnets", ("kd=1,fitnets=1", "fitnets"),
                                   dict(fitnets_hint=p["hint"], fitnets_guided=p["guided"],
                                        fitnets_schedule="single")),
                                  ("f_online_kd", ("kd=1", "online"), {"online": True})]:
                rounds.setdefault(key, []).append(student(*args, **kw))
            log(f"round {r + 1}/{cfg.repeat}: " + " ".join(
                f"({k[0]}{'+FitNets' if 'fitnets' in k else ''}) {rounds[k][-1]['img_s']:,.0f}"
                for k in ["d_student_alone", "e_student_kd", "e_student_fitnets", "f_online_kd"]) + " img/s")
        for key, rows in rounds.items():
            results[key] = {m: float(np.median([row[m] for row in rows])) for m in rows[0]} | {"rounds": rows}
        per_round = {  # ratio -> (numerator, denominator), both from the same round
            "b/a": ("b_cache_logits", "a_teacher_forward"), "c/a": ("c_cache_logits_hint", "a_teacher_forward"),
            "e/d (KD)": ("e_student_kd", "d_student_alone"), "e/d (FitNets)": ("e_student_fitnets", "d_student_alone"),
            "e/f": ("e_student_kd", "f_online_kd")}
        results["ratio_rounds"] = {k: [u["img_s"] / v["img_s"] for u, v in zip(rounds[num], rounds[den])]
                                   for k, (num, den) in per_round.items()}
        results["ratio_rounds"]["c_write_vs_disk"] = [row["MB_s"] / results["disk_write_MB_s"]
                                                      for row in rounds["c_cache_logits_hint"]]
        results["ratios"] = {k: float(np.median(v)) for k, v in results["ratio_rounds"].items()}
        # Once, after the rounds: what the reader alone delivers from the last round's store (KD, then FitNets)
        results["loader_alone"] = {
            what: {"img_s": loader_alone(store, data, targets, batch, workers, device)}
            for what, targets in [("kd", ["logits"]), ("fitnets", ["logits", f"features/{p['hint']}"])]}
        log("    loader alone             " + ", ".join(f"{k} {v['img_s']:,.0f}" for k, v in
                                                      results["loader_alone"].items()) + " img/s")
        results["store_read"] = store_read_bandwidth(Path(store))  # the last round's logits + hint store
        log(f"    store read (1 thread)    {results['store_read']['cold_MB_s']:10,.0f} MB/s with its pages dropped, "
            f"{results['store_read']['warm_MB_s']:,.0f} MB/s cached")
        results["shuffle"] = shuffle_table(batch, workers)
        if cfg.scaling:
            results["scaling"] = scaling(cfg, [int(s) for s in cfg.scaling.split(",")], work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log(table(results))
    log(f"wrote {out}")
    return results


def scaling(cfg: BenchConfig, sizes: list[int], work: Path, log) -> list[dict]:
    """(b) and (e) at growing dataset sizes with tiny tensors: per-sample cost should stay flat."""
    from pipeline.models import build_model
    from pipeline.store import open_store
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache
    from pipeline.train_student import StudentConfig, run_train_student

    p = PRESETS["tiny"]
    c, h, _ = (int(v) for v in p["shape"].split("x"))
    torch.manual_seed(0)
    weights = work / "tiny-teacher.pt"
    torch.save(build_model(p["teacher"], p["classes"], c, h).state_dict(), weights)
    rows = []
    for n in sizes:
        data = f"synthetic:{n}:{p['shape']}:{p['classes']}"
        path = run_teacher_cache(CacheConfig(data=data, weights=str(weights), layers=[p["hint"]],
                                             out=str(work / f"scale-{n}.zarr"), batch_size=p["batch"],
                                             chunk_samples=p["chunk"], device=cfg.device), log=lambda *_: None)
        cache_s = open_store(path).manifest["stats"]["seconds"]
        run = work / f"scale-run-{n}"
        run_train_student(StudentConfig(cache=path, student=p["student"], loss="kd=1", epochs=2,
                                        batch_size=p["batch"], workers=p["workers"], device=cfg.device,
                                        test_data=f"synthetic:256:{p['shape']}:{p['classes']}:1", out=str(run),
                                        overwrite=True),
                          log=lambda *_: None)
        img_s = last_epoch_img_s(run)
        row = {"samples": n, "cache_img_s": n / cache_s, "cache_us_per_sample": 1e6 * cache_s / n,
               "student_kd_img_s": img_s, "student_us_per_sample": 1e6 / img_s}
        rows.append(row)
        log(f"scaling {n:>9,}: cache {row['cache_img_s']:10,.0f} img/s   student KD {row['student_kd_img_s']:10,.0f}"
            " img/s")
        shutil.rmtree(path, ignore_errors=True)
    return rows


# What one row of a loader buffer holds on the default cache (Fashion-MNIST through the default teacher), in
# memory, uncompressed: the 28x28 uint8 image, index, label and view number (3 x int64), fp16 logits (10 x 2 B),
# and for FitNets the layer3 hint (64 x 7 x 7 fp16 = 6,272 B).
BUFFER_ROW_BYTES = {"KD": 784 + 24 + 20, "FitNets": 784 + 24 + 20 + 6272}


def buffer_mb(chunks: int, loss: str, chunk: int = 1024) -> float:
    return chunks * chunk * BUFFER_ROW_BYTES[loss] / 1e6


def shuffle_table(batch: int, workers: int = 1, num_samples: int = 60000, chunk: int = 1024,
                  buffers=(1, 2, 4, 8, 16, 64)) -> list[dict]:
    """The reader's order against a uniform shuffle, per buffer size (Fashion-MNIST-sized store by default), and
    the memory a buffer holds per worker (see BUFFER_ROW_BYTES). With W loader workers a batch comes from one
    worker's buffer, and each worker holds only every W-th chunk: the default buffer is measured at 1, 2, 4 and the
    run's worker count too."""
    from pipeline.reader import CacheStream, shuffle_quality
    from pipeline.store import CacheStore

    store = CacheStore(path="-", manifest={"data": {"num_samples": num_samples}, "chunk_samples": chunk,
                                           "targets": {}, "transform": {"size": [1, 1], "channels": 1,
                                                                         "mean": [0.0], "std": [1.0]}})
    rows = []
    for w, k in [(1, k) for k in buffers] + [(w, buffers[-1]) for w in sorted({2, 4, max(1, workers)} - {1})]:
        order = CacheStream(store, None, [], batch, use_labels=False, buffer_chunks=k, seed=0).epoch_rows(w)
        q = shuffle_quality(order, chunk, batch)
        rows.append({"workers": w, "buffer_chunks": k, **q})
    uniform = shuffle_quality(np.random.default_rng(0).permutation(num_samples), chunk, batch)
    rows.append({"workers": None, "buffer_chunks": "uniform", **uniform})
    return rows


TARGETS = {  # the targets, per preset: ratio -> minimum
    "cpu": {"b/a": 0.9, "e/d (KD)": 0.9},
    "gpu": {"b/a": 0.95, "c/a": 0.8, "e/d (KD)": 0.95, "e/f": 1.9},
}
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def target_lines(r: dict) -> list[str]:
    """Each target of the preset, measured value, met or not (c/a may be met by the disk-bandwidth clause)."""
    out = []
    for ratio, want in TARGETS.get(r["preset"], {}).items():
        got = r["ratios"][ratio]
        met = got >= want
        rounds = r.get("ratio_rounds", {}).get(ratio, [])
        extra = ""
        if ratio == "c/a" and not met and r["ratios"]["c_write_vs_disk"] >= 0.8:
            met, extra = True, f" (write bandwidth {100 * r['ratios']['c_write_vs_disk']:.0f}% of the disk's)"
        spread = f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else ""
        out.append(f"- {ratio} = {got:.2f}{spread}, target ≥ {want}: {'met' if met else 'missed'}{extra}")
    return out


def readme_section(results: list[dict]) -> str:
    parts = []
    for r in results:
        sizes = ",".join(str(x["samples"]) for x in r.get("scaling") or [])
        # the flags that made these numbers: each one whose value is not the preset's (or BenchConfig's) default
        preset = PRESETS.get(r["preset"], {})
        # (a JSON from before bench recorded its rounds had 1, as `table` says)
        used = {"samples": r.get("samples"), "batch": r.get("batch"), "workers": r.get("workers"),
                "repeat": r.get("repeat", 1)}
        given = "".join(f" {flag} {used[key]}" for flag, key, default in (
            ("--samples", "samples", preset.get("samples")), ("--batch-size", "batch", preset.get("batch")),
            ("--workers", "workers", preset.get("workers")), ("--repeat", "repeat", BenchConfig.repeat))
            if used[key] is not None and used[key] != default)
        parts += [f"`kdcache bench --preset {r['preset']}{given}" + (f" --scaling {sizes}" if sizes else "") +
                  f"` on {r['device']}, {r['platform']}:", "", table(r), "", *target_lines(r), ""]
    return "\n".join(parts)


def main() -> None:
    """`python -m pipeline.bench data/bench/bench-cpu.json [...] --write-readme`: the README's performance tables
    from benchmark JSON files (so the README shows exactly what a `kdcache bench` run measured)."""
    import argparse

    from pipeline.results import write_readme

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--write-readme", action="store_true")
    a = ap.parse_args()
    md = readme_section([json.loads(Path(f).read_text()) for f in a.json])
    print(md)
    if a.write_readme:
        write_readme(md, START, END)


def table(r: dict) -> str:
    repeat = r.get("repeat", 1)
    lines = [f"bench preset={r['preset']} ({r['pair']}, input {r['input']}, hint {r['hint']}), {r['samples']:,} "
             f"samples, batch {r['batch']}, device {r['device']}, median of {repeat} interleaved rounds"
             + (f" (note: {r['note']})" if r.get("note") else ""),
             "| measurement | img/s | MB/s to (b, c) / from (e) the store "
             "| CPU cores busy (writer threads at work, wall time) |",
             "| --- | --- | --- | --- |"]
    for key, label in [("a_teacher_forward", "(a) teacher forward only"),
                       ("b_cache_logits", "(b) teacher-cache, logits"),
                       ("c_cache_logits_hint", f"(c) teacher-cache, logits + {r['hint']}"),
                       ("d0_student_step", "(d0) student step, batch resident on the device (ceiling of d, e)"),
                       ("d_student_alone", "(d) student alone"),
                       ("e_student_kd", "(e) student + KD from cache"),
                       ("e_student_fitnets", "(e) student + KD + FitNets from cache"),
                       ("f_online_kd", "(f) online KD (teacher in the loop)")]:
        if key not in r:  # a JSON written before this row existed
            continue
        v = r[key]
        mb = f"{v['MB_s']:.1f}" if "MB_s" in v else "-"
        cores = f"{v['cores_busy']:.2f}" if "cores_busy" in v else "-"
        cores += f" ({v['writer_cores']:.2f})" if "writer_cores" in v else ""
        lines.append(f"| {label} | {v['img_s']:,.0f} | {mb} | {cores} |")
    for what, v in (r.get("loader_alone") or {}).items():
        lines.append(f"| student-stage loader alone, {'KD' if what == 'kd' else 'KD + FitNets'} targets (no "
                     f"training) | {v['img_s']:,.0f} | - | - |")
    lines.append(f"| disk sequential write (same run) | - | {r['disk_write_MB_s']:,.0f} | - |")
    if r.get("store_read"):
        lines.append(f"| store read, 1 thread, page cache dropped / cached (same run) | - | "
                     f"{r['store_read']['cold_MB_s']:,.0f} / {r['store_read']['warm_MB_s']:,.0f} | - |")
    lines.append("")
    lines.append("| ratio | median | rounds |")
    lines.append("| --- | --- | --- |")
    lines += [f"| {k} | {v:.2f} | {' '.join(f'{x:.2f}' for x in r.get('ratio_rounds', {}).get(k, [v]))} |"
              for k, v in r["ratios"].items()]
    if r.get("shuffle"):
        lines += ["", "| loader workers | buffer (chunks of 1024) | buffer memory per worker, KD / FitNets on layer3 "
                      "| neighbour spread | distinct chunks per batch (vs uniform) |", "| --- | --- | --- | --- | --- |"]
        for q in r["shuffle"]:
            k = q["buffer_chunks"]
            mem = (f"{buffer_mb(k, 'KD'):.0f} / {buffer_mb(k, 'FitNets'):.0f} MB" if isinstance(k, int)
                   else "all")
            lines.append(f"| {q.get('workers', 1) or '-'} | {k} | {mem} | "
                         f"{q['neighbour_spread']:.3f} | "
                         f"{q['distinct_chunks_per_batch']:.1f} ({q['batch_chunks']:.2f}) |")
    if r.get("scaling"):
        lines += ["", "| samples | cache img/s | cache µs/sample | student KD img/s | student µs/sample |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s['samples']:,} | {s['cache_img_s']:,.0f} | {s['cache_us_per_sample']:.1f} | "
                  f"{s['student_kd_img_s']:,.0f} | {s['student_us_per_sample']:.1f} |" for s in r["scaling"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
