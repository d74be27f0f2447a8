"""lpc-steer on a run trained in a chat template (the pretrained tier's SmolLM2 runs): it prompts as training did."""

from __future__ import annotations

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
