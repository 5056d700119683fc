"""VPD referring image segmentation on RefCOCO / RefCOCO+ / RefCOCOg (paper val oIoU: 73.46 / 63.93 / 63.12). The
original recipe and test protocol: docs/reference.md, "Referring model" to "Referring metrics".

Reference run: SD v1.5 with its CLIP text encoder (frozen), 512x512 squashed images, CLIP tokens L = 40
(RefCOCO, RefCOCO+) or 77 (RefCOCOg umd) of REFER's sentences, global batch 32 (8 GPUs x 4), 40 epochs over the
refs (each a fresh permutation of all of them, data.sample_order), AdamW 5e-5 (UNet effectively x1), wd 1e-2,
poly(0.9) per iteration; evaluation per sentence at 512x512.

  python train.py --config=configs/vpd_refer.py:refcoco --workdir=runs/refer_refcoco \\
      --config.init=/path/to/stable-diffusion-v1-5 --config.data.data_dir=/path/to/tfds \\
      --config.data.refer_sentences=/path/to/refcoco.json

  data.refer_sentences: the refcoco.json TFDS' ref_coco was built from; it holds REFER's own sentences (`sent`),
  which VPD feeds to CLIP. Without it the sentences are TFDS' text lower-cased with punctuation removed, which
  misses REFER's manual corrections (vpd_jax/data/refer_text.py, docs/fidelity.md).

  Arguments: 'refcoco' | 'refcoco+' | 'refcocog' (default refcoco); 'smoke' a tiny scratch run on vpd_shapes.
  The text encoder and tokenizer come from the `init` pipeline root unless config.model.text_encoder /
  config.model.tokenizer name other folders.
"""
from configs.common import check_arg, cpu_run, scratch_tiny
from vpd_jax.run.config import base_config

# TFDS ref_coco config, token length, training refs (REFER statistics; one sentence drawn per ref per epoch).
DATASETS = {
    "refcoco": ("ref_coco/refcoco_unc", 40, 42_404),
    "refcoco+": ("ref_coco/refcocoplus_unc", 40, 42_278),
    "refcocog": ("ref_coco/refcocog_umd", 77, 42_226),
}
ARGS = ("", *DATASETS, "smoke")  # every argument get_config accepts ('' = refcoco)


def get_config(arg=None):
    arg = check_arg(arg, ARGS) or "refcoco"
    if arg == "smoke":
        return smoke_config()
    name, length, refs = DATASETS[arg]
    c = base_config("refer", name)
    c.compute.matmul_precision = "highest"  # float32 matmuls as the references' fp32 GPU runs (README)
    c.data.text_max_length = length
    c.batch_size = 32
    c.eval_batch_size = 8
    c.steps_per_epoch = refs // c.batch_size  # drop_last
    c.total_steps = 40 * c.steps_per_epoch
    c.eval_every = c.ckpt_every = c.steps_per_epoch
    return c


def smoke_config():
    c = base_config("refer", "vpd_shapes/small")
    scratch_tiny(c)
    cpu_run(c, batch_size=4, eval_batch_size=8, total_steps=4, log_every=2, ckpt_every=2)
    return c
