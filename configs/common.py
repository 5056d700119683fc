"""What the config files share: the check of their argument, CPU-sized runs of the tiny architecture, and the tiny
heads and test protocols of the vpd_shapes runs (the smoke variants and the demo)."""
from vpd_jax.tasks.registry import task_class


def check_arg(arg, args: tuple[str, ...]) -> str:
    """The config argument ('' for none), or an error listing the ones the file accepts."""
    arg = arg or ""
    if arg not in args:
        raise ValueError(f"unknown config argument {arg!r}; use one of {args}")
    return arg


def scratch_tiny(c) -> None:
    """The tiny SD-shaped architecture from random initialisation, with no file to read: random class embeddings
    where the task has them, the hash tokenizer where it has text."""
    c.model.arch = "tiny"
    if task_class(c.task).uses_text_encoder():
        c.model.tokenizer = "hash"
    elif "class_embeddings" in c.model:
        c.model.class_embeddings = "random"


def cpu_run(c, *, batch_size: int, eval_batch_size: int, total_steps: int, log_every: int, ckpt_every: int,
            eval_max_batches: int = 2) -> None:
    """Batch sizes, length, log / checkpoint intervals and a short evaluation: a run a CPU finishes in minutes. Its
    parameters start from the 'hash' generator, whose initialiser compiles in seconds (vpd_jax/run/init_rng.py)."""
    c.init_rng = "hash"
    c.batch_size = batch_size
    c.eval_batch_size = eval_batch_size
    c.total_steps = total_steps
    c.log_every = log_every
    c.ckpt_every = ckpt_every
    c.eval_max_batches = eval_max_batches
    c.eval_panels = 0  # no pictures: one program less to compile for a run of a few minutes


def shapes_seg(c) -> None:
    """Segmentation of vpd_shapes: its 6 classes (wall, floor, sphere, cube, cylinder, cone after reduce_zero_label),
    a small FPN, slide windows of the 64 px images."""
    c.model.num_classes = 6
    c.model.fpn_channels = 32
    c.eval.seg_crop = (64, 64)
    c.eval.seg_stride = (43, 43)


def shapes_depth(c) -> None:
    """Depth of vpd_shapes: a small head; one 64 px window covers an image; no Eigen crop (it is defined on 480x640
    only). Its rooms are NYU scene names: the 27 scene classes of the model stay."""
    c.model.depth_fusion_channels = 64
    c.model.depth_num_filters = (16, 16, 16)
    c.model.depth_decoder_channels = 16
    c.eval.depth_shift_size = 1
    c.eval.depth_crop = ""
