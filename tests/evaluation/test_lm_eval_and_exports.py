"""lm-eval wrapper, local tasks, the evaluate command and the AlpacaEval / MT-bench exports."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import shutil
import sys

# lm-eval is in the dev extra, which `make install` installs: without it these tests fail rather than skip
# (test_missing_extra_gives_install_message simulates its absence for the user-facing message).
import lm_eval  # noqa: F401
import pytest
import torch

from lpc.data import encode_prompt
from lpc.policy import PreferenceModel, conditioned_on
from lpc.training.checkpoint import load_checkpoint


def make_lm(model, tok, **kw):
    from lpc.evaluation.lm_eval_model import LPCLM

    return LPCLM(model, tok, batch_size=4, **kw)


def requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lpc_ckpt(tiny_lpc_run):
    return load_checkpoint(tiny_lpc_run)[:2]


@pytest.fixture(scope="module")
def dpo_ckpt(tiny_dpo_run):
    return load_checkpoint(tiny_dpo_run)[:2]


def prior_z_by_hand(model, ids):
    """z = E_{p(k|x)}[e_k]: the prior MLP on h of the context (at its last token, or the mean over its tokens with
    pool=mean; less the running mean of its training inputs, at unit RMS, with head_input=centered), softmax, times
    the codes (the codebook less its usage-weighted mean, with center=usage)."""
    lat = model.latent
    if lat is None:
        return None
    states = model.lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    h = states[-1] if lat.pool == "last" else states.mean(0)
    if lat.head_input == "centered":
        h = h - lat.prior_center.mean
        h = h / (h.pow(2).mean() + 1e-6).sqrt()
    codes = lat.codebook if lat.center == "none" else lat.codebook - lat.usage @ lat.codebook
    return lat.prior(h).softmax(-1) @ codes


@torch.no_grad()
def reference(model, ctx_ids, cont_ids, z="prior"):
    """Sum of log p(cont | ctx) from the HF model's own forward, z added to the LM head input by hand."""
    z = prior_z_by_hand(model, ctx_ids) if z == "prior" else z
    with conditioned_on(model.lm, z):
        logits = model.lm(input_ids=torch.tensor([ctx_ids + cont_ids])).logits[0].float()
    lp = logits[len(ctx_ids) - 1 : -1].log_softmax(-1)
    target = torch.tensor(cont_ids)
    return lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


def cases(tok):
    """(context, continuation) as the harness sends them, and the token ids they must become."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    bos = [tok.bos_token_id]
    return [
        # multi-token continuation
        (("The answer is", " helpful and precise"), (bos + enc("The answer is"), enc(" helpful and precise"))),
        # the context's trailing space belongs to the continuation's first token (lm-eval's boundary rule)
        (("Question: why?\nAnswer: ", "because"), (bos + enc("Question: why?\nAnswer:"), enc(" because"))),
        # a one-token continuation in the same batch (different length: exercises padding)
        (("Say", " yes"), (bos + enc("Say"), enc(" yes"))),
        # empty context: BOS is the context
        (("", "hello world"), (bos, enc("hello world"))),
    ]


@pytest.mark.parametrize("which", ["dpo", "lpc"])
def test_loglikelihood_equals_direct_forward(which, request):
    model, tok = request.getfixturevalue(f"{which}_ckpt")
    lm = make_lm(model, tok)
    cs = cases(tok)
    assert len(cs[0][1][1]) >= 3  # really a multi-token continuation
    got = lm.loglikelihood(requests("loglikelihood", [c for c, _ in cs]))
    for (args, (ctx_ids, cont_ids)), (lp, greedy) in zip(cs, got):
        if args[0]:  # lm-eval's own split of the pair gives the hand-written token ids
            assert lm._encode_pair(*args) == (ctx_ids, cont_ids)
        ref_lp, ref_greedy = reference(model, ctx_ids, cont_ids)
        assert lp == pytest.approx(ref_lp, abs=1e-4), args
        assert greedy == ref_greedy
        assert lp < 0


def hidden_scale_codes(model, seed=0):
    """A copy of ``model`` whose codes are random at the hidden state's norm: a short run's codes, centred on their
    usage, are too small to change a log-likelihood or a greedy token, and these tests check where z goes, not how
    large training made it."""
    model = copy.deepcopy(model)
    with torch.no_grad():  # N(0, 1) entries: rows of norm ~sqrt(d), the tiny model's hidden-state norm
        gen = torch.Generator().manual_seed(seed)
        model.latent.codebook.copy_(torch.randn(model.latent.codebook.shape, generator=gen))
    return model


def test_lpc_loglikelihood_uses_the_prior_z(lpc_ckpt):
    model, tok = lpc_ckpt
    model = hidden_scale_codes(model)
    with torch.no_grad():  # a prior that puts its mass on code 0, so the prior's z is code 0 less the codes' mean
        model.latent.prior[-1].weight.zero_()
        model.latent.prior[-1].bias.copy_(20.0 * torch.nn.functional.one_hot(torch.tensor(0), 8).float())
    args = [c for c, _ in cases(tok)]
    with_z = [lp for lp, _ in make_lm(model, tok).loglikelihood(requests("loglikelihood", args))]
    no_z = [
        lp for lp, _ in make_lm(PreferenceModel(model.lm, None), tok).loglikelihood(requests("loglikelihood", args))
    ]
    for (ctx_ids, cont_ids), a, b in zip([ids for _, ids in cases(tok)], with_z, no_z):
        assert b == pytest.approx(reference(model, ctx_ids, cont_ids, z=None)[0], abs=1e-4)
        assert abs(a - b) > 1e-3  # the trained codes move the log-likelihood


def test_rolling_loglikelihood(dpo_ckpt):
    model, tok = dpo_ckpt
    text = "the quick answer is helpful"
    (got,) = make_lm(model, tok).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    ids = tok.encode(text, add_special_tokens=False)
    assert got == pytest.approx(reference(model, [tok.bos_token_id], ids)[0], abs=1e-4)


@torch.no_grad()
def greedy_by_hand(model, tok, prompt, n, stop):
    ids = encode_prompt(tok, prompt)
    z = prior_z_by_hand(model, ids)
    out = []
    with conditioned_on(model.lm, z):
        for _ in range(n):
            nxt = model.lm(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax().item()
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).split(stop)[0]


def test_generate_until_uses_the_prior_z(lpc_ckpt):
    model, tok = lpc_ckpt
    model = hidden_scale_codes(model)
    # The prior is set to put softmax(b) on every prompt, with b favouring a different code per call, so the greedy
    # text must follow the prior's code.
    prompts = ["Question: what is best?\nAnswer:", "Tell me"]
    gen = {"until": ["Question:"], "max_gen_toks": 10, "do_sample": False}
    texts = {}
    for k in range(4):
        with torch.no_grad():
            model.latent.prior[-1].weight.zero_()
            model.latent.prior[-1].bias.copy_(20.0 * torch.nn.functional.one_hot(torch.tensor(k), 8).float())
        got = make_lm(model, tok).generate_until(requests("generate_until", [(p, gen) for p in prompts]))
        assert got == [greedy_by_hand(model, tok, p, 10, "Question:") for p in prompts]
        texts[k] = tuple(got)
    no_z = make_lm(PreferenceModel(model.lm, None), tok).generate_until(
        requests("generate_until", [(p, gen) for p in prompts])
    )
    # the prior's code changes the text: a generator that ignored z, or used one fixed code, fails here
    assert len(set(texts.values())) > 1 and any(text != tuple(no_z) for text in texts.values())


def load_local_data():
    from lpc.evaluation import TASKS_DIR

    spec = importlib.util.spec_from_file_location("lpc_local_data", TASKS_DIR / "local_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_truthfulqa_bleu_works_offline():
    data = load_local_data()
    doc = data.process_docs_gen(data.truthfulqa()["validation"])[0]
    right = data.process_results_gen(doc, [doc["correct_answers"][0]])
    wrong = data.process_results_gen(doc, [doc["incorrect_answers"][0]])
    assert right["bleu_acc"] == 1 and right["bleu_max"] == pytest.approx(100.0)
    assert wrong["bleu_acc"] == 0


def local_task(name: str):
    """One of our local lm-eval tasks, loaded by lm-eval's own TaskManager (its prompts and filters)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from lpc.evaluation import TASKS_DIR

    return get_task_dict([name], TaskManager(include_path=str(TASKS_DIR), include_defaults=False))[name]


def test_evaluate_command_writes_metrics(tiny_lpc_run, tmp_path, lpc_ckpt):
    from lpc.evaluation import harness as evaluate

    run = tmp_path / "run"
    shutil.copytree(tiny_lpc_run / "final", run / "final")
    shutil.copy(tiny_lpc_run / "metrics.json", run / "metrics.json")
    before = json.loads((run / "metrics.json").read_text())
    rc = evaluate.main(
        [
            str(run),
            "tasks=arc_challenge_local,arc_easy_local,gsm8k_local,truthfulqa_local",
            "limit=2",
            "batch_size=4",
            "device=cpu",
        ]
    )
    assert rc == 0
    m = json.loads((run / "metrics.json").read_text())
    assert {k: m[k] for k in before} == before  # existing keys kept
    for task in ("arc_challenge_local", "arc_easy_local", "gsm8k_local", "truthfulqa_local"):
        assert m[f"lm_eval/{task}/n_samples"] == 2
    assert m["lm_eval/gsm8k_local/exact_match"] == m["lm_eval/gsm8k_local/exact_match/strict-match"]
    # TruthfulQA's bleu_acc recomputed by hand: the wrapper's greedy answers to the task's prompt, scored
    # by the task's own process_results on the same two questions
    task = local_task("truthfulqa_local")
    tqa = list(task.validation_docs())[:2]
    gen = {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 64}
    answers = make_lm(*lpc_ckpt).generate_until(requests("generate_until", [(task.doc_to_text(d), gen) for d in tqa]))
    data = load_local_data()
    bleu_acc = [data.process_results_gen(d, [a])["bleu_acc"] for d, a in zip(tqa, answers)]
    assert m["lm_eval/truthfulqa_local/bleu_acc"] == pytest.approx(sum(bleu_acc) / 2)
    # ARC acc recomputed by hand from the wrapper's log-likelihoods on the same two questions
    model, tok = lpc_ckpt
    lm = make_lm(model, tok)
    docs = load_local_data().arc_challenge()["test"].select(range(2))
    hits = []
    for d in docs:
        lps = [
            lp
            for lp, _ in lm.loglikelihood(
                requests(
                    "loglikelihood", [(f"Question: {d['question']}\nAnswer:", f" {c}") for c in d["choices"]["text"]]
                )
            )
        ]
        hits.append(max(range(len(lps)), key=lps.__getitem__) == d["choices"]["label"].index(d["answerKey"]))
    assert m["lm_eval/arc_challenge_local/acc"] == pytest.approx(sum(hits) / 2)
    assert (run / "eval" / "lm_eval_results.json").exists()


def test_evaluate_rejects_bad_options(tiny_dpo_run, capsys):
    from lpc.evaluation import harness as evaluate

    assert evaluate.main([str(tiny_dpo_run), "tasks=local", "limit=-3"]) == 2
    assert "eval.limit" in capsys.readouterr().err
    assert evaluate.main([str(tiny_dpo_run), "tasks=local", "batch_sise=4"]) == 2
    assert "batch_sise" in capsys.readouterr().err


def test_missing_extra_gives_install_message(monkeypatch, tiny_dpo_run, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    for name in [m for m in sys.modules if m.startswith("lpc.evaluat") or m == "lpc.evaluation.export"]:
        monkeypatch.delitem(sys.modules, name)
    evaluation = importlib.import_module("lpc.evaluation")  # importing our package needs no lm-eval
    evaluate = importlib.import_module("lpc.evaluation.harness")
    importlib.import_module("lpc.evaluation.export")
    with pytest.raises(evaluation.MissingExtra, match=r"pip install -e '\.\[eval\]'"):
        evaluation.require_lm_eval()
    with pytest.raises(evaluation.MissingExtra, match="pip install lm-eval"):
        importlib.import_module("lpc.evaluation.lm_eval_model")
    assert evaluate.main([str(tiny_dpo_run), "tasks=local"]) == 2
    assert "pip install -e '.[eval]'" in capsys.readouterr().err


# ---------------------------------------------------------------------- exports
def test_one_bos_with_and_without_a_bos_template(dpo_ckpt):
    from lpc.evaluation.export import prompt_ids

    _, tok = dpo_ckpt
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    plain = prompt_ids(tok, msgs)
    assert "bos" not in tok.chat_template  # the tiny template adds none: we add it
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = "{{ bos_token }}" + tok.chat_template  # Llama-3 style: the template adds it
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).startswith(tok.bos_token)
    templated = prompt_ids(tok2, msgs)
    for ids in (plain, templated):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert plain == templated


SMALL_EXPORT = {"max_new_tokens": 4, "limit": 2, "model_id": "tiny-lpc", "device": "cpu"}


def test_exports_match_the_tools_schemas(tiny_lpc_run, tmp_path):
    from lpc.evaluation import QUESTIONS_DIR
    from lpc.evaluation.export import ExportConfig, export, load_questions

    a = export(
        tiny_lpc_run, ExportConfig(format="alpaca_eval", out=str(tmp_path / "model_outputs.json"), **SMALL_EXPORT)
    )
    rows = json.loads(a.read_text())
    qs = load_questions(QUESTIONS_DIR / "alpaca_eval_tiny.json", "alpaca_eval")
    assert isinstance(rows, list) and len(rows) == 2
    for row, q in zip(rows, qs):
        assert set(row) == {"instruction", "output", "generator", "dataset"}
        assert all(isinstance(v, str) for v in row.values())
        assert (row["instruction"], row["generator"], row["dataset"]) == (q["instruction"], "tiny-lpc", q["dataset"])

    m = export(tiny_lpc_run, ExportConfig(format="mt_bench", out=str(tmp_path / "tiny-lpc.jsonl"), **SMALL_EXPORT))
    lines = [json.loads(ln) for ln in m.read_text().splitlines()]
    qs = load_questions(QUESTIONS_DIR / "mt_bench_tiny.jsonl", "mt_bench")
    assert len(lines) == 2
    for row, q in zip(lines, qs):
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert row["question_id"] == q["question_id"] and row["model_id"] == "tiny-lpc"
        assert isinstance(row["answer_id"], str) and isinstance(row["tstamp"], float)
        (choice,) = row["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == len(q["turns"]) == 2
        assert all(isinstance(t, str) for t in choice["turns"])


def test_export_rejects_bad_question_file(tiny_dpo_run, tmp_path):
    from lpc.evaluation.export import ExportConfig, ExportError, export

    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "x"}) + "\n")
    with pytest.raises(ExportError, match="turns"):
        export(tiny_dpo_run, ExportConfig(format="mt_bench", questions=str(bad), device="cpu"))


def test_loglikelihood_with_z_before_the_final_norm(lpc_ckpt):
    """latent.z_injection=pre_norm through the harness: the batched scorer equals the HF forward with z
    added to the final norm's input, and differs from z at the LM head."""
    import copy

    model, tok = lpc_ckpt
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.latent.codebook.mul_(20.0)  # codes large enough that where they enter shows
    cs = cases(tok)
    model.latent.z_injection = "head"
    at_head = [lp for lp, _ in make_lm(model, tok).loglikelihood(requests("loglikelihood", [c for c, _ in cs]))]
    model.latent.z_injection = "pre_norm"
    got = make_lm(model, tok).loglikelihood(requests("loglikelihood", [c for c, _ in cs]))
    for (_, (ctx_ids, cont_ids)), (lp, _), head_lp in zip(cs, got, at_head):
        z = prior_z_by_hand(model, ctx_ids)
        with torch.no_grad(), conditioned_on(model.lm, z, at="pre_norm"):
            logits = model.lm(input_ids=torch.tensor([ctx_ids + cont_ids])).logits[0].float()
        ref = logits[len(ctx_ids) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(cont_ids)[:, None]).sum().item()
        assert lp == pytest.approx(ref, abs=1e-4)
        assert abs(lp - head_lp) > 1e-3


def test_gsm8k_headline_is_strict_match_not_flexible_extract():
    # the paper reports GSM8K exact_match under lm-eval's strict-match filter; a results dict where the two
    # filters disagree shows which one becomes the headline lm_eval/gsm8k/exact_match
    from lpc.evaluation.harness import flatten_results, paper_metrics

    results = {
        "results": {
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.75, "alias": "gsm8k"},
            "arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.625, "acc_stderr,none": 0.1},
        },
        "n-samples": {"gsm8k": {"effective": 8}},
    }
    flat = flatten_results(results)
    assert flat["lm_eval/gsm8k/exact_match"] == 0.25
    assert flat["lm_eval/gsm8k/exact_match/flexible-extract"] == 0.75 and flat["lm_eval/gsm8k/n_samples"] == 8
    assert paper_metrics(flat) == {"lm_eval/gsm8k/exact_match": 0.25, "lm_eval/arc_easy/acc": 0.5}
