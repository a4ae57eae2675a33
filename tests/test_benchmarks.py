"""benchmarks/all.sh runs every benchmark on one device and survives one that fails."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from convviz.machine import device_name, matmul_rate

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ["train_throughput", "mine_overhead", "projection_speed", "occlusion_speed"]


def test_device_name_says_which_cpu_setting_measured():
    name = device_name("cpu")
    assert name.startswith("CPU, ") and "threads" in name and "torch" in name


def test_matmul_rate_is_the_product_s_multiply_adds_per_second(monkeypatch):
    """The machine-speed figure benchmark records carry: size^3 multiply-adds over the best time,
    in billions (a clock that advances 1 ms per reading makes every product take 1 ms)."""
    import convviz.machine as machine

    ticks = iter(range(10_000))
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(ticks) * 1e-3)
    assert matmul_rate("cpu", size=100, repeats=3) == round(100**3 / 1e-3 / 1e9, 1)


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in interpreter: records each call's arguments, writes the --out file, and fails
    for the benchmark named in FAIL."""
    script = tmp_path / "python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, pathlib\n"
        "args = sys.argv[1:]\n"
        "with open(os.environ['CALLS'], 'a') as f: f.write(' '.join(args) + '\\n')\n"
        "if os.environ.get('FAIL') and os.environ['FAIL'] in args[0]: sys.exit(3)\n"
        "pathlib.Path(args[args.index('--out') + 1]).write_text('{}')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def run_all(fake_python, tmp_path, fail=""):
    env = dict(os.environ, PYTHON=str(fake_python), CALLS=str(tmp_path / "calls"), FAIL=fail)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "all.sh"), "cuda", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    return done, out, calls


def test_all_benchmarks_run_on_the_named_device_into_the_named_folder(fake_python, tmp_path):
    done, out, calls = run_all(fake_python, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [Path(c.split()[0]).stem for c in calls] == BENCHMARKS
    assert all("--device cuda" in c for c in calls)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{b}_cuda.json" for b in BENCHMARKS)
    for name in BENCHMARKS:  # each script really takes the options all.sh passes
        source = (ROOT / "benchmarks" / f"{name}.py").read_text()
        assert '"--out"' in source and '"--device"' in source


def test_a_failing_benchmark_is_reported_and_the_rest_still_run(fake_python, tmp_path):
    done, out, calls = run_all(fake_python, tmp_path, fail="projection_speed")
    assert done.returncode == 1
    assert len(calls) == 4  # occlusion_speed ran after the failure
    assert "projection_speed failed (exit status 3)" in done.stdout
    assert "did not finish: projection_speed" in done.stdout
    assert not (out / "projection_speed_cuda.json").exists() and (out / "occlusion_speed_cuda.json").exists()
