# The worker image: fmnist-sweep installed as a wheel (conf/ and sweeps/ inside),
# with PostgreSQL drivers and optuna-dashboard. Build: docker compose build
FROM python:3.11-slim

# PyPI's torch for Linux includes CUDA (GPU workers need it). For a CPU-only image,
# point TORCH_PIP_ARGS at PyTorch's CPU wheel index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_PIP_ARGS=""
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" ${TORCH_PIP_ARGS}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY fmnist_sweep fmnist_sweep
COPY conf conf
COPY sweeps sweeps
RUN pip install --no-cache-dir ".[postgres,dashboard]" && rm -rf /src

# Every service (worker, MLflow server, dashboard, storage proxy) runs as an
# unprivileged user; the folders its volumes mount on are its own, so a fresh named
# volume takes that owner.
RUN useradd --create-home --uid 10001 fmnist \
    && mkdir -p /cache /work /mlartifacts && chown fmnist:fmnist /cache /work /mlartifacts
USER fmnist

# Data and decoded-tensor cache on a volume (downloaded once, shared by workers);
# the work dir holds nothing a worker needs to keep (storage and tracking are servers).
ENV FMNIST_CACHE_DIR=/cache FMNIST_SWEEP_DIR=/work
WORKDIR /work
ENTRYPOINT ["python", "-m", "fmnist_sweep"]
