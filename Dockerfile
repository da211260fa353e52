# One image for the API and the GPU worker (docker-compose.yml picks the command).
# torch from PyPI bundles its CUDA runtime; the host needs only the NVIDIA driver and the
# container toolkit for the worker's GPU reservation.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000

# libgomp: OpenMP for faiss and torch CPU kernels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 scan \
    && mkdir -p /data \
    && chown scan:scan /data

WORKDIR /srv/scan
COPY pyproject.toml README.md alembic.ini ./
COPY scan_engine ./scan_engine
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Editable, so migrations/ stays next to app/ (app.db.migrate finds it there).
RUN pip install -e .

USER scan
VOLUME ["/data"]
EXPOSE 8000
CMD ["scan-service"]
