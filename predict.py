"""Predict with a trained run on image files of any size.

  python predict.py --config=configs/vpd_seg_ade20k.py:smoke --workdir=runs/x --input=photo.jpg --output=out/
  python predict.py --config=configs/vpd_depth_nyu.py --workdir=runs/depth --input=folder/ --scene=kitchen ...
  python predict.py --config=configs/vpd_refer.py --workdir=runs/refer --input=a.jpg --text="the man on the left"

The config must be the run's (the same file, argument and overrides as for train.py). Outputs are written to
--output (see vpd_jax/predict_lib.py for the files of each task).
"""
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "The run's config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "The run directory whose checkpoints/ hold the trained model.")
flags.DEFINE_list("input", None, "Image files and/or folders of images.")
flags.DEFINE_string("output", None, "Folder for the outputs.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("text", None, "refer: the referring expression.")
flags.DEFINE_string("scene", None, "depth: the NYU scene class of the images (e.g. kitchen, bedroom, office).")
flags.DEFINE_string("classes", None, "seg: a file with one class name per line (for the legend).")
flags.mark_flags_as_required(["config", "workdir", "input", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from vpd_jax import predict_lib

    f = flags.FLAGS
    files = predict_lib.list_images(f.input)
    predictor = predict_lib.Predictor(f.config, f.workdir, f.step)
    written = predict_lib.predict_files(predictor, files, f.output, text=f.text, scene=f.scene, names_file=f.classes)
    print(f"wrote {len(written)} files to {f.output}")


if __name__ == "__main__":
    app.run(main)
