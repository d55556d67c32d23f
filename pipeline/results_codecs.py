"""`make results-codecs`: what each codec costs on the default teacher, as teacher-cache measures it.

    python -m pipeline.results_codecs [--write-readme]

Caches Fashion-MNIST's training set with the default teacher (logits + layer3 + avgpool) once per codec choice and
tabulates, from each store's manifest: bytes per sample on disk and the distortion teacher-cache measured over all
60k samples (logits: KL(full || stored) at T=1 and T=4, top-1 agreement; features: relative L2 error and cosine).
Writes data/results/codecs.json, data/results/codecs.md and, with --write-readme, the README's codecs table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.data import data_root
from pipeline.results import machine, one_line_errors, publish

START, END = "<!-- codecs:start -->", "<!-- codecs:end -->"
CHOICES = [  # (label, teacher-cache flags)
    ("float32 (exact)", {"dtype": "float32"}),
    ("float16 (default)", {"dtype": "float16"}),
    ("bfloat16 (stored as uint16 bits)", {"dtype": "bfloat16"}),
    ("float16 logits, int8 features", {"feature_codec": "int8"}),
    ("top-3 logits + tail, int8 features", {"feature_codec": "int8", "logits_topk": 3}),
    ("top-1 logits + tail, int8 features", {"feature_codec": "int8", "logits_topk": 1}),
]


def run(log=print) -> dict:
    from pipeline.catalog import disk_bytes
    from pipeline.store import open_store
    from pipeline.teacher_cache import CacheConfig, run_teacher_cache

    rows = []
    for label, flags in CHOICES:
        path = run_teacher_cache(CacheConfig(data="fashion-mnist:train", layers=["layer3", "avgpool"], **flags),
                                 log=log)
        man = open_store(path).manifest
        n = man["data"]["num_samples"]
        per_array = {name: disk_bytes(Path(path) / name) / n for name in man["arrays"]}
        targets = {t: sum(per_array[p] for p in v["parts"]) for t, v in man["targets"].items()}
        rows.append({"codec": label, "flags": flags, "bytes_per_sample": disk_bytes(Path(path)) / n,
                     "target_bytes_per_sample": targets, "distortion": man["distortion"]})
        log(f"{label}: {rows[-1]['bytes_per_sample']:,.0f} B/sample")
    result = {"rows": rows, "machine": machine()}
    out = data_root() / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "codecs.json").write_text(json.dumps(result, indent=2))
    (out / "codecs.md").write_text(table(result))
    return result


def table(r: dict) -> str:
    lines = ["Default teacher on Fashion-MNIST train (60k samples), logits + `layer3` (64×7×7) + `avgpool` (64); "
             "distortion as teacher-cache measured it over every sample (from the store's manifest).", "",
             "| codec | B/sample: logits | layer3 | avgpool | KL T=1 | KL T=4 | top-1 agree | layer3 rel. err | "
             "layer3 cosine |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        d, b = row["distortion"], row["target_bytes_per_sample"]
        lines.append(f"| {row['codec']} | {b['logits']:,.1f} | {b['features/layer3']:,.0f} | "
                     f"{b['features/avgpool']:,.0f} | {d['logits']['kl_t1']:.2e} | {d['logits']['kl_t4']:.2e} | "
                     f"{100 * d['logits']['top1_agreement']:.2f}% | {d['features/layer3']['rel_err']:.2e} | "
                     f"{d['features/layer3']['cosine']:.6f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-readme", action="store_true")
    a = ap.parse_args()
    publish(lambda: table(run()), a.write_readme, START, END)


if __name__ == "__main__":
    one_line_errors(main)
