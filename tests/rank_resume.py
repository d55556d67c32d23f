"""Run by torchrun in a test: on every rank, a dropout student trained whole, then interrupted in its third epoch and
resumed; prints that rank's two weights' fingerprints as one JSON line."""

import json
import sys

import torch.distributed as dist

import pipeline.train_student as ts
from pipeline.train_student import StudentConfig, run_train_student

if __name__ == "__main__":
    cache, test = sys.argv[1:3]
    dist.init_process_group("gloo")  # one group for the three runs (a run tears down only a group it started)
    common = dict(cache=cache, student="tests.odd_models:dropout_student", loss="kd=1", epochs=3, batch_size=20,
                  workers=0, test_data=test)
    whole = run_train_student(StudentConfig(out="whole", **common), log=lambda *_: None)
    real, steps = ts.cosine_lr, []

    def interrupted_in_epoch_3(*a, **k):  # 4 steps an epoch: every rank stops at the same step
        steps.append(1)
        if len(steps) == 10:
            raise KeyboardInterrupt
        return real(*a, **k)

    ts.cosine_lr = interrupted_in_epoch_3
    try:
        run_train_student(StudentConfig(out="cut", **common), log=lambda *_: None)
    except KeyboardInterrupt:
        pass
    ts.cosine_lr = real
    dist.barrier()
    cut = run_train_student(StudentConfig(out="cut", resume=True, **common), log=lambda *_: None)
    sys.stdout.write(json.dumps({"rank": dist.get_rank(), "whole": whole["params_fingerprint"],
                                 "cut": cut["params_fingerprint"]}) + "\n")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
