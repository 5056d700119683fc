"""`--cpu-report` (tests/helpers/cpu_report.py): each test's CPU time, its subprocesses' apart, summed per file."""
import json
import os
import subprocess
import sys

from tests.helpers.cpu_report import per_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass"
TESTS = f'''
import subprocess, sys

def test_busy_subprocess():
    subprocess.run([sys.executable, "-c", {BUSY.format(seconds=0.6)!r}], check=True)

def test_busy_here():
    exec({BUSY.format(seconds=0.4)!r})
'''


def test_cpu_report_separates_a_tests_own_cpu_from_its_subprocesses(tmp_path):
    (tmp_path / "test_busy.py").write_text(TESTS)
    report = tmp_path / "cpu.jsonl"
    report.write_text('{"stale": "line"}\n')  # emptied at the start of the session
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                           "tests.helpers.cpu_report", f"--cpu-report={report}", str(tmp_path / "test_busy.py")],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {json.loads(line)["test"].split("::")[1]: json.loads(line) for line in report.read_text().splitlines()}
    assert set(rows) == {"test_busy_subprocess", "test_busy_here"}
    assert rows["test_busy_subprocess"]["subprocess_cpu_s"] >= 0.5 and rows["test_busy_subprocess"]["cpu_s"] < 0.4
    assert rows["test_busy_here"]["cpu_s"] >= 0.35 and rows["test_busy_here"]["subprocess_cpu_s"] < 0.05
    total = per_file(str(report))["test_busy.py"]
    assert total["tests"] == 2 and total["subprocess_cpu_s"] >= 0.5 and total["cpu_s"] >= 0.35
    assert "CPU seconds per test file" in done.stdout and "test_busy.py" in done.stdout.split("CPU seconds")[-1]
