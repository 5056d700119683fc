"""Every command of the README runs as written on a fresh clone, as far as it can without the data and weights it
names: each `python ...` command is run verbatim, plus `--print_config` (the entry points then resolve the config
file, its argument and every override, and stop) or `--help` (the argparse tools); `make` targets must exist.
Paths under /path/... and inputs such as photo.jpg are the reader's: the commands are checked up to the point
where they would read them. Commands on a run directory without --config (runs/demo/<task>, runs/refer) get one holding a config.json
(what `make demo` or training leaves there)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_configs import get_config

REPO = Path(__file__).resolve().parents[1]
# The argparse tools: --help checks the module and its entry point (they take no config).
ARGPARSE_TOOLS = ("vpd_jax.data.prepare", "vpd_jax.apps.class_embeddings", "bench.run", "bench.attention_kernels",
                  "bench.vae_latent_probe", "bench.matmul_precision", "bench.op_profile",
                  "bench.init_compile")


def readme_commands() -> list[str]:
    """The shell commands of the README's sh blocks and its inline `python ...` / `make ...` spans."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    commands += [c for c in re.findall(r"`((?:python|make) [^`]+)`", text)]
    return list(dict.fromkeys(" ".join(c.split()) for c in commands))


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    assert "make demo" in COMMANDS and "make test" in COMMANDS
    assert sum(c.startswith("python train.py") for c in COMMANDS) >= 1
    assert sum(c.startswith("python predict.py") for c in COMMANDS) >= 3


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """runs/demo/{seg,depth} as `make demo` leaves them, as far as the commands need: their config.json."""
    root = tmp_path_factory.mktemp("repo")
    for run, file, arg in (("demo/seg", "demo.py", "seg"), ("demo/depth", "demo.py", "depth"),
                           ("refer", "vpd_refer.py", "smoke")):  # runs/refer: a run the reader trained
        folder = root / "runs" / run
        folder.mkdir(parents=True)
        config = get_config(file, arg)
        config.data.data_dir = str(root / "runs" / "demo" / "tfds")
        (folder / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    return root


def _checked(command: str, runs: Path) -> list[str]:
    """The command as argv from the repository root (its run directories under `runs`), with the flag that stops
    it before any data or weights: --help for the argparse tools, --print_config for the config-taking ones."""
    argv = [a.replace("runs/", f"{runs}/") if "runs/" in a else a for a in shlex.split(command)]
    argv[0] = sys.executable
    module = argv[2] if argv[1:2] == ["-m"] else ""
    if module in ARGPARSE_TOOLS:
        return argv + ["--help"]
    if module and len(argv) == 3:  # the module named in the text, without its flags: it must exist
        return argv + ["--helpshort"]
    return argv + ["--print_config"]


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python ") and "..." not in c])
def test_each_python_command_resolves(command, demo_runs):
    """Run from the repository root, its runs/ directories those of `demo_runs` (as after `make demo`)."""
    done = subprocess.run(_checked(command, demo_runs / "runs"), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    # absl's --helpshort exits 1 after listing the module's own flags under its file name: the module imported.
    listed = command.split()[2].replace(".", "/") + ".py:" if "--helpshort" in done.args else None
    ok = done.returncode == 0 or (listed is not None and listed in done.stdout + done.stderr)
    assert ok, f"{command}\n{done.stderr[-3000:]}"
    assert (done.stdout + done.stderr).strip(), f"{command}: printed nothing"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_each_make_target_exists(command):
    done = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
