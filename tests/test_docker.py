"""Docker files: no engine here, so check what can be checked: what the image installs and runs, and the build
script's arguments (with a stand-in `docker` on PATH that records them)."""

import os
import re
import subprocess

from tiny_run import REPO_ROOT

REPO = REPO_ROOT
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def test_dockerfile_installs_the_projects_requirements_and_code():
    assert re.search(r"^COPY requirements.txt", DOCKERFILE, re.M)
    assert "pip install -r /tmp/requirements-deps.txt" in DOCKERFILE
    for script in ("train_ddpm.py", "reconstruct.py", "ood_detection.py", "get_datasets.py"):
        assert script in DOCKERFILE and (REPO / script).is_file()
    for copied in re.findall(r"^COPY (.+) \./", DOCKERFILE, re.M):
        for name in copied.split():
            assert (REPO / name).exists(), name


def test_dockerfile_runs_as_the_callers_user_in_a_workdir():
    for arg in ("USER_ID", "GROUP_ID", "USER"):
        assert re.search(rf"^ARG {arg}=", DOCKERFILE, re.M)
    assert re.search(r"^USER \$\{USER_ID\}:\$\{GROUP_ID\}", DOCKERFILE, re.M)
    assert re.search(r"^WORKDIR /opt/ddpm-ood", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", DOCKERFILE, re.M)


def test_requirements_pin_the_working_torch_pair():
    req = (REPO / "requirements.txt").read_text()
    assert "torch==2.14.1" in req and "torchvision==0.29.1" in req and "einops" in req
    assert "monai-generative" not in req


def test_build_script_passes_uid_gid_and_tag(tmp_path):
    script = REPO / "docker" / "create_docker_image.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "docker"
    log = tmp_path / "args"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "USER": "alice"}
    subprocess.run(["bash", str(script), "--no-cache"], check=True, env=env, cwd=tmp_path)
    args = log.read_text().splitlines()
    assert args[0] == "build"
    assert args[args.index("--tag") + 1] == "alice:ddpm-ood"
    assert f"USER_ID={os.getuid()}" in args and f"GROUP_ID={os.getgid()}" in args and "USER=alice" in args
    assert args[args.index("--file") + 1] == str(REPO / "docker" / "Dockerfile")
    assert "--no-cache" in args and args[-1] == str(REPO)


def test_base_image_does_not_bring_a_second_torch():
    # The pinned torch wheel brings its CUDA runtime; a PyTorch base image would bring another torch build.
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, re.M).group(1)
    assert base.startswith("python:3.11") and "pytorch" not in base
    assert "CUDA 13.0" in DOCKERFILE and ">= 580" in DOCKERFILE
