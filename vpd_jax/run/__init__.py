"""Running a task: start-up (setup.py, start.py, launch.py), the sharded state and steps (trainer.py), the train and
eval loops (training.py, evaluation.py), checkpoints, the optimizer (optim.py, param_groups.py, schedules.py),
logs (logs.py) and the config's fields (config.py)."""
