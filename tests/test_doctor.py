"""``batchrun doctor``: what the machine gives the engine (here: a CPU build of torch), and ``--expect-gpu``
failing with the reason when no GPU is usable."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from batchrun.cli import cli


def test_doctor_reports_the_cpu_build_and_what_auto_picks():
    done = CliRunner().invoke(cli, ["doctor", "--json"])
    assert done.exit_code == 0, done.output
    found = json.loads(done.output.strip().splitlines()[-1])
    assert found["versions"]["torch"] == torch.__version__.split("+")[0] or found["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])
    if not torch.cuda.is_available():
        assert (found["torch_build"] in ("cpu", f"cuda {torch.version.cuda}"), found["gpus"], found["auto_device"],
                found["auto_dtype"], found["attention"]) == (True, [], "cpu", "float32", "torch")
        assert "engine.device auto: cpu (float32), attention: torch" in done.output


def test_expect_gpu_fails_with_the_reason_when_there_is_none():
    if torch.cuda.is_available():
        return
    done = CliRunner().invoke(cli, ["doctor", "--expect-gpu", "--json"])
    assert done.exit_code == 1
    out = json.loads(done.output.strip().splitlines()[-1])
    reason = ("torch is a CPU build" if not torch.version.cuda else "torch has CUDA but sees no device")
    assert out["kind"] == "runtime_failure" and out["error"].startswith(f"no usable GPU: {reason}")
