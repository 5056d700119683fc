"""Predict with a trained run on image files of any size, or make zero-shot maps with a Stable Diffusion folder.

  python predict.py --workdir=runs/demo/seg --input=photo.jpg --output=out/
  python predict.py --workdir=runs/depth --input=folder/ --scene=kitchen --output=out/
  python predict.py --workdir=runs/refer --input=a.jpg --text="the man on the left" --output=out/
  python predict.py --workdir=runs/ldznet --input=a.jpg --text="black car" --output=out/
  python predict.py --zeroshot --sd=/path/to/stable-diffusion-v1-4 --input=a.jpg --text="black car" --output=out/

The run's own config (<workdir>/config.json) is used; --config=configs/<file>.py[:arg] gives another, and
--config.x=value overrides apply to either (e.g. --config.init for a run whose weights moved). Zero-shot maps need
no run:
--sd is a diffusers pipeline root (unet/, vae/, text_encoder/, tokenizer/). Outputs are written to --output (see
vpd_jax/apps/predict.py for the files of each task, vpd_jax/apps/zeroshot.py for the zero-shot defaults).
"""
from absl import app, flags
from ml_collections import config_flags

from vpd_jax.run import launch  # the flag parser that reads the run's config.json; imports no JAX

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]); default: the run's config.json.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run directory whose checkpoints/ hold the trained model.")
flags.DEFINE_list("input", None, "Image files and/or folders of images.")
flags.DEFINE_string("output", None, "Folder for the outputs.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("text", None, "refer: the referring expression; ldznet and --zeroshot: the phrase.")
flags.DEFINE_string("scene", None, "depth: the NYU scene class of the images (e.g. kitchen, bedroom, office).")
flags.DEFINE_string("classes", None, "seg: a file with one class name per line (for the legend).")
flags.DEFINE_float("threshold", 0.3, "ldznet: mask = sigmoid(logits) > threshold.")
flags.DEFINE_list("depth_range", None, "depth: the colour map's range in metres, e.g. 0,10 (default: each prediction's "
                  "own range).")
flags.DEFINE_bool("zeroshot", False, "Zero-shot text-vs-null noise-difference maps from --sd (no --config).")
flags.DEFINE_string("sd", None, "--zeroshot: a Stable Diffusion diffusers pipeline root.")
flags.DEFINE_list("zeroshot_timesteps", None, "--zeroshot: SD timesteps to average (default 300,400,500).")
flags.DEFINE_integer("zeroshot_draws", None, "--zeroshot: noise draws per timestep (default 4).")
flags.DEFINE_integer("zeroshot_size", None, "--zeroshot: working resolution, area ~ size^2 (default 512).")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if launch.printed_config(f.config if f.config is not None else "(--zeroshot: no run config)"):
        return
    if f.zeroshot and (f.config is not None or f.workdir):
        raise app.UsageError("--zeroshot uses --sd, not a trained run's --config / --workdir")
    if f.zeroshot and not (f.sd and f.text):
        raise app.UsageError("--zeroshot needs --sd (a Stable Diffusion folder) and --text")
    if not f.zeroshot and (f.config is None or not f.workdir):
        raise app.UsageError("--workdir is required (or --zeroshot with --sd)")
    if f.depth_range is not None and len(f.depth_range) != 2:
        raise app.UsageError(f"--depth_range takes two numbers, min,max in metres; got {','.join(f.depth_range)}")
    launch.quiet_libraries()
    from vpd_jax.apps import predict

    files = predict.list_images(f.input)
    if f.zeroshot:
        timesteps = tuple(int(t) for t in f.zeroshot_timesteps) if f.zeroshot_timesteps else None
        mapper = predict.zeroshot_mapper(f.sd, timesteps=timesteps, num_draws=f.zeroshot_draws,
                                         image_size=f.zeroshot_size)
        written = predict.predict_zeroshot_files(mapper, files, f.output, f.text)
    else:
        predictor = predict.Predictor(f.config, f.workdir, f.step)
        depth_range = tuple(float(v) for v in f.depth_range) if f.depth_range else None
        written = predict.predict_files(predictor, files, f.output, text=f.text, scene=f.scene,
                                        names_file=f.classes, threshold=f.threshold, depth_range=depth_range)
    print(f"wrote {len(written)} files to {f.output}")


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags_with_run_config)
