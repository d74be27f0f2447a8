"""lpc-steer on a run trained in a chat template (the pretrained tier's SmolLM2 runs): it prompts as training did."""

from __future__ import annotations

import json
import shutil

from omegaconf import OmegaConf

# A minimal chat template (the tiny tokenizer has none); only that it differs from the plain prompt matters here.
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"


def test_steering_prompts_a_chat_template_run_in_its_template(tiny_lpc_run, tmp_path, monkeypatch):
    """Every prompt lpc-steer generates from (the untagged ones) and gives the prior (the tagged ones) is encoded
    with the chat template when the run trained with data.chat_template=true, as tokenize_pairs encoded its
    training prompts; a plain prompt would be text the run never saw."""
    import transformers

    from lpc.data import encode_prompt
    from lpc.evaluation import steering
    from lpc.training.checkpoint import RUN_CONFIG

    final = tmp_path / "run" / "final"
    shutil.copytree(tiny_lpc_run / "final", final)
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(final)
    cfg = OmegaConf.load(final / RUN_CONFIG)
    cfg.data.chat_template = True
    OmegaConf.save(cfg, final / RUN_CONFIG)

    seen = []

    def recording(tok, prompt, chat_template=False, messages=""):
        ids = encode_prompt(tok, prompt, chat_template, messages)
        seen.append((prompt, ids))
        return ids

    monkeypatch.setattr(steering, "encode_prompt", recording)
    assert steering.main([str(final.parent), "prompts=2", "samples=1", "max_new_tokens=2"]) == 0
    assert any(p.startswith("[") for p, _ in seen) and any(not p.startswith("[") for p, _ in seen)
    for prompt, ids in seen:
        assert ids == encode_prompt(tokenizer, prompt, chat_template=True)
        assert ids != encode_prompt(tokenizer, prompt, chat_template=False)


def test_the_pretrained_steering_script_measures_every_code_of_a_run(tiny_lpc_run):
    """scripts/steering_pretrained.py: every code of the codebook is in a row (a trained code's own, or the zero
    codes' shared z = 0 row, whose generations it checks are z = 0's token for token); the z = 0 row's plain-text
    NLL is the run's own LM-integrity figure (the same probe), and the rewards are lpc-steer's measure."""
    import importlib.util
    from pathlib import Path

    from lpc.training.checkpoint import load_checkpoint

    path = Path(__file__).resolve().parents[2] / "scripts" / "steering_pretrained.py"
    spec = importlib.util.spec_from_file_location("steering_pretrained", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    sizes = {"prompts": 4, "samples": 2, "max_new_tokens": 4, "seed": 0}
    out = script.measure_run(tiny_lpc_run / "final", sizes)
    model, _, _ = load_checkpoint(tiny_lpc_run)
    codes = [k for key, row in out["rows"].items() if key != "z = 0" for k in row["codes"]]
    codes += out.get("zero_codes", [])
    assert sorted(codes) == list(range(model.latent.num_codes))
    if out.get("zero_codes"):
        assert out["zero_code_equals_z0"] is True
    for k in codes:  # a code's row holds that code's vector
        key = next((n for n, r in out["rows"].items() if k in r.get("codes", [])), None)
        if key is not None:
            assert out["rows"][key]["norm"] == float(model.latent.code_vector(k).norm())
    metrics = json.loads((tiny_lpc_run / "metrics.json").read_text())
    assert abs(out["rows"]["z = 0"]["text_nll"] - metrics["eval/lm/text_nll/zero"]) < 1e-4
    for row in out["rows"].values():
        assert len(row["all"]) == 2 and all(-1.0 <= mu <= 1.0 for mu, _ in row["all"])
        assert 0.0 <= row["repeat_rate"] <= 1.0
