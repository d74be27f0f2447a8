"""lm-evaluation-harness model wrapper for trained checkpoints, running the LPC-conditioned policy.

Why a subclass of lm-eval's ``HFLM``: HFLM already implements the harness's conventions that are easy to
get subtly wrong (how a request's context/continuation pair is split into tokens, few-shot and chat
templates, stop sequences and ``max_gen_toks`` in ``generate_until``, request re-ordering and batching).
We override only the parts where z enters or where our checkpoints need a different rule:

* ``_loglikelihood_tokens``: one backbone pass per batch; z from the prior on each request's context
  (pooled as in training, ``latent.pool``) is added to the LM head input at the scored continuation positions (the same math as
  ``lpc.policy.response_logps``); logits are computed only there. Requests that share the same input
  tokens and context boundary (multiple-choice with one-token answers, e.g. MMLU's " A".." D") share one pass.
* ``_model_generate``: z from the prior on each prompt, then ``generate`` inside
  ``lpc.policy.conditioned_on``.
* ``tok_encode`` / ``tok_batch_encode``: every context starts with exactly one BOS, as training prompts do
  (``lpc.data.encode_prompt``), whether or not the tokenizer or a chat template adds one.
* ``loglikelihood_rolling``: the text is encoded without BOS; the harness's rolling windows start from BOS.

A baseline checkpoint (no latent) runs the same code with z = None: a plain Hugging Face causal LM.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lpc.data import encode_prompt
from lpc.errors import check_choice
from lpc.evaluation import require_lm_eval
from lpc.evaluation.inference import last_hidden, left_pad, prior_z, prompt_prior_z
from lpc.policy import conditioned_on, final_norm, injection_of

require_lm_eval()
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string  # noqa: E402


@register_model("lpc")
class LPCLM(HFLM):
    """``LPCLM(model, tokenizer)`` for a loaded ``PreferenceModel``; ``LPCLM.from_checkpoint(path)`` for a run.

    Also usable from lm-eval's own entry points once this module is imported, as model ``lpc`` with
    ``model_args="checkpoint=RUN_DIR"``."""

    def __init__(
        self,
        model=None,
        tokenizer=None,
        checkpoint: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        latent_inference: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **_ignored,
    ):
        if model is None:
            if checkpoint is None:
                raise ValueError("LPCLM needs a loaded PreferenceModel (model=...) or checkpoint=PATH")
            model, tokenizer, _ = load_for_eval(checkpoint, device, dtype)
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the LPC wrapper: give an integer")
        super().__init__(
            pretrained=model.lm,
            tokenizer=tokenizer,
            backend="causal",
            batch_size=int(batch_size),
            max_length=max_length,
            logits_cache=False,
        )
        self.latent = model.latent
        self.checkpoint = str(checkpoint) if checkpoint else None
        self._max_gen_toks = int(max_gen_toks)
        if self.latent is not None and latent_inference is not None:
            check_choice("latent_inference", latent_inference, self.latent.inference_modes)
            self.latent.inference = latent_inference

    @classmethod
    def from_checkpoint(cls, path, device: str | None = None, dtype: str | None = None, **kwargs) -> LPCLM:
        model, tokenizer, _ = load_for_eval(path, device, dtype)
        return cls(model, tokenizer, checkpoint=str(path), **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):  # lm-eval's `--model_args` entry point
        args = simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
        return cls(**args)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    # ------------------------------------------------------------------ tokens
    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        if add_special_tokens is False:
            ids = self.tokenizer.encode(string, add_special_tokens=False)
        else:  # the training rule: exactly one BOS, whether or not the text (a chat template) has one
            ids = encode_prompt(self.tokenizer, string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_batch_encode(
        self,
        strings: list[str],
        padding_side: str = "left",
        left_truncate_len: int | None = None,
        truncation: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if padding_side != "left":
            raise ValueError("generation prompts are left-padded")
        return left_pad(
            [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings], self.tokenizer.pad_token_id
        )

    # ------------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """``requests``: ``(cache_key, context_tokens, continuation_tokens)``; returns ``(logprob, is_greedy)``.

        The model sees ``(context + continuation)[:-1]`` (left-truncated to ``max_length``); the
        continuation's tokens are predicted from the last ``len(continuation)`` positions, the first of
        which is the context's last token, where the prior reads h."""
        L = self.max_length
        inputs: dict[tuple, int] = {}  # (input tokens, index of the context's last token) -> unique id
        req_input = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("a loglikelihood request needs a non-empty context and continuation")
            if len(cont) > L:
                raise ValueError(f"continuation of {len(cont)} tokens is longer than max_length={L}")
            inp = tuple((list(ctx) + list(cont))[-(L + 1) :][:-1])
            req_input.append(inputs.setdefault((inp, len(inp) - len(cont)), len(inputs)))
        keys = list(inputs)
        order = sorted(range(len(keys)), key=lambda u: -len(keys[u][0]))  # long first: similar lengths batch
        bs = int(override_bs or self.batch_size)
        logps: list[torch.Tensor | None] = [None] * len(keys)  # per unique input: (n_scored, V)
        for start in range(0, len(order), bs):
            chunk = order[start : start + bs]
            for u, lp in zip(chunk, self._continuation_logprobs([keys[u] for u in chunk])):
                logps[u] = lp
        out = []
        for (key, _, cont), u in zip(requests, req_input):
            lp = logps[u]
            target = torch.tensor(cont, device=lp.device)
            answer = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
            out.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    @torch.no_grad()
    def _continuation_logprobs(self, batch: list[tuple[tuple, int]]) -> list[torch.Tensor]:
        """Log-softmax over the vocabulary at each scored position (ctx_last .. end) of each input."""
        seqs = [list(inp) for inp, _ in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding: positions are the unpadded ones
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pre_norm = None
        if injection_of(self.latent) == "pre_norm":  # z enters before the final norm
            captured = {}
            handle = final_norm(self.model).register_forward_hook(lambda _m, a, _o: captured.__setitem__("pre", a[0]))
            try:
                hidden = last_hidden(self.model, ids, mask)
            finally:
                handle.remove()
            pre_norm = captured["pre"]
        else:
            hidden = last_hidden(self.model, ids, mask)
        rows = torch.arange(len(seqs), device=self.device)
        ctx_last = torch.tensor([c for _, c in batch], device=self.device)
        pos = torch.arange(width, device=self.device)
        context = (pos[None] <= ctx_last[:, None]) & (mask > 0)
        z = None if self.latent is None else prior_z(self.latent, self.latent.pooled(hidden, context))
        scored = (pos[None] >= ctx_last[:, None]) & (mask > 0)
        h = hidden[scored]
        if z is not None:
            zz = z[rows[:, None].expand_as(scored)[scored]]
            h = (
                final_norm(self.model)(pre_norm[scored] + zz.to(pre_norm.dtype))
                if pre_norm is not None
                else h + zz.to(h.dtype)
            )
        lp = F.log_softmax(self.model.get_output_embeddings()(h).float(), dim=-1)
        return list(lp.split(scored.sum(1).tolist()))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            tokens = self.tok_encode(string, add_special_tokens=False)
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                )
            ]
            total = sum(lp for lp, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(context)
        z = prompt_prior_z(self.model, self.latent, context, mask)
        if z is not None:  # generate() repeats each prompt num_beams x num_return_sequences times
            z = z.repeat_interleave(
                generation_kwargs.get("num_beams", 1) * generation_kwargs.get("num_return_sequences", 1), 0
            )
        with conditioned_on(self.model, z, at=injection_of(self.latent)):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        """No hub lookup (HFLM's asks the hub for a revision hash)."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "checkpoint": self.checkpoint,
            "latent": None if self.latent is None else self.latent.name,
            "latent_inference": None if self.latent is None else self.latent.inference,
        }


def load_for_eval(path, device: str | None = None, dtype: str | None = None):
    """``(PreferenceModel, tokenizer, cfg)`` on ``device`` (default: cuda if available), eval mode."""
    from lpc.training.checkpoint import load_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {
        None: None,
        "auto": None,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[dtype]
    return load_checkpoint(Path(path), device=device, dtype=torch_dtype)
