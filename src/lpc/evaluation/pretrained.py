"""A trained policy as one object: the language model, its tokenizer and, for LPC, the latent module.

    from lpc.evaluation.pretrained import LPCPolicy

    policy = LPCPolicy.from_pretrained("outputs/runs/.../RUN")    # a run directory, its final/, or a hub repo
    policy.generate("Please describe rivers.")                    # z from the prior
    policy.generate("Please describe rivers.", code=3)            # z = code 3 of the codebook
    policy.save_pretrained("my-lpc-policy")                       # the same layout as a run's final/
    policy.push_to_hub("me/lpc-mistral-7b")                       # then LPCPolicy.from_pretrained("me/lpc-mistral-7b")

``AutoModelForCausalLM.from_pretrained(RUN/final)`` alone loads the language model without the latent; this class
is the one call that loads both. It is huggingface_hub's ``ModelHubMixin`` (``from_pretrained``,
``save_pretrained``, ``push_to_hub``, a model card) over the checkpoint layout of
:mod:`lpc.training.checkpoint`, so a saved or pushed policy is also a run's ``final/`` folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import ModelHubMixin, snapshot_download

from lpc.training.checkpoint import export_checkpoint, load_checkpoint
from lpc.training.rundir import RunDir


class LPCPolicy(ModelHubMixin, library_name="lpc", tags=["latent-preference-coding", "preference-optimization"]):
    """``model`` is a ``lpc.policy.PreferenceModel`` (``model.lm``, ``model.latent``; no latent for a baseline);
    ``run_config`` the run's resolved Hydra config (its ``lpc_config.yaml``)."""

    def __init__(self, model, tokenizer, run_config=None):
        super().__init__()
        self.model, self.tokenizer, self.run_config = model, tokenizer, run_config

    @property
    def latent(self):
        return self.model.latent

    @property
    def chat_template(self) -> bool:
        """Whether prompts are wrapped in the tokenizer's chat template, as in training."""
        data = (self.run_config or {}).get("data") or {}
        return bool(data.get("chat_template", False))

    def generate(self, prompts: str | list[str], code: int | None = None, **kwargs):
        """``lpc.evaluation.generate.generate`` with this policy: one ``Generation`` per prompt, z from the
        prior, or codebook[``code``] for a discrete latent; prompts are encoded as in training."""
        from lpc.evaluation.generate import generate

        kwargs.setdefault("chat_template", self.chat_template)
        return generate(self.model, self.tokenizer, prompts, code=code, **kwargs)

    def to(self, device) -> LPCPolicy:
        self.model.to(device)
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> LPCPolicy:
        """A run directory (its ``final/``), a checkpoint folder, or a hub repo id; ``device=`` and ``dtype=``
        go to the loader. ``huggingface_hub``'s keyword arguments (``revision``, ``token``, ...) work too."""
        run = RunDir.of(str(pretrained_model_name_or_path))
        if run.has_model():  # a local run or checkpoint: its model directory; else a hub repo id
            pretrained_model_name_or_path = run.model_dir
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        if self.run_config is None:
            raise ValueError("a policy without its run config (lpc_config.yaml) cannot be saved")
        export_checkpoint(self.model, self.tokenizer, self.run_config, save_directory)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        **_ignored,
    ) -> LPCPolicy:
        path = Path(model_id).expanduser()
        if not path.exists():  # a hub repo id: the files into the local cache (or from it, offline)
            path = Path(
                snapshot_download(
                    model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            )
        model, tokenizer, run_config = load_checkpoint(path, device=device, dtype=dtype)
        return cls(model, tokenizer, run_config)
