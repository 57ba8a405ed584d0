"""Every file in accelerate_configs/ is valid for `accelerate launch --config_file`.
(cpu.yaml and multi_gpu.yaml also run real trainings in test_cli.py and test_distributed.py.)"""

import subprocess

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from helpers import REPO

CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
EXPECTED = {  # file -> (distributed_type, num_machines, use_cpu)
    "cpu.yaml": ("NO", 1, True),
    "single_gpu.yaml": ("NO", 1, False),
    "multi_gpu.yaml": ("MULTI_GPU", 1, False),
    "multi_node.yaml": ("MULTI_GPU", 2, False),
    "fsdp.yaml": ("FSDP", 1, False),
    "deepspeed.yaml": ("DEEPSPEED", 1, False),
}


def test_the_expected_files_are_there():
    assert sorted(c.name for c in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_loads_it(path):
    config = load_config_from_file(str(path))
    distributed_type, num_machines, use_cpu = EXPECTED[path.name]
    assert config.distributed_type.value == distributed_type
    assert config.num_machines == num_machines and config.use_cpu == use_cpu
    assert config.mixed_precision == "no"
    assert "EDIT" in path.read_text() or path.name == "cpu.yaml"  # says what a user changes
    if path.name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
    if path.name == "deepspeed.yaml":
        assert config.deepspeed_config["zero_stage"] == 2


def test_the_slurm_script_is_valid_bash():
    script = REPO / "accelerate_configs" / "slurm.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    assert "--signal=B:TERM@" in script.read_text()  # the time limit ends in a checkpoint and a requeue
