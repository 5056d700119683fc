"""vpd_jax/run/logs.py: the console progress line."""
import time

from vpd_jax.run import logs


def test_the_progress_line_has_loss_lr_and_an_eta_without_the_compilation(caplog):
    caplog.set_level("INFO")
    progress = logs.Progress(first_step=0, total_steps=10, examples_per_step=8)
    started = time.perf_counter() - 100.0  # a first step that took 100 s to compile
    progress.compiled(1, started)
    assert "compiled and run once in 0h01m40s" in caplog.text
    progress._last_time -= 2.0  # two steps of 1 s each since then
    progress.start -= 2.0
    rates = progress.update(3, loss=0.25, lr=1e-4)
    line = caplog.records[-1].getMessage()
    assert "step 3/10  loss 0.2500  lr 0.0001" in line
    assert abs(rates["step_time"] - 1.0) < 0.05
    eta = line.split("ETA ")[1]
    assert eta in ("0h00m06s", "0h00m07s")  # 7 steps left at 1 s, not at the 34 s a step the compile would say
