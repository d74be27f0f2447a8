"""Does the LPC policy stay a language model? NLL of plain text and greedy answers, with and without z.

z is added to the LM head's input, a logit offset ``W z`` over the whole vocabulary: a z of the hidden
state's size makes a pretrained LM write gibberish (SmolLM2: 3.4 -> 9.7 nats/token) while the preference
loss, which reads only differences between two responses, can still go down. So every run measures, on
text the project ships (:data:`PLAIN_QA`, plain questions with one-sentence answers) and on the eval
pairs' chosen responses:

* per-token NLL of the answers under the prior's z, under each code (up to ``max_codes``), with z = 0,
  and under the reference model (the initial LM, measured before the first step);
* a degeneration measure of greedy answers to the questions: the rate of repeated 3-grams, against the
  reference's answers to the same questions; and their coherence: the per-token NLL of the answers given with
  the prior's z under the same LM without z (``lm/answer_nll``), beside that of the reference's answers
  (``lm/answer_nll/reference``), and the fraction of answers equal to the reference's;
* the plain text's NLL under the codes the prior picks for the eval prompts (:func:`prompt_codes_nll`): the prior's
  z for the plain text itself need not be one of them;
* ``lm/damaged``: 1.0 when the prior's z raises the plain-text NLL by more than :data:`NLL_TOLERANCE`
  (5%) over the same LM with z = 0, or the greedy answers repeat 3-grams :data:`REPEAT_TOLERANCE` (0.2)
  more often than the reference's. ``lpc-report`` lists flagged runs. It is left out (``lm/reference_is_lm``
  0) where the initial model is no language model of English (:data:`LM_NLL_FRACTION`): the random-init tiny
  model, whose figures are still reported.
* ``lm/prompt_codes_damaged``: 1.0 when a code the prior picks for an eval prompt raises the plain-text NLL by
  more than :data:`NLL_TOLERANCE`, judged where ``lm/damaged`` is. Its own flag, which ``lpc-report`` lists too:
  ``lm/damaged`` is the LM a user gets for plain text (the prior's z for that text), this one the LM a prompt of
  the task gets.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from lpc.data import PairCollator, encode_prompt
from lpc.evaluation.inference import left_pad, prompt_prior_z
from lpc.policy import conditioned_on, hidden_states, injection_of, positions_of, prompt_mask, response_logps

log = logging.getLogger(__name__)

NLL_TOLERANCE = 0.05  # the prior's z may raise plain text's NLL by at most 5% over z = 0
REPEAT_TOLERANCE = 0.2  # ... and the repeated-3-gram rate of greedy answers by at most 0.2 over the reference's
# A backbone is judged only if it models plain English: its reference NLL under this fraction of ln(vocabulary), the
# uniform guess's (SmolLM2: 2.5 of 10.8 nats; the random-init tiny model: 6.5 of 6.9, no language model to damage).
LM_NLL_FRACTION = 0.8

# Plain questions and one-sentence answers (written for this project). The answers are what the NLL scores;
# the first GENERATE questions are also answered greedily.
PLAIN_QA = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("Why do we need sleep?", "Sleep lets the body rest and helps the brain store what it has learned."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How do plants get energy?", "Plants use sunlight to turn water and carbon dioxide into sugar."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water at sea level?", "At sea level, water boils at 100 degrees Celsius."),
    ("Why is exercise good for you?", "Regular exercise strengthens the heart, muscles and bones."),
    ("What is a noun?", "A noun is a word that names a person, place or thing."),
    ("How does a bicycle move?", "The rider pushes the pedals, which turn the chain and the back wheel."),
    ("What is the moon?", "The moon is a natural satellite that orbits the Earth."),
    ("Give me a tip for studying.", "Study in short sessions and take a break between them."),
    ("What should I pack for a day at the beach?", "Bring sunscreen, water, a towel and a hat."),
    ("How do you make a cup of tea?", "Boil water, pour it over a tea bag and let it steep for a few minutes."),
    ("What is the main job of the heart?", "The heart pumps blood through the body."),
    ("Describe a rainy afternoon.", "Grey clouds hang low and the rain taps softly on the windows."),
    ("What is a good way to save money?", "Set aside a small part of every paycheck before spending the rest."),
    ("Why do leaves change color in autumn?", "As days get shorter, trees stop making the green pigment in leaves."),
    ("What is the tallest animal?", "The giraffe is the tallest animal in the world."),
)
GENERATE = 8  # questions answered greedily
MAX_NEW_TOKENS = 32


def repeat_rate(tokens: list[int], n: int = 3) -> float:
    """Fraction of a sequence's n-grams that repeat an earlier one (0 = none; "Che Che Che ..." -> ~1)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class LMProbe:
    """The plain-text probe of one run: its token ids, in the run's chat template if it trains in one."""

    def __init__(self, tokenizer, chat_template: bool = False, max_codes: int = 16):
        self.tokenizer, self.max_codes = tokenizer, max_codes
        eos = tokenizer.eos_token_id
        self.rows = []
        for question, answer in PLAIN_QA:
            ids = tokenizer(" " + answer if not chat_template else answer, add_special_tokens=False)["input_ids"]
            ids = ids + ([eos] if eos is not None else [])
            prompt = encode_prompt(tokenizer, question, chat_template)
            self.rows.append({"prompt_input_ids": prompt, "chosen_input_ids": ids, "rejected_input_ids": ids})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.pad_id = pad
        full = PairCollator(pad)(self.rows)
        self.batch = {k: v[: len(self.rows)] for k, v in full.items()}  # the chosen half: (question, answer)

    def _to(self, device):
        return {k: v.to(device) for k, v in self.batch.items()}

    @torch.no_grad()
    def nll(self, lm, zs: dict[str, torch.Tensor | None], latent=None) -> dict[str, float]:
        """Per-token NLL of the answers for each named z (rows (N, d) or one (d,) vector; None = no z), and
        ``prior`` under the latent's prior (from each question) when a latent is given. One backbone pass."""
        device = next(lm.parameters()).device
        batch = self._to(device)
        hidden = hidden_states(lm, batch)
        if latent is not None:
            h_prompt = latent.pooled(hidden, prompt_mask(batch))
            zs = {**zs, "prior": latent.prior_z(h_prompt)}
        out = {}
        for name, z in zs.items():
            if z is not None and z.dim() == 1:
                z = z.expand(hidden.shape[0], -1)
            sums, counts = response_logps(lm, hidden, batch, z, positions_of(latent))
            out[name] = float(-sums.sum() / counts.sum())
        return out

    @torch.no_grad()
    def answers_nll(self, lm, answers: list[list[int]]) -> float:
        """Per-token NLL of greedy answers (to the first questions) under ``lm`` without z: how plausible an
        answer is to the LM the latent sits on. Empty answers are left out."""
        rows = [
            {"prompt_input_ids": r["prompt_input_ids"], "chosen_input_ids": a, "rejected_input_ids": a}
            for r, a in zip(self.rows, answers)
            if a
        ]
        if not rows:
            return float("nan")
        device = next(lm.parameters()).device
        full = PairCollator(self.pad_id)(rows)
        batch = {k: v[: len(rows)].to(device) for k, v in full.items()}
        sums, counts = response_logps(lm, hidden_states(lm, batch), batch)
        return float(-sums.sum() / counts.sum())

    @torch.no_grad()
    def greedy(self, lm, latent=None) -> list[list[int]]:
        """Greedy answers (new tokens) to the first :data:`GENERATE` questions, z from the prior."""
        device = next(lm.parameters()).device
        ids, mask = left_pad([r["prompt_input_ids"] for r in self.rows[:GENERATE]], self.pad_id, device)
        z = prompt_prior_z(lm, latent, ids, mask)
        with conditioned_on(lm, z, injection_of(latent)):
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        eos = self.tokenizer.eos_token_id
        answers = []
        for row in out[:, ids.shape[1] :].tolist():
            answers.append(row[: row.index(eos)] if eos in row else row)
        return answers

    def measure_reference(self, lm, generate: bool = True) -> dict:
        """The initial LM's figures (call before the first step)."""
        was_training = lm.training
        lm.eval()
        try:
            ref = {"nll": self.nll(lm, {"ref": None})["ref"]}
            if generate:
                ref["answers"] = self.greedy(lm)
        finally:
            lm.train(was_training)
        return ref

    def measure(self, lm, latent, reference: dict | None, codes: list[int] = (), generate: bool = True) -> dict:
        """``lm/*`` metrics of a trained policy (see the module docstring) and its greedy answers."""
        was_training = lm.training
        lm.eval()
        try:
            zs: dict = {"zero": None}
            for k in codes[: self.max_codes]:
                zs[f"code_{k}"] = latent.code_vector(k).detach()
            nll = self.nll(lm, zs, latent)
            answers = self.greedy(lm, latent) if generate else None
            ref_answers = (reference or {}).get("answers")
            # the same LM without z reads the latent's answers and the reference's: coherence beside the NLL
            coherence = None
            if answers is not None and latent is not None and ref_answers is not None:
                coherence = (self.answers_nll(lm, answers), self.answers_nll(lm, ref_answers))
        finally:
            lm.train(was_training)
        m = {"lm/text_nll/zero": nll["zero"]}
        if latent is not None:
            m["lm/text_nll/prior"] = nll["prior"]
            m["lm/nll_ratio"] = nll["prior"] / nll["zero"]
            code_nll = [v for k, v in nll.items() if k.startswith("code_")]
            if code_nll:
                m["lm/text_nll/code_max"] = max(code_nll)
                m["lm/text_nll/code_mean"] = sum(code_nll) / len(code_nll)
        used = nll.get("prior", nll["zero"])
        is_lm = True
        if reference is not None:
            m["lm/text_nll/reference"] = reference["nll"]
            m["lm/nll_ratio_reference"] = used / reference["nll"]
            is_lm = reference["nll"] < LM_NLL_FRACTION * math.log(lm.config.vocab_size)
            m["lm/reference_is_lm"] = float(is_lm)
        damaged = m.get("lm/nll_ratio", 1.0) > 1.0 + NLL_TOLERANCE
        if coherence is not None:
            m["lm/answer_nll"], m["lm/answer_nll/reference"] = coherence
            m["lm/answers_equal_reference"] = sum(a == b for a, b in zip(answers, ref_answers)) / len(answers)
        if answers is not None:
            m["lm/repeat_rate"] = sum(map(repeat_rate, answers)) / len(answers)
            if reference is not None and reference.get("answers") is not None:
                ref_rate = sum(map(repeat_rate, reference["answers"])) / len(reference["answers"])
                m["lm/repeat_rate/reference"] = ref_rate
                damaged = damaged or m["lm/repeat_rate"] > ref_rate + REPEAT_TOLERANCE
        if is_lm:
            m["lm/damaged"] = float(damaged)
        decode = self.tokenizer.decode
        texts = {}
        if answers is not None:
            texts["answers"] = [decode(a) for a in answers]
        if reference is not None and reference.get("answers") is not None:
            texts["reference_answers"] = [decode(a) for a in reference["answers"]]
        return {"metrics": m, "per_z_nll": nll, "texts": texts, "questions": [q for q, _ in PLAIN_QA[:GENERATE]]}


def prompt_codes_nll(per_z_nll: dict, prior_code) -> dict:
    """The plain text's NLL under the codes the prior picks for the eval prompts, over z = 0's: the highest
    (``lm/nll_ratio/prompt_codes_max``), the mean weighted by how many prompts pick each code
    (``lm/nll_ratio/prompt_codes_mean``) and the share of those prompts whose code is over the :data:`NLL_TOLERANCE`
    (``lm/prompt_codes_over``). ``lm/nll_ratio`` reads the prior's z for the plain text itself, a code the benchmark's
    prompts may never get; these read the z a user's prompt does get (:func:`lm_integrity` flags the run,
    ``lm/prompt_codes_damaged``, when the highest is over the tolerance). Only the probed codes (``per_z_nll``'s
    ``code_<k>``; the most used first) count."""
    if prior_code is None or "zero" not in per_z_nll:
        return {}
    counts = torch.bincount(torch.as_tensor(prior_code).long().reshape(-1))
    ratios = {
        k: per_z_nll[f"code_{k}"] / per_z_nll["zero"]
        for k in range(len(counts))
        if counts[k] > 0 and f"code_{k}" in per_z_nll
    }
    if not ratios:
        return {}
    n = sum(int(counts[k]) for k in ratios)
    return {
        "lm/nll_ratio/prompt_codes_max": max(ratios.values()),
        "lm/nll_ratio/prompt_codes_mean": sum(int(counts[k]) * r for k, r in ratios.items()) / n,
        "lm/prompt_codes_over": sum(int(counts[k]) for k, r in ratios.items() if r > 1.0 + NLL_TOLERANCE) / n,
    }


def prompt_codes_flag(metrics: dict) -> dict:
    """``lm/prompt_codes_damaged``: 1.0 when the highest of the prompts' codes (:func:`prompt_codes_nll`) raises the
    plain text's NLL over the :data:`NLL_TOLERANCE`; given where ``lm/damaged`` is (a backbone that models English)."""
    if "lm/damaged" not in metrics or "lm/nll_ratio/prompt_codes_max" not in metrics:
        return {}
    return {"lm/prompt_codes_damaged": float(metrics["lm/nll_ratio/prompt_codes_max"] > 1.0 + NLL_TOLERANCE)}


def eval_text_nll(pairs: dict) -> dict:
    """Per-token NLL of the eval pairs' chosen responses under each z the final evaluation scored (the
    prior's, z = 0, shuffled, posterior) and under the reference, from ``evaluate(diagnostics=True)``."""
    if "chosen_tokens" not in pairs:
        return {}
    n = float(pairs["chosen_tokens"].sum())
    out = {}
    for key, logps in pairs.items():
        if key.startswith("chosen_logps/"):
            name = key.split("/", 1)[1].removeprefix("z_")
            out[f"lm/chosen_nll/{name}"] = float(-logps.sum() / n)
    return out


def codes_to_probe(pairs: dict, latent, most: int) -> list[int]:
    """The codes the prior picks on the eval set, most used first, then the rest by index, ``most`` at most."""
    if latent is None or latent.num_codes == 0:
        return []
    picked = pairs.get("prior_code")
    order = []
    if picked is not None:
        counts = torch.bincount(picked.long().reshape(-1), minlength=latent.num_codes)
        order = [int(k) for k in counts.argsort(descending=True, stable=True) if counts[k] > 0]
    order += [k for k in range(latent.num_codes) if k not in order]
    return order[:most]


def lm_integrity(trainer, out_dir, probe: LMProbe, reference: dict | None, pairs: dict, generate: bool = True) -> dict:
    """The trainer's end-of-training hook: ``eval/lm/*`` metrics; the answers into ``out_dir/integrity.json``."""
    from pathlib import Path

    from accelerate.utils import DistributedType

    from lpc.files import atomic_write_json

    model = trainer.accelerator.unwrap_model(trainer.model)
    latent = model.latent
    kind = trainer.accelerator.distributed_type
    gathered = contextlib.nullcontext()
    if latent is not None and kind == DistributedType.DEEPSPEED:
        # ZeRO-3 partitions the codes; the LM's own forward gathers its layers, the codes are read here directly
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(latent.parameters()), modifier_rank=None)
    elif latent is not None and kind == DistributedType.FSDP:
        log.warning("FSDP: the LM-integrity probe measures the LM without z (the latent's parameters are sharded)")
        latent = None
    with gathered:
        codes = codes_to_probe(pairs, latent, probe.max_codes)
        report = probe.measure(model.lm, latent, reference, codes, generate)
    if latent is not None:
        report["metrics"].update(prompt_codes_nll(report["per_z_nll"], pairs.get("prior_code")))
        report["metrics"].update(prompt_codes_flag(report["metrics"]))
    metrics = {f"eval/{k}": v for k, v in {**report["metrics"], **eval_text_nll(pairs)}.items()}
    if trainer.accelerator.is_main_process and out_dir is not None:
        atomic_write_json(Path(out_dir) / "integrity.json", {**report, "metrics": metrics})
    return metrics
