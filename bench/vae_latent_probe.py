"""How much of a vpd_shapes room survives a random, untrained VAE encoder (the demo's question, configs/demo.py).

A small probe, an MLP on the 3x3 neighbourhood of each 8x8-pixel cell, learns the majority class of the cell from
(a) the tiny preset's VAE latents (posterior mean, random initialisation) and (b) the cell's own pixels, on the
first 2/3 of the rooms, and is scored on the rest: IoU per class over cells. The same probe and the same cells on
both inputs, so the gap is what the random encoder loses.

  python -m bench.vae_latent_probe [--rooms 300] [--size 64] [--steps 2000]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vpd_jax.data import shapes
from vpd_jax.models import presets
from vpd_jax.models.vae import AutoencoderKLEncoder

CELL = 8  # the VAE's downsampling factor
NAMES = shapes.SEMANTIC_CLASSES  # raw ids: 0 'other' (never drawn), then wall, floor, the four shapes


def neighbourhoods(grid: np.ndarray) -> np.ndarray:
    """(N, h, w, C) per-cell features -> (N h w, 9 C): each cell with its 8 neighbours (edges repeated)."""
    n, h, w, _ = grid.shape
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return np.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1).reshape(n * h * w, -1)


def probe_iou(features: np.ndarray, classes: np.ndarray, train: int, steps: int, seed: int = 0) -> np.ndarray:
    """IoU per raw class id 1.. of an MLP (one hidden layer of 128) trained with Adam on the first `train` cells."""
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    x = jnp.asarray((features - mean) / std, jnp.float32)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w1": jax.random.normal(k1, (x.shape[1], 128)) / np.sqrt(x.shape[1]), "b1": jnp.zeros(128),
              "w2": jax.random.normal(k2, (128, len(NAMES))) / np.sqrt(128), "b2": jnp.zeros(len(NAMES))}

    def logits(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x[:train]), classes[:train]).mean()

    tx = optax.adam(1e-3)

    @jax.jit
    def step(p, state):
        updates, state = tx.update(jax.grad(loss)(p), state)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    predicted, truth = np.asarray(logits(params, x[train:]).argmax(-1)), classes[train:]
    return np.array([((predicted == c) & (truth == c)).sum() / max(((predicted == c) | (truth == c)).sum(), 1)
                     for c in range(1, len(NAMES))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rooms", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="room images are size x size pixels")
    parser.add_argument("--steps", type=int, default=2000, help="probe training steps")
    args = parser.parse_args()

    config = shapes.ShapesConfig(height=args.size, width=args.size)
    rooms = [scene for _, scene in shapes.iter_scenes(0, "train", args.rooms, config)]
    images = np.stack([room.image for room in rooms]).astype(np.float32) / 127.5 - 1.0
    labels = np.stack([room.label for room in rooms]).astype(np.int64)
    cells = args.size // CELL
    per_cell = labels.reshape(args.rooms, cells, CELL, cells, CELL).transpose(0, 1, 3, 2, 4).reshape(-1, CELL * CELL)
    classes = np.stack([np.bincount(c, minlength=len(NAMES)) for c in per_cell]).argmax(-1)

    encoder = AutoencoderKLEncoder(presets.architecture("tiny").vae)
    variables = encoder.init(jax.random.key(0), jnp.asarray(images[:1]))
    latents = np.asarray(jax.jit(lambda v, x: encoder.apply(v, x).mean)(variables, jnp.asarray(images)))
    pixels = images.reshape(args.rooms, cells, CELL, cells, CELL, 3).transpose(0, 1, 3, 2, 4, 5)
    pixels = pixels.reshape(args.rooms, cells, cells, CELL * CELL * 3)

    train = len(classes) * 2 // 3
    print(f"{args.rooms} rooms of {args.size} px, {len(classes)} cells of {CELL}x{CELL} px (probe trained on "
          f"{train}); IoU per class of each cell's majority label")
    print(f"{'input':28s}" + "".join(f"{name:>9s}" for name in NAMES[1:]))
    for name, grid in ((f"random VAE latents {latents.shape[-1]} ch", latents), ("pixels", pixels)):
        iou = probe_iou(neighbourhoods(grid), classes, train, args.steps)
        print(f"{name:28s}" + "".join(f"{v:9.3f}" for v in iou))


if __name__ == "__main__":
    main()
