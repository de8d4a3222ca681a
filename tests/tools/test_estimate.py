"""sg_distributed.tools.estimate against measurements.

* bytes per step: a real 2-rank DeepSpeed ZeRO-2 run (tests/comm_worker.py, gloo, fp32) counted with
  CommCounter; the estimator's ring "wire" total must equal the measured total exactly, per method.
* optimizer state: bytes of every optimizer-state tensor after one step of a 1-process run == estimate.
* memory (what can be measured on CPU without an allocator: tensor bytes): parameters + buffers
  (deduplicated by storage) within 10 % of "weights + bases/buffers", and the gradients of the
  trainable tensors == "gradients". Activations are not compared (the CPU allocator hides them).
* calibration memory: the live tensor bytes (a dispatch mode) of a real ``calibrate()`` on an fp32 tiny Llama,
  overall and per phase, within 10 % of ``calibration_phases`` with its activations term replaced by the
  measured peak of plain backward passes and LAPACK's eigh workspace (invisible to a dispatch mode) left out.
* the presets: the estimator's counts equal sg_distributed.tools.presets' (DESIGN §2) for LLaMA-2-7B.
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, lm_batches, make_tiny_llama, run_ranks
from sg_distributed.sparsegrad.config import SparseGradConfig
from sg_distributed.tools.estimate import build_meta_model, estimate, main
from sg_distributed.training.methods import prepare

REPO = Path(__file__).resolve().parents[2]
HIDDEN, INTER, DENSITY = 64, 256, 0.01
WORKER_METHODS = ("full", "lora", "sparsegrad", "graddrop", "sparsegrad_dynamic")


def _tiny():
    return make_tiny_llama(layers=2, hidden=HIDDEN, intermediate=INTER)


@pytest.mark.multiprocess
def test_zero2_bytes_per_step_equal_commcounter(tmp_path):
    out = tmp_path / "comm.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "comm_worker.py"), "--out", str(out),
           "--stage", "2", "--steps", "2", "--hidden", str(HIDDEN), "--intermediate", str(INTER),
           "--density", str(DENSITY), "--methods", ",".join(WORKER_METHODS)]
    proc = run_ranks(cmd, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = json.loads(out.read_text())["ranks"][0]
    model = _tiny()
    for method in WORKER_METHODS:
        est = estimate(model, method, p=2, zero=2, dtype="fp32", density=DENSITY, max_rows=None, max_cols=None,
                       exchange="exact", graddrop_exchange="dense")  # the worker's GradDrop reduces dense
        got = measured[method]
        assert est["trainable"] == got["trainable_numel"], method
        assert est["comm_total"] == pytest.approx(got["total"]["wire"], abs=1e-6), (method, est["comm"], got["total"])


def _state_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size() if obj.dim() > 0 else 0
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


@pytest.mark.parametrize("method,budget,density", [("full", None, DENSITY), ("lora", None, DENSITY),
                                                   ("graddrop", None, DENSITY), ("sparsegrad", None, DENSITY),
                                                   ("sparsegrad", 0.25, 0.05), ("sparsegrad_dynamic", None, DENSITY)])
def test_optimizer_state_and_tensor_memory_match_one_rank(method, budget, density):
    model = _tiny()
    est = estimate(model, method, p=1, zero=2, dtype="fp32", density=density, max_rows=budget, max_cols=budget)
    config = SparseGradConfig(density=density, calibration_steps=2, max_rows=budget, max_cols=budget)
    prepared = prepare(method, model, config, calibration_batches=lm_batches(n=2, batch=2, seq=12, seed=7))
    optimizer = prepared.make_optimizer(1e-3)
    batch = lm_batches(n=1, batch=2, seq=12, seed=11)[0]
    prepared.model(**batch).loss.backward()
    net = prepared.model
    trainable = prepared.trainable_parameters()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    assert grads == est["gradients"], method
    seen, tensor_bytes = set(), 0
    shared_bases = [t for basis in getattr(net, "shared_bases", {}).values() for t in basis.tensors()]
    for t in list(net.parameters()) + list(net.buffers()) + shared_bases:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensor_bytes += t.numel() * t.element_size()
    accumulators = sum(m.grad_accumulator.numel() * m.grad_accumulator.element_size() for m in net.modules()
                       if getattr(m, "grad_accumulator", None) is not None)
    if method == "sparsegrad" and budget is None:  # k << m, n: the rows/cols touched are data-dependent
        assert tensor_bytes <= est["weights"] + est["buffers"], method  # the estimate is an upper bound
    else:  # k >> budget (as in the presets): the layer keeps exactly the budgeted rows/cols
        assert tensor_bytes + accumulators == pytest.approx(est["weights"] + est["buffers"], rel=0.10), method
    optimizer.step()
    prepared.after_step()
    state = _state_bytes(optimizer.state_dict()["state"])
    sparse_opt = getattr(prepared.after_step, "__closure__", None)
    if method == "sparsegrad_dynamic":  # SparseStateAdam, stepped by after_step: k entries per matrix now
        opt = next(c.cell_contents for c in sparse_opt if isinstance(c.cell_contents, dict))["optimizer"]
        state += _state_bytes(opt.state)
    assert state == est["optimizer"], (method, state, est["optimizer"])


def test_reselection_scores_match_the_layers_score_blocks():
    """k >> budget (0.05 density, 0.25 budget): every layer's score block is exactly the budgeted r x c, so
    the estimate's extra memory and amortised all-reduce equal what the calibrated layers allocate."""
    kw = dict(p=4, zero=2, dtype="fp32", density=0.05, max_rows=0.25, max_cols=0.25)
    plain = estimate(_tiny(), "sparsegrad", **kw)
    est = estimate(_tiny(), "sparsegrad", reselect_every=5, **kw)
    config = SparseGradConfig(density=0.05, calibration_steps=2, max_rows=0.25, max_cols=0.25, reselect_every=5)
    prepared = prepare("sparsegrad", _tiny(), config, calibration_batches=lm_batches(n=2, batch=2, seq=12, seed=7))
    prepared.make_optimizer(1e-3)
    scores = [layer.structure.score for layer in prepared.model.converted_layers().values()]
    score_bytes = sum(t.numel() * t.element_size() for t in scores)
    assert score_bytes > 0 and est["buffers"] - plain["buffers"] == score_bytes
    extra = {k: v for k, v in est["comm"].items() if k not in plain["comm"]}
    assert list(extra) == ["re-selection scores (every 5 steps, amortised)"]
    assert extra[next(iter(extra))] == pytest.approx(2 * 3 / 4 * score_bytes / 5)


def test_presets_agree_with_presets_module():
    from sg_distributed.tools.presets import cost_report

    model, over = build_meta_model("llama-2-7b")
    est = estimate(model, "sparsegrad", p=8, zero=2, dtype="bf16", k=over["k"], block_stride=over["block_stride"],
                   target_modules=over["target_modules"])
    rep = cost_report("llama-2-7b", (8,), "bf16", model=model)
    assert est["k_total"] == rep["k_total"] == 2_200_000
    assert est["N_targets"] == rep["N"]
    # optimizer state over all ranks (12 B/entry in bf16) is the presets' figure, /p per rank (+ padding)
    assert est["optimizer"] * 8 == pytest.approx(rep["optimizer_state_sparsegrad"], rel=1e-5)
    # gradient all-reduce == the presets' k-vector all-reduce
    assert est["comm"]["grad all-reduce"] == pytest.approx(rep["wire"][0]["kvector_allreduce"])
    full = estimate(model, "full", p=8, zero=2, dtype="bf16", k=over["k"], block_stride=over["block_stride"],
                    target_modules=over["target_modules"])
    assert full["comm"]["grad all-reduce"] == pytest.approx(rep["wire"][0]["dense_allreduce"])


def test_graddrop_kept_exchange_sends_one_minus_p_of_the_gradient_all_reduce():
    """ZeRO-2: the kept-only exchange's all-reduce is (1 - p) of the dense one (the counted bytes of the 2-rank
    runs equal this expectation within binomial noise: tests/graddrop/test_exchange.py, bench_comm.py); the
    all-gather of updated partitions stays dense; ZeRO-3 stays dense (not built there) and says so."""
    model, over = build_meta_model("llama-2-7b")
    kw = dict(p=16, dtype="bf16", k=over["k"], block_stride=over["block_stride"], target_modules=over["target_modules"])
    dense = estimate(model, "graddrop", zero=2, graddrop_exchange="dense", **kw)
    kept = estimate(model, "graddrop", zero=2, drop_prob=0.9, **kw)
    [(name, value)] = [(k, v) for k, v in kept["comm"].items() if k.startswith("grad all-reduce (kept")]
    assert value == pytest.approx(0.1 * dense["comm"]["grad all-reduce"], rel=1e-12) and "p = 0.9" in name
    assert kept["comm"]["all-gather updated partitions"] == dense["comm"]["all-gather updated partitions"]
    zero3 = estimate(model, "graddrop", zero=3, drop_prob=0.9, **kw)
    assert zero3["comm"] == estimate(model, "graddrop", zero=3, graddrop_exchange="dense", **kw)["comm"]
    assert "ZeRO-3 reduces the dense gradient" in zero3["note"]
    assert "kept-only exchange (element masks, p = 0.9)" in kept["note"]
    # row masks keep the same expected (1 - p) of the entries, in whole rows
    row = estimate(model, "graddrop", zero=2, drop_prob=0.9, graddrop_granularity="row", **kw)
    assert row["comm"]["grad all-reduce (kept rows, (1-p) D, p = 0.9)"] == pytest.approx(value, rel=1e-12)
    assert row["comm_total"] == pytest.approx(kept["comm_total"], rel=1e-12)
    with pytest.raises(ValueError, match="drop_prob must be in"):
        estimate(model, "graddrop", zero=2, drop_prob=1.0, **kw)
    with pytest.raises(ValueError, match="graddrop_granularity must be one of element, row"):
        estimate(model, "graddrop", zero=2, graddrop_granularity="layer", **kw)


def test_cli_graddrop_options(capsys):
    argv = ["--model", "smollm2", "--nodes", "1", "--gpus-per-node", "2", "--zero", "2", "--method", "graddrop",
            "--drop_prob", "0.9", "--graddrop_granularity", "row"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "grad all-reduce (kept rows, (1-p) D, p = 0.9)" in out and "kept-only exchange (row masks" in out
    assert main(argv[:-2] + ["--graddrop_exchange", "dense"]) == 0
    assert "kept" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(argv[:-4] + ["--drop_prob", "1.0"])
    assert "--drop_prob must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_zero3_persistence_threshold_follows_resolve_auto():
    """ZeRO-3: the default threshold is resolve_auto's max(10 h, largest k): the 7B preset's k-vectors
    (k = 100,000 > 10 h = 40,960) persist, leave the per-use gathers and are re-gathered once after the step."""
    model, over = build_meta_model("llama-2-7b")
    kw = dict(p=8, zero=3, dtype="bf16", k=over["k"], block_stride=over["block_stride"],
              target_modules=over["target_modules"])
    new = estimate(model, "sparsegrad", **kw)
    old = estimate(model, "sparsegrad", **kw, persistence_threshold=10 * 4096)
    assert new["persistence_threshold"] == 100_000 and old["persistence_threshold"] == 40_960
    assert new["persistent"] - old["persistent"] == new["k_total"] == 2_200_000  # only the k-vectors move
    ag, after = "param all-gather (fwd + bwd)", "persistent param all-gather (after step)"
    assert old["comm"][ag] - new["comm"][ag] == pytest.approx(2 * 7 / 8 * 2 * new["k_total"])
    assert new["comm"][after] - old["comm"][after] == pytest.approx(7 / 8 * 2 * new["k_total"])
    assert new["weights"] - old["weights"] == pytest.approx(2 * new["k_total"] * 7 / 8)  # whole, not 1/p
    lora = estimate(model, "lora", **kw)
    assert lora["persistence_threshold"] == 40_960  # no k-vectors: accelerate's 10 h


def test_cli_runs_on_presets_and_config_json(tmp_path, capsys):
    assert main(["--model", "smollm2", "--nodes", "1", "--gpus-per-node", "2", "--zero", "2", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "530,820" in text and "| sparsegrad |" in text and "| sparsegrad_dynamic |" in text
    _tiny().config.to_json_file(tmp_path / "config.json")
    assert main(["--model", str(tmp_path / "config.json"), "--nodes", "2", "--gpus-per-node", "4", "--zero", "3",
                 "--method", "lora"]) == 0
    assert "ZeRO-3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--model", "smollm2", "--method", "nope"])
    with pytest.raises(ValueError):
        main(["--model", str(tmp_path / "missing.json")])


class _PeakBytes:
    """Bytes of the storages created while active (views and in-place results of older tensors excluded),
    freed when the storage dies; ``peak`` is the most alive at once. Sees every dispatched op, backward
    included; allocations inside a kernel (LAPACK's workspace) are not tensors and are not seen."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._track(t.untyped_storage(), inputs)
                return out

        self.mode, self.live, self.peak, self.seen = Mode(), 0, 0, set()
        self.phase, self.phases = None, {}  # peak bytes per phase, from the phase's start to the next's

    def start(self, phase):
        self.phase = phase
        self.phases[phase] = max(self.phases.get(phase, 0), self.live)

    def _track(self, storage, inputs):
        import weakref

        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in inputs or ptr in self.seen:
            return
        self.seen.add(ptr)
        self.live += size
        self.peak = max(self.peak, self.live)
        if self.phase is not None:
            self.phases[self.phase] = max(self.phases[self.phase], self.live)
        weakref.finalize(storage, self._free, ptr, size)

    def _free(self, ptr, size):
        self.seen.discard(ptr)
        self.live -= size

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _phase_marks(monkeypatch, tracker):
    """Mark the phases of ``calibrate`` on ``tracker``: Gram pass, solve, scores pass, block pass."""
    import sg_distributed.sparsegrad.calibration as calibration_module
    from sg_distributed.sparsegrad.basis import GramAccumulator

    def wrap(owner, name, before, after=None):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if before:
                tracker.start(before)
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    tracker.start(after)

        monkeypatch.setattr(owner, name, wrapped)

    wrap(calibration_module.Calibrator, "fit_bases", "bases pass")
    wrap(GramAccumulator, "bases", "solve", "between")
    wrap(calibration_module.Calibrator, "select_supports", "scores pass", "conversion")
    original_choose = calibration_module.choose_block

    def choose(*args, **kwargs):  # called once per layer between the two scoring passes
        result = original_choose(*args, **kwargs)
        tracker.start("block pass")
        return result

    monkeypatch.setattr(calibration_module, "choose_block", choose)
    original_leading = calibration_module.leading_block

    def leading(*args, **kwargs):  # the leading block has no sums pass: the block pass comes next
        result = original_leading(*args, **kwargs)
        tracker.start("block pass")
        return result

    monkeypatch.setattr(calibration_module, "leading_block", leading)


def test_calibration_memory_matches_a_measured_calibrate(monkeypatch):
    """``calibration_memory``'s terms against the live tensor bytes of a real ``calibrate()`` (fp32, p=1).

    Compared: the estimator's peak over the calibration phases with two substitutions -- its activations
    term (Korthikanti's rough formula) replaced by the measured peak of plain backward passes over the same
    batches (gradients_flowing + run_backward_passes), and LAPACK's eigh workspace left out (allocated inside
    the kernel, invisible to a dispatch mode). Everything else (Grams, eigh output, bases, score buffers,
    tapped inputs, hook transients) is the estimator's own figure."""
    from sg_distributed.sparsegrad.gradient_tap import gradients_flowing, run_backward_passes
    from peft import get_peft_model

    from sg_distributed.sparsegrad.targets import find_target_linears

    layers, hidden, inter, batch, seq = 2, 128, 512, 2, 16
    batches = lm_batches(n=2, batch=batch, seq=seq)
    config = SparseGradConfig(density=DENSITY)

    plain = make_tiny_llama(layers=layers, hidden=hidden, intermediate=inter).requires_grad_(False)  # as calibrate's
    modules = find_target_linears(plain, config.target_modules, config.blocks, config.block_stride)
    with _PeakBytes() as backward, gradients_flowing(plain, modules):
        run_backward_passes(plain, batches, len(batches))

    model = get_peft_model(make_tiny_llama(layers=layers, hidden=hidden, intermediate=inter), config)
    measured = _PeakBytes()
    _phase_marks(monkeypatch, measured)
    with measured:
        model.calibrate(batches, steps=len(batches))

    est = estimate(make_tiny_llama(layers=layers, hidden=hidden, intermediate=inter), "sparsegrad", p=1,
                   dtype="fp32", density=DENSITY, micro_batch_size=batch, seq=seq)
    def allocated(term, value):
        """What a dispatch mode sees of one estimator term: nothing of what kernels allocate inside (LAPACK's
        workspace, add_'s float64 copy), and the whole m x m allocation of the solved Gram, of which the host
        solve touches (and the estimator counts) the upper triangle, 4 m (m + 1) bytes."""
        if term.startswith("eigh workspace") or term.startswith("hook float64 copy"):
            return 0
        if term == "solved gram":
            m = round((-1 + math.sqrt(1 + value)) / 2)
            return 8 * m * m
        return value

    phases = {name: sum(allocated(k, v) for k, v in terms.items() if k != "activations")
              + (backward.peak if "activations" in terms else 0) for name, terms in est["calibration_phases"].items()}
    expected = max(phases.values())
    print(f"\nmeasured calibrate peak {measured.peak:,} B; plain backward peak {backward.peak:,} B; "
          f"estimate (activations := measured backward, no LAPACK workspace) {expected:,} B "
          f"({max(phases, key=phases.get)}); phases {phases}; estimator's own figure {est['calibration_memory']:,} B")
    print("measured per phase", measured.phases)
    assert measured.peak == pytest.approx(expected, rel=0.10)
    for phase, value in phases.items():  # and each phase's own peak
        assert measured.phases[phase] == pytest.approx(value, rel=0.10), phase
    # the estimator's own figure differs only by its rough activations formula and what kernels allocate inside
    own = max(sum(v for k, v in terms.items() if k != "activations") + (backward.peak if "activations" in terms else 0)
              for terms in est["calibration_phases"].values())
    assert est["calibration_memory"] == pytest.approx(own, rel=0.10)
