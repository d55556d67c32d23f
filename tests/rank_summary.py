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
    print(json.dumps(s))
