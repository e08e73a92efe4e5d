"""The Dockerfile's install steps (``scripts/install.sh``) in a clean virtualenv (no container engine runs
here), then ``batchrun doctor`` and ``batchrun validate`` from it; and the Dockerfile really runs that script
with its build arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv

from helpers import REPO


def test_the_dockerfile_runs_the_install_script_with_its_build_arguments():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG TORCH=torch==2.13.0" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert 'RUN TORCH="$TORCH" TORCH_INDEX="$TORCH_INDEX" PYTHON=python scripts/install.sh' in text
    assert "COPY scripts/install.sh ./scripts/install.sh" in text


def test_the_install_script_in_a_clean_virtualenv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # The torch build comes from the index the machine's pip uses (here: the CPU build on disk).
    env = {**os.environ, "PYTHON": str(python), "TORCH_INDEX": "", "TORCH": "torch==2.13.0"}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(".gguf") or "smollm2" in done.stdout.lower(), done.stdout
    batchrun = env_dir / "bin" / "batchrun"
    doctor = subprocess.run([str(batchrun), "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert doctor.returncode == 0, doctor.stderr
    found = json.loads(doctor.stdout.strip().splitlines()[-1])
    assert found["versions"]["torch"].startswith("2.13.0") and found["auto_device"] in ("cpu", "cuda")
    check = subprocess.run([str(batchrun), "validate", "jobs/example.yaml"], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert sys.executable != str(python)
