# One image for every dmoe role (coordinator, node, trainer, chaos); docker/entrypoint.py picks the role.
#
#   docker build -t dmoe:latest .                          # official Python base, packages from PyPI
#   docker build --build-arg BASE_IMAGE=dmoe-base:bookworm -t dmoe:local .   # any Debian-like base with python3
#
# Offline builds: put wheels in docker/wheelhouse/ (scripts/docker_env.py does, from a host `pip wheel`);
# when that folder holds wheels, pip installs only from it (--no-index) and the build needs no network.
ARG BASE_IMAGE=python:3.11-slim

# The dependency list alone, so editing other parts of pyproject.toml keeps the slow install layer cached.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import tomllib; t = tomllib.load(open("/src/pyproject.toml", "rb")); \
print("\n".join(sorted(t["project"]["dependencies"] + t["build-system"]["requires"] + ["wheel"])))' \
    > /requirements.txt

FROM ${BASE_IMAGE}
# Where torch comes from when installing from the network: the CPU-only build (no CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/dmoe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    GRPC_VERBOSITY=ERROR

# tc (iproute2) shapes a node's home link; the debootstrap base has it, the official slim image does not.
RUN command -v tc >/dev/null 2>&1 || { apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null \
      && rm -rf /var/lib/apt/lists/*; }
RUN python3 -m venv /opt/dmoe

# Dependencies (rebuilt only when the dependency list or the wheelhouse changes).
COPY docker/wheelhouse/ /wheels/
COPY --from=requirements /requirements.txt /tmp/requirements.txt
# --no-compile + one import pass: bytecode only for the modules dmoe actually loads (pip would compile all of
# torch, which takes longer than installing it); the rest compiles in memory in the rare case it is imported.
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
      pip install -q --no-compile --no-index --find-links /wheels -r /tmp/requirements.txt; \
    else \
      pip install -q --no-compile --extra-index-url "$TORCH_INDEX_URL" -r /tmp/requirements.txt; \
    fi \
    && env -u PYTHONDONTWRITEBYTECODE python3 -c 'import torch, hivemind, grpc, uvloop, numpy, prometheus_client'

# The project itself (small, changes often).
COPY pyproject.toml README.md /src/
COPY dmoe /src/dmoe
COPY node /src/node
COPY coordinator /src/coordinator
RUN pip install -q --no-index --no-deps --no-build-isolation /src && rm -rf /src/build /src/*.egg-info \
    && env -u PYTHONDONTWRITEBYTECODE python3 -c 'import dmoe.node.cli, dmoe.train.cli, dmoe.coordinator.cli, \
dmoe.sim.chaos_cli, dmoe.sim.links, dmoe.train.trainer, dmoe.train.model'

COPY scenarios /opt/dmoe-scenarios
COPY docker/scenarios /opt/dmoe-scenarios/docker
COPY docker/entrypoint.py docker/home_link.py /usr/local/lib/dmoe-docker/
WORKDIR /data
ENTRYPOINT ["python3", "/usr/local/lib/dmoe-docker/entrypoint.py"]
CMD ["--help"]
