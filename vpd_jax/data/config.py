"""The `config.data` section: which dataset, how it is split, batched and augmented.

`data_config(task, name)` returns a ConfigDict with every field, so command-line overrides are type checked
(`--config.data.batch_size_per_host=4`, `--config.data.aug.crop_size="(256, 256)"`). `aug` mirrors the task's
frozen transform config dataclass field by field (nested dataclasses become nested sections);
`transform_config(data)` turns it back into that dataclass, rejecting unknown fields by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

# The input pipelines (`data.task`); each task of vpd_jax.tasks names the one its batches come from.
PIPELINES = ("seg", "depth", "refer", "phrasecut")

# Dataset-specific defaults. vpd_shapes images are small, so its transforms work at matching sizes
# (crops and resizes scaled down from the references' 512 / 480 / 384).
_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("seg", "ade20k"): dict(split="train", eval_split="validation", batch_size_per_host=16),
    ("depth", "nyu_depth_v2_bts"): dict(split="train", eval_split="test", batch_size_per_host=24),
    ("depth", "nyu_depth_v2"): dict(split="train", eval_split="validation", batch_size_per_host=24),
    ("refer", "ref_coco"): dict(split="train", eval_split="validation", batch_size_per_host=32, text_max_length=40),
    ("phrasecut", "phrasecut"): dict(split="train", eval_split="test", batch_size_per_host=4,
                                     eval_batch_size_per_host=32, text_max_length=77),
    # vpd_shapes keeps the shuffle buffer it was tuned with: the demo's numbers stay those of its README.
    ("seg", "vpd_shapes"): dict(aug=dict(img_scale=(256, 64), crop_size=(64, 64)), seg_eval_pad_multiple=64,
                                sample_order="shuffle_buffer"),
    ("depth", "vpd_shapes"): dict(aug=dict(crop_size=(64, 64)), sample_order="shuffle_buffer"),
    ("refer", "vpd_shapes"): dict(aug=dict(size=64), text_max_length=16, sample_order="shuffle_buffer"),
    ("phrasecut", "vpd_shapes"): dict(aug=dict(size=64), text_max_length=16, sample_order="shuffle_buffer"),
}


def family(name: str) -> str:
    """The dataset family of a TFDS name: 'ref_coco/refcocog_umd' -> 'ref_coco'."""
    return name.split("/")[0].split(":")[0]


def data_config(task: str, name: str, **overrides) -> ml_collections.ConfigDict:
    """All fields of a data section for the pipeline `task` on the TFDS dataset `name`, with its defaults.

    Fields:
      task, name            the pipeline (one of PIPELINES) and TFDS name (with builder config, e.g. 'vpd_shapes/small')
      data_dir              TFDS data_dir (None: TFDS' default)
      manual_dir            where the downloaded files are, for `prepare`
      on_bad_input          'raise' or 'skip' (our builders; see builders/common.py)
      split, eval_split     TFDS split names (per-host subsplits are taken automatically)
      batch_size_per_host, eval_batch_size_per_host
      sample_order          'permutation' (every epoch a fresh permutation of all the host's elements, held
                            encoded in memory; the references' order) or 'shuffle_buffer' (sample_order.py)
      shuffle_buffer        elements (after flattening refs/phrases), for sample_order 'shuffle_buffer'
      seed                  shuffling, per-element augmentation seeds, eval prompts
      num_parallel_calls    of the transform map; -1 = AUTOTUNE
      prefetch              batches
      text_max_length       token length (refer: 40 RefCOCO/+, 77 RefCOCOg; phrasecut: 77)
      refer_text            'sent' (REFER's sentences, as VPD feeds CLIP) or 'raw' (TFDS' text); refer_text.py
      refer_sentences       for 'sent': the refcoco.json TFDS' ref_coco was built from, which holds REFER's
                            `sent` of every sentence (exact); unset: REFER's normalisation applied to `raw`
      scene_class_fallback  depth on TFDS nyu_depth_v2 (no scene names): the class id to use; None = error
      seg_eval_pad_multiple segmentation eval: padded sizes are multiples of this (pipelines.py explains)
      aug                   the task's transform config (transforms.py)
    """
    if task not in PIPELINES:
        raise ValueError(f"unknown data pipeline {task!r}; pipelines are {PIPELINES}")
    defaults = dict(_DEFAULTS.get((task, family(name)), {}))
    if name.startswith("ref_coco/refcocog"):
        defaults["text_max_length"] = 77  # RefCOCOg sentences are longer: VPD's 77 tokens, not 40
    cfg = ml_collections.ConfigDict({
        "task": task,
        "name": name,
        # Placeholders: None by default, but typed, so that --config.data.data_dir=... can set them.
        "data_dir": ml_collections.config_dict.placeholder(str),
        "manual_dir": ml_collections.config_dict.placeholder(str),
        "on_bad_input": "raise",
        "split": "train",
        "eval_split": "validation",
        "batch_size_per_host": 8,
        "eval_batch_size_per_host": 8,
        "sample_order": "permutation",
        "shuffle_buffer": 1000,
        "seed": 0,
        "num_parallel_calls": -1,
        "prefetch": 2,
        "text_max_length": 77,
        "refer_text": "sent",
        "refer_sentences": ml_collections.config_dict.placeholder(str),
        "scene_class_fallback": ml_collections.config_dict.placeholder(int),
        "seg_eval_pad_multiple": 256,
        "aug": _to_config_dict(transform_config_class(task)()),
    })
    cfg.update({k: v for k, v in defaults.items() if k != "aug"})
    cfg.aug.update(defaults.get("aug", {}))
    cfg.lock()  # a misspelt field is an error, here and in --config.data.* overrides
    cfg.update_from_flattened_dict(_flatten(overrides))
    return cfg


def transform_config_class(task: str):
    from vpd_jax.data import transforms  # late: transforms imports TensorFlow

    return {"seg": transforms.SegAugConfig, "depth": transforms.DepthAugConfig, "refer": transforms.ReferConfig,
            "phrasecut": transforms.PhraseCutConfig}[task]


def transform_config(data: ml_collections.ConfigDict):
    """The frozen transform config dataclass for `data.task`, built from `data.aug`."""
    return _from_mapping(transform_config_class(data.task), data.aug.to_dict(), "data.aug")


def _to_config_dict(instance) -> ml_collections.ConfigDict:
    out = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        out[field.name] = _to_config_dict(value).to_dict() if dataclasses.is_dataclass(value) else value
    # Optional fields whose default is None would lock to NoneType otherwise; ConfigDict accepts any type for None.
    return ml_collections.ConfigDict(out)


def _from_mapping(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            value = _from_mapping(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
