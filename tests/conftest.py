"""Shared fixtures: tiny random Llama / BERT models and batches (no downloads)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every process the tests launch (train_qa, workers; they inherit os.environ) raises on a collective whose
# tensor is not on the device its process group takes (sg_distributed.distributed.comm, "Collective-device check").
os.environ.setdefault("SG_CHECK_COLLECTIVE_DEVICE", "1")

import socket
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# train_qa.py flags for drop-and-grow re-selection on the tiny model: swaps after steps 2 and 4 (a row/column
# budget is required: growth scores come from the dense-block kernel)
RESELECT_ARGS = ("--density", "0.05", "--max_rows", "0.5", "--max_cols", "0.5", "--reselect_every", "2",
                 "--reselect_fraction", "0.5")


def supports_reselected(adapter: dict) -> bool:
    """True when some saved support left row-major order, i.e. re-selection swapped entries."""
    return any(not torch.equal(t, t.sort().values) for k, t in adapter.items() if k.endswith(".support_flat"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The one failure a multi-rank launch is retried for: a rank that finished its work aborts while the
# interpreter tears the gloo process group down (std::terminate from a C++ thread; seen twice in full-suite
# runs, not reproduced in 75 launches of the same test in a loop, loaded or not). Anything else fails at once.
TEARDOWN_ABORT = "terminate called without an active exception"


def run_ranks(cmd, *, env=None, cwd=ROOT, timeout=240, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for a multi-rank launch, retried once (with a warning) on a teardown abort only."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr:
        import warnings

        warnings.warn(f"a rank aborted at teardown ({TEARDOWN_ABORT!r}); launching once more: {cmd[:6]}")
        if "--master_port" in cmd:  # the first launch's port may still be in TIME_WAIT
            cmd = list(cmd)
            cmd[cmd.index("--master_port") + 1] = str(free_port())
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    return proc


def run_train_qa(cmd, out: Path):
    """Run a train_qa.py command line (any launcher) into ``out``; returns (saved adapter tensors, stdout)."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = run_ranks(cmd + ["--output_dir", str(out)], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "world size 1," not in proc.stdout:  # a multi-rank run: it must have run under the collective-device check
        assert "collective-device check on" in proc.stderr, proc.stderr[-3000:]
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), proc.stdout


def make_tiny_llama(seed=0, layers=2, hidden=32, intermediate=64, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def make_tiny_bert(seed=0, layers=2, hidden=32, intermediate=64, vocab=128):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=4, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def lm_batches(n=4, batch=2, seq=12, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def cls_batches(n=4, batch=4, seq=10, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
             "labels": torch.randint(0, 3, (batch,), generator=g)} for _ in range(n)]


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


def quantize_linears(model, names, bits=8, quant_storage=torch.uint8):
    """Swap the named nn.Linear layers for bitsandbytes 8-bit (or 4-bit nf4, packed into ``quant_storage``
    words) layers, quantised on CPU."""
    import bitsandbytes as bnb

    for name in names:
        old = model.get_submodule(name)
        if bits == 8:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    quant_type="nf4", compute_dtype=torch.float32, quant_storage=quant_storage)
        new.load_state_dict(old.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.to("cpu"))
    return model


def load_launch_script(name: str):
    """launch/<name>.py as a module (a script, not part of the package): tests call its main(argv)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_qa():
    return load_launch_script("train_qa")


def save_tiny_llama_dir(path: Path, hidden: int = 32, intermediate: int = 64) -> Path:
    """A 2-block random Llama saved with the real SmolLM2 tokenizer: the launch scripts run on it in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sg_distributed.data.assets import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo process group, for code paths that need torch.distributed initialised."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def calibrated(model, config=None, batches=None, **kwargs):
    """``get_sparsegrad_model(model, config)`` calibrated on ``batches`` (default ``lm_batches()``): a PeftModel
    in fixed-support mode (peft's ``calibrate`` works in place), the research wrapper otherwise."""
    from sg_distributed import get_sparsegrad_model

    wrapped = get_sparsegrad_model(model, config)
    wrapped.calibrate(lm_batches() if batches is None else batches, **kwargs)
    return wrapped


def orthogonal(n, seed):
    """A random n x n orthogonal float64 matrix (QR of a seeded Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def make_layer(m, n, k, budget=None, seed=0, convention="textbook"):
    """(base, P, R, support, SparseGradLinear) in float64 with random orthogonal bases and a random support."""
    from torch import nn

    from sg_distributed.sparsegrad.selection import select_support
    from sg_distributed.sparsegrad.layer import SparseGradLinear

    torch.manual_seed(seed)
    base = nn.Linear(n, m, dtype=torch.float64)
    P, Q = orthogonal(m, seed + 1), orthogonal(n, seed + 2)
    R = Q if convention == "textbook" else Q.T.contiguous()
    score = torch.rand(m, n, dtype=torch.float64)
    rows, cols = (budget or (m, n))
    support = select_support(score, k, rows, cols)
    values = torch.randn(k, dtype=torch.float64)
    return base, P, R, support, SparseGradLinear(base, P, R, support, values=values, dtype=torch.float64)
