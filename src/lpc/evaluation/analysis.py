"""Latent analysis of an evaluated model: what the codes learned, checked against known types.

Pure metric functions (numbers in, numbers out) and two plots, tied together by :func:`latent_report`,
which takes what ``PreferenceTrainer.evaluate(return_pairs=True)`` returns:

* preference accuracy overall and per true type (or per source when the types are unknown);
* NMI and purity between the prior's argmax code and the true type (and the posterior's), each beside
  its chance baseline (the same codes against permuted types);
* the z ablations of `latent_diagnostics`: accuracy with z = 0, shuffled and posterior z;
* code usage (histogram, entropy, perplexity) and the mean prior entropy;
* ``prior_embedding.png``: a 2-D t-SNE (or PCA) of the prior's code distributions coloured by source,
  like the paper's Figure 2, and ``code_usage.png``: how often each code is the prior's argmax.

NMI uses the arithmetic-mean normalisation ``I(T; C) / ((H(T) + H(C)) / 2)`` (scikit-learn's default);
it is 1 when the codes are a relabelling of the types and 0 when they are independent of them.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from lpc.files import atomic_save_figure

PLOT_FILES = {"prior_embedding": "prior_embedding.png", "code_usage": "code_usage.png"}


# ---------------------------------------------------------------------- metrics
def preference_accuracy(chosen_rewards, rejected_rewards) -> float:
    """Fraction of pairs whose implicit reward ranks the chosen response above the rejected one."""
    c, r = np.asarray(chosen_rewards, dtype=float), np.asarray(rejected_rewards, dtype=float)
    return float((c > r).mean()) if len(c) else float("nan")


def accuracy_by_group(correct, groups) -> dict:
    """Mean of ``correct`` (bools) within each group label, keyed by the label."""
    correct = np.asarray(correct, dtype=float)
    groups = list(groups)
    return {g: float(correct[[i for i, x in enumerate(groups) if x == g]].mean()) for g in sorted(set(groups))}


def entropy(counts) -> float:
    """Shannon entropy (nats) of a histogram."""
    p = np.asarray(counts, dtype=float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information, ``I / mean(H_true, H_pred)`` (scikit-learn's arithmetic mean);
    1.0 if both have a single label."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(list(labels_true), list(labels_pred)))


def purity(labels_true, labels_pred) -> float:
    """Fraction of examples whose cluster's majority true label is their own (1.0 = pure clusters).
    More clusters can only raise it, so read it together with NMI and the number of codes used."""
    by_cluster: dict = {}
    for t, c in zip(labels_true, labels_pred):
        by_cluster.setdefault(c, Counter())[t] += 1
    n = sum(sum(cnt.values()) for cnt in by_cluster.values())
    return sum(max(cnt.values()) for cnt in by_cluster.values()) / n if n else float("nan")


def chance_baseline(metric, labels_true, labels_pred, n_permutations: int = 20, seed: int = 0) -> float:
    """``metric`` of ``labels_pred`` against randomly permuted true labels, averaged: what a code
    assignment with the same histogram scores by chance. NMI and purity read next to it: an argmax of a
    near-uniform prior can score well above 0 (purity 1.0 with one code per tag) without any latent
    structure, so only the gap to this baseline means anything."""
    rng = np.random.default_rng(seed)
    truth = np.asarray(list(labels_true))
    return float(np.mean([metric(rng.permutation(truth).tolist(), list(labels_pred)) for _ in range(n_permutations)]))


def latent_diagnostics(pairs: dict, prefix: str = "eval/") -> dict:
    """Did z change anything? From ``evaluate(diagnostics=True)``'s per-pair margins:

    * ``pref_accuracy/z_zero``, ``/z_shuffled``, ``/z_posterior``: accuracy with z = 0, with another
      prompt's prior z (same distribution of z, wrong prompt) and with the posterior's code (an
      oracle upper bound: the posterior sees which response won);
    * ``latent/decisions_changed``: the fraction of pairs whose decision flips when z = 0;
    * ``latent/z_hidden_norm_ratio``: ||z|| over the norm of the hidden state it is added to;
    * ``latent/inert`` (1.0 when z = 0 flips under 1% of the decisions) and
      ``latent/prompt_independent`` (1.0 when shuffling z across prompts costs under 1 point).
    """
    margin = _numpy(pairs["chosen_rewards"]) - _numpy(pairs["rejected_rewards"])
    correct = margin > 0
    out = {}
    for name in ("z_zero", "z_shuffled", "z_posterior"):
        key = f"margin/{name}"
        if key in pairs and len(pairs[key]):
            out[f"{prefix}pref_accuracy/{name}"] = float((_numpy(pairs[key]) > 0).mean())
    if "margin/z_zero" in pairs:
        changed = float(((_numpy(pairs["margin/z_zero"]) > 0) != correct).mean())
        out[f"{prefix}latent/decisions_changed"] = changed
        out[f"{prefix}latent/inert"] = float(changed < 0.01)
    if f"{prefix}pref_accuracy/z_shuffled" in out:
        gap = float(correct.mean()) - out[f"{prefix}pref_accuracy/z_shuffled"]
        out[f"{prefix}latent/shuffle_gap"] = gap
        out[f"{prefix}latent/prompt_independent"] = float(gap < 0.01)
    if "z_norm" in pairs:
        out[f"{prefix}latent/z_norm"] = float(_numpy(pairs["z_norm"]).mean())
        out[f"{prefix}latent/z_hidden_norm_ratio"] = float(
            _numpy(pairs["z_norm"]).mean() / max(_numpy(pairs["hidden_norm"]).mean(), 1e-12)
        )
    return out


def code_usage(codes, codebook_size: int) -> dict:
    """Histogram of argmax codes, its entropy (nats), perplexity (= effective number of codes) and
    the number of codes used at least once."""
    hist = np.bincount(np.asarray(codes, dtype=int), minlength=codebook_size)
    h = entropy(hist)
    return {"histogram": hist.tolist(), "entropy": h, "perplexity": math.exp(h), "used": int((hist > 0).sum())}


def mean_prior_entropy(prior_probs) -> float:
    """Mean entropy (nats) of the per-pair prior p(z|x): 0 = confident, log K = uniform."""
    p = np.asarray(prior_probs, dtype=float)
    return float(-(p * np.log(np.clip(p, 1e-12, None))).sum(-1).mean())


# ---------------------------------------------------------------------- plots
def embed_2d(x, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates of the rows of ``x``: t-SNE (scikit-learn) or PCA (numpy SVD).

    Rows that are all the same (a prior that puts every prompt on one code) fall back to PCA: scikit-learn's
    t-SNE divides by their zero spread and crashes the process (a segmentation fault, seen with 1.9.1)."""
    x = np.asarray(x, dtype=float)
    if method == "tsne" and len(x) >= 5 and float(x.std(0).max()) > 1e-9:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(x) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    if method not in ("tsne", "pca"):
        raise ValueError(f"embedding method must be 'tsne' or 'pca', got {method!r}")
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))  # fewer than 2 codes: pad with zeros


def plot_prior_embedding(
    prior_probs, sources, path, method: str = "tsne", title: str = "", codes: list[int] | None = None
) -> Path:
    """Figure 2 of the paper: the prior's code distributions in 2-D, one colour per source; with ``codes``
    (each pair's prior code) a second panel of the same points coloured by code, so two clean clusters
    that all share one code are seen for what they are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = embed_2d(prior_probs, method)
    panels = [("source", [str(x) for x in sources])] + ([("prior code", [f"code {c}" for c in codes])] if codes else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (what, labels) in zip(axes[0], panels):
        order = sorted(set(labels), key=lambda v: (len(v), v))  # code 2 before code 10
        for i, s in enumerate(order):
            idx = [j for j, x in enumerate(labels) if x == s]
            ax.scatter(xy[idx, 0], xy[idx, 1], s=9, alpha=0.7, color=plt.cm.tab10(i % 10), label=s)
        ax.set_title(f"coloured by {what}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle(title or f"prior p(z|x), {method.upper()}", fontsize=10)
    fig.tight_layout()
    try:
        return atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_code_usage(histogram, path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(histogram)), histogram, color="tab:blue")
    ax.set_xlabel("code (prior argmax)")
    ax.set_ylabel("eval pairs")
    ax.set_title(title or "code usage")
    try:
        return atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------- entry point
def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def latent_report(
    pairs: dict,
    sources: list[str] | None = None,
    types: list[int] | None = None,
    out_dir: str | Path | None = None,
    prefix: str = "eval/",
    embedding: str = "tsne",
    title: str = "",
) -> dict:
    """Scalar metrics (keys ``{prefix}...``) from ``evaluate(return_pairs=True)``'s ``pairs``; with
    ``out_dir``, also writes ``prior_embedding.png`` and ``code_usage.png`` there (LPC runs only), with
    ``title`` (the run: model, algorithm, K, seed, scale) on both.

    ``types`` are the true types (synthetic data); without them, ``sources`` stand in as the truth
    (e.g. UltraFeedback's six sources). The returned dict holds scalars only (for metrics.json and W&B);
    the plots are at ``out_dir / PLOT_FILES[name]``.
    """
    cr, rr = _numpy(pairs["chosen_rewards"]), _numpy(pairs["rejected_rewards"])
    n = len(cr)
    for name, seq in (("sources", sources), ("types", types)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries but the evaluation has {n} pairs")
    truth = list(types) if types is not None else (list(sources) if sources is not None else None)
    kind = "type" if types is not None else "source"
    out: dict = {f"{prefix}pref_accuracy": preference_accuracy(cr, rr), **latent_diagnostics(pairs, prefix)}
    if truth is not None:
        for g, acc in accuracy_by_group(cr > rr, truth).items():
            out[f"{prefix}pref_accuracy/{kind}_{g}"] = acc
    if "prior_probs" in pairs:
        probs = _numpy(pairs["prior_probs"])
        prior_code = _numpy(pairs["prior_code"]).astype(int)
        usage = code_usage(prior_code, probs.shape[1])
        prior_entropy = mean_prior_entropy(probs)
        out.update(
            {
                f"{prefix}code_usage_entropy": usage["entropy"],
                f"{prefix}code_perplexity": usage["perplexity"],
                f"{prefix}codes_used": usage["used"],
                f"{prefix}prior_entropy": prior_entropy,
                f"{prefix}latent/prior_entropy_normalized": prior_entropy / math.log(probs.shape[1])
                if probs.shape[1] > 1
                else 0.0,
            }
        )
        if truth is not None:
            codes = prior_code.tolist()
            out[f"{prefix}nmi"] = nmi(truth, codes)
            out[f"{prefix}purity"] = purity(truth, codes)
            out[f"{prefix}nmi_chance"] = chance_baseline(nmi, truth, codes)
            out[f"{prefix}purity_chance"] = chance_baseline(purity, truth, codes)
            if "posterior_code" in pairs:
                post = _numpy(pairs["posterior_code"]).astype(int).tolist()
                out[f"{prefix}posterior_nmi"] = nmi(truth, post)
                out[f"{prefix}posterior_purity"] = purity(truth, post)
        if out_dir is not None:
            out_dir = Path(out_dir)
            colour = list(sources) if sources is not None else [f"{kind}_{t}" for t in (truth or [0] * n)]
            k = f"K={probs.shape[1]}, {usage['used']} used"
            plot_prior_embedding(
                probs,
                colour,
                out_dir / PLOT_FILES["prior_embedding"],
                method=embedding,
                title=f"{title} ({k}): prior p(z|x), {embedding.upper()}".lstrip(" "),
                codes=prior_code.tolist(),
            )
            plot_code_usage(usage["histogram"], out_dir / PLOT_FILES["code_usage"], title=f"{title} ({k})".lstrip())
    return out


def final_analysis(
    trainer, out_dir: str | Path, embedding: str = "tsne", pairs: dict | None = None, title: str = ""
) -> dict:
    """The trainer's end-of-training hook: from the final evaluation's per-pair outputs, report
    against the eval set's ``type``/``source`` columns (when present), and log the plots to W&B."""
    if pairs is None:  # the trainer passes its final evaluation's pairs; evaluate only when called alone
        _, pairs = trainer.evaluate(return_pairs=True)
    ds = trainer.eval_dataset
    types = list(ds["type"]) if "type" in ds.column_names else None
    sources = list(ds["source"]) if "source" in ds.column_names else None
    main = trainer.accelerator.is_main_process
    metrics = latent_report(pairs, sources, types, out_dir if main else None, embedding=embedding, title=title)
    if "ceiling" in ds.column_names:  # synthetic data: the best achievable accuracy on this eval set
        metrics["eval/ceiling"] = float(np.mean(ds["ceiling"]))
    if "rating" in ds.column_names:  # mixed preferences: accuracy per labelling rating (the rebuttal's table)
        correct = _numpy(pairs["chosen_rewards"]) > _numpy(pairs["rejected_rewards"])
        for rating, acc in accuracy_by_group(correct, list(ds["rating"])).items():
            metrics[f"eval/pref_accuracy/rating_{rating}"] = acc
    if main and trainer.tracker:
        import wandb

        images = {
            f"eval/{name}": wandb.Image(str(Path(out_dir) / f))
            for name, f in PLOT_FILES.items()
            if (Path(out_dir) / f).exists()
        }
        trainer.accelerator.log({**metrics, **images}, step=trainer.step)
    return metrics
