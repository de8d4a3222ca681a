"""accelerate 1.15: the launch/accelerate/*.yaml configs (read by accelerate's own loader) and the
environment that `accelerate launch` hands to launch/train_qa.py (sg_distributed.integrations.accelerate)."""
import argparse
import importlib.util
from pathlib import Path

import pytest

from sg_distributed.integrations.accelerate import (AccelerateConfigError, apply_accelerate_env,
                                                    deepspeed_config_from_accelerate, read_accelerate_env,
                                                    render_accelerate_config)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launch" / "accelerate"
EXPECTED = {  # file -> (distributed_type, use_cpu, num_processes)
    "cpu_ddp.yaml": ("MULTI_GPU", True, 2),
    "cpu_deepspeed_zero2.yaml": ("DEEPSPEED", True, 2),
    "cpu_deepspeed_zero3.yaml": ("DEEPSPEED", True, 2),
    "gpu_fsdp2.yaml": ("FSDP", False, 8),
    "gpu_deepspeed_zero3.yaml": ("DEEPSPEED", False, 8),
    "multinode_deepspeed_zero3.yaml": ("DEEPSPEED", False, "${NUM_PROCESSES}"),
}
MULTINODE = {"MACHINE_RANK": 1, "MAIN_PROCESS_IP": "10.0.0.1", "MAIN_PROCESS_PORT": 29500, "NUM_MACHINES": 2,
             "NUM_PROCESSES": 16}


def load(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    return config


def test_every_yaml_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_loads_with_accelerates_loader(name):
    config = load(CONFIGS / name)
    kind, use_cpu, processes = EXPECTED[name]
    assert config.distributed_type.value == kind and config.use_cpu is use_cpu
    assert config.num_processes == processes
    assert config.compute_environment.value == "LOCAL_MACHINE"
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config
        if "deepspeed_config_file" in ds:  # accelerate refuses these next to a config file
            assert (ROOT / ds["deepspeed_config_file"]).exists()
            assert not {"zero_stage", "gradient_accumulation_steps", "gradient_clipping"} & set(ds)
            assert config.mixed_precision is None
        else:
            assert ds["zero_stage"] in (2, 3)
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    if name.startswith("cpu_"):
        assert config.main_process_port == 0 and config.num_machines == 1  # a free port on one box


def test_multinode_placeholders_render_and_load(tmp_path):
    text = (CONFIGS / "multinode_deepspeed_zero3.yaml").read_text()
    for name in MULTINODE:
        assert "${" + name + "}" in text
    config = render_accelerate_config(CONFIGS / "multinode_deepspeed_zero3.yaml", tmp_path / "node.yaml", **MULTINODE)
    assert (config.machine_rank, config.num_machines, config.num_processes) == (1, 2, 16)
    assert (config.main_process_ip, config.main_process_port) == ("10.0.0.1", 29500)
    assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    with pytest.raises(AccelerateConfigError, match="MACHINE_RANK"):
        render_accelerate_config(CONFIGS / "multinode_deepspeed_zero3.yaml", tmp_path / "x.yaml",
                                 **{k: v for k, v in MULTINODE.items() if k != "MACHINE_RANK"})


# The environment the deepspeed launcher builds for cpu_deepspeed_zero2.yaml / cpu_deepspeed_zero3.yaml
# (accelerate/utils/launch.py: prepare_deepspeed_cmd_env).
DS_FILE_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no",
               "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,zero3_init_flag",
               "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero2.json", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}
DS_FIELDS_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no",
                 "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,gradient_accumulation_steps,gradient_clipping,"
                                                "offload_optimizer_device,offload_param_device,zero3_init_flag,"
                                                "zero3_save_16bit_model,mixed_precision",
                 "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
                 "ACCELERATE_GRADIENT_CLIPPING": "1.0", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
                 "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}


def test_deepspeed_plugin_from_config_file():
    launch = read_accelerate_env(DS_FILE_ENV)
    assert launch.uses_deepspeed and launch.deepspeed_config_file.endswith("ds_configs/zero2.json")
    assert launch.deepspeed_config["zero_optimization"]["stage"] == 2
    clash = DS_FILE_ENV | {"ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,zero_stage"}
    with pytest.raises(AccelerateConfigError, match="zero_stage"):
        read_accelerate_env(clash)


def test_deepspeed_plugin_from_fields_resolves_like_train_qa():
    from sg_distributed.integrations.deepspeed import resolve_auto

    config, path = deepspeed_config_from_accelerate(DS_FIELDS_ENV)
    assert path is None and config["zero_optimization"] == {"stage": 3,
                                                             "stage3_gather_16bit_weights_on_model_save": True}
    assert config["gradient_clipping"] == 1.0 and config["zero_allow_untested_optimizer"] is True
    resolved = resolve_auto(config, world_size=2, micro_batch_size=2, gradient_accumulation_steps=1,
                            max_grad_norm=1.0, hidden_size=32)
    assert resolved["train_batch_size"] == 4
    defaults, _ = deepspeed_config_from_accelerate({"ACCELERATE_USE_DEEPSPEED": "true"})
    assert defaults["zero_optimization"]["stage"] == 2 and defaults["gradient_accumulation_steps"] == "auto"
    offload, _ = deepspeed_config_from_accelerate(DS_FIELDS_ENV | {"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"})
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def train_qa_args(*argv):
    spec = importlib.util.spec_from_file_location("train_qa_for_accelerate", ROOT / "launch" / "train_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.parse_args(list(argv))


def test_apply_env_to_train_qa_args():
    _, args = train_qa_args()
    assert apply_accelerate_env(args, {}) is None and args.ds_config is None  # not under accelerate: untouched
    config = apply_accelerate_env(args, DS_FIELDS_ENV, cuda_available=False)
    assert config["zero_optimization"]["stage"] == 3 and "zero_stage 3" in args.ds_config
    _, args = train_qa_args("--ds_config", "ds_configs/zero2.json")
    assert apply_accelerate_env(args, DS_FIELDS_ENV, cuda_available=False) is None  # explicit --ds_config wins
    _, args = train_qa_args()
    apply_accelerate_env(args, {"ACCELERATE_MIXED_PRECISION": "bf16"}, cuda_available=True)
    assert args.precision == "bf16"
    _, args = train_qa_args()
    apply_accelerate_env(args, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, cuda_available=True)
    assert args.fsdp is True
    with pytest.raises(AccelerateConfigError, match="fsdp_version: 2"):
        apply_accelerate_env(train_qa_args()[1], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
                             cuda_available=True)


@pytest.mark.parametrize("env", [{"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_USE_CPU": "true"},
                                 {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}])
def test_fsdp_on_cpu_is_refused_clearly(env):
    with pytest.raises(AccelerateConfigError, match="cannot run FSDP on CPU"):
        apply_accelerate_env(argparse.Namespace(ds_config=None, fsdp=False), env, cuda_available=False)


def test_train_qa_exits_on_cpu_fsdp_accelerate_config(monkeypatch, tmp_path):
    module, _ = train_qa_args()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="cannot run FSDP on CPU"):
        module.main(["--steps", "1", "--output_dir", str(tmp_path)])


def test_multinode_yaml_with_slurm_cli_overrides():
    """launch/slurm/accelerate_multinode.sbatch passes the five values on the command line instead of
    rendering the placeholders: accelerate must then take them from the CLI, not the yaml."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(CONFIGS / "multinode_deepspeed_zero3.yaml"), "--machine_rank", "1",
            "--num_machines", "2", "--num_processes", "16", "--main_process_ip", "10.0.0.1",
            "--main_process_port", "29500", "launch/train_qa.py", "--steps", "1"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert (int(args.machine_rank), args.num_machines, args.num_processes) == (1, 2, 16)
    assert (args.main_process_ip, int(args.main_process_port)) == ("10.0.0.1", 29500)
    assert args.use_deepspeed and args.deepspeed_config_file == "ds_configs/zero3.json"
    assert args.deepspeed_multinode_launcher == "standard"
