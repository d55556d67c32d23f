"""Run by torchrun in a test: train a student on every rank and print that rank's summary as one JSON line."""

import json
import sys

from pipeline.train_student import StudentConfig, run_train_student

if __name__ == "__main__":
    cache, out, test = sys.argv[1:4]
    s = run_train_student(StudentConfig(cache=cache, loss="kd=1,fitnets=1", fitnets_hint="layer2",
                                        fitnets_guided="block1", fitnets_schedule="single", epochs=2,
                                        batch_size=16, workers=int(sys.argv[4]), out=out, test_data=test),
                          log=lambda *_: None)
    # one write of the whole line: both ranks share torchrun's stdout pipe and now finish together (print writes the
    # text and its newline separately, so two ranks' lines could interleave); a write under PIPE_BUF is atomic
    sys.stdout.write(json.dumps(s) + "\n")
    sys.stdout.flush()
