"""kdcache: run the teacher once, distil many students from its cached outputs.

Stages, one file each:
- `pipeline.teacher_train`  trains the default teacher (`make teacher`)
- `pipeline.teacher_cache`  runs a teacher once over a dataset into a Zarr v3 store (`make teacher-cache`)
- `pipeline.train_student`  streams the store back and trains a student (`make train-student`)
Shared pieces: `data` (dataset specs, transforms), `models` (teacher/student builders, layer hooks),
`store` (the Zarr layout and manifest), `losses/` (one distillation loss per file), `cli` (typer).
"""

__version__ = "0.1.0"
FORMAT_VERSION = 2  # bump when the store layout changes incompatibly
