"""Reference log-probs: computed once, cached under $LPC_CACHE_DIR/ref_logps/<key>, hit by the next
run that shares (model, data, tokenizer, lengths, precision), missed when any of them changes, and
equal to the on-the-fly reference."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import compose

SMALL = ["data.n_train=48", "data.n_eval=24", "trainer.eval_batch_size=16"]


def prepare(overrides, cache):
    from accelerate import Accelerator
    from hydra.utils import instantiate

    from lpc.data import PairCollator
    from lpc.run import build_datasets
    from lpc.training.reference import attach_reference_logps, key_parts

    cfg = compose(SMALL + overrides)
    lm, tok = instantiate(cfg.model)
    train, ev, _ = build_datasets(cfg, tok)
    acc = Accelerator(cpu=True)
    parts = key_parts(cfg, lm, train, ev, acc.device.type)
    splits, info = attach_reference_logps(
        lm, {"train": train, "eval": ev}, parts, acc, PairCollator(tok.pad_token_id), 16, cache
    )
    return cfg, lm, tok, splits, info


def test_cache_is_hit_by_the_next_run_of_a_sweep_and_missed_when_model_data_or_lengths_change(tmp_path):
    _, _, _, splits, first = prepare([], tmp_path)
    assert first["ref_logps/cache_hit"] is False
    assert (tmp_path / "ref_logps" / first["ref_logps/key"] / "logps.safetensors").exists()
    # another run of the sweep: different algorithm, beta, latent -> same reference numbers, from the cache
    _, _, _, again, second = prepare(["algo=ipo", "latent=discrete", "codebook=4"], tmp_path)
    assert second == {**first, "ref_logps/cache_hit": True}
    assert again["train"]["ref_chosen_logps"] == splits["train"]["ref_chosen_logps"]
    keys = {first["ref_logps/key"]}
    for change in (["data.seed=1"], ["flip=0.25"], ["trainer.max_length=40"], ["model.init_seed=1"]):
        _, _, _, changed, info = prepare(change, tmp_path)
        assert info["ref_logps/cache_hit"] is False, change
        assert info["ref_logps/key"] not in keys, change
        keys.add(info["ref_logps/key"])
    # the last change (another model) gives other numbers: reusing the first entry would be wrong
    assert changed["train"]["ref_chosen_logps"] != splits["train"]["ref_chosen_logps"]


def test_a_corrupted_or_foreign_entry_is_not_used(tmp_path):
    _, _, _, _, info = prepare([], tmp_path)
    key_file = tmp_path / "ref_logps" / info["ref_logps/key"] / "key.json"
    key_file.write_text(key_file.read_text().replace('"max_length": 64', '"max_length": 65'))
    _, _, _, _, again = prepare([], tmp_path)
    assert again["ref_logps/cache_hit"] is False


def test_precomputed_reference_gives_the_on_the_fly_losses(tmp_path):
    from hydra.utils import instantiate

    from lpc.run import preference_trainer

    # codes at the hidden state's norm: z moves the policy off the reference from step 0, so the margins are not 0
    cfg, lm, tok, splits, _ = prepare(["latent=discrete", "codebook=4", "latent.codebook_init=hidden"], tmp_path)

    def trainer(ref, train, ev, sub):
        from lpc.policy import PreferenceModel

        torch.manual_seed(0)
        latent = instantiate(cfg.latent, hidden_size=lm.config.hidden_size)
        return preference_trainer(
            cfg, PreferenceModel(copy.deepcopy(lm), latent), ref, tok, train, ev, tmp_path / sub, None
        )

    plain = {k: v.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]) for k, v in splits.items()}
    on_the_fly = trainer(copy.deepcopy(lm), plain["train"], plain["eval"], "otf")
    precomputed = trainer(None, splits["train"], splits["eval"], "pre")
    assert precomputed.ref_model is None
    batch = next(iter(precomputed._micro_batches(0)))
    assert "ref_logps" in batch
    l1, m1, _ = on_the_fly.compute_loss({k: v for k, v in batch.items() if k != "ref_logps"}, 0.0, "prior")
    l2, m2, _ = precomputed.compute_loss(batch, 0.0, "prior")
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    e1, e2 = on_the_fly.evaluate(), precomputed.evaluate()
    for k in e1:
        assert e2[k] == pytest.approx(e1[k], abs=1e-5), k
    # a reward that uses the reference at all: with a zero reference the margins would differ
    assert m1["rewards/margins"] != pytest.approx(0.0)


def test_a_precompute_run_builds_no_reference_model(tmp_path, monkeypatch):
    import lpc.run
    from lpc.training.trainer import PreferenceTrainer

    seen = {}
    original = PreferenceTrainer.__init__

    def spy(self, **kw):
        seen["ref_model"] = kw["ref_model"]
        original(self, **kw)

    monkeypatch.setattr(PreferenceTrainer, "__init__", spy)
    monkeypatch.setenv("LPC_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose(
        SMALL + ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0", "trainer.batch_size=8"]
    )
    assert cfg.trainer.reference_logps == "precompute"  # the default
    (tmp_path / "run").mkdir()  # Hydra creates it in a real run
    metrics = lpc.run.run(cfg, tmp_path / "run")
    assert seen["ref_model"] is None
    assert metrics["ref_logps/cache_hit"] is False and metrics["train/steps"] == 2
