"""VPD's frozen class-embedding buffers: the recipes that make them and a tool to compute them.

Recipes (docs/reference.md, "Class embeddings"): each row is the *pooled* CLIP text feature (final-LayerNorm state at
the EOS token, no projection, no L2 normalisation) of prompts built from the class name:
* ADE20K (150 classes, mmseg order = train label after reduce_zero_label): one template "a photo of a {}.",
  tokenised to 77 tokens.
* NYUv2 (27 scene types): underscores become spaces, the 80 OpenAI ImageNet templates, 20 tokens, mean over the
  templates.
The released tensors are preferred over regenerated ones (a user could not regenerate NYU's bit-exactly), so
`vpd_jax.weights.class_embeddings` reads VPD's `.pth` files (safely, without torch) as well as our `.npy`.

    python -m vpd_jax.apps.class_embeddings --dataset nyu --text_encoder path/to/clip-vit-large-patch14 --output nyu.npy
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from vpd_jax.data.class_names import ADE20K_CLASSES, NYU_SCENE_CLASSES

# The 80 prompt templates of OpenAI CLIP's ImageNet zero-shot notebook, in their order.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one dataset's class-embedding rows are made: row i = mean over templates of pooled CLIP(prompt)."""

    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    max_length: int
    underscores_to_spaces: bool = False

    def prompts(self, class_name: str) -> list[str]:
        name = class_name.replace("_", " ") if self.underscores_to_spaces else class_name
        return [template.format(name) for template in self.templates]


RECIPES: dict[str, Recipe] = {
    "ade20k": Recipe(ADE20K_CLASSES, ("a photo of a {}.",), max_length=77),
    "nyu": Recipe(NYU_SCENE_CLASSES, IMAGENET_TEMPLATES, max_length=20, underscores_to_spaces=True),
}


def embed_prompts(encode_pooled: Callable[[np.ndarray], np.ndarray], tokenizer, recipe: Recipe,
                  batch_size: int = 256) -> np.ndarray:
    """(num_classes, D) float32: per class, the mean over its prompts of `encode_pooled(token_ids)`."""
    prompts = [p for name in recipe.class_names for p in recipe.prompts(name)]
    ids = tokenizer(prompts, recipe.max_length)
    pooled = []
    for start in range(0, len(prompts), batch_size):
        chunk = ids[start:start + batch_size]
        pad = batch_size - len(chunk) if len(prompts) > batch_size else 0  # one compiled shape for every chunk
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        pooled.append(np.asarray(encode_pooled(padded), np.float32)[:len(chunk)])
    pooled = np.concatenate(pooled).reshape(len(recipe.class_names), len(recipe.templates), -1)
    return pooled.mean(axis=1, dtype=np.float32)


def compute_class_embeddings(dataset: str, text_encoder_path: str, tokenizer_path: str | None = None,
                             batch_size: int = 256) -> np.ndarray:
    """Class embeddings of `dataset` ('ade20k' or 'nyu') from a CLIP text encoder folder (HF or SD pipeline)."""
    from vpd_jax.weights import load_text_encoder, load_tokenizer  # heavy; only the tool needs them

    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(RECIPES)}")
    module, params = load_text_encoder(text_encoder_path)
    tokenizer = load_tokenizer(tokenizer_path or text_encoder_path)
    encode = jax.jit(lambda ids: module.apply({"params": params}, ids).pooled)
    return embed_prompts(encode, tokenizer, RECIPES[dataset], batch_size)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vpd_jax.apps.class_embeddings", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(RECIPES))
    parser.add_argument("--text_encoder", required=True, help="HF CLIP text model folder or SD pipeline root")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --text_encoder)")
    parser.add_argument("--output", required=True, help="where to write the (num_classes, D) float32 .npy")
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args(argv)
    if not args.output.endswith(".npy"):
        parser.error(f"--output must end in .npy, got {args.output!r}")
    embeddings = compute_class_embeddings(args.dataset, args.text_encoder, args.tokenizer, args.batch_size)
    np.save(args.output, embeddings)
    print(f"wrote {args.output}: {embeddings.shape} {embeddings.dtype}")


if __name__ == "__main__":
    main()
