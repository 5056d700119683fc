"""Evaluate a run's checkpoint: python eval.py --workdir=DIR [--step=N] [--config.x=v]

Reads DIR/checkpoints (or --config.resume=<checkpoint dir>) with the config the run was started with
(DIR/config.json; or --config=configs/<file>.py[:arg] to give one) and writes DIR/eval_<step>.json (an earlier,
different result of that step is kept as eval_<step>.<n>.json). Only the evaluation split is read. Multi-host
flags as in train.py.
"""
from absl import app, flags
from ml_collections import config_flags

from vpd_jax.run import launch  # defines the multi-host flags; imports no JAX

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]); default: the run's config.json.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run directory (its checkpoints/ are evaluated).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if launch.printed_config(flags.FLAGS.config):
        return
    launch.initialize_distributed()
    from vpd_jax.run import evaluation, logs

    logs.check_workdir(flags.FLAGS.workdir)  # it receives eval_<step>.json: fail now, not after the evaluation
    evaluation.evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.step)


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags_with_run_config)
