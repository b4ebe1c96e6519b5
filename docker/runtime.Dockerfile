# The aggregator/client image: fedkube with CUDA-capable torch and the built-in tasks.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 1000 --create-home fedkube
COPY --from=build /wheels /wheels
# PyPI's default torch wheel for Linux x86_64 bundles CUDA; the pods get GPUs via the device plugin.
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[runtime]" && rm -rf /wheels
USER 1000:1000
# Scratch and checkpoints live on mounted volumes; the root filesystem is read-only.
ENV HOME=/tmp PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/matplotlib
ENTRYPOINT ["fedkube"]
