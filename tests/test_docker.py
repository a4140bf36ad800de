"""Docker files, checked without an engine (none runs here): the Dockerfile is parsed into its instructions and its
build followed through. The build context comes from .dockerignore; COPY takes files from it; each RUN runs under
/bin/sh in a folder holding what the image has at that point, with stand-ins on PATH that record the commands it
calls (python, useradd, ...: nothing is installed); the build script runs with a stand-in `docker`."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from tiny_run import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

REPO = REPO_ROOT
DOCKERFILE = REPO / "docker" / "Dockerfile"
BUILD_SCRIPT = REPO / "docker" / "create_docker_image.sh"
# Every entry script at the repository root must be in the image (the README runs each of them).
ROOT_SCRIPTS = tuple(sorted(p.name for p in REPO.glob("*.py")))
# Commands a RUN may call, replaced by recorders (grep is the real one: it only filters a file into the image's /tmp).
RECORDED = ("python", "groupadd", "useradd", "mkdir", "chown")
# NVIDIA's minimum Linux driver for a CUDA major version (minor-version compatibility).
MIN_DRIVER = {"12": 525, "13": 580}


# ------------------------------------------------------------------------------------------------ the parser
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comment lines dropped (also inside a continuation), lines ending in
    a backslash joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def substitute(value: str, variables: dict[str, str]) -> str:
    """Docker's ${NAME} / $NAME substitution (unknown names become empty, as in Docker)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether .dockerignore leaves ``path`` (or a folder above it) out of the build context: the last pattern
    that matches decides; ``!`` patterns take back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    decision = False
    for keep, pattern in patterns:
        if any(pattern.fullmatch(p) for p in prefixes):
            decision = not keep
    return decision


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is an exception ``!``, regex) per .dockerignore line: paths relative to the context root, ``*`` and ``?``
    within one path segment, ``**`` any number of segments."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        line = line.lstrip("!").strip().lstrip("/")
        parts = (line[2:] if line.startswith("./") else line).split("/")
        regex = ""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "**":
                regex += (".*" if not i else "(?:/.*)?") if last else "(?:.*/)?"
                continue
            regex += "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in part)
            if not last and not (parts[i + 1] == "**" and i + 1 == len(parts) - 1):
                regex += "/"
        patterns.append((keep, re.compile(regex)))
    return patterns


def build_context() -> set[str]:
    """The files `docker build <repo>` sends: every file under the repository that .dockerignore keeps."""
    patterns = dockerignore_patterns((REPO / ".dockerignore").read_text())
    files = set()
    for folder, dirs, names in os.walk(REPO):
        rel = Path(folder).relative_to(REPO)
        dirs[:] = [d for d in dirs if not ignored((rel / d).as_posix(), patterns)]
        files |= {(rel / n).as_posix() for n in names if not ignored((rel / n).as_posix(), patterns)}
    return files


# ------------------------------------------------------------------------------------------------ the build
@dataclass
class Image:
    """What the build makes of the Dockerfile: the resolved base, settings, files and commands."""

    base: str = ""
    workdir: str = "/"
    user: str = "root"
    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # image path -> context path
    runs: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)  # (command, files, env)
    cmd: list[str] = field(default_factory=list)


def build(build_args: dict[str, str] | None = None, context: set[str] | None = None) -> Image:
    """Follow the Dockerfile with ``build_args`` (``--build-arg``); a COPY of something outside the build context
    fails the test, as it fails the build."""
    build_args = build_args or {}
    context = build_context() if context is None else context
    image, global_args = Image(), {}
    for keyword, args in instructions(DOCKERFILE.read_text()):
        variables = {**image.args, **image.env}  # what a stage's instructions (and its RUNs) see
        if keyword == "ARG":
            name, has_default, default = args.partition("=")
            if not image.base:  # before FROM: usable in FROM only
                global_args[name] = build_args.get(name, default)
            else:
                image.args[name] = build_args.get(name, default if has_default else global_args.get(name, ""))
        elif keyword == "FROM":
            image.base = substitute(args, global_args)
        elif keyword == "ENV":
            image.env.update(item.split("=", 1) for item in shlex.split(args))
        elif keyword == "WORKDIR":
            image.workdir = str(PurePosixPath(image.workdir, substitute(args, variables)))
        elif keyword == "COPY":
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            for source in sources:
                source = source.rstrip("/")
                under = sorted(f for f in context if f == source or f.startswith(source + "/"))
                assert under, f"COPY {source}: not in the build context (.dockerignore leaves it out or it is missing)"
                target = PurePosixPath(image.workdir, substitute(dest, variables))
                for f in under:
                    inside = PurePosixPath(f).name if f == source else PurePosixPath(f).relative_to(source)
                    image.files[str(target / inside)] = f
        elif keyword == "RUN":
            image.runs.append((args, dict(image.files), variables))
        elif keyword == "USER":
            image.user = substitute(args, variables)
        elif keyword == "CMD":
            image.cmd = json.loads(args)
    return image


def run_in_image(image: Image, index: int, tmp_path: Path) -> list[list[str]]:
    """Run the ``index``-th RUN under /bin/sh, as the build runs it, in a copy of the image's working directory at
    that point, the image's /tmp a folder of the test; returns the recorded commands (name, *args)."""
    command, files, env = image.runs[index]
    root, fake_bin, log = tmp_path / f"run{index}", tmp_path / "bin", tmp_path / f"calls{index}"
    for image_path, source in files.items():
        dest = root / PurePosixPath(image_path).relative_to(image.workdir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((REPO / source).read_bytes())
    fake_bin.mkdir(exist_ok=True)
    for name in RECORDED:
        (fake_bin / name).write_text(f'#!/bin/sh\nprintf "%s\\t" "${{0##*/}}" "$@" >> "{log}"\necho >> "{log}"\n')
        (fake_bin / name).chmod(0o755)
    grep = next(Path(d, "grep") for d in ("/usr/bin", "/bin") if Path(d, "grep").is_file())
    (fake_bin / "grep").unlink(missing_ok=True)
    (fake_bin / "grep").symlink_to(grep)
    for target in re.findall(r">\s*(\S+)", command.replace("2>/dev/null", "")):
        assert target.startswith("/tmp/"), f"RUN writes {target}: not redirected into the test's /tmp"
    (tmp_path / "image_tmp").mkdir(exist_ok=True)
    command = command.replace("/tmp/", f"{tmp_path / 'image_tmp'}/")
    proc = subprocess.run(["/bin/sh", "-c", command], cwd=root, capture_output=True, text=True,
                          env={**env, "PATH": str(fake_bin), "HOME": str(tmp_path)})
    assert proc.returncode == 0, (command, proc.stderr)
    return [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()] if log.exists() else []


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a pip requirements file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def build_script_docker_args(tmp_path: Path, *extra: str) -> list[str]:
    """The arguments docker/create_docker_image.sh gives `docker` (a stand-in on PATH records them), as alice."""
    fake, log = tmp_path / "docker", tmp_path / "docker_args"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "USER": "alice"}
    subprocess.run(["bash", str(BUILD_SCRIPT), *extra], check=True, env=env, cwd=tmp_path)
    return log.read_text().splitlines()


def build_args_of(docker_args: list[str]) -> dict[str, str]:
    return dict(docker_args[i + 1].split("=", 1) for i, a in enumerate(docker_args) if a == "--build-arg")


# ------------------------------------------------------------------------------------------------ the tests
def test_dockerignore_matching_follows_docker():
    patterns = dockerignore_patterns(".venv\n**/__pycache__\n/runs\n*.log\ndocs/**/*.png\n!docs/keep.png\n")
    assert ignored(".venv/bin/python", patterns) and ignored("src/ddpm_ood/__pycache__/x.pyc", patterns)
    assert ignored("__pycache__/x.pyc", patterns) and ignored("runs/a/checkpoint.pth", patterns)
    assert ignored("train.log", patterns) and not ignored("logs/train.log", patterns)
    assert ignored("docs/a/b.png", patterns) and ignored("docs/b.png", patterns) and not ignored("docs/keep.png", patterns)
    assert not ignored("src/ddpm_ood/__init__.py", patterns) and not ignored("venv/x", patterns)


def test_build_context_holds_the_code_and_leaves_out_environments():
    context = build_context()
    for name in ("requirements.txt", "pyproject.toml", "README.md", "src/ddpm_ood/__init__.py", *ROOT_SCRIPTS):
        assert name in context, name
    assert not [f for f in context if f.split("/")[0] in (".venv", ".git", "runs") or "__pycache__" in f]


def test_image_holds_the_projects_code_and_root_scripts():
    image = build()
    workdir = PurePosixPath(image.workdir)
    assert image.workdir == "/opt/ddpm-ood"
    for script in ROOT_SCRIPTS:
        assert image.files.get(str(workdir / script)) == script and (REPO / script).is_file(), script
    package = {f for f in build_context() if f.startswith("src/ddpm_ood/")}
    assert package and {image.files.get(str(workdir / f)) for f in package} == package  # the whole package
    assert image.cmd[0] == "python" and str(workdir / image.cmd[1]) in image.files
    proc = subprocess.run([sys.executable, *image.cmd[1:]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr  # the default command runs


def test_dependency_layer_installs_exactly_the_requirements_before_the_code_is_copied(tmp_path):
    image = build()
    index = next(i for i, (command, _, _) in enumerate(image.runs) if " -r " in command)
    _, files, _ = image.runs[index]
    # A layer of its own: only requirements.txt is in the image yet, so code changes keep it cached.
    assert files == {f"{image.workdir}/requirements.txt": "requirements.txt"}
    calls = run_in_image(image, index, tmp_path)
    assert [c[:4] for c in calls] == [["python", "-m", "pip", "install"]]
    given = Path(calls[0][calls[0].index("-r") + 1])
    want = [line for line in requirement_lines(REPO / "requirements.txt") if not line.startswith("-e ")]
    assert requirement_lines(given) == want  # every requirement, and not the editable install of the code
    for line in want:
        Requirement(line)  # each parses as pip reads it


def test_code_layer_installs_the_package_editable_without_dependencies_and_the_lpips_weights(tmp_path):
    image = build()
    index = next(i for i, (command, _, _) in enumerate(image.runs) if " -e " in command)
    calls = run_in_image(image, index, tmp_path)
    assert calls[0] == ["python", "-m", "pip", "install", "--no-deps", "-e", "."]
    project = tmp_path / f"run{index}"  # "." = the working directory, as the image has it at that RUN
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert (project / pyproject["project"]["readme"]).is_file()
    for where in pyproject["tool"]["setuptools"]["packages"]["find"]["where"]:
        assert (project / where / "ddpm_ood" / "__init__.py").is_file()
    modules = [c[2] for c in calls[1:] if c[:2] == ["python", "-m"]]
    assert modules == ["ddpm_ood.cli.lpips_weights"]
    where = pyproject["tool"]["setuptools"]["packages"]["find"]["where"][0]
    module = project / where / Path(*modules[0].split(".")).with_suffix(".py")
    assert 'if __name__ == "__main__":' in module.read_text()  # runnable with -m


def test_image_runs_as_the_callers_user_who_owns_its_folders(tmp_path):
    docker_args = build_script_docker_args(tmp_path)
    build_args = build_args_of(docker_args)
    image = build(build_args)
    uid, gid = str(os.getuid()), str(os.getgid())
    assert image.user == f"{uid}:{gid}"
    index = next(i for i, (command, _, _) in enumerate(image.runs) if "useradd" in command)
    calls = run_in_image(image, index, tmp_path)
    useradd = next(c for c in calls if c[0] == "useradd")
    assert useradd[useradd.index("--uid") + 1] == uid and useradd[useradd.index("--gid") + 1] == gid
    assert useradd[-1] == "alice"
    chown = next(c for c in calls if c[0] == "chown")
    assert chown[1:3] == ["-R", f"{uid}:{gid}"]
    assert {image.workdir, image.env["TORCH_HOME"], "/data", "/output"} <= set(chown[3:])
    assert build(build_args={}).user == "1000:1000"  # defaults when built without the script


def test_build_script_passes_uid_gid_tag_and_only_arguments_the_dockerfile_declares(tmp_path):
    assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)]).returncode == 0
    args = build_script_docker_args(tmp_path, "--no-cache")
    assert args[0] == "build"
    assert args[args.index("--tag") + 1] == "alice:ddpm-ood"
    assert f"USER_ID={os.getuid()}" in args and f"GROUP_ID={os.getgid()}" in args and "USER=alice" in args
    assert args[args.index("--file") + 1] == str(DOCKERFILE)
    assert "--no-cache" in args and args[-1] == str(REPO)
    declared = {args.partition("=")[0] for keyword, args in instructions(DOCKERFILE.read_text()) if keyword == "ARG"}
    assert set(build_args_of(args)) <= declared  # an undeclared --build-arg would be ignored by docker


def test_base_image_is_a_plain_python_the_project_supports_and_can_be_overridden():
    # The pinned torch wheel brings its CUDA runtime; a PyTorch base image would bring a second torch build.
    base = build().base
    assert base.startswith("python:") and "pytorch" not in base
    version = re.match(r"python:(\d+\.\d+)", base).group(1)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert version == "3.11" and SpecifierSet(requires).contains(version)
    assert build({"BASE_IMAGE": "python:3.11-bookworm"}).base == "python:3.11-bookworm"


def test_requirements_pin_the_working_torch_pair():
    reqs = {Requirement(line).name: Requirement(line) for line in requirement_lines(REPO / "requirements.txt")
            if not line.startswith("-")}
    assert str(reqs["torch"].specifier) == "==2.14.1" and str(reqs["torchvision"].specifier) == "==0.29.1"
    assert "einops" in reqs and "monai-generative" not in reqs


def test_dockerfile_note_on_the_host_driver_matches_the_pinned_torch():
    # What the image needs of the host: the driver of the CUDA runtime the pinned torch wheel bundles.
    import torch

    notes = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#"))
    pin = next(str(Requirement(line).specifier)[2:] for line in requirement_lines(REPO / "requirements.txt")
               if line.startswith("torch=="))
    assert f"torch=={pin}" in notes
    cuda = re.search(r"CUDA (\d+\.\d+)", notes).group(1)
    if torch.__version__.split("+")[0] == pin and torch.version.cuda:  # the pinned wheel is installed here
        assert torch.version.cuda == cuda
    driver = int(re.search(r">= (\d+)", notes).group(1))
    assert driver == MIN_DRIVER[cuda.split(".")[0]]
