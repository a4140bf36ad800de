"""Every pipeline command in the README (the upstream README's commands) parses with our scripts, as written."""

import importlib
import re
import shlex

import pytest
from tiny_run import REPO_ROOT

from ddpm_ood.cli.options import refuse_unsupported

README = (REPO_ROOT / "README.md").read_text()
SCRIPTS = {
    "train_ddpm.py": "train_ddpm",
    "train_vqvae.py": "train_vqvae",
    "reconstruct.py": "reconstruct",
    "ood_detection.py": "ood_detection",
    "get_datasets.py": "get_datasets",
    "src/data/get_computer_vision_datasets.py": "get_datasets",
    "src/data/get_mednist_datasets.py": "get_mednist_datasets",
    "src/data/get_decathlon_datasets.py": "get_decathlon_datasets",
    "src/data/get_3dmedmnist.py": "get_3dmedmnist",
}


def readme_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w in SCRIPTS and i > 0 and words[i - 1] in ("python", "python3") or (
                    w in SCRIPTS and i > 0 and words[i - 1].startswith("--node_rank")
                ):
                    commands.append(words[i:])
                    break
    return commands


COMMANDS = readme_commands()


def test_readme_has_every_stage():
    scripts = {c[0] for c in COMMANDS}
    assert set(SCRIPTS) <= scripts, set(SCRIPTS) - scripts
    assert any(c[0] == "train_ddpm.py" for c in COMMANDS if "torchrun" in README)


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_readme_command_parses(words):
    module = importlib.import_module(f"ddpm_ood.cli.{SCRIPTS[words[0]]}")
    argv = [w.replace("${data_root}", "/data").replace("${output_root}", "/out") for w in words[1:]]
    args = module.build_parser().parse_args(argv)
    refuse_unsupported(args)
