# khala-stream worker image: one image, the compose services pick the subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install . \
    && useradd --create-home --uid 10001 khala

# Unprivileged, and in a writable home so any local state (.khala/) has somewhere to go.
USER khala
WORKDIR /home/khala

ENTRYPOINT ["khala-stream"]
CMD ["--help"]
