# An image that runs batchrun jobs. CPU (the default):
#   docker build -t batchrun . && docker run --rm -v $PWD:/work batchrun submit jobs/example.yaml
# CUDA (torch's CUDA build bundles the CUDA libraries; the host needs the NVIDIA driver and container toolkit):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 --build-arg TORCH=torch \
#       -t batchrun:cuda .
#   docker run --rm --gpus all -v $PWD:/work batchrun:cuda doctor --expect-gpu
# The install steps are scripts/install.sh (tests/test_install.py runs them in a clean virtualenv).
FROM python:3.11-slim
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /opt/batchrun
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 BATCHRUN_CACHE=/opt/batchrun-cache
COPY pyproject.toml constraints.txt README.md ./
COPY batchrun ./batchrun
COPY scripts/install.sh ./scripts/install.sh
RUN TORCH="$TORCH" TORCH_INDEX="$TORCH_INDEX" PYTHON=python scripts/install.sh
WORKDIR /work
ENTRYPOINT ["batchrun"]
CMD ["--help"]
