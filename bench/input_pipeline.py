"""Input-pipeline throughput: images per second per CPU core of the training pipelines.

Writes synthetic full-size datasets in the real layouts to a temporary folder (ADE20K-like 683x512 / 512x683
JPEGs with 150-class block labels; NYUv2 480x640 JPEGs with uint16 depth), builds them with our TFDS builders,
and times the real training pipelines (reference augmentations: ADE 512x512 crops, NYU 480x480 crops).

    python -m bench.input_pipeline [--images 48] [--batches 12] [--batch-size 8]

"img/s/core" is images per CPU-second consumed by the whole process (all tf.data threads), so it does not
depend on how many cores the machine lends the run; "img/s" is wall-clock throughput on this machine.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from bench import machine
from vpd_jax.data import pipelines
from vpd_jax.data.config import data_config


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency colour plus noise: JPEG sizes and decode costs close to photos, unlike pure noise."""
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
    return np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


def write_ade_like(root: str, count: int, rng: np.random.Generator) -> None:
    for split, n in (("training", count), ("validation", 2)):
        for i in range(n):
            h, w = (512, 683) if i % 2 == 0 else (683, 512)
            blocks = rng.integers(0, 151, (h // 64 + 1, w // 64 + 1), dtype=np.uint8)
            label = np.kron(blocks, np.ones((64, 64), np.uint8))[:h, :w]
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            for folder, array, ext in (("images", _smooth_image(rng, h, w), "jpg"), ("annotations", label, "png")):
                os.makedirs(f"{root}/ADEChallengeData2016/{folder}/{split}", exist_ok=True)
                Image.fromarray(array).save(f"{root}/ADEChallengeData2016/{folder}/{split}/{stem}.{ext}", quality=90)


def write_nyu_like(root: str, count: int, rng: np.random.Generator) -> None:
    for folder, list_name, n in (("sync", "nyu_train_list.txt", count), ("official_splits/test", "nyu_test_list.txt", 2)):
        lines = []
        for i in range(n):
            scene = "kitchen_0001a" if folder == "sync" else "kitchen"
            os.makedirs(f"{root}/{folder}/{scene}", exist_ok=True)
            Image.fromarray(_smooth_image(rng, 480, 640)).save(f"{root}/{folder}/{scene}/rgb_{i:05d}.jpg", quality=90)
            depth = rng.integers(500, 9000, (480, 640)).astype(np.uint16)
            Image.fromarray(depth).save(f"{root}/{folder}/{scene}/sync_depth_{i:05d}.png")
            lines.append(f"/{scene}/rgb_{i:05d}.jpg /{scene}/sync_depth_{i:05d}.png")
        with open(f"{root}/{list_name}", "w") as f:
            f.write("\n".join(lines))


def measure(data, builder, batches: int, warmup: int = 2) -> dict:
    it = iter(pipelines.make_train_dataset(data, builder=builder, process_index=0, process_count=1))
    for _ in range(warmup):
        next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(it)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = batches * data.batch_size_per_host
    return {"shape": "x".join(map(str, batch["image"].shape[1:3])), "images": images, "wall": wall, "cpu": cpu,
            "img/s": images / wall, "img/s/core": images / cpu}


def run(spec: dict) -> dict:
    """spec: images (synthetic training images per dataset), batches (timed), batch_size. The JSON-able rows."""
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_ade_like(f"{tmp}/ade", spec["images"], rng)
        write_nyu_like(f"{tmp}/nyu", spec["images"], rng)
        for name, task, manual in (("ade20k", "seg", "ade"), ("nyu_depth_v2_bts", "depth", "nyu")):
            data = data_config(task, name, data_dir=f"{tmp}/tfds", manual_dir=f"{tmp}/{manual}",
                               batch_size_per_host=spec["batch_size"], shuffle_buffer=min(spec["images"], 64))
            builder = pipelines.prepare(data)
            rows.append(dict(pipeline=f"{task} train ({name})", **measure(data, builder, spec["batches"])))
    return dict(cores=len(machine.available_cpus()), batch_size=spec["batch_size"], rows=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="synthetic training images per dataset")
    parser.add_argument("--batches", type=int, default=12, help="timed batches (after 2 warm-up batches)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    result = run(dict(images=args.images, batches=args.batches, batch_size=args.batch_size))
    print(f"\ninput pipeline throughput ({result['cores']} CPU cores available, batch {args.batch_size})")
    header = f"{'pipeline':<32} {'crop':>8} {'images':>7} {'wall s':>7} {'img/s':>7} {'CPU s':>7} {'img/s/core':>11}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(f"{r['pipeline']:<32} {r['shape']:>8} {r['images']:>7} {r['wall']:>7.2f} {r['img/s']:>7.1f} "
              f"{r['cpu']:>7.2f} {r['img/s/core']:>11.1f}")


if __name__ == "__main__":
    main()
