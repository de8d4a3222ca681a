"""torch.compile over a converted model: forward and backward run, gradients match eager, shapes compile once."""
import pytest
import torch

from sg_distributed import SparseGradConfig

from conftest import calibrated, lm_batches, make_tiny_llama


def k_gradients(model, forward, batch):
    model.zero_grad(set_to_none=True)
    forward(**batch).loss.backward()
    return torch.cat([p.grad.float() for p in model.trainable_parameters()])


@pytest.mark.parametrize("config,dtype", [
    (dict(density=0.05, max_rows=0.5, max_cols=0.5), torch.bfloat16),
    (dict(density=0.3, max_rows=None, max_cols=None), torch.float32),
], ids=["dense-block-bf16", "csr-fp32"])
def test_compiled_model_matches_eager(config, dtype):
    """The dense-block kernel (any row/column budget) traces into ONE graph for the whole model: no graph
    break and no recompile per layer (each layer type has one block shape). The CSR kernel (no budget)
    graph-breaks at every layer (torch.compile cannot create sparse tensors) but runs and matches eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = calibrated(make_tiny_llama(layers=3), SparseGradConfig(**config))
    model.to(dtype).train()
    batch = lm_batches(n=1, seed=5)[0]
    eager = k_gradients(model, model.get_base_model(), batch)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.get_base_model(), backend="aot_eager")  # tracing and autograd, no C++ codegen
    for _ in range(2):  # the second call must reuse the graph(s)
        got = k_gradients(model, compiled, batch)
    dense_block = config["max_rows"] is not None
    assert all(layer.structure.dense_block == dense_block for layer in model.converted_layers().values())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((got - eager).norm() / eager.norm()) < tolerance
    if dense_block:
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert not counters["recompiles"]
