"""Process start-up shared by train.py and eval.py (must run before any other JAX call)."""
from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging

flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection (TPU VMs, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process start).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process start).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process start).")
flags.DEFINE_bool("print_config", False, "Print the resolved config (the file, its argument and the overrides) and "
                  "exit without running.")


def printed_config(config) -> bool:
    """With --print_config: prints `config` and returns True (the caller exits)."""
    if not flags.FLAGS.print_config:
        return False
    print(config)
    return True


# The config file of a run directory (its config.json): eval.py and predict.py read it when given no --config.
WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workdir_config.py")


def with_run_config(argv: list[str]) -> list[str]:
    """`argv` with --config=<WORKDIR_CONFIG>:<W> added when it gives --workdir=W and no --config, so that a run's
    own config.json is used (and --config.x overrides still apply to it)."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        return argv
    workdir = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg == "--workdir" and i + 1 < len(argv):
            workdir = argv[i + 1]
    if not workdir:
        return argv
    return [argv[0], f"--config={WORKDIR_CONFIG}:{workdir}", *argv[1:]]


def parse_flags_with_run_config(argv: list[str]) -> list[str]:
    """`parse_flags` of `with_run_config(argv)`: eval.py's and predict.py's flag parser."""
    return parse_flags(with_run_config(argv))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for app.run(flags_parser=...), with a one-line error naming the override when a
    `--config.<key>=...` names no field of the config: ml_collections raises a bare KeyError / AttributeError
    from inside the --config flag's parser for it, which absl would show as a traceback ending in "'key'"."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as err:
        cause = err
        while isinstance(cause, AttributeError) and cause.args and isinstance(cause.args[0], KeyError):
            cause = cause.args[0]
        detail = str(cause.args[0] if cause.args else cause)
        key = detail.split("\n")[0].strip("'\"")
        overrides = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
        named = [o for o in overrides if key in o[len("--config."):].split(".")] or overrides
        suggestion = " ".join(detail.split("\n")[1:])
        message = (f"{' / '.join(named)}: the config has no field {key!r} (vpd_jax/run/config.py lists every "
                   f"field). {suggestion}")
        sys.stderr.write(f"FATAL Flags parsing error: {message.rstrip()}\n")
        sys.exit(1)


class _QuietLibraries:
    """Drops INFO lines logged by installed libraries (Orbax, TFDS write dozens per checkpoint / dataset);
    their warnings and errors, and all of this project's lines, stay."""

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname


def quiet_libraries() -> None:
    """Keep installed libraries' INFO lines off the console (their warnings and errors stay)."""
    logging.get_absl_handler().addFilter(_QuietLibraries())


def initialize_distributed() -> None:
    """jax.distributed.initialize() when the flags ask for several processes; TF kept off accelerators."""
    import jax

    quiet_libraries()
    f = flags.FLAGS
    explicit = [f.coordinator_address, f.num_processes, f.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")
        jax.distributed.initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                                   process_id=f.process_id)
    elif f.multihost:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local device(s), pid %d", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), os.getpid())
