"""The `kdcache` command line. Each command parses flags into a config and calls one plain function.

Heavy imports (torch, zarr) happen inside the commands so `kdcache --help` is instant.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from contextlib import contextmanager
from typing import List, Optional

import typer

# Plain (click-style) help, not rich panels: in an 80-column terminal rich's option table truncated long flag
# names ("--fitnets-hint-epo…") and tagged every switch "<bool>"; the plain layout prints each flag whole.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Run the teacher once into a Zarr cache; distil students from it (KD, FitNets, RKD).")


def _one_line(e: BaseException) -> str:
    """The user's message of an error. An error raised in a DataLoader worker comes back re-wrapped, its message
    the worker's whole traceback; the original message is its last line."""
    text = str(e).strip()
    if "DataLoader worker" in text and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(e).__name__


def _stopped_by(e: BaseException | None) -> tuple[str, int]:
    """How an interruption is named and its exit code: 128 + the signal's number, as a shell reports a process the
    signal killed (SIGINT 2, SIGTERM 15)."""
    from pipeline.errors import Terminated

    return ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)


RERUN = "re-run the same command"
RESUMES_CACHE = "re-run the same command: committed chunks are kept and the run resumes"
RESUMES_STUDENT = ("re-run the same command with --resume --out RUN_DIR (its --out, or the run directory it named "
                   "first): it continues from the last finished epoch")


@contextmanager
def imports():
    """A command's imports of the pipeline (torch, torchvision: seconds on a cold start) with Ctrl-C held (see
    `hold_interrupts`: torch's import can abort on one). One pressed meanwhile is raised when they are done and
    says that nothing had started (not train-student's --resume advice: no run exists yet)."""
    from pipeline.errors import hold_interrupts

    try:
        with hold_interrupts():
            yield
    except KeyboardInterrupt as e:
        e.kdcache_then = f"nothing had started; {RERUN}"
        raise


@contextmanager
def user_errors(then: str = RERUN):
    """A KDCacheError (or a file-system error) becomes one line on stderr and exit code 2, never a traceback.
    `then`: what to do after an interruption or a full disk, which differs by command."""
    from pipeline.errors import KDCacheError

    try:
        yield
    except KDCacheError as e:
        typer.echo(f"error: {_one_line(e)}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`Terminated`, where the CLI's entry made it one)
        typer.echo(f"{_stopped_by(e)[0]}; {getattr(e, 'kdcache_then', then)}", err=True)
        raise typer.Exit(_stopped_by(e)[1])
    except OSError as e:
        from pipeline import store

        if e.errno in (28, 122):  # ENOSPC, EDQUOT (a user's quota on a shared disk: full for this user)
            typer.echo(f"error: disk full{' (quota exceeded)' if e.errno == 122 else ''} while writing "
                       f"{e.filename or 'the output'}; free space and {getattr(e, 'kdcache_then', then)}", err=True)
        elif e.errno in (1, 2, 13, 17, 20, 21, 30, 36):  # EPERM ENOENT EACCES EEXIST ENOTDIR EISDIR EROFS ENAMETOOLONG
            typer.echo(f"error: {e.strerror or e}: {e.filename or ''}; check the path, or choose another "
                       "--out / --cache-dir", err=True)
        elif e.errno is None and isinstance(e, store.ACCESS_ERRORS):
            # an object store's backend refusing or unreachable where no store path was at hand to name
            typer.echo(f"error: {_one_line(store.access_error('the store', e))}", err=True)
        else:
            raise
        raise typer.Exit(2)
    except RuntimeError as e:
        if os.environ.get("WORLD_SIZE", "1") != "1" and ("Connection closed by peer" in str(e)
                                                          or "Connection reset by peer" in str(e)):
            # under torchrun, a rank that failed mid-run closes its connections; its own error line says why
            typer.echo("error: another rank stopped (its error is above); fix that and re-run", err=True)
            raise typer.Exit(2)
        if "DataLoader worker" not in str(e):
            raise
        typer.echo(f"error: in a data-loading worker: {_one_line(e)}", err=True)
        raise typer.Exit(2)


def log_err(msg: str) -> None:
    typer.echo(msg, err=True)


@app.command("teacher")
def teacher_cmd(
    data: str = typer.Option("fashion-mnist:train", help="Training data spec."),
    test_data: Optional[str] = typer.Option(None, help="Test data spec (default: the data's test split)."),
    arch: str = typer.Option("default-teacher", help="Architecture to train."),
    epochs: int = typer.Option(14, help="Training epochs."),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(0.1),
    weight_decay: float = typer.Option(5e-4),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[str] = typer.Option(None, help="Weights file (default data/teachers/default.pt); its metadata "
                                                 "goes beside it as <stem>.json."),
    image_size: Optional[int] = typer.Option(None, help="Resize inputs to this square size (recorded: teacher-cache "
                                                        "feeds the teacher the same)."),
    channels: Optional[int] = typer.Option(None, help="Convert inputs to 1 or 3 channels (recorded likewise), e.g. 3 "
                                                      "for a torchvision model on grayscale data."),
    normalize: Optional[str] = typer.Option(None, help="Input normalisation: imagenet or MEAN/STD, one value or one "
                                                       "per channel (recorded likewise; default: the data's own: "
                                                       "Fashion-MNIST 0.286/0.353, others 0.5/0.5)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out (caches made from it can then no longer "
                                               "be verified with --recompute or repaired)."),
):
    """Train a teacher: the default one (no weights can be downloaded, so kdcache trains its own), or --arch."""
    with user_errors("re-run `kdcache teacher` (its training starts over)"):
        with imports():
            from pipeline.teacher_train import TeacherTrainConfig, run_teacher_train

        meta = run_teacher_train(TeacherTrainConfig(data=data, test_data=test_data, arch=arch, epochs=epochs,
                                                    batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                                    seed=seed, device=device, out=out,
                                                    image_size=image_size, channels=channels, normalize=normalize,
                                                    overwrite=overwrite),
                                 log=log_err)
        typer.echo(meta["path"])  # the last line of stdout is the weights file, for scripts


def _cache_command(mode: str):
    """teacher-cache and plan take the same flags: one signature, two behaviours."""

    def command(
        data: str = typer.Option("fashion-mnist:train", help="fashion-mnist[:train|:test], imagefolder:DIR, "
                                                               "synthetic:N:CxHxW[:CLASSES[:SEED]]."),
        teacher: str = typer.Option("default-teacher", help="default-teacher, torchvision:NAME or module:function."),
        weights: Optional[str] = typer.Option(None, help="Teacher weights: a file from `kdcache teacher` (weights "
                                              "and metadata) or a bare state_dict; default-teacher reads "
                                              "data/teachers/default.pt when omitted."),
        layer: List[str] = typer.Option([], "--layer", help="Module path whose output to cache; repeatable."),
        dtype: str = typer.Option("float16", help="float16, float32 (exact) or bfloat16 (stored as its uint16 "
                                                    "bits; with --logits-topk the top-k values are float16)."),
        feature_codec: str = typer.Option("float", help="Features: float (= --dtype) or int8 (a scale per sample and "
                                                          "channel; per sample for vectors and 1x1 maps)."),
        logits_topk: int = typer.Option(0, help="Store only the top-k logits + tail mass (0: all logits)."),
        views: int = typer.Option(1, help="Augmented views per sample (needs --augment)."),
        augment: Optional[str] = typer.Option(None, help="Augmentation policy, e.g. crop=0.5-1,translate=2,flip,"
                                                          "plain0 (see README)."),
        aug_seed: int = typer.Option(0, help="Base seed of the views' parameters."),
        row_order: str = typer.Option("shuffled", help="shuffled (a fixed permutation: every chunk a random sample) "
                                                        "or source (the data's order)."),
        out: Optional[str] = typer.Option(None, help="Store path (default <cache-dir>/<key>.zarr)."),
        cache_dir: Optional[str] = typer.Option(None, help="Folder of caches (default data/cache)."),
        chunk_samples: int = typer.Option(1024, help="Samples per chunk (the unit of commit)."),
        batch_size: int = typer.Option(256),
        compression_level: int = typer.Option(1, help="zstd level (1: ~2x faster than 3 on float16 features, about "
                                                        "the same ratio; negative: zstd's fast modes, larger files)."),
        image_size: Optional[int] = typer.Option(None, help="Resize inputs to this square size."),
        channels: Optional[int] = typer.Option(None, help="Convert inputs to 1 or 3 channels."),
        num_classes: Optional[int] = typer.Option(None, help="The teacher's output count (default: recorded with "
                                                             "it, else the data's classes, else read off its "
                                                             "weights' classifier)."),
        normalize: Optional[str] = typer.Option(None, help="The teacher's input normalisation: imagenet or MEAN/STD, "
                                                           "one value or one per channel (0.5,0.4,0.3/0.2,0.2,0.2) "
                                                           "(default: recorded with the teacher, else the data's own: "
                                                           "Fashion-MNIST 0.286/0.353, others 0.5/0.5)."),
        limit: Optional[int] = typer.Option(None, help="Cache only the first N samples by index (a quick trial; an "
                                                       "image folder's come class by class)."),
        device: str = typer.Option("auto"),
        # accepted by plan too (the same command line), where they change nothing: not listed in its --help
        writers: int = typer.Option(0, help="Writer threads (0: CPU cores - 3, from 2 to 16).", hidden=mode == "plan"),
        force: bool = typer.Option(False, help="Rebuild even if a complete cache exists.", hidden=mode == "plan"),
        json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ):
        with user_errors(RESUMES_CACHE if mode != "plan" else RERUN):
            with imports():
                from pipeline.teacher_cache import CacheConfig

            cfg = CacheConfig(data=data, teacher=teacher, weights=weights, layers=list(layer), dtype=dtype,
                              feature_codec=feature_codec, logits_topk=logits_topk, views=views, augment=augment,
                              aug_seed=aug_seed, row_order=row_order, out=out,
                              cache_dir=cache_dir, chunk_samples=chunk_samples, batch_size=batch_size,
                              compression_level=compression_level, image_size=image_size, channels=channels,
                              num_classes=num_classes, normalize=normalize, limit=limit, device=device,
                              writers=writers, force=force)
            if mode == "plan":
                from pipeline.catalog import dumps, human, plan_cache

                plan = plan_cache(cfg)
                if json_out:
                    typer.echo(dumps(plan))
                    return
                for name, a in plan["arrays"].items():
                    typer.echo(f"{name:<28} {str(a['shape']):<22} {a['dtype']:<8} "
                               f"{a['bytes_per_sample']:>10,.1f} B/sample  (raw {a['raw_bytes_per_sample']:,})")
                views_txt = f" ({plan['views']} views each)" if plan["views"] else ""
                typer.echo(f"{plan['samples']:,} samples{views_txt} x {plan['bytes_per_sample']:,.1f} B + "
                           f"{human(plan['overhead_bytes'])} manifest, metadata and commit markers = "
                           f"{human(plan['total_bytes'])} on disk (measured on {plan['probe_samples']} samples)")
                typer.echo(plan["path"])
                return
            from pipeline.teacher_cache import run_teacher_cache

            path = run_teacher_cache(cfg, log=log_err)
            if str(path).startswith("memory://"):
                log_err("note: a memory:// store lives in this process only and is gone when the command ends; use "
                        "it from Python (run_teacher_cache, then run_train_student in the same process)")
            # The last line of stdout is the store's path, for scripts (once, under torchrun: rank 0's).
            if os.environ.get("RANK", "0") in ("", "0"):
                if json_out:
                    from pipeline.store import open_store

                    store = open_store(path)
                    typer.echo(json.dumps({"path": path, "key": store.manifest["key"], "samples": store.num_samples,
                                           "views": store.views, "arrays": sorted(store.arrays),
                                           "stats": store.manifest.get("stats")}))
                else:
                    typer.echo(path)

    return command


app.command("teacher-cache", help="Run the teacher once over the data; write logits and layer outputs to a Zarr v3 "
            "store; print its path.")(_cache_command("cache"))
app.command("plan", help="Predict a cache's size: run the teacher on one batch, compress it with the store's "
            "codecs, extrapolate.")(_cache_command("plan"))


@app.command("verify")
def verify_cmd(
    path: str = typer.Argument(..., help="Store to check (or its key from `kdcache ls`, 4+ digits of it)."),
    recompute: int = typer.Option(0, help="Also re-run the teacher on N random samples (every view of each) "
                                          "and compare."),
    seed: int = typer.Option(0, help="Seed choosing the recomputed samples."),
    data: Optional[str] = typer.Option(None, help="Where the store's data lies now, if it moved (--recompute, and "
                                                  "the check of the stored labels against the data's)."),
    weights: Optional[str] = typer.Option(None, help="Where the teacher's weights lie now, if they moved "
                                                     "(--recompute)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Read every chunk; report bad or missing chunks with their store rows; exit 1 if anything is wrong."""
    with user_errors():
        with imports():
            from pipeline.catalog import dumps
            from pipeline.verify import verify_store

        report = verify_store(path, recompute=recompute, seed=seed, moved={"data": data, "weights": weights})
        if json_out:
            typer.echo(dumps(report.to_dict()))
        else:
            for line in report.summary_lines():
                typer.echo(f"BAD  {line}")
            if not report.complete:
                typer.echo("BAD  manifest: not marked complete")
            if report.recompute:
                k = len(report.recompute["views"] or [])
                views = f" x {k} views" if k else ""
                for name, d in report.recompute["arrays"].items():
                    typer.echo(f"{'ok ' if d['ok'] else 'BAD'}  recompute {name}: max |diff| {d['max_abs']:.3g}, "
                               f"max rel {d['max_rel']:.3g} (tolerance {d['tolerance']:g}, "
                               f"{report.recompute['samples']} samples{views})")
                for problem in report.recompute.get("problems", []):
                    typer.echo(f"BAD  recompute {problem.line()}")
                if report.recompute.get("problems"):  # with the --data / --weights this check needed
                    moved = "".join(f" --{flag} {shlex.quote(value)}" for flag, value in
                                    (("data", data), ("weights", weights)) if value)
                    typer.echo(f"     (`kdcache repair {shlex.quote(report.path)} --recompute {recompute} --seed {seed}"
                               f"{moved}` redoes them)")
                if "note" in report.recompute:
                    typer.echo(f"BAD  recompute: {report.recompute['note']}")
                if "labels" in report.recompute:
                    lab = report.recompute["labels"]
                    typer.echo(f"{'ok ' if lab['ok'] else 'BAD'}  recompute labels: {lab['mismatches']} of "
                               f"{lab['checked']} differ from the data's labels of their index")
            typer.echo(f"{'OK' if report.ok else 'FAILED'}: {report.path}")  # a key given: the store it named
        if not report.ok:
            raise typer.Exit(1)


@app.command("repair")
def repair_cmd(
    path: str = typer.Argument(..., help="Store to repair (or its key from `kdcache ls`, 4+ digits of it)."),
    data: Optional[str] = typer.Option(None, help="Where the store's data lies now, if it moved."),
    weights: Optional[str] = typer.Option(None, help="Where the teacher's weights lie now, if they moved."),
    device: Optional[str] = typer.Option(None, help="Device to recompute on (default: the store's own --device; "
                                                    "e.g. cpu for a store made with --device cuda, on a machine "
                                                    "without that GPU)."),
    recompute: int = typer.Option(0, help="Also redo the chunks whose outputs differ from the teacher's on N "
                                          "random samples (as verify --recompute N finds them)."),
    seed: int = typer.Option(0, help="Seed choosing the recomputed samples (as verify's)."),
):
    """Recompute only the bad or missing chunks of a store (needs its teacher and data)."""
    with user_errors(RESUMES_CACHE):  # repair commits unit by unit: a re-run verifies again and redoes the rest
        with imports():
            from pipeline.verify import repair_store

        report = repair_store(path, log=log_err, moved={"data": data, "weights": weights, "device": device},
                              recompute=recompute, seed=seed)
        typer.echo(f"{'OK' if report.ok else 'FAILED'}: {report.path}")
        if not report.ok:
            raise typer.Exit(1)


@app.command("ls")
def ls_cmd(
    cache_dir: Optional[str] = typer.Option(None, help="Folder of caches (default data/cache)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List the caches in a cache folder."""
    with user_errors():
        with imports():
            from pipeline.catalog import dumps, human, list_caches

        caches = list_caches(cache_dir)
        if json_out:
            typer.echo(dumps(caches))
            return
        if not caches:  # said on stderr: stdout stays a list (of nothing)
            from pipeline.data import data_root

            log_err(f"no caches in {cache_dir or data_root() / 'cache'} (teacher-cache makes one)")
        for c in caches:
            if "error" in c:  # most errors name the store first already
                err = str(c["error"])
                typer.echo(err if err.startswith(str(c["path"])) else f"{c['path']}: {err}")
                continue
            views = f" x {c['views']} views" if c["views"] else ""
            top1 = f" (top-1 {100 * c['teacher_top1']:.1f}%)" if c.get("teacher_top1") is not None else ""
            name = str(c["path"]).rstrip("/").rsplit("/", 1)[-1]
            named = f" ({name})" if name != f"{c['key']}.zarr" else ""  # a store made with --out
            state = "DAMAGED   " if c["missing_arrays"] else "complete  " if c["complete"] else "INCOMPLETE"
            typer.echo(f"{c['key']}{named}  {state}  {c['teacher']}"
                       f"@{c['teacher_fingerprint'][:8]}{top1}  {c['data']}  {c['samples']:,} samples{views}  "
                       f"{human(c['bytes'])}  [{', '.join(c['arrays'])}]")


@app.command("inspect")
def inspect_cmd(path: str = typer.Argument(..., help="Store to show (or its key from `kdcache ls`, 4+ digits of it)."),
                json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Print a store's manifest and, per array, shape, dtype, chunks, codecs, compression ratio, bytes per sample."""
    with user_errors():
        with imports():
            from pipeline.catalog import dumps, human, inspect_cache

        info = inspect_cache(path)
        if json_out:
            typer.echo(dumps(info))
            return
        typer.echo(dumps(info["manifest"]))
        for name, a in info["arrays"].items():
            if a.get("missing"):
                typer.echo(f"{name:<28} {str(a['shape']):<20} {a['dtype']:<8} MISSING (rebuild with teacher-cache "
                           "--force)")
                continue
            typer.echo(f"{name:<28} {str(a['shape']):<20} {a['dtype']:<8} chunks {str(a['chunks']):<18} "
                       f"{'+'.join(c.replace('Codec', '') for c in a['codecs']):<18} ratio {a['compression_ratio']}  "
                       f"{a['bytes_per_sample']:,.1f} B/sample")
        typer.echo(f"total {human(info['bytes'])}")


@app.command("train-student")
def train_student_cmd(
    cache: str = typer.Option(..., help="Path of the store teacher-cache printed (or its key from `kdcache ls`, 4+ "
                                        "digits of it)."),
    student: str = typer.Option("default-student", help="default-student, mlp, torchvision:NAME, module:function."),
    loss: str = typer.Option("kd=1", help="Weighted losses, e.g. kd=1,fitnets=1,rkd=1 (also ce)."),
    temperature: float = typer.Option(4.0, "--temperature", "-T"),
    alpha: float = typer.Option(0.1, help="Hard-label weight inside KD."),
    no_labels: bool = typer.Option(False, "--no-labels", help="Ignore labels even if cached (soft targets only)."),
    fitnets_hint: str = typer.Option("layer3", help="Teacher hint layer (cached)."),
    fitnets_guided: str = typer.Option("block2", help="Student guided layer."),
    fitnets_schedule: str = typer.Option("two-stage", help="two-stage (paper) or single."),
    fitnets_hint_epochs: int = typer.Option(2, help="Hint-stage epochs (two-stage), taken out of --epochs."),
    rkd_layer: str = typer.Option("avgpool", help="Teacher embedding layer (cached)."),
    rkd_student_layer: str = typer.Option("embed", help="Student embedding layer."),
    rkd_distance_weight: float = typer.Option(25.0),
    rkd_angle_weight: float = typer.Option(50.0),
    augment: Optional[str] = typer.Option(None, help="The views' policy this run expects (refused if the store "
                                                      "holds another); default: whatever the store holds."),
    view_policy: str = typer.Option("cycle", help="Which stored view a sample gets each epoch: cycle or random."),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(0.05, help="Peak learning rate (cosine decay to 0 over each stage)."),
    weight_decay: float = typer.Option(5e-4),
    optimizer: str = typer.Option("sgd", help="sgd (Nesterov, momentum 0.9) or adamw."),
    seed: int = typer.Option(0),
    test_data: Optional[str] = typer.Option(None, help="Labelled test data (default: the data's test split)."),
    data: Optional[str] = typer.Option(None, help="Data spec (default: the one recorded in the cache)."),
    workers: int = typer.Option(1, help="DataLoader worker processes."),
    buffer_chunks: int = typer.Option(0, help="Chunks shuffled together (0: as many as fit in 256 MiB per worker, "
                                              "2 to 64)."),
    device: str = typer.Option("auto"),
    out: Optional[str] = typer.Option(None, help="Run directory (default data/runs/...)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last finished epoch."),
    overwrite: bool = typer.Option(False, help="Replace a finished or interrupted run in --out (else refused)."),
):
    """Train a student from a cache (the teacher is never built) and print its test accuracy."""
    with user_errors(RESUMES_STUDENT):
        with imports():
            from pipeline.train_student import StudentConfig, run_train_student

        cfg = StudentConfig(cache=cache, student=student, loss=loss, temperature=temperature, alpha=alpha,
                            no_labels=no_labels, fitnets_hint=fitnets_hint, fitnets_guided=fitnets_guided,
                            fitnets_schedule=fitnets_schedule, fitnets_hint_epochs=fitnets_hint_epochs,
                            rkd_layer=rkd_layer, rkd_student_layer=rkd_student_layer,
                            rkd_distance_weight=rkd_distance_weight, rkd_angle_weight=rkd_angle_weight,
                            augment=augment, view_policy=view_policy, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, optimizer=optimizer, seed=seed,
                            test_data=test_data, data=data, workers=workers, buffer_chunks=buffer_chunks,
                            device=device, out=out, resume=resume, overwrite=overwrite)
        summary = run_train_student(cfg, log=log_err)
        if summary.get("rank", 0) == 0:  # under torchrun, rank 0 speaks for the run
            typer.echo(json.dumps({"test_acc": summary["test_acc"], "run_dir": summary["run_dir"]}))


@app.command("eval")
def eval_cmd(
    weights: str = typer.Argument(..., help="A run's student.pt, a teacher's weights, or a bare state_dict."),
    data: str = typer.Option("fashion-mnist:test", help="Labelled data spec."),
    model: Optional[str] = typer.Option(None, help="Architecture (default: the one the weights file records)."),
    image_size: Optional[int] = typer.Option(None, help="Override the recorded input size."),
    channels: Optional[int] = typer.Option(None, help="Override the recorded channel count (1 or 3)."),
    normalize: Optional[str] = typer.Option(None, help="Override the recorded normalisation: imagenet or MEAN/STD "
                                                                "(one value or one per channel, comma-separated)."),
    batch_size: int = typer.Option(512),
    device: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json", help="Print the result (per-class accuracy, confusion) as JSON."),
):
    """Score a trained model on labelled data: top-1, top-5, per-class accuracy (labels matched by class name)."""
    with user_errors():
        with imports():
            from pipeline.evaluate import EvalConfig, dumps, run_eval

        result = run_eval(EvalConfig(weights=weights, data=data, model=model, image_size=image_size,
                                     channels=channels, normalize=normalize, batch_size=batch_size, device=device),
                          log=log_err)
        if json_out:
            typer.echo(dumps(result))
            return
        width = max(len(c) for c in [*result["classes"], "class"])
        typer.echo(f"  {'class':<{width}}  accuracy (- : no test samples of it)")
        for c, acc in result["per_class"].items():
            typer.echo(f"  {c:<{width}}  {'-' if acc is None else f'{acc:.4f}'}")
        typer.echo(json.dumps({"top1": result["top1"], "top5": result["top5"], "samples": result["samples"]}))


@app.command("bench")
def bench_cmd(
    preset: str = typer.Option("cpu", help="cpu (default pair, minutes on 2 cores), gpu (resnet50 -> resnet18, "
                                            "224x224) or tiny."),
    samples: Optional[int] = typer.Option(None, help="Synthetic samples (default per preset)."),
    batch_size: Optional[int] = typer.Option(None),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers for the student runs."),
    device: str = typer.Option("auto"),
    repeat: int = typer.Option(3, help="Interleaved rounds; each number is the median over them."),
    scaling: Optional[str] = typer.Option(None, help="Also measure cache and KD at these sizes, e.g. "
                                                      "10000,100000,1000000 (tiny tensors)."),
    out: Optional[str] = typer.Option(None, help="JSON output (default data/bench/bench-<preset>.json)."),
    write_readme: bool = typer.Option(False, help="Also write the table into the README's performance section."),
):
    """Throughput: teacher forward, cache writing, student alone, KD/FitNets from the cache, online KD."""
    with user_errors():
        with imports():
            from pipeline.bench import PRESETS, BenchConfig, run_bench
            from pipeline.errors import KDCacheError

        if preset not in PRESETS:
            raise KDCacheError(f"unknown --preset '{preset}'; use {', '.join(PRESETS)}")
        if write_readme:
            from pipeline.bench import END, START
            from pipeline.results import check_readme

            check_readme(START, END)  # now, not after minutes of measuring
        result = run_bench(BenchConfig(preset=preset, samples=samples, batch_size=batch_size, workers=workers,
                                       device=device, repeat=repeat, scaling=scaling, out=out), log=typer.echo)
        if write_readme:
            from pipeline.bench import readme_section
            from pipeline.results import write_readme as write

            write(readme_section([result]), START, END)


def main() -> int:
    """The console script: typer's own usage errors (an unknown flag, `--views abc`) are one `error:` line too.

    SIGTERM (a scheduler's pre-emption or time limit, `kill PID`) is made an interruption like Ctrl-C for the
    command's run (`errors.on_sigterm`): the same clean-up, then one line and exit code 143. Only here, the process's
    entry: library callers keep their own SIGTERM.

    (Duck-typed: click's UsageError lives in click or, in newer typer, in its vendored copy.)"""
    from pipeline.errors import off_sigterm, on_sigterm

    on_sigterm()
    try:
        return _main()
    finally:
        off_sigterm()


def _main() -> int:
    try:
        code = app(prog_name="kdcache", standalone_mode=False)
    except typer.Abort as e:  # click's own wrapping of an interruption outside a command's user_errors
        what, code = _stopped_by(e.__cause__ or e.__context__)
        typer.echo(what, err=True)
        return code
    except Exception as e:  # noqa: BLE001 - only usage errors are handled here; the rest is re-raised
        if not (hasattr(e, "format_message") and getattr(e, "exit_code", None) == 2):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `kdcache` or `kdcache CMD`: the help, as typer shows it
            e.show()
            return 2
        ctx = getattr(e, "ctx", None)
        path = ctx.command_path if ctx is not None else "kdcache"
        typer.echo(f"error: {e.format_message()} (see {path} --help)", err=True)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
