"""Train (and evaluate) a VPD task: python train.py --config=configs/<file>.py[:arg] --workdir=DIR [--config.x=v].

--print_config prints the resolved config (file, argument and overrides) and exits.
Multi-host: pass --multihost (jax.distributed.initialize() finds the cluster on TPU VMs / SLURM), or give
--coordinator_address, --num_processes and --process_id explicitly.
"""
from absl import app, flags
from ml_collections import config_flags

from vpd_jax.run import launch  # defines the multi-host flags; imports no JAX

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here; an existing one is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if launch.printed_config(flags.FLAGS.config):
        return
    launch.initialize_distributed()
    from vpd_jax.run import training

    training.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)
