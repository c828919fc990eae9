"""Packaging for clusters, checked offline: the --setup_file sdist, the worker Dockerfile, docs/RUNNING.md.

Dataflow and Flink cannot run here; what they consume can be checked:
- ``setup.py`` as Beam's ``--setup_file``: ``python setup.py sdist`` (and Beam's own staging call) builds
  into a temporary directory, the sdist holds the two packages and nothing heavy, and its requirements cover
  every third-party import of the packages;
- the Dockerfile: pinned base matching the installed Beam and Python, no pip/apt caches, Beam's entrypoint
  kept, the weights file baked where :mod:`transforms.weights` looks, and its verification step run here;
- docs/RUNNING.md: every flag of its ``python -m pipeline`` commands exists; no DaskRunner.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV_BIN = pathlib.Path(sys.executable).parent
PACKAGES = ("lpips_pipe", "pipeline", "transforms")
SDIST_TIMEOUT_S = 120


def _run(argv: list[str], cwd: pathlib.Path, timeout_s: float = SDIST_TIMEOUT_S, **kwargs) -> str:
    """Run ``argv`` with a hard timeout (subprocess.run kills it on expiry); returns its output."""
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, **kwargs)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _members(sdist: pathlib.Path) -> dict[str, int]:
    """``{path inside the project dir: size}`` of an sdist's files."""
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        return {member.name[len(top) + 1:]: member.size for member in archive.getmembers() if member.isfile()}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """``python setup.py sdist`` into a temporary directory, as the issue's check asks."""
    dist = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)], cwd=ROOT)
    (built,) = dist.glob("lpips_pipe-*.tar.gz")
    return built


def test_sdist_holds_the_packages_and_nothing_heavy(sdist: pathlib.Path) -> None:
    members = _members(sdist)
    sources = {str(path.relative_to(ROOT)) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
               if "__pycache__" not in path.parts}
    assert sources and sources <= set(members), f"missing from the sdist: {sorted(sources - set(members))}"
    allowed_extra = {"PKG-INFO", "setup.py", "setup.cfg", "README.md", "MANIFEST.in", "lpips_pipe/py.typed"}
    unexpected = [name for name in members
                  if name not in sources and name not in allowed_extra and not name.startswith("lpips_pipe.egg-info/")]
    assert unexpected == [], f"the sdist carries more than the packages: {unexpected}"
    assert not any(name.endswith((".pt", ".pth", ".ckpt", ".parquet", ".png", ".jpg", ".pyc")) for name in members)
    assert sum(members.values()) < 1_000_000, f"sdist content is {sum(members.values())} bytes"
    assert sdist.stat().st_size < 300_000


def test_beam_stages_setup_file_the_same_way(sdist: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Beam's own ``--setup_file`` build (``Stager._build_setup_package``) gives the same files."""
    script = ("import sys\n"
              "from apache_beam.runners.portability.stager import Stager\n"
              "print('TARBALL', Stager._build_setup_package(sys.argv[1], sys.argv[2]))\n")
    output = _run([sys.executable, "-c", script, str(ROOT / "setup.py"), str(tmp_path)], cwd=tmp_path)
    tarball = pathlib.Path(output.split("TARBALL ", 1)[1].split()[0])
    assert tarball.parent == tmp_path
    assert set(_members(tarball)) == set(_members(sdist))


def _requirements(sdist: pathlib.Path) -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """install_requires and extras_require, read back from the built sdist's metadata."""
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("lpips_pipe.egg-info/requires.txt"))
        text = archive.extractfile(member).read().decode()
    required: list[Requirement] = []
    extras: dict[str, list[Requirement]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("["):
            section = line.strip("[]")
            extras[section] = []
        elif section is None:
            required.append(Requirement(line))
        else:
            extras[section].append(Requirement(line))
    return required, extras


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported anywhere in the packages (lazy imports included) -> importing files."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _with_their_extras(requirements: list[Requirement]) -> set[str]:
    """The distributions ``requirements`` name, and those their extras bring with what they need in turn
    (``apache-beam[aws]``: boto3, and boto3's botocore)."""
    names = set()
    brought: list[str] = []
    for req in requirements:
        names.add(canonicalize_name(req.name))
        for extra in req.extras:
            try:
                requires = importlib.metadata.requires(req.name) or []
            except importlib.metadata.PackageNotFoundError:
                requires = []
            for line in requires:
                dependency = Requirement(line)
                if dependency.marker is not None and dependency.marker.evaluate({"extra": extra}):
                    brought.append(dependency.name)
    while brought:
        name = brought.pop()
        if canonicalize_name(name) in names:
            continue
        names.add(canonicalize_name(name))
        try:
            lines = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # an extra's package not installed here (gcs)
            lines = []
        for line in lines:
            dependency = Requirement(line)
            if dependency.marker is None or dependency.marker.evaluate({"extra": ""}):
                brought.append(dependency.name)
    return names


def test_requirements_cover_every_third_party_import(sdist: pathlib.Path) -> None:
    required, extras = _requirements(sdist)
    declared = _with_their_extras(required)
    optional = _with_their_extras([req for reqs in extras.values() for req in reqs])
    distributions = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"apache_beam", "torch", "lpips", "numpy", "pyarrow", "PIL"} <= set(imports)
    for module, files in sorted(imports.items()):
        if module in ("google", "requests"):  # the gcs extra's clients (and their HTTP session), in the GCS path only
            assert "gcs" in extras and files == {"transforms/paths.py"}, files
            continue
        names = {canonicalize_name(dist) for dist in distributions.get(module, [])}
        assert names, f"{module} (imported by {sorted(files)}) is not installed in the venv"
        if names & declared:
            continue
        assert names & optional, f"{module} (imported by {sorted(files)}) is in neither install_requires nor extras"
        # Extras only for code no worker runs (the demo's photographs), or an optional reader a worker uses
        # when it is installed (fsspec, for URIs Beam's filesystems do not know).
        allowed = {"fsspec": {"transforms/uri_io.py"}}.get(module, {"pipeline/demo.py"})
        assert files == allowed, f"{module} is only an extra but {sorted(files)} import it"
    # lpips imports torchvision itself; workers need it even though no module of ours names it.
    assert "torchvision" in declared


def test_requirements_admit_the_tested_pins(sdist: pathlib.Path) -> None:
    """The versions the tests ran with (constraints.txt, and this venv) satisfy install_requires."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    required, _ = _requirements(sdist)
    for req in required:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the pinned {pins[name]}"
        installed = importlib.metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req} excludes the installed {installed}"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined as Docker joins them."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        full = pending + line
        pending = ""
        keyword, _, arguments = full.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents decides."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(candidate, pattern) or fnmatch.fnmatchcase(candidate, pattern.replace("**/", ""))
               for candidate in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_is_pinned_and_lint_clean() -> None:
    import apache_beam

    instructions = _dockerfile()
    keywords = [keyword for keyword, _ in instructions]
    froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert froms == [f"apache/beam_python{python}_sdk:{apache_beam.__version__}"] == [
        "apache/beam_python3.11_sdk:2.77.0"]
    # Beam's boot program must stay the entrypoint; Beam's images run as root.
    assert not {"ENTRYPOINT", "CMD", "USER"} & set(keywords)
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    assert all(keyword in {"FROM", "ARG", "ENV", "COPY", "RUN"} for keyword in keywords), keywords
    for run in runs:
        for command in re.split(r"&&|;", run):
            if re.search(r"\bpip install\b", command):
                assert "--no-cache-dir" in command, f"pip without --no-cache-dir: {command.strip()}"
                packages = [word for word in shlex.split(command.replace("${", "").replace("}", ""))
                            if re.fullmatch(r"[A-Za-z][\w.-]*", word) and word not in ("pip", "install")]
                for package in packages:  # bare names are pinned by -c constraints.txt, else pinned inline
                    assert "-c " in command or "==" in package, f"unpinned {package}: {command.strip()}"
            if "apt-get install" in command:
                assert "rm -rf /var/lib/apt/lists" in run and "--no-install-recommends" in command
    assert ":latest" not in (ROOT / "Dockerfile").read_text()


def test_dockerfile_bakes_the_weights_where_the_model_looks() -> None:
    from lpips_pipe.transforms.model.weights import WEIGHTS_DIR_ENV

    instructions = _dockerfile()
    env = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV")
    weights_dir = re.search(rf"{WEIGHTS_DIR_ENV}=(\S+)", env)
    assert weights_dir and weights_dir.group(1).startswith("/")
    args = dict(arguments.split("=", 1) for keyword, arguments in instructions if keyword == "ARG" and "=" in arguments)
    assert args["NET"] == "alex" and args["WEIGHTS_FILE"].endswith(".pt")
    copies = [arguments.split() for keyword, arguments in instructions if keyword == "COPY"]
    assert ["${WEIGHTS_FILE}", f"${{{WEIGHTS_DIR_ENV}}}/lpips-${{NET}}.pt"] in copies
    # Every other COPY source exists and is in the build context; the default weights path is let through.
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for copy in copies:
        for source in copy[:-1]:
            if "$" not in source:
                assert (ROOT / source).exists(), f"COPY source {source} is missing"
                assert not _dockerignored(source, patterns), f"COPY source {source} is excluded by .dockerignore"
    assert not _dockerignored(args["WEIGHTS_FILE"], patterns)
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/test_runners.py", "build/lib/pipeline/cli.py"):
        assert _dockerignored(heavy, patterns), f"{heavy} would be sent to the Docker build"


def _verify_step() -> str:
    runs = [arguments for keyword, arguments in _dockerfile() if keyword == "RUN"]
    (verify,) = [run for run in runs if run.startswith("python -c")]
    return verify


def test_dockerfile_weights_check_runs(tmp_path: pathlib.Path) -> None:
    """The image's last RUN, run here: it accepts the exported file and refuses one for another net."""
    from lpips_pipe.transforms.model.weights import ModelConfig, export_weights

    baked = tmp_path / "weights"
    baked.mkdir()
    digest = export_weights(ModelConfig(net="alex"), str(baked / "lpips-alex.pt"))
    (baked / "lpips-vgg.pt").write_bytes((baked / "lpips-alex.pt").read_bytes())  # wrong net under vgg's name
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               LPIPS_PIPE_WEIGHTS_DIR=str(baked), TORCH_HOME=str(tmp_path / "torch_home"))
    command = _verify_step()
    output = _run(["sh", "-c", command], cwd=tmp_path, env={**env, "NET": "alex"})
    assert f"file:{baked / 'lpips-alex.pt'}" in output and digest in output
    refused = subprocess.run(["sh", "-c", command], cwd=tmp_path, env={**env, "NET": "vgg"}, capture_output=True,
                             text=True, timeout=SDIST_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert refused.returncode != 0 and "net=alex" in refused.stderr


# --------------------------------------------------------------------------- docs/RUNNING.md


def _doc_commands() -> list[list[str]]:
    """Argument lists of the ``python -m pipeline`` commands in RUNNING.md's bash blocks."""
    text = (ROOT / "docs" / "RUNNING.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("python -m pipeline"):
                commands.append(shlex.split(line)[3:])
    return commands


def test_running_doc_commands_use_real_flags() -> None:
    from lpips_pipe.pipeline.options import unknown_flags as _unknown_flags

    commands = _doc_commands()
    assert len(commands) >= 7
    runners = set()
    for argv in commands:
        assert _unknown_flags(argv) == [], f"unknown flag(s) {_unknown_flags(argv)} in: {' '.join(argv)}"
        assert "--input" in argv and "--output" in argv
        runner = next((argv[i + 1] for i, arg in enumerate(argv) if arg == "--runner"), None)
        runner = runner or next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--runner=")), "FnApiRunner")
        runners.add(runner)
        if runner == "DataflowRunner":
            assert "--setup_file" in argv or "--sdk_container_image" in argv, argv
            assert any(arg.startswith("gs://") for arg in argv)
        if runner == "FlinkRunner":
            given = {arg.split("=", 1)[0] for arg in argv}
            assert "--flink_master" in given and ("--environment_type" in given or "--streaming" in given), argv
    assert runners == {"FnApiRunner", "PortableRunner", "DataflowRunner", "FlinkRunner"}
    joined = [" ".join(argv) for argv in commands]
    assert any("multi_processing" in cmd for cmd in joined)
    assert any("--weights gs://" in cmd for cmd in joined)
    assert any("worker_accelerator=" in cmd and "--device cuda" in cmd for cmd in joined)


def test_running_doc_warns_off_dask() -> None:
    text = (ROOT / "docs" / "RUNNING.md").read_text()
    assert "DaskRunner" in text and "finish_bundle" in text and "0 rows" in text
    assert "--runner DaskRunner" not in text and "--runner=DaskRunner" not in text
    assert "docker build" in text and "--build-arg WEIGHTS_FILE=" in text


def test_installed_the_package_is_lpips_pipe_alone_and_a_users_files_do_not_shadow_it(tmp_path: pathlib.Path) -> None:
    """A wheel of the project holds one top-level package, ``lpips_pipe``; installed, it works from a folder
    holding a user's own ``transforms.py`` and ``pipeline.py`` (which shadowed it when it installed top-level
    ``transforms`` and ``pipeline`` modules)."""
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the repository
    for name in ("lpips_pipe", "pipeline", "transforms"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
          str(wheels), str(source)], cwd=tmp_path, timeout_s=300)
    (wheel,) = wheels.glob("lpips_pipe-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"lpips_pipe"}, tops
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
         cwd=tmp_path, timeout_s=300)
    user = tmp_path / "user"
    user.mkdir()
    (user / "transforms.py").write_text("BRIGHTNESS = 1.2\n")
    (user / "pipeline.py").write_text("STEPS = []\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = _run([sys.executable, "-c", "import lpips_pipe, transforms; from lpips_pipe import masked_lpips; "
                "print(lpips_pipe.__file__, transforms.BRIGHTNESS, masked_lpips.__module__)"], cwd=user, env=env)
    assert str(target) in out and "1.2" in out and "lpips_pipe.transforms.model.masked" in out, out
    help_text = _run([sys.executable, "-m", "lpips_pipe", "--help"], cwd=user, env=env)
    assert "--input" in help_text and "--output" in help_text, help_text
