"""adapter=lora|qlora (lpc.adapters, issue 24): LoRA-DPO against a peft model built by hand, what a step changes,
the reference (the base with the adapter off, no copy; the precomputed cache shared with full fine-tuning), resume,
the exported adapter and its merged model, LPCPolicy, the refusals before any model loads, and lpc-plan's counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra.utils import instantiate

import lpc.adapters as adapters
from conftest import compose, read_metrics, run_train
from lpc.config import ConfigError, validate
from lpc.experiments.plan import adapter_parameters, arch_of, load_hardware, plan
from lpc.policy import hidden_states, response_logps

SMALL = ["data.n_train=64", "data.n_eval=16", "trainer.batch_size=8", "trainer.eval_batch_size=16"]
LORA = ["adapter=lora", "adapter.dropout=0.0"]  # no dropout: the hand-built model sees the same function


def build(overrides, tmp_path):
    from lpc.run import build_trainer

    trainer, tokenizer, stats = build_trainer(compose(overrides), tmp_path)
    return trainer, tokenizer, stats


def perturb_adapter(lm, seed=1, scale=0.02):
    """lora_B starts at zero (the adapter starts as the identity): give it values, so the policy differs from its
    base and lora_A gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def lora_params(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if ".lora_" in n}


def logps_by_hand(model, batch) -> torch.Tensor:
    """Summed log-probs of the response tokens from the model's full forward (logits at every position)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    token = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token * batch["response_mask"][:, 1:]).sum(1)


# --------------------------------------------------------------------------- the loss and a step
@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)], ids=["tiny", "smollm2"])
def test_lora_dpo_loss_and_gradients_equal_a_hand_built_peft_model(model, tmp_path):
    from peft import LoraConfig, get_peft_model

    overrides = [f"model={model}", *LORA, *SMALL, "trainer.reference_logps=on_the_fly", "trainer.batch_size=2"]
    trainer, _, _ = build(overrides, tmp_path)
    lm = trainer.model.lm
    perturb_adapter(lm)
    batch = next(trainer._micro_batches(0))
    loss, _, _ = trainer.compute_loss(batch, progress=0.0)
    loss.backward()

    cfg = compose(overrides)
    base, _ = instantiate(cfg.model)
    node = cfg.adapter
    peft_model = get_peft_model(
        base, LoraConfig(r=node.r, lora_alpha=node.alpha, lora_dropout=0.0, target_modules=list(node.target_modules))
    )
    mine = lora_params(lm)
    theirs = lora_params(peft_model)
    assert len(theirs) == len(mine) > 0
    with torch.no_grad():
        for name, p in mine.items():
            theirs["base_model.model." + name].copy_(p)
    peft_model.train()
    policy = logps_by_hand(peft_model, batch)
    with torch.no_grad(), peft_model.disable_adapter():
        ref = logps_by_hand(peft_model, batch)
    half = policy.shape[0] // 2
    margin = (policy[:half] - ref[:half]) - (policy[half:] - ref[half:])
    hand = -torch.nn.functional.logsigmoid(cfg.algo.beta * margin).mean()
    hand.backward()
    assert abs(hand.item() - math.log(2)) > 1e-4  # the adapter moved the policy off its reference
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5, abs=1e-6)
    for name, p in mine.items():
        other = theirs["base_model.model." + name]
        assert p.grad is not None and other.grad is not None, name
        # per tensor, relative to its norm: both sum the same fp32 terms in another order (the LM head on the scored
        # positions only here, on every position there); measured 1.1e-6 on the tiny model, 1.6e-5 on SmolLM2
        error = (p.grad - other.grad).norm() / other.grad.norm().clamp_min(1e-30)
        assert error < 1e-4, (name, error.item())
    assert any(p.grad.abs().max() > 0 for n, p in mine.items() if ".lora_A." in n)


def test_only_the_adapter_and_the_latent_change_in_a_step(tmp_path):
    trainer, _, _ = build(["adapter=lora", "latent=discrete", "codebook=8", "trainer.warmup_steps=0", *SMALL], tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora_" in n or n.startswith("latent.")}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trainable}
    for _ in range(2):  # step 1 moves lora_B only (lora_A's gradient is B^T ... = 0 while B = 0), step 2 both
        trainer.train_step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert {n for n in trainable if ".lora_" in n} <= changed  # every adapter weight moved
    assert any(n.startswith("latent.") for n in changed)
    share = sum(p.numel() for n, p in model.named_parameters() if n in trainable) / sum(
        p.numel() for p in model.parameters()
    )
    assert 0 < share < 0.2  # the tiny model's 128-wide layers: r=16 is 14% of it (SmolLM2: under 5%, below)


# --------------------------------------------------------------------------- the reference
def test_the_reference_is_the_base_model_with_no_second_copy(tmp_path):
    trainer, _, _ = build([*LORA, *SMALL, "trainer.reference_logps=on_the_fly"], tmp_path)
    assert trainer.ref_model is None  # no copy: the policy with its adapter off
    perturb_adapter(trainer.model.lm)
    base, _ = instantiate(compose([]).model)
    base.eval()
    for batch in trainer._micro_batches(0):
        ref, counts = trainer._reference_logps(batch)
        with torch.no_grad():
            want, _ = response_logps(base, hidden_states(base, batch), batch)
            policy = trainer.model(batch).logps
        torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
        assert counts.tolist() == batch["response_mask"][:, 1:].sum(1).tolist()
        assert (policy - want).abs().max() > 1e-4  # the policy itself is not the base
    assert adapters.has_adapter(trainer.model.lm) and all(
        p.requires_grad for p in lora_params(trainer.model.lm).values()
    )  # switching the adapter off for the reference leaves it trainable


def test_the_precomputed_reference_is_the_full_models_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LPC_CACHE_DIR", str(tmp_path / "cache"))
    _, _, full = build([*SMALL, "trainer.reference_logps=precompute"], tmp_path / "full")
    trainer, _, lora = build([*LORA, *SMALL, "trainer.reference_logps=precompute"], tmp_path / "lora")
    assert not full["ref_logps/cache_hit"] and lora["ref_logps/cache_hit"]  # the same entry: computed once
    assert lora["ref_logps/key"] == full["ref_logps/key"]
    base, _ = instantiate(compose([]).model)
    batch = next(trainer._micro_batches(0))
    with torch.no_grad():
        want, _ = response_logps(base, hidden_states(base, batch), batch)
    torch.testing.assert_close(trainer._reference_logps(batch)[0], want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- a run: resume, export, reload
RUN = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.log_every=1", "trainer.eval_every=0", "data.n_train=320",
       "data.n_eval=64", "adapter=lora", "latent=discrete", "codebook=8"]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """An LPC-DPO LoRA run of the tiny model, with the merged export."""
    run_dir = tmp_path_factory.mktemp("lora_run")
    run_train([*RUN, "adapter.merged_export=true"], run_dir, env={"OMP_NUM_THREADS": "1"})
    return run_dir


def test_resume_is_bit_exact(lora_run, tmp_path):
    from conftest import REPO

    crashed = tmp_path / "crashed"
    proc = run_train(
        [*RUN, "adapter.merged_export=true"],
        crashed,
        env={"OMP_NUM_THREADS": "1"},
        script=[str(REPO / "tests" / "crash_after.py"), "3"],
        check=False,
    )
    assert proc.returncode == 3 and not (crashed / "final").exists()
    run_train([*RUN, "adapter.merged_export=true"], crashed, env={"OMP_NUM_THREADS": "1"})
    assert read_metrics(crashed)["train/resumed"] is True
    assert (crashed / "train_log.jsonl").read_text() == (lora_run / "train_log.jsonl").read_text()
    for name in (adapters.ADAPTER_WEIGHTS, "latent.safetensors"):
        assert (crashed / "final" / name).read_bytes() == (lora_run / "final" / name).read_bytes(), name
    a, b = read_metrics(crashed), read_metrics(lora_run)
    for key in ("eval/pref_accuracy", "eval/margin", "eval/loss"):
        assert a[key] == b[key], key


def test_a_checkpoint_holds_the_adapter_and_the_latent_not_the_base(lora_run):
    from safetensors.torch import load_file

    (checkpoint,) = sorted((lora_run / "checkpoints").iterdir())[-1:]
    state = load_file(str(checkpoint / "model.safetensors"))
    assert state and all(".lora_" in k or k.startswith("latent.") for k in state)
    p = plan(compose(RUN), load_hardware("cpu"))
    size = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file())
    assert size == pytest.approx(p.checkpoint_bytes, rel=0.1)  # + the RNG states and small files
    final = lora_run / "final"
    assert {adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS, "latent.safetensors"} <= {
        f.name for f in final.iterdir()
    }
    assert not (final / "model.safetensors").exists()
    config = json.loads((final / adapters.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (16, 16, "LORA")


def test_lpc_policy_reloads_the_adapter_run_and_its_merged_export_equals_it(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lpc.evaluation.pretrained import LPCPolicy
    from lpc.run import build_datasets

    policy = LPCPolicy.from_pretrained(lora_run)
    merged = LPCPolicy.from_pretrained(lora_run / "final" / adapters.MERGED)
    assert adapters.has_adapter(policy.model.lm) and not adapters.has_adapter(merged.model.lm)
    assert policy.latent is not None and merged.latent is not None
    _, eval_ds, _ = build_datasets(compose(RUN), policy.tokenizer)
    from lpc.data import PairCollator

    batch = PairCollator(policy.tokenizer.pad_token_id)([eval_ds[i] for i in range(8)])
    with torch.no_grad():
        a = policy.model(batch, latent_mode="prior").logps
        b = merged.model(batch, latent_mode="prior").logps
        # peft's own loader reads the same adapter (peft's file format)
        base, _ = instantiate(compose(RUN).model)
        theirs = PeftModel.from_pretrained(base, lora_run / "final").eval()
        c = response_logps(theirs.base_model.model, hidden_states(theirs.base_model.model, batch), batch)[0]
        plain = AutoModelForCausalLM.from_pretrained(lora_run / "final" / adapters.MERGED).eval()
        d = response_logps(plain, hidden_states(plain, batch), batch)[0]
        mine = response_logps(policy.model.lm, hidden_states(policy.model.lm, batch), batch)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mine, c, rtol=0, atol=1e-5)
    torch.testing.assert_close(mine, d, rtol=1e-5, atol=1e-4)
    # the reloaded policy is the trained one: its evaluation reproduces the run's accuracy
    with torch.no_grad():
        got = policy.generate("[source_0] Please describe rivers.", code=3, greedy=True, max_new_tokens=8)
    assert isinstance(got[0].text, str)


def test_lm_eval_runs_on_an_adapter_checkpoint(lora_run, tmp_path):
    import shutil

    from lpc.evaluation import harness

    run = tmp_path / "run"
    shutil.copytree(lora_run / "final", run / "final")
    shutil.copy(lora_run / "metrics.json", run / "metrics.json")
    assert harness.main([str(run), "tasks=arc_easy_local", "limit=2", "batch_size=4", "device=cpu"]) == 0
    assert read_metrics(run)["lm_eval/arc_easy_local/n_samples"] == 2


# --------------------------------------------------------------------------- refusals before any model loads
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["adapter=lora", "adapter.r=0"], "adapter.r=0 is not allowed: an integer >= 1"),
        (["adapter=lora", "adapter.alpha=-1"], "adapter.alpha=-1 is not allowed"),
        (["adapter=lora", "adapter.dropout=1.5"], "adapter.dropout=1.5 is not allowed: a number in [0, 1)"),
        (["adapter=lora", "adapter.target_modules=[lm_head]"], "adapter.target_modules=['lm_head'] is not allowed"),
        (
            ["adapter=lora", "hardware=cpu_1x2", "distributed=zero3"],
            "adapter=lora is not allowed with distributed=zero3",
        ),
        (["adapter=qlora"], "adapter=qlora is not allowed here: QLoRA loads the frozen base in 4 bits"),
    ],
)
def test_bad_adapter_configs_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert message in str(err.value)


def test_qlora_is_refused_on_cpu_with_exit_2_before_any_model_loads(tmp_path):
    proc = run_train(["model=smollm2", "adapter=qlora"], tmp_path / "run", check=False)
    assert proc.returncode == 2
    err = proc.stdout + proc.stderr
    assert "config error: adapter=qlora is not allowed here" in err and "needs a CUDA GPU" in err
    assert "data:" not in err and not (tmp_path / "run" / "checkpoints").exists()


def test_the_fingerprint_of_a_run_without_an_adapter_is_unchanged():
    """Runs from before the adapter group existed resume: adapter=none adds nothing to the fingerprint."""
    from omegaconf import OmegaConf, open_dict

    from lpc.config import fingerprint

    cfg = compose([])
    without = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(without):
        del without["adapter"]
    assert fingerprint(cfg) == fingerprint(without)
    assert fingerprint(compose(["adapter=lora"])) != fingerprint(cfg)
    assert fingerprint(compose(["adapter=lora", "adapter.merged_export=true"])) == fingerprint(
        compose(["adapter=lora"])
    )


# --------------------------------------------------------------------------- lpc-plan
def test_adapter_parameters_equal_a_built_peft_models():
    trainer_cfg = compose(["adapter=lora"])
    lm, _ = instantiate(trainer_cfg.model)
    adapters.add_adapter(lm, trainer_cfg.adapter)
    arch, _ = arch_of(trainer_cfg.model)
    assert adapter_parameters(arch, 16, adapters.PROJECTIONS) == adapters.parameter_counts(lm)[0] == 90_112
    # SmolLM2's shapes, built on the meta device (no weights): 4,884,480 = 3.6% of 134,515,008
    from transformers import LlamaConfig, LlamaForCausalLM

    a = compose(["model=smollm2"]).model.arch
    config = LlamaConfig(**{k: a[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "intermediate_size", "vocab_size",
                                              "tie_word_embeddings")})  # fmt: skip
    with torch.device("meta"):
        smol = LlamaForCausalLM(config)
    adapters.add_adapter(smol, trainer_cfg.adapter)
    arch, _ = arch_of(compose(["model=smollm2"]).model)
    assert adapter_parameters(arch, 16, adapters.PROJECTIONS) == adapters.parameter_counts(smol)[0] == 4_884_480


def test_lora_llama3_8b_with_64_codes_fits_one_80gb_gpu():
    from lpc.experiments.plan import main

    argv = [
        "model=llama3_8b",
        "algo=dpo",
        "codebook=64",
        "adapter=lora",
        "distributed=none",
        "hardware.gpus_per_node=1",
    ]
    assert main(argv) == 0
    p = plan(compose(argv))
    assert p.fits and p.world == 1 and p.adapter == "lora" and p.reference_weights == 0
    n_adapter = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert p.n_adapter_params == n_adapter and p.n_trainable == n_adapter + p.n_latent_params
    assert p.frozen_weights == 2 * 8_030_261_248  # bf16, no fp32 master copy
    assert p.gradients == 4 * p.n_trainable and p.optimizer == 8 * p.n_trainable
    assert p.checkpoint_bytes == 12 * p.n_trainable  # not the frozen base
    full = plan(compose([a for a in argv if a != "adapter=lora"]))
    assert not full.fits and full.peak > 3 * p.peak


def test_qlora_plans_a_4_bit_base():
    p = plan(compose(["model=llama3_8b", "adapter=qlora", "distributed=none", "hardware.gpus_per_node=1"]))
    arch, _ = arch_of(compose(["model=llama3_8b"]).model)
    linear = 32 * (arch.layer_parameters - 2 * 4096)
    assert p.frozen_weights == pytest.approx(
        linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + 2 * (arch.num_parameters - linear)
    )
    assert p.frozen_weights / 2**30 < 6.5  # 8B in ~5.7 GiB


def test_a_misfit_suggests_adapter_lora_on_the_gpus_it_has():
    p = plan(compose(["model=llama3_8b", "algo=dpo", "distributed=none", "hardware.gpus_per_node=1"]))
    assert not p.fits and p.suggestion == "distributed=zero3 hardware.gpus_per_node=4"  # the method unchanged
    assert p.alternative == "adapter=lora" and p.alternative_plan.fits and p.alternative_plan.world == 1
    # a 24 GB GPU, nothing else fits: LoRA's bf16 base (15 GiB) and the evaluation's logits of 16 sequences do not,
    # QLoRA's 4-bit base does; with 4 sequences LoRA does
    small = {**load_hardware("a100_80g_x8"), "gpu_memory_gb": 24, "gpus_per_node": 1}
    q = plan(compose(["model=llama3_8b", "algo=dpo", "distributed=none"]), small)
    assert not q.fits and q.suggestion == "adapter=qlora" and q.suggested.fits and q.alternative is None
    q = plan(compose(["model=llama3_8b", "algo=dpo", "distributed=none", "trainer.eval_batch_size=2"]), small)
    assert q.suggestion == "adapter=lora" and q.suggested.fits
    # on CPU hardware QLoRA is refused, so never suggested
    cpu = plan(compose(["model=llama3_8b", "algo=dpo", "distributed=none", "hardware=cpu"]))
    assert "qlora" not in (cpu.suggestion or "") + (cpu.alternative or "")


# --------------------------------------------------------------------------- SmolLM2: the command
@pytest.mark.slow
def test_smollm2_lora_trains_saves_resumes_and_reloads(tmp_path):
    from lpc.evaluation.pretrained import LPCPolicy

    run_dir = tmp_path / "run"
    overrides = ["model=smollm2", "codebook=8", "adapter=lora", "trainer.max_steps=3", "data.n_eval=16"]
    proc = run_train(overrides, run_dir, env={"OMP_NUM_THREADS": "1"})
    assert "parameters train" in proc.stdout + proc.stderr
    first = read_metrics(run_dir)
    assert first["train/steps"] == 3 and first["status"] == "completed"
    run_train(overrides, run_dir, env={"OMP_NUM_THREADS": "1"})  # the same command again: resumes at step 3
    again = read_metrics(run_dir)
    assert again["train/resumed"] is True and again["train/steps_this_session"] == 0
    assert again["eval/pref_accuracy"] == first["eval/pref_accuracy"]
    policy = LPCPolicy.from_pretrained(run_dir)
    trainable = sum(p.numel() for n, p in policy.model.named_parameters() if ".lora_" in n or n.startswith("latent."))
    total = sum(p.numel() for p in policy.model.parameters())
    assert trainable / total < 0.05
    assert policy.generate("Please describe rivers.", greedy=True, max_new_tokens=4)[0].text is not None
