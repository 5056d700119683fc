"""The 'ldznet' task and configs/ldznet_phrasecut.py: config values
(docs/reference.md, "LD-ZNet optimiser and learning rate"), the frozen SD branch (no gradient, no optimizer state), SD
initialisation through the trainer's hook, deterministic evaluation keys, and a short training on vpd_shapes phrases
that beats the untrained model."""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from tests.models.ldznet_reference import TINY_TEXT, TINY_UNET, TINY_VAE, host_init
from vpd_jax.data import shapes
from vpd_jax.models.ldznet import is_new_parameter
from vpd_jax.models.presets import Architecture, architecture
from vpd_jax.models.tokenizer import WordHashTokenizer
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.run import optim
from vpd_jax.tasks import registry
from vpd_jax.tasks.ldznet import LDZNetTask
from vpd_jax.tasks.phrase import example_keys

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                      "ldznet_phrasecut.py")
TINY = Architecture(TINY_UNET, TINY_VAE, TINY_TEXT)
SIZE, TOKENS = 64, 8


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("ldznet_phrasecut_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(**model):
    config = get_config("smoke")
    config.model.pool_image_size = SIZE
    config.model.update(model)
    return config


def abstract_variables(task, batch_size: int = 2) -> dict:
    batch = {"image": jax.ShapeDtypeStruct((batch_size, SIZE, SIZE, 3), jnp.float32),
             "tokens": jax.ShapeDtypeStruct((batch_size, TOKENS), jnp.int32)}
    return nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch, task.constants))


# ----------------------------------------------------------------------------------------------- configs


def test_reference_config():
    """lr = 5e-7 x global batch (following --config.batch_size), AdamW wd 0.01 (0.9, 0.999, 1e-8), EMA 0.9999
    without warm-up, SD v1 timesteps 300..499, 384 px, 0.18215, sampled latent (docs/reference.md,
    "LD-ZNet at a glance", "LD-ZNet optimiser and learning rate", "LD-ZNet EMA"; docs/fidelity.md)."""
    config = get_config()
    assert config.task == "ldznet" and config.data.task == "phrasecut" and config.data.name == "phrasecut"
    assert config.batch_size == 32 and config.optim.lr == pytest.approx(32 * 5e-7)
    config.batch_size = 64
    assert config.optim.lr == pytest.approx(64 * 5e-7)
    o = config.optim
    assert (o.weight_decay, o.b1, o.b2, o.eps, o.param_groups, o.ema_decay, o.ema_warmup) == (
        0.01, 0.9, 0.999, 1e-8, "ldznet", 0.9999, False)
    assert o.schedule.name == "constant" and o.clip_grad_norm == 0
    m = config.model
    assert (m.inject, tuple(m.sd_timesteps), m.sd_timestep_mode, m.latent_scale, m.sample_latent) == (
        True, (300, 500), "uniform", 0.18215, True)
    assert m.pool_image_size == config.data.aug.size == 384 and config.data.text_max_length == 77
    assert config.eval_batch_size == 32 and config.data.eval_split == "test"


def test_inject_false_gives_znet_and_the_task_is_registered():
    config = tiny_config(inject=False)
    task = registry.make_task(config, TINY)
    assert isinstance(task, LDZNetTask) and registry.TASKS["ldznet"] is LDZNetTask
    assert sorted(abstract_variables(task)["params"]) == ["head", "text_encoder", "vae", "znet"]
    assert isinstance(task.tokenizer, WordHashTokenizer)


# ------------------------------------------------------------------------------------------- frozen branch


def test_frozen_branch_has_no_optimizer_state():
    """VAE, CLIP and the SD feature UNet are frozen: not in the trainable tree, no Adam moments, no EMA
    (docs/reference.md, "LD-ZNet optimiser and learning rate")."""
    task = registry.make_task(get_config("smoke"), architecture("tiny"))
    params = abstract_variables(task)["params"]
    tx, info = optim.make_optimizer(task.config.optim, params, 10)
    trainable, frozen = info.split(params)
    assert sorted(trainable) == ["head", "znet"] and sorted(frozen) == ["sd_unet", "text_encoder", "vae"]
    opt_state = jax.eval_shape(tx.init, trainable)
    n_trainable = len(jax.tree.leaves(trainable))
    per_parameter = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.shape != ()]  # not the step counters
    assert len(per_parameter) == 3 * n_trainable  # Adam mu and nu, and the EMA, of each trainable leaf only
    paths = {tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(opt_state)}
    assert not any(name in path for path in paths for name in ("sd_unet", "vae", "text_encoder"))


@pytest.fixture(scope="module")
def tiny_task():
    """The task on the two-level test architecture with host-random weights and a batch of two examples."""
    task = registry.make_task(tiny_config(), TINY)
    params = host_init(abstract_variables(task)["params"], seed=2)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32),
             "tokens": rng.integers(0, 63, (2, TOKENS)).astype(np.int32),
             "mask": (rng.uniform(size=(2, SIZE, SIZE, 1)) > 0.5).astype(np.float32),
             "image_id": np.array([11, 12]), "valid": np.array([True, True])}
    return task, params, batch


def test_frozen_sd_branch_gets_no_gradient(tiny_task):
    """stop_gradient on the taps (docs/reference.md, "Frozen SD branch"): the loss gradient is exactly zero for the
    SD UNet, VAE and CLIP, and non-zero for ZNet, its attention pools and attn3, and the head."""
    task, params, batch = tiny_task

    @jax.jit
    def grads(params):
        def loss(p):
            output, _ = task.apply({"params": p}, batch, {}, train=True, rng=jax.random.key(0))
            return task.loss(output, batch)
        return jax.grad(loss)(params)

    flat = flatten_dict(grads(params))
    norms = {}
    for path, g in flat.items():
        key = path[0] if path[0] != "znet" or not is_new_parameter(path) else "znet_injection"
        norms[key] = norms.get(key, 0.0) + float(jnp.sum(jnp.square(g)))
    assert norms["sd_unet"] == norms["vae"] == norms["text_encoder"] == 0.0
    assert norms["znet"] > 0 and norms["znet_injection"] > 0 and norms["head"] > 0


def test_pretrained_hook_fits_the_trainer(tiny_task):
    """run.start.pretrained_state's contract: every loaded path is a model path of the same shape, and the model paths
    the SD weights do not provide are exactly the ones the hook says keep their initialisation."""
    task, params, _ = tiny_task
    sd = UNet2DConditionModel(TINY_UNET)
    unet = host_init(jax.eval_shape(sd.init, jax.random.key(0), *sd.dummy_inputs())["params"])
    loaded, keeps_init = task.pretrained_params(unet, host_init(params["vae"]), host_init(params["text_encoder"]))
    loaded, model = flatten_dict(loaded), flatten_dict(params)
    assert not loaded.keys() - model.keys()
    assert all(loaded[p].shape == model[p].shape for p in loaded)
    missing = {p for p in model if p not in loaded}
    assert missing and all(keeps_init(p) for p in missing)
    assert not any(keeps_init(p) for p in loaded)


# ------------------------------------------------------------------------------------------------- evaluation


def test_eval_keys_follow_the_example_not_its_position():
    batch = {"image": np.zeros((3, 8, 8, 3)), "image_id": np.array([5, 6, 7])}
    keys = example_keys(0, batch)
    reordered = example_keys(0, {"image": batch["image"], "image_id": batch["image_id"][::-1]})
    np.testing.assert_array_equal(jax.random.key_data(reordered[::-1]), jax.random.key_data(keys))
    assert not np.array_equal(jax.random.key_data(example_keys(1, batch)), jax.random.key_data(keys))
    no_ids = example_keys(0, {"image": batch["image"]})
    assert len({tuple(np.ravel(k)) for k in jax.random.key_data(no_ids)}) == 3


def test_eval_statistics_are_deterministic_phrasecut_counts(tiny_task):
    task, params, batch = tiny_task
    step = jax.jit(lambda p, b: task.eval_statistics({"params": p}, b, {}))
    counts, valid = step(params, batch)
    assert counts.shape == (2, 49, 4) and valid.tolist() == [True, True]
    np.testing.assert_array_equal(step(params, batch)[0], counts)
    assert (np.asarray(counts).sum(-1) == SIZE * SIZE).all()
    metric = task.new_metric()
    metric.update(jax.device_get((counts, valid)))
    assert set(metric.result()) == {"mIoU@0.3", "IoU_FG@0.3", "IoU_FG@0.5", "AP"}


# --------------------------------------------------------------------------------------------- smoke training


def _phrase_examples(split: str, count: int, tokenizer) -> dict[str, np.ndarray]:
    config = shapes.ShapesConfig(height=SIZE, width=SIZE)
    images, masks, texts, ids = [], [], [], []
    for image_id, scene in shapes.iter_scenes(seed=0, split=split, count=count, config=config):
        for phrase, mask in scene.phrases:
            images.append(scene.image.astype(np.float32) / 127.5 - 1.0)
            masks.append(mask[..., None].astype(np.float32))
            texts.append(phrase)
            ids.append(image_id)
    return {"image": np.stack(images), "mask": np.stack(masks), "tokens": tokenizer(texts, TOKENS),
            "image_id": np.asarray(ids), "valid": np.ones(len(ids), bool)}


@pytest.mark.slow
def test_short_training_on_shapes_phrases_beats_the_untrained_model():
    """A few hundred steps of the task's own initialisation (the smoke config's 'upsample' head), train loss,
    optimizer preset (AdamW + EMA with warm-up, as the smoke config) and evaluation (EMA parameters, PhraseCut
    metrics) on vpd_shapes phrases: the masks follow the phrases."""
    config = tiny_config()
    assert config.model.head_init == "upsample"
    # A vocabulary in which the hash tokenizer gives every word of the shapes phrases its own id (with TINY's 64,
    # 'floor', 'wall' and 'cone' share one and the phrases cannot be told apart).
    arch = dataclasses.replace(TINY, text=dataclasses.replace(TINY_TEXT, vocab_size=1024, eos_token_id=1023))
    task = registry.make_task(config, arch)
    train = _phrase_examples("train", 24, task.tokenizer)
    test = _phrase_examples("validation", 8, task.tokenizer)
    scenes = shapes.iter_scenes(seed=0, split="train", count=24, config=shapes.ShapesConfig(height=SIZE, width=SIZE))
    words = sorted({word for _, scene in scenes for phrase, _ in scene.phrases for word in phrase.split()})
    word_ids = task.tokenizer(words, 3)[:, 1]
    assert len(set(word_ids)) == len(words), dict(zip(words, word_ids))
    init_batch = {"image": jnp.zeros((2, SIZE, SIZE, 3)), "tokens": jnp.zeros((2, TOKENS), jnp.int32)}
    params = nn.meta.unbox(jax.jit(task.init_variables)(jax.random.key(0), init_batch, task.constants))["params"]
    tx, info = optim.make_optimizer(config.optim, params, 300)
    trainable, frozen = info.split(params)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, batch, rng):
        def loss(t):
            output, _ = task.apply({"params": info.merge(t, frozen)}, batch, {}, train=True, rng=rng)
            return task.loss(output, batch)
        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    evaluate = jax.jit(lambda t, b: task.eval_statistics({"params": info.merge(t, frozen)}, b, {}))

    def scores(trainable):
        metric = task.new_metric()
        for start in range(0, len(test["image"]), 16):
            batch = {k: v[start:start + 16] for k, v in test.items()}
            metric.update(jax.device_get(evaluate(trainable, batch)))
        return metric.result()

    before = scores(trainable)
    rng = np.random.default_rng(0)
    losses = []
    for i in range(300):
        pick = rng.choice(len(train["image"]), 8, replace=False)
        batch = {k: train[k][pick] for k in ("image", "mask", "tokens")}
        trainable, opt_state, value = step(trainable, opt_state, batch, jax.random.key(i))
        losses.append(float(value))
    after = scores(optim.ema_params(opt_state))
    assert np.mean(losses[-20:]) < 0.75 * np.mean(losses[:20]), losses[::20]  # BCE starts near ln 2
    assert after["mIoU@0.3"] > before["mIoU@0.3"] + 0.1, (before, after)
    assert after["IoU_FG@0.5"] > before["IoU_FG@0.5"] + 0.1, (before, after)
    assert after["AP"] > before["AP"] + 0.3, (before, after)


# ------------------------------------------------------------------------------------ config.init -> the state

# diffusers configs with the shapes of TINY (tests/models/ldznet_reference.py).
TINY_DIFFUSERS_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                           cross_attention_dim=16, norm_num_groups=8,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_DIFFUSERS_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_DIFFUSERS_CLIP = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=12, hidden_act="quick_gelu",
                           bos_token_id=62, eos_token_id=63, pad_token_id=63)


def test_config_init_loads_sd_weights_into_the_state(tmp_path):
    """--config.init=<SD pipeline root> with arch 'init': the trainer's pretrained loading (through the task's
    hook) fills ZNet with the SD UNet (conv_out sliced to channel 0), the frozen branch with the same UNet, the
    VAE and CLIP from the files; the head and the injection modules, and only they, keep their initialisation."""
    from safetensors.numpy import load_file

    from tests.reference_models import save_pipeline, save_tiny_clip, save_tiny_unet, save_tiny_vae
    from vpd_jax import parallel
    from vpd_jax.run.setup import resolve_architecture
    from vpd_jax.run.init_rng import init_key
    from vpd_jax.run.start import pretrained_state, read_pretrained
    from vpd_jax.run.trainer import build_trainer

    root = str(tmp_path / "sd")
    save_pipeline(root, unet=save_tiny_unet(f"{root}/unet", TINY_DIFFUSERS_UNET, seed=3),
                  vae=save_tiny_vae(f"{root}/vae", seed=4, **TINY_DIFFUSERS_VAE),
                  text_encoder=save_tiny_clip(f"{root}/text_encoder", seed=5, **TINY_DIFFUSERS_CLIP))
    config = tiny_config()
    config.init, config.model.arch = root, "init"
    config.data.text_max_length = TOKENS  # within the tiny CLIP's 12 positions
    arch = resolve_architecture(config)
    assert (arch.text, arch.vae) == (TINY.text, TINY.vae)  # CLIP's config too is read from the files
    assert arch.unet.block_out_channels == TINY.unet.block_out_channels
    task = registry.make_task(config, arch)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    trainer = build_trainer(config, task, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        state = jax.device_get(pretrained_state(trainer, init_key(config.seed, config.init_rng), root))
    params = flatten_dict(trainer.info.merge(state["params"], state["frozen"]))

    unet = load_file(f"{root}/unet/diffusion_pytorch_model.safetensors")
    conv_in = unet["conv_in.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(params[("znet", "conv_in", "kernel")], conv_in)
    np.testing.assert_array_equal(params[("sd_unet", "conv_in", "kernel")], conv_in)
    np.testing.assert_array_equal(params[("znet", "conv_out", "kernel")],
                                  unet["conv_out.weight"][0:1].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params[("znet", "conv_out", "bias")], unet["conv_out.bias"][0:1])
    vae = load_file(f"{root}/vae/diffusion_pytorch_model.safetensors")
    np.testing.assert_array_equal(params[("vae", "encoder", "conv_in", "bias")], vae["encoder.conv_in.bias"])
    clip = load_file(f"{root}/text_encoder/model.safetensors")
    embedding = [k for k in clip if k.endswith("token_embedding.weight")][0]
    ours = [p for p in params if p[0] == "text_encoder" and p[-2:] == ("token_embedding", "embedding")]
    assert len(ours) == 1 and np.array_equal(params[ours[0]], clip[embedding])
    kept = {p for p in params if is_new_parameter(p)}
    assert kept and set(read_pretrained(trainer, root)) == set(params) - kept  # the rest is drawn
    assert all(np.all(np.isfinite(params[p])) for p in kept)
