"""lpc.experiments.plan: memory and compute estimates from the config alone (nothing downloaded or run)."""

from __future__ import annotations

import inspect

import pytest
from hydra.utils import get_object, instantiate

from conftest import compose
from lpc.experiments.plan import Arch, GiB, arch_of, latent_parameters, load_hardware, main, plan

A100 = load_hardware("a100_80g_x8")
HUB = {
    "mistral7b": 7_241_732_096,
    "llama3_8b": 8_030_261_248,
    "llama3_8b_instruct": 8_030_261_248,
    "smollm2": 134_515_008,
}


def by_hand(h, layers, heads, kv_heads, inter, vocab, tied):
    """Embeddings + layers x (q, k, v, o, gate, up, down, 2 RMSNorm) + final norm + untied lm_head."""
    kv = kv_heads * (h // heads)
    layer = h * h + h * kv + h * kv + h * h + 3 * h * inter + 2 * h
    return vocab * h + layers * layer + h + (0 if tied else vocab * h)


# --------------------------------------------------------------------------- (b) parameter counts
def test_published_parameter_counts_follow_from_the_shapes():
    assert by_hand(4096, 32, 32, 8, 14336, 32000, False) == HUB["mistral7b"]
    assert by_hand(4096, 32, 32, 8, 14336, 128256, False) == HUB["llama3_8b"]
    assert by_hand(576, 30, 9, 3, 1536, 49152, True) == HUB["smollm2"]


@pytest.mark.parametrize("model", sorted(HUB))
def test_arch_in_the_model_configs(model):
    node = compose([f"model={model}"]).model
    arch, stated = arch_of(node)
    assert stated == HUB[model] == arch.num_parameters
    a = node.arch
    assert arch.num_parameters == by_hand(
        a.hidden_size,
        a.num_hidden_layers,
        a.num_attention_heads,
        a.num_key_value_heads,
        a.intermediate_size,
        a.vocab_size,
        a.tie_word_embeddings,
    )


def test_inconsistent_arch_is_a_config_error(capsys):
    assert main(["model=llama3_8b", "model.arch.num_parameters=5"]) == 2
    assert "num_parameters=5 but its shapes give 8,030,261,248" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny", "smollm2", "mistral7b", "llama3_8b", "llama3_8b_instruct"])
def test_loaders_accept_the_arch_node(model):
    """instantiate(cfg.model) passes `arch` to the loader: its signature must take it."""
    node = compose([f"model={model}"]).model
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    assert "arch" in kwargs
    inspect.signature(get_object(node._target_)).bind(**kwargs)  # TypeError if not accepted


# --------------------------------------------------------------------------- (c) the tiny model, built
def test_tiny_count_matches_the_built_model():
    cfg = compose([])
    model, tokenizer = instantiate(cfg.model)
    real = sum(p.numel() for p in model.parameters())
    arch, _ = arch_of(cfg.model)
    assert arch.num_parameters == real
    assert arch.vocab_size == len(tokenizer) == model.config.vocab_size
    assert plan(cfg, A100).n_params == real


@pytest.mark.parametrize(
    "overrides",
    [
        ["latent=discrete"],
        ["latent=discrete", "codebook=8", "latent.posterior_input=diff"],
        ["latent=continuous"],
        ["latent=continuous", "latent.posterior_input=concat_diff"],
    ],
)
def test_latent_count_matches_the_module(overrides):
    cfg = compose(overrides)
    module = instantiate(cfg.latent, hidden_size=128)
    assert latent_parameters(cfg.latent, 128) == sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- (a) memory formulas
def test_zero3_on_8_gpus_is_16_bytes_per_param_over_8():
    p = plan(compose(["model=llama3_8b", "algo=dpo", "distributed=zero3"]), A100)
    n = HUB["llama3_8b"]
    assert p.world == 8 and p.n_trainable == n
    assert (p.weights, p.gradients, p.optimizer) == (2 * n / 8, 2 * n / 8, 12 * n / 8)
    assert p.states == (2 + 2 + 12) * n / 8
    assert p.reference_weights == 0  # trainer=gpu precomputes the reference log-probs
    # gradient checkpointing (trainer=gpu): 2sbh per layer boundary + one layer recomputed (34sbh);
    # logits: 8 bytes per scored (token, vocabulary) element; s=1024, b=2x2 sequences
    s, b, h, L, V = 1024, 4, 4096, 32, 128256
    assert p.activations == p.activations_checkpointing == L * 2 * s * b * h + 34 * s * b * h
    assert p.activations_no_checkpointing == L * 34 * s * b * h  # sdpa: no stored attention scores
    assert p.logits == 8 * s * b * V
    assert p.fits and p.suggestion is None


def saved_bytes_per_logit(z_kl: bool) -> float:
    """Bytes autograd keeps for the backward per scored (token, vocabulary) element of policy.response_logps."""
    import torch

    from lpc.policy import response_logps

    torch.manual_seed(0)
    V, d, B, T = 3000, 16, 2, 24
    head = torch.nn.Linear(d, V, bias=False)
    lm = type("LM", (), {"get_output_embeddings": lambda self: head})()
    hidden = torch.randn(B, T, d, requires_grad=True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 8:] = True
    batch = {"response_mask": mask, "input_ids": torch.randint(0, V, (B, T))}
    z = torch.randn(B, d, requires_grad=True)
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_logps(lm, hidden, batch, z, with_logits=True, z_kl=z_kl)
    n = int(mask[:, 1:].sum()) * V
    return sum(size for (_, numel), size in saved.items() if numel >= n) / n


def test_the_lm_penalty_costs_what_autograd_keeps():
    """latent.lm_kl_weight > 0: the plan's logits grow by the bytes the KL to the LM without z really saves."""
    from lpc.experiments.plan import LM_KL_BYTES, format_plan

    assert saved_bytes_per_logit(False) <= 8  # the fp32 logits (+ a temporary the plan counts)
    assert saved_bytes_per_logit(True) - saved_bytes_per_logit(False) == LM_KL_BYTES
    base = ["model=llama3_8b", "algo=dpo", "distributed=zero3", "latent=discrete"]
    off = plan(compose([*base, "latent.lm_kl_weight=0"]), A100)
    on = plan(compose([*base, "latent.lm_kl_weight=0.5"]), A100)
    s, b, V = 1024, 4, 128256
    assert (off.logits_bytes, off.logits) == (8, 8 * s * b * V)
    assert (on.logits_bytes, on.logits) == (24, 24 * s * b * V)
    assert on.train_peak - off.train_peak == 16 * s * b * V
    assert "24 B x 4 x 1024 x vocabulary (8 + 16 for latent.lm_kl_weight's KL)" in format_plan(on)
    none = plan(compose(["model=llama3_8b", "algo=dpo", "distributed=zero3", "latent=none"]), A100)
    assert none.logits_bytes == 8  # no latent, no penalty, whatever latent.lm_kl_weight a config carries


@pytest.mark.parametrize("dist,world,shard", [("none", 1, 1), ("ddp", 8, 1), ("fsdp", 8, 8), ("zero3", 8, 8)])
def test_sharding(dist, world, shard):
    p = plan(compose(["model=mistral7b", f"distributed={dist}"]), A100)
    n = HUB["mistral7b"]
    assert p.world == world
    assert p.states == 16 * n / shard
    assert (p.gathered > 0) == (shard > 1)


def test_fp32_training_is_4_4_8_bytes():
    cfg = compose([])  # tiny, trainer=cpu: precision=no, float32
    p = plan(cfg, A100)
    n = p.n_params
    assert (p.weights, p.gradients, p.optimizer) == (4 * n, 4 * n, 8 * n)
    # fp32 activations: twice Korthikanti's 16-bit bytes; gradient checkpointing off on the CPU trainer
    s, b, h, L = 64, 32, 128, 2
    assert p.activations == p.activations_no_checkpointing == L * 34 * s * b * h * 2


def test_reference_model():
    n = HUB["llama3_8b"]
    on_the_fly = ["model=llama3_8b", "distributed=zero3", "trainer.reference_logps=on_the_fly"]
    dpo = plan(compose(on_the_fly + ["algo=dpo"]), A100)
    assert dpo.reference == "on_the_fly" and dpo.reference_weights == 2 * n  # bf16, replicated (not / 8)
    assert dpo.flops_reference == 2 * n * dpo.tokens and dpo.flops_policy == 6 * n * dpo.tokens
    simpo = plan(compose(on_the_fly + ["algo=simpo"]), A100)
    assert simpo.reference == "none" and simpo.reference_weights == 0 and simpo.flops_reference == 0
    pre = plan(compose(["model=llama3_8b", "distributed=zero3", "algo=ipo"]), A100)
    assert pre.reference == "precompute" and pre.reference_weights == 0 and pre.flops_precompute > 0


def test_compute_follows_the_trainer_step_arithmetic():
    p = plan(compose(["model=llama3_8b", "distributed=zero3", "data=ultrafeedback_binarized"]), A100, mfu=0.5)
    assert p.pairs == 61_135 and p.global_batch == 2 * 8 * 8 and p.steps == 61_135 // 128
    assert p.tokens == p.steps * 128 * 2 * 1024
    assert p.gpu_hours == pytest.approx(p.flops / (312e12 * 0.5) / 3600)
    assert p.wall_hours == pytest.approx(p.gpu_hours / 8)
    assert plan(compose(["model=llama3_8b", "distributed=zero3"]), A100, pairs=1280).steps == 10


# --------------------------------------------------------------------------- (d) the command line
def test_one_gpu_does_not_fit_and_zero3_would(capsys):
    code = main(["model=llama3_8b", "algo=dpo", "distributed=none", "hardware=a100_80g_x8"])
    out = capsys.readouterr().out
    assert code == 1
    assert "Verdict: does not fit" in out
    assert "smallest change that fits: add  distributed=zero3" in out
    p = plan(compose(["model=llama3_8b", "algo=dpo", "distributed=none"]), A100)
    assert p.world == 1 and p.states == 16 * HUB["llama3_8b"] and not p.fits
    assert p.suggestion == "distributed=zero3" and p.suggested.fits and p.suggested.world == 8


def test_zero3_on_8_a100_fits(capsys):
    assert main(["model=llama3_8b", "algo=dpo", "distributed=zero3", "hardware=a100_80g_x8"]) == 0
    out = capsys.readouterr().out
    assert "Verdict: fits" in out and "this job uses 8 GPUs" in out


def test_suggestions_in_order(capsys):
    # 40 GB A100s with the reference on the fly: precomputing it is the first (and enough) change
    argv = ["model=llama3_8b", "distributed=zero3", "trainer.reference_logps=on_the_fly", "hardware=a100_40g_x8"]
    assert main(argv) == 1
    assert "add  trainer.reference_logps=precompute" in capsys.readouterr().out
    # no sharding and no checkpointing on 80 GB: checkpointing alone is not enough, ZeRO-3 alone is
    p = plan(compose(["model=mistral7b", "distributed=ddp", "trainer.gradient_checkpointing=false"]), A100)
    assert p.suggestion == "distributed=zero3"
    # more GPUs once sharded: hardware.nodes
    small = {**A100, "gpu_memory_gb": 24}
    q = plan(compose(["model=llama3_8b", "distributed=zero3", "trainer.eval_batch_size=2"]), small)
    assert not q.fits and q.suggestion == "hardware.nodes=2" and q.suggested.fits and q.suggested.world == 16


def test_sweep_and_config_errors(capsys):
    assert main(["-m", "model=llama3_8b", "distributed=zero3", "algo=dpo,simpo"]) == 0
    out = capsys.readouterr().out
    assert "Sweep: 2 jobs" in out and "2/2 jobs fit" in out
    assert main(["model=no_such_model"]) == 2
    assert "config error" in capsys.readouterr().err
    assert main(["--mfu", "0", "model=llama3_8b"]) == 2
    assert main(["hardware=no_such_gpu"]) == 2


def test_plan_reports_gib():
    p = plan(compose(["model=llama3_8b", "distributed=zero3"]), A100)
    assert p.gib("budget") == pytest.approx(80 * 0.9)
    assert p.budget == 80 * GiB * 0.9
    assert isinstance(Arch(4, 1, 2, 1, 8, 10).num_parameters, int)


# --------------------------------------------------------------------------- estimate vs measurement
class PeakTensorBytes:
    """The peak of live CPU tensor bytes while the block runs (what torch.cuda.max_memory_allocated gives on a
    GPU): every op's output storage counted once until it is freed, on top of the storages already alive."""

    def __init__(self, alive: dict[int, int]):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live, self.now = dict(alive), sum(alive.values())
        self.peak = self.now

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.count(out)
                return out

        self.mode = Mode()

    def count(self, out):
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()  # views share their base's storage: counted once
                if key not in self.live and storage.nbytes():
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self.free, key)
        self.peak = max(self.peak, self.now)

    def free(self, key):
        self.now -= self.live.pop(key)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_peak_memory_estimate_within_25_percent_of_the_measured_peak(model, tmp_path):
    import torch

    from lpc.run import build_trainer

    overrides = [f"model={model}", "latent=discrete", "codebook=8", "trainer.batch_size=4", "trainer.eval_batch_size=8"]
    overrides += ["data.n_train=64", "data.n_eval=16", "trainer.reference_logps=on_the_fly", "trainer.precision=no"]
    trainer, _, _ = build_trainer(compose(overrides), tmp_path)
    trainer.train_step()  # AdamW's moments exist from the first step on
    # The planner counts every sequence at trainer.max_length; plan at the data's real longest sequence
    longest = max(len(ids) for c in ("chosen_input_ids", "rejected_input_ids") for ids in trainer.train_dataset[c])
    estimate = plan(compose([*overrides, f"trainer.max_length={longest}"]), load_hardware("cpu"))

    persistent = [*trainer.model.parameters(), *trainer.ref_model.parameters()]
    persistent += [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in persistent}
    with PeakTensorBytes(alive) as train:
        trainer.train_step()
    with PeakTensorBytes(alive) as evaluation:
        trainer.evaluate()
    measured = max(train.peak, evaluation.peak)
    print(
        f"{model}: estimate {estimate.peak / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
        f"(train {train.peak / 2**20:.1f}, eval {evaluation.peak / 2**20:.1f}; planned {estimate.train_peak / 2**20:.1f}, "
        f"{estimate.eval_peak / 2**20:.1f})"
    )
    assert estimate.peak == pytest.approx(measured, rel=0.25)
    # the persistent part is exact: weights + AdamW's two moments + the reference, all fp32
    states = estimate.weights + estimate.optimizer + estimate.reference_weights
    assert sum(alive.values()) == pytest.approx(states, rel=0.01)
