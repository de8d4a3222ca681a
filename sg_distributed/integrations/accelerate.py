"""``accelerate launch`` (1.15) support for scripts that run their own torch.distributed / DeepSpeed loop.

``accelerate launch --config_file X.yaml script.py`` starts the ranks with ``torch.distributed.run``
(the ``MULTI_GPU``, ``FSDP`` and single-node ``DEEPSPEED`` launchers) and describes the run to the
script only through environment variables. A script that does not build an ``accelerate.Accelerator``
(``launch/train_qa.py`` builds its DeepSpeed engine itself) must read them; :func:`read_accelerate_env`
does, with the same defaults as accelerate's ``DeepSpeedPlugin.__post_init__``:

=============================================== ===================================================
``ACCELERATE_USE_DEEPSPEED=true``                 distributed_type DEEPSPEED (deepspeed launcher)
``ACCELERATE_DEEPSPEED_CONFIG_FILE``              ``deepspeed_config.deepspeed_config_file``
``ACCELERATE_DEEPSPEED_ZERO_STAGE``               ``zero_stage`` (default 2 when no config file)
``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``        ``gradient_accumulation_steps`` (default "auto")
``ACCELERATE_GRADIENT_CLIPPING``                  ``gradient_clipping`` (default "auto")
``ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE`` ``offload_optimizer_device`` (none/cpu/nvme)
``ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE``     ``offload_param_device``
``ACCELERATE_DEEPSPEED_OFFLOAD_*_NVME_PATH``      ``offload_*_nvme_path``
``ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL``   ``zero3_save_16bit_model``
``ACCELERATE_DEEPSPEED_ZERO3_INIT``               ``zero3_init_flag`` (informational: models load unpartitioned)
``ACCELERATE_CONFIG_DS_FIELDS``                   keys of the yaml's ``deepspeed_config`` block (+ mixed_precision)
``ACCELERATE_USE_FSDP=true`` / ``FSDP_VERSION``   distributed_type FSDP
``ACCELERATE_USE_CPU``                            ``use_cpu`` (set by the simple launcher only; the
                                                  multi-GPU / DeepSpeed launchers pass the caller's value)
``ACCELERATE_MIXED_PRECISION``                    ``mixed_precision`` (no / fp16 / bf16 / fp8)
``ACCELERATE_USE_MEGATRON_LM``                    refused
=============================================== ===================================================

``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` come from
``torch.distributed.run`` as usual. FSDP on CPU is refused with a clear message: accelerate 1.15 cannot
shard on CPU (use ``torchrun`` with ``torch.distributed.fsdp.fully_shard`` there).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["AccelerateConfigError", "AccelerateLaunch", "read_accelerate_env", "deepspeed_config_from_accelerate",
           "apply_accelerate_env", "render_accelerate_config",
           "check_supported", "launched_by_accelerate"]

_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f", ""}

# Fields of the yaml's deepspeed_config block that accelerate forbids next to deepspeed_config_file
# (DeepSpeedPlugin._deepspeed_config_checks), spelled as ACCELERATE_CONFIG_DS_FIELDS spells them.
_FIELDS_IGNORED_WITH_CONFIG_FILE = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage",
                                    "offload_optimizer_device", "offload_param_device", "offload_param_nvme_path",
                                    "offload_optimizer_nvme_path", "zero3_save_16bit_model", "mixed_precision")


class AccelerateConfigError(ValueError):
    """An accelerate launch configuration this script cannot honour."""


def _bool(environ: Mapping[str, str], key: str, default: bool = False) -> bool:
    value = environ.get(key)
    if value is None:
        return default
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise AccelerateConfigError(f"{key}={environ[key]!r} is not a boolean")


@dataclass
class AccelerateLaunch:
    """What ``accelerate launch`` asked for, read back from the environment."""

    launched: bool = False  # any ACCELERATE_* launch variable present
    distributed_type: str = "NO"  # NO, MULTI_GPU (torchrun DDP, on CPU too), DEEPSPEED, FSDP, MEGATRON_LM
    use_cpu: bool = False
    mixed_precision: str = "no"
    deepspeed_config_file: str | None = None
    deepspeed_config: dict | None = None  # the file's contents, or built from the plugin fields
    fsdp_version: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # the ACCELERATE_* / FSDP_* variables seen

    @property
    def uses_deepspeed(self) -> bool:
        return self.distributed_type == "DEEPSPEED"

    @property
    def uses_fsdp(self) -> bool:
        return self.distributed_type == "FSDP"


def launched_by_accelerate(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return any(k in environ for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION",
                                      "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_MEGATRON_LM"))


def _resolve_path(path: str) -> str:
    """A DeepSpeed config path as given, else relative to the repository root (yaml files name repo paths)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = Path(__file__).resolve().parents[2] / path
    return str(candidate) if candidate.exists() else path


def deepspeed_config_from_accelerate(environ: Mapping[str, str] | None = None) -> tuple[dict, str | None]:
    """The DeepSpeed config an ``accelerate launch`` with the DeepSpeed plugin describes: (config, file or None).

    With ``deepspeed_config_file`` the file is loaded (and, as accelerate does, plugin fields next to it
    in the yaml are refused). Otherwise a config is built from the plugin fields with accelerate's
    defaults (ZeRO-2, "auto" batch sizes / accumulation / clipping), plus what a client torch optimizer
    on CPU needs (``zero_allow_untested_optimizer``) and no step logging.
    """
    from .deepspeed import DeepSpeedConfigError, load_ds_config

    environ = os.environ if environ is None else environ
    path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path and path.lower() != "none":
        fields = [f for f in environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f]
        clash = [f for f in fields if f in _FIELDS_IGNORED_WITH_CONFIG_FILE]
        if clash:
            raise AccelerateConfigError(
                f"the accelerate config names deepspeed_config_file {path!r} and also sets {clash}; accelerate ignores "
                "(and its DeepSpeedPlugin refuses) those next to a config file: put them in the DeepSpeed JSON "
                "(\"auto\" is fine) and remove them from the yaml")
        path = _resolve_path(path)
        try:
            config = load_ds_config(path)
        except DeepSpeedConfigError as err:
            raise AccelerateConfigError(f"ACCELERATE_DEEPSPEED_CONFIG_FILE: {err}") from None
        if "zero_optimization" not in config:
            raise AccelerateConfigError(f"{path}: accelerate requires a 'zero_optimization' block in the DeepSpeed config")
        config.setdefault("gradient_accumulation_steps", 1)  # as accelerate's DeepSpeedPlugin does
        return config, path

    gas = environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    clip = environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    try:
        stage = int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        gas_value: Any = int(gas) if gas.isdigit() else gas
        clip_value: Any = clip if clip == "auto" else float(clip)
    except ValueError as err:
        raise AccelerateConfigError(f"bad DeepSpeed plugin value in the accelerate environment: {err}") from None
    if gas_value != "auto" and (not isinstance(gas_value, int) or gas_value < 1):
        raise AccelerateConfigError(f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={gas!r} must be a positive integer")
    zero: dict[str, Any] = {"stage": stage}
    for kind in ("optimizer", "param"):
        device = environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none").lower()
        if device not in ("none", "cpu", "nvme"):
            raise AccelerateConfigError(f"offload_{kind}_device={device!r}: choose none, cpu or nvme")
        if device != "none":
            block: dict[str, Any] = {"device": device}
            if device == "nvme":
                nvme = environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_NVME_PATH", "none")
                if nvme.lower() == "none":
                    raise AccelerateConfigError(f"offload_{kind}_device=nvme needs offload_{kind}_nvme_path")
                block["nvme_path"] = nvme
            zero[f"offload_{kind}"] = block
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = _bool(environ, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": gas_value,
        "gradient_clipping": clip_value,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the script passes a client torch optimizer
        "steps_per_print": 10**9,
    }
    if "offload_optimizer" in zero:
        config["zero_force_ds_cpu_optimizer"] = False  # keep the client optimizer (no cpu_adam JIT build)
    return config, None


def read_accelerate_env(environ: Mapping[str, str] | None = None) -> AccelerateLaunch:
    """Parse what ``accelerate launch`` put in the environment (see the module docstring)."""
    environ = os.environ if environ is None else environ
    seen = {k: v for k, v in environ.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    launch = AccelerateLaunch(launched=launched_by_accelerate(environ), env=seen)
    launch.use_cpu = _bool(environ, "ACCELERATE_USE_CPU")
    launch.mixed_precision = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    use_ds = _bool(environ, "ACCELERATE_USE_DEEPSPEED")
    use_fsdp = _bool(environ, "ACCELERATE_USE_FSDP")
    if _bool(environ, "ACCELERATE_USE_MEGATRON_LM"):
        launch.distributed_type = "MEGATRON_LM"
    elif use_ds and use_fsdp:
        raise AccelerateConfigError("the accelerate environment asks for both DeepSpeed and FSDP; pick one")
    elif use_ds:
        launch.distributed_type = "DEEPSPEED"
        launch.deepspeed_config, launch.deepspeed_config_file = deepspeed_config_from_accelerate(environ)
    elif use_fsdp:
        launch.distributed_type = "FSDP"
        launch.fsdp_version = int(environ.get("FSDP_VERSION", "1"))
    elif int(environ.get("WORLD_SIZE", "1")) > 1:
        launch.distributed_type = "MULTI_GPU"  # torchrun-style DDP (gloo on CPU, nccl on CUDA)
    return launch


def check_supported(launch: AccelerateLaunch, *, cuda_available: bool | None = None, allow_fsdp: bool = False,
                    precisions: tuple[str, ...] = ("no",), script: str = "this script") -> None:
    """Refuse launch configurations the calling script cannot run, with a message saying what to do."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if launch.distributed_type == "MEGATRON_LM":
        raise AccelerateConfigError(f"accelerate's Megatron-LM plugin is not supported by {script}; use DeepSpeed, "
                                    "FSDP or plain multi-process (MULTI_GPU) in the accelerate config")
    if launch.uses_fsdp:
        on_cpu = launch.use_cpu or not cuda_available
        if on_cpu:
            raise AccelerateConfigError(
                "the accelerate config asks for FSDP (distributed_type: FSDP) on CPU"
                f"{' (use_cpu: true)' if launch.use_cpu else ' (no CUDA device)'}: accelerate 1.15 cannot run FSDP on "
                "CPU. On CPU use distributed_type: MULTI_GPU with use_cpu: true (DDP over gloo) or the DeepSpeed "
                "plugin (launch/accelerate/cpu_*.yaml), or test sharding with torchrun and "
                "torch.distributed.fsdp.fully_shard; FSDP configs (launch/accelerate/gpu_fsdp2.yaml) are for GPUs")
        if not allow_fsdp:
            raise AccelerateConfigError(
                f"{script} does not shard with FSDP itself; with an FSDP accelerate config use "
                "launch/train_qa_trainer.py (the HF Trainer applies accelerate's FSDP plugin), or use the DeepSpeed "
                "plugin (launch/accelerate/gpu_deepspeed_zero3.yaml)")
    if launch.mixed_precision not in precisions:
        raise AccelerateConfigError(
            f"mixed_precision={launch.mixed_precision!r} from the accelerate config is not supported by {script} "
            f"(supported: {', '.join(precisions)}); set mixed_precision: 'no' in the yaml")


def apply_accelerate_env(args, environ: Mapping[str, str] | None = None, *, cuda_available: bool | None = None,
                         script: str = "launch/train_qa.py") -> dict | None:
    """Fold an ``accelerate launch`` environment into a train_qa-style argparse namespace.

    * DeepSpeed plugin and no ``--ds_config``: returns the DeepSpeed config dict (loaded from
      ``deepspeed_config_file`` or built from the plugin fields) and sets ``args.ds_config`` to the file
      path, or to a label naming the plugin when the yaml has no file. Returns None otherwise.
    * FSDP (GPU only; refused on CPU): sets ``args.fsdp`` (the script's FSDP2 ``fully_shard`` path),
      requires ``fsdp_version: 2``.
    * ``mixed_precision`` bf16/fp16: becomes ``args.precision`` when that is still fp32; a different
      explicit ``--precision`` is an error.
    Outside ``accelerate launch`` nothing changes.
    """
    environ = os.environ if environ is None else environ
    launch = read_accelerate_env(environ)
    if not launch.launched:
        return None
    has_precision = hasattr(args, "precision")
    precisions = ("no", "bf16", "fp16") if has_precision else ("no",)
    check_supported(launch, cuda_available=cuda_available, allow_fsdp=hasattr(args, "fsdp"), precisions=precisions,
                    script=script)
    if launch.mixed_precision != "no":
        if args.precision not in ("fp32", launch.mixed_precision):
            raise AccelerateConfigError(f"--precision {args.precision} contradicts mixed_precision="
                                        f"{launch.mixed_precision!r} in the accelerate config")
        args.precision = launch.mixed_precision
    if launch.uses_fsdp:
        if launch.fsdp_version != 2:
            raise AccelerateConfigError(f"{script} shards with FSDP2 (fully_shard): set fsdp_version: 2 in the "
                                        f"accelerate config (got {launch.fsdp_version})")
        if getattr(args, "ds_config", None):
            raise AccelerateConfigError("--ds_config and an FSDP accelerate config: pick one")
        args.fsdp = True
        return None
    if launch.uses_deepspeed and not getattr(args, "ds_config", None):
        stage = launch.deepspeed_config.get("zero_optimization", {}).get("stage")
        args.ds_config = launch.deepspeed_config_file or f"<accelerate DeepSpeed plugin: zero_stage {stage}>"
        return launch.deepspeed_config
    return None


PLACEHOLDERS = ("MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT", "NUM_MACHINES", "NUM_PROCESSES")


def render_accelerate_config(template: str | os.PathLike, output: str | os.PathLike, **values: Any):
    """Fill the ``${NAME}`` placeholders of an accelerate yaml (as ``envsubst`` would) and check the result
    with accelerate's own loader; returns the loaded ``ClusterConfig``. Missing values are an error."""
    import re

    from accelerate.commands.config.config_args import load_config_from_file

    text = Path(template).read_text()
    missing = sorted({m for m in re.findall(r"\$\{(\w+)\}", text) if m not in values})
    if missing:
        raise AccelerateConfigError(f"{template}: no value for placeholders {missing}")
    text = re.sub(r"\$\{(\w+)\}", lambda m: str(values[m.group(1)]), text)
    Path(output).write_text(text)
    return load_config_from_file(str(output))
