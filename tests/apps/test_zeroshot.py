"""Zero-shot noise-difference maps (vpd_jax/apps/zeroshot.py; docs/reference.md, "Zero-shot noise-difference maps";
docs/fidelity.md): parity with a straightforward diffusers / transformers computation on a tiny saved SD pipeline,
the map's range, identical prompts, sizes, and the PhraseCut scoring."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.reference_models import (build_tiny_clip, build_tiny_unet, build_tiny_vae, max_rel_diff, save_pipeline,
                                    write_tiny_tokenizer)
from vpd_jax import metrics
from vpd_jax.apps import zeroshot
from vpd_jax.data import shapes

TOL = 1e-4
# A two-level SD-shaped UNet on the 2x tiny VAE: the working size is a multiple of 4.
TINY_UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                 cross_attention_dim=32, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIG = zeroshot.ZeroShotConfig(timesteps=(300, 500), num_draws=2, image_size=64)


def save_tiny_sd_pipeline(root: str, seed: int = 0) -> str:
    """A diffusers pipeline root with a tiny UNet, VAE, CLIP text encoder and CLIP BPE tokenizer that fit together
    (the text encoder's vocabulary and special ids are the tokenizer's)."""
    vocab = write_tiny_tokenizer(os.path.join(root, "vocab_probe"))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    text = build_tiny_clip(seed, vocab_size=len(vocab), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                           hidden_size=32)
    return save_pipeline(root, unet=build_tiny_unet(TINY_UNET, seed), vae=build_tiny_vae(seed), text_encoder=text,
                         tokenizer_pad_token="<|endoftext|>")


def odd_image(height: int = 75, width: int = 130, seed: int = 7) -> tuple[np.ndarray, list]:
    scene = shapes.render_scene(seed, shapes.ShapesConfig(height=height, width=width))
    return scene.image, list(scene.phrases)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="module")
def mapper(pipeline):
    return zeroshot.ZeroShotMapper.from_pretrained(pipeline, CONFIG)


def torch_reference(root: str, image: np.ndarray, phrase: str, null: str, timesteps, noise: np.ndarray,
                    out_size) -> tuple[np.ndarray, np.ndarray]:
    """The noise-difference map (docs/reference.md, "Zero-shot noise-difference maps"; our recipe: docs/fidelity.md)
    written out with the reference libraries: (latent map (h, w), map (H, W)). `image` is uint8 at the working size,
    `noise` (K, 1, h, w, 4) NHWC."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae")).eval()
    text = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    abar = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear").alphas_cumprod
    with torch.no_grad():
        x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        z0 = vae.encode(x).latent_dist.mean * 0.18215
        ids = tokenizer([null, phrase], padding="max_length", max_length=text.config.max_position_embeddings,
                        truncation=True, return_tensors="pt").input_ids
        context = text(ids).last_hidden_state
        maps = []
        for t in timesteps:
            for eps in noise:
                eps = torch.from_numpy(np.array(eps)).permute(0, 3, 1, 2)
                z_t = abar[t].sqrt() * z0 + (1 - abar[t]).sqrt() * eps
                out = unet(torch.cat([z_t, z_t]), torch.tensor([t, t]), context).sample
                d = (out[1] - out[0]).norm(dim=0)
                maps.append((d - d.min()) / (d.max() - d.min()))
        latent = torch.stack(maps).mean(0)
        up = F.interpolate(latent[None, None], size=out_size, mode="bilinear", align_corners=False)[0, 0]
        return latent.numpy(), ((up - up.min()) / (up.max() - up.min())).numpy()


def test_parity_with_diffusers_on_a_tiny_pipeline(pipeline, mapper):
    image, phrases = odd_image()
    phrase = phrases[0][0]
    working = mapper.prepare(image)
    h, w = zeroshot.working_size(75, 130, CONFIG, mapper.multiple)
    assert working.shape == (h, w, 3) == (48, 84, 3)  # aspect kept, area ~ 64^2, sides floored to multiples of 4
    noise = np.asarray(mapper.noise((1, h // 2, w // 2, 4)))
    ref_latent, ref_map = torch_reference(pipeline, ((working + 1) * 127.5).round().astype(np.uint8), phrase, "",
                                          CONFIG.timesteps, noise, (75, 130))
    latent = np.asarray(mapper.latent_map(image, phrase))[0]
    assert latent.shape == ref_latent.shape == (24, 42)
    assert max_rel_diff(latent, ref_latent) <= TOL
    ours = mapper(image, phrase)
    assert ours.shape == ref_map.shape == (75, 130) and ours.dtype == np.float32
    assert max_rel_diff(ours, ref_map) <= TOL
    # The map is not trivial: the phrase changes the prediction unevenly over the image.
    assert ours.std() > 0.05


def test_maps_span_zero_to_one_at_the_original_size(mapper):
    image, phrases = odd_image(61, 97, seed=3)
    for phrase, _ in phrases[:2]:
        m = mapper(image, phrase)
        assert m.shape == (61, 97)
        assert m.min() == 0.0 and m.max() == 1.0
    other = mapper(image, "a photo of the sky")
    assert np.abs(other - mapper(image, phrases[0][0])).max() > 0.05  # the map depends on the phrase


def test_identical_text_and_null_prompt_give_a_zero_map(pipeline):
    same = zeroshot.ZeroShotMapper.from_pretrained(
        pipeline, zeroshot.ZeroShotConfig(timesteps=(400,), num_draws=1, image_size=32, null_prompt="red cube"))
    image, _ = odd_image(40, 50)
    m = same(image, "red cube")
    assert m.shape == (40, 50) and np.all(m == 0.0)
    assert same(image, "blue sphere").max() == 1.0


def test_core_function_normalises_each_draw_and_averages():
    """noise_difference_maps with a stand-in UNet whose eps difference is known: the mean of per-draw min-max maps."""
    import jax.numpy as jnp

    class Linear:
        """eps = z_t * (1 + context mean): the text-vs-null difference is proportional to z_t."""

        def apply(self, variables, z, t, context):
            scale = 1 + context.mean(axis=(1, 2))[:, None, None, None]
            return type("Out", (), {"sample": z * scale})

    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
    noise = rng.standard_normal((3, 2, 5, 6, 4)).astype(np.float32)
    null, text = np.zeros((1, 3, 8), np.float32), np.ones((2, 3, 8), np.float32)
    maps = np.asarray(zeroshot.noise_difference_maps(Linear(), None, jnp.asarray(z0), null, text,
                                                     jnp.asarray([100, 900]), jnp.asarray(noise)))
    abar = zeroshot.NoiseSchedule().alphas_cumprod()
    expected = []
    for t in (100, 900):
        for k in range(3):
            d = np.linalg.norm(np.sqrt(abar[t]) * z0 + np.sqrt(1 - abar[t]) * noise[k], axis=-1)
            low, high = d.min(axis=(1, 2), keepdims=True), d.max(axis=(1, 2), keepdims=True)
            expected.append((d - low) / (high - low))
    np.testing.assert_allclose(maps, np.mean(expected, axis=0), rtol=1e-5, atol=1e-6)


def test_working_size_rules():
    config = zeroshot.ZeroShotConfig(image_size=512)
    # the rule of docs/reference.md, "LD-ZNet inference script", at 512 (384 gives 256x448)
    assert zeroshot.working_size(512, 768, config, 64) == (384, 576)
    assert zeroshot.working_size(768, 512, zeroshot.ZeroShotConfig(image_size=384), 64) == (448, 256)
    assert zeroshot.working_size(10, 4000, config, 64) == (64, 10240)  # area kept; never below one multiple
    assert zeroshot.working_size(75, 130, zeroshot.ZeroShotConfig(image_size=100, keep_aspect=False), 64) == (64, 64)
    with pytest.raises(ValueError, match="prompt_template"):
        zeroshot.ZeroShotConfig(prompt_template="no slot").check(1000)
    with pytest.raises(ValueError, match="timesteps"):
        zeroshot.ZeroShotConfig(timesteps=(1000,)).check(1000)


def test_score_equals_phrasecut_scores_of_the_maps():
    rng = np.random.default_rng(1)
    examples = []
    for i in range(4):
        mask = np.zeros((20 + i, 30), np.uint8)
        mask[3:10 + i, 5:20] = 1
        examples.append((rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8), f"thing {i}", mask))

    def fake_mapper(image, phrase):
        return image[..., 0].astype(np.float32) / 255.0

    maps = [fake_mapper(image, phrase) for image, phrase, _ in examples]
    expected = metrics.phrasecut_scores(maps, [m for _, _, m in examples])
    assert zeroshot.score(fake_mapper, examples) == pytest.approx(expected)
    assert zeroshot.score(fake_mapper, examples, max_examples=2) == pytest.approx(
        metrics.phrasecut_scores(maps[:2], [m for _, _, m in examples[:2]]))
    perfect = zeroshot.score(lambda image, phrase: examples[int(phrase.split()[-1])][2].astype(np.float32), examples)
    assert perfect["mIoU@0.3"] > 0.95 and perfect["IoU_FG@0.5"] > 0.95


def test_eval_examples_read_the_phrasecut_pipeline(tmp_path):
    from vpd_jax.data import pipelines
    from vpd_jax.data.config import data_config

    data = data_config("phrasecut", "vpd_shapes/small", data_dir=str(tmp_path), eval_batch_size_per_host=4,
                       aug=dict(size=32, fixed_template="{}"))
    pipelines.prepare(data)
    examples = list(zeroshot.eval_examples(data))
    image, phrase, mask = examples[0]
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3) and mask.shape == (32, 32)
    assert set(np.unique(mask)) <= {0.0, 1.0} and mask.sum() > 0
    assert "photo" not in phrase and phrase.split()[-1] in shapes.SHAPES + ("wall", "floor")
    result = zeroshot.score(lambda im, p: np.full(im.shape[:2], 0.5, np.float32), examples, max_examples=5)
    assert set(result) == {"mIoU@0.3", "IoU_FG@0.3", "IoU_FG@0.5", "AP"}
