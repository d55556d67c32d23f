"""Online KD, the reference kdcache is measured against: the teacher in the loop, a fresh augmented view every step.

    run_online_kd(OnlineConfig(...)) -> summary dict

Same student, losses, schedule, optimiser and evaluation as `train_student.fit`; only the targets differ: each
batch's view is drawn fresh (parameters from (seed, sample, 1_000_000 + epoch), so no two epochs repeat a view and
none is a cached one) and the teacher runs on it right there. This is what a cache of K views approximates, and
what every experiment would pay for without one. With `--loss ce=1` alone it is the student alone (labels only,
the teacher never runs): the benchmark's ceiling. Used by the views experiment (`results_views.py`) and the
benchmark; it is not a kdcache stage (it builds the teacher).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import store as st
from pipeline.augment import REPLAY_VERSION, AugmentPolicy, check_policy, sample_params
from pipeline.data import Source, Transform, default_transform, open_source, refuse_blank
from pipeline.loops import batch_bounds
from pipeline.models import capture, fingerprint_module, load_teacher, teacher_classes
from pipeline.reader import SharedEpoch, make_loader
from pipeline.errors import KDCacheError
from pipeline.train_student import (StudentConfig, check_out, declared, fit, loss_weights, open_run_dir,
                                    refuse_missing_labels, setup, validate, write_config)

FRESH_VIEW_BASE = 1_000_000
# 2: the student starts from the weights a cached run of the same seed starts from (1 drew them after the
# teacher's construction had used the seeded generator). Recorded with every run; results reuse only this one's.
STUDENT_INIT = 2


@dataclass
class OnlineConfig(StudentConfig):
    teacher: str = "default-teacher"
    weights: str | None = None
    aug_seed: int = 0

    def __post_init__(self):
        super().__post_init__()  # plain_fields, over this class's fields too


class OnlineStream(IterableDataset):
    """Uniformly shuffled batches of fresh views (uint8) and labels; workers split the batches of an epoch."""

    def __init__(self, source: Source, tf: Transform, policy: AugmentPolicy, batch_size: int, seed: int,
                 aug_seed: int, use_labels: bool):
        self.source, self.tf, self.policy, self.batch_size = source, tf, policy, batch_size
        self.seed, self.aug_seed, self.use_labels = seed, aug_seed, use_labels
        self._epoch = SharedEpoch()  # persistent workers must see set_epoch

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(batch_bounds(self.source.num_samples, self.batch_size))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.source.num_samples)
        hw = tuple(self.source.native_shape[1:])
        for i, (s, e) in enumerate(batch_bounds(len(order), self.batch_size)):
            if i % workers != worker:
                continue
            idx = order[s:e]
            if self.policy.identity:
                x = self.source.load_raw(idx, self.tf)
            else:
                box, flip = sample_params(self.policy, self.aug_seed, idx, [FRESH_VIEW_BASE + self.epoch], hw)
                x = self.source.load_view(idx, self.tf, box[:, 0], flip[:, 0])
            out = {"index": torch.from_numpy(idx), "x": x}
            if self.use_labels:
                out["labels"] = torch.from_numpy(self.source.labels(idx))
            yield out


def _teacher(cfg: OnlineConfig) -> tuple[Source, torch.nn.Module, dict]:
    """The data and the teacher (built on the CPU, its weights loaded, in eval mode) with its weights file's meta."""
    refuse_blank(cfg.weights, "--weights", empty_too=True)
    source = open_source(cfg.data or "fashion-mnist:train")
    probe_tf = default_transform(source)
    teacher, meta = load_teacher(cfg.teacher, Path(cfg.weights) if cfg.weights else None,
                                 source.num_classes, probe_tf.channels, probe_tf.size, data=source.spec)
    return source, teacher, meta


def identity(cfg: OnlineConfig, source: Source | None = None, teacher: torch.nn.Module | None = None) -> dict:
    """What an online run's targets come from, by content: the teacher's weights and the data (their
    fingerprints, as a cache key has them). Recorded with every run; results reuse a run only where both are still
    the same: `make teacher` retrains the default teacher under the same file name, and the config names only it."""
    if source is None or teacher is None:
        with torch.random.fork_rng():  # building the teacher draws initial weights; leave the caller's numbers be
            source, teacher, _ = _teacher(cfg)
    return {"teacher": fingerprint_module(teacher), "data": source.fingerprint()}


def run_online_kd(cfg: OnlineConfig, log=print) -> dict:
    weights = loss_weights(cfg)
    validate(cfg, weights)
    if cfg.resume:
        raise KDCacheError("--resume continues a train-student run; online KD runs start over")
    if not 0 <= cfg.aug_seed < 2**63:  # as teacher-cache: a negative seed would alias another (the hash wraps it)
        raise KDCacheError(f"--aug-seed must be from 0 to 2**63-1 (got {cfg.aug_seed})")
    if cfg.cache:
        raise KDCacheError("online KD runs the teacher on fresh views and reads no cache; drop cache= and give the "
                           "data, teacher and augment= to compare with")
    check_out(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    source, teacher, meta = _teacher(cfg)
    tf = Transform.from_dict(meta["transform"]) if "transform" in meta else default_transform(source)
    policy = AugmentPolicy.parse(cfg.augment)
    check_policy(policy, cfg.aug_seed, tuple(source.native_shape[1:]))
    use_labels = source.labelled and not cfg.no_labels
    needs, _ = declared(weights, cfg)
    refuse_missing_labels(needs, use_labels, source.labelled, "data")  # as train-student does
    layers = [t[len("features/"):] for t in needs if t.startswith("features/")]
    with torch.no_grad(), capture(teacher, layers) as feats:
        logits = teacher(source.load(np.arange(min(2, source.num_samples)), tf))  # one-sample data too
        teacher_shapes = {"logits": tuple(logits.shape[1:])} | {st.feature_array(k): tuple(v.shape[1:])
                                                                 for k, v in feats.items()}
    # Building the teacher drew from the seeded generator: seed again, so the student starts where a cached run
    # of this seed starts (a paired comparison of the two), not from other weights.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    s = setup(cfg, weights, source, tf, teacher_shapes["logits"][0], teacher_shapes, use_labels,
              teacher_classes(meta), log)
    teacher.to(s.device).eval()
    run_dir = open_run_dir(cfg, tag="online-")
    write_config(run_dir, {"config": asdict(cfg), "online": True, "augment": policy.spec(), "replay": REPLAY_VERSION,
                           "student_init": STUDENT_INIT, "identity": identity(cfg, source, teacher),
                           "device": str(s.device)})
    stream = OnlineStream(source, tf, policy, cfg.batch_size, cfg.seed, cfg.aug_seed, use_labels)
    loader = make_loader(stream, cfg.workers)
    cuda = s.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:  # the same layout as the cache stage's teacher and the student
        teacher.to(memory_format=torch.channels_last)

    if set(weights) <= {"ce"}:  # labels only: the student alone, the teacher never runs
        def targets(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
            return {}
        extra = {"online": False, "augment": policy.spec()}
    else:
        def targets(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
            # no_grad, not inference_mode: the losses keep these tensors for their backward pass.
            with torch.no_grad(), capture(teacher, layers) as tf_feats, autocast:
                x = tf(batch["x"].to(device, non_blocking=True))
                out = {"logits": teacher(x.contiguous(memory_format=torch.channels_last) if cuda else x)}
                out.update({st.feature_array(k): v for k, v in tf_feats.items()})
            return {k: v.float() for k, v in out.items()}
        extra = {"online": True, "augment": policy.spec()}

    return fit(cfg, s, loader, stream.set_epoch, lambda _epoch: len(stream), targets, run_dir, log, extra=extra)
