"""The three objects every post-training command shares: the run (``lpc.training.rundir.RunDir``), the latent
(``lpc.latent.Latent``) and the ``RUN key=value`` options (``lpc.evaluation.options``). In-process, no training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lpc.evaluation.options import option, options_from, parse_command, usage
from lpc.training import rundir
from lpc.training.rundir import RunDir


# ---------------------------------------------------------------------- the options
@dataclasses.dataclass
class Opts:
    """Options of a made-up command."""

    n: int = option(3, "how many", "an integer >= 1", lambda v: v >= 1)
    rate: float = option(0.5, "a rate", "a number in (0, 1]", lambda v: 0 < v <= 1)
    flag: bool = option(False, "a switch")
    mode: str = option("a", "a mode", choices=("a", "b"))
    limit: int | None = option(None, "a cap; null: none", "an integer >= 1", lambda v: v >= 1)
    word: list[str] = option([], "a word; repeat the key", repeat=True)
    names: list[str] = option([], "names, comma-separated", sep=",")


def test_values_are_converted_to_each_fields_type(tmp_path):
    path, opts = parse_command(
        [str(tmp_path), "n=7", "rate=1", "flag=TRUE", "mode=b", "limit=null", "word=x, y", "word=z", "names=p,q"], Opts
    )
    assert path == tmp_path
    assert opts == Opts(n=7, rate=1.0, flag=True, mode="b", limit=None, word=["x, y", "z"], names=["p", "q"])
    assert parse_command([str(tmp_path)], Opts)[1] == Opts()  # the defaults
    assert parse_command(["run", "limit=4", "flag=0"], Opts)[1] == Opts(limit=4, flag=False)


@pytest.mark.parametrize(
    "arg,message",
    [
        ("n=two", "n='two' is not allowed: an integer >= 1"),
        ("n=0", "n='0' is not allowed: an integer >= 1"),
        ("n=2.5", "n='2.5' is not allowed: an integer >= 1"),
        ("rate=0", "rate='0' is not allowed: a number in (0, 1]"),
        ("flag=maybe", "flag='maybe' is not allowed: true or false"),
        ("mode=c", "mode='c' is not allowed: one of ('a', 'b')"),
        ("limit=0", "limit='0' is not allowed: an integer >= 1 or null"),
        ("n=null", "n='null' is not allowed: an integer >= 1"),  # not optional: null is no integer
        ("colour=red", "unknown argument 'colour'; allowed: n, rate, flag, mode, limit, word, names"),
    ],
)
def test_an_unknown_key_or_a_bad_value_is_refused_naming_it(arg, message):
    from lpc.errors import UsageError

    with pytest.raises(UsageError) as err:
        parse_command(["run", arg], Opts)
    assert str(err.value) == message


def test_one_run_exactly_and_a_run_named_like_an_option(tmp_path):
    from lpc.errors import GenerateError

    with pytest.raises(GenerateError, match=r"expected exactly one RUN .*got \[\]"):
        parse_command(["n=1"], Opts, GenerateError)
    with pytest.raises(GenerateError, match=r"got \['a', 'b'\]"):
        parse_command(["a", "b"], Opts, GenerateError)
    sweep_run = tmp_path / "codebook=8,seed=0"  # an existing path with "=" is the run, not an option
    sweep_run.mkdir()
    assert parse_command([str(sweep_run), "n=2"], Opts)[0] == sweep_run


def test_typed_values_of_a_config_node_get_the_same_checks():
    from lpc.errors import ConfigError

    assert options_from(Opts, {"n": 4, "flag": True, "names": ["a", "b"]}) == Opts(n=4, flag=True, names=["a", "b"])
    with pytest.raises(ConfigError, match=r"^eval.n=True is not allowed: an integer >= 1$"):
        options_from(Opts, {"n": True}, ConfigError, prefix="eval.")
    with pytest.raises(ConfigError, match=r"^eval.rate='x' is not allowed"):
        options_from(Opts, {"rate": "x"}, ConfigError, prefix="eval.")
    with pytest.raises(ConfigError, match=r"^unknown argument 'eval.colour'; allowed: n, rate, "):
        options_from(Opts, {"colour": 1}, ConfigError, prefix="eval.")


def test_usage_lists_every_option_with_what_is_allowed_and_its_default():
    text = usage(Opts, "Does something.", "lpc-thing")
    assert text.startswith("Does something.\n\nusage: lpc-thing RUN key=value ...\n\noptions (key=value):\n")
    assert (
        "  limit                a cap; null: none\n                         an integer >= 1 or null; default: null"
        in text
    )
    assert "one of ('a', 'b'); default: a" in text and "true or false; default: false" in text


@pytest.mark.parametrize(
    "module,command,options",
    [
        ("generate", "lpc-generate", "GenerateOptions"),
        ("harness", "lpc-evaluate", "EvalConfig"),
        ("export", "lpc-export", "ExportConfig"),
        ("steering", "lpc-steer", "SteeringOptions"),
    ],
)
def test_every_commands_help_has_one_format_and_every_option(module, command, options, capsys):
    import importlib

    mod = importlib.import_module(f"lpc.evaluation.{module}")
    assert mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert f"\nusage: {command} " in out and "\noptions (key=value):\n" in out
    for f in dataclasses.fields(getattr(mod, options)):
        assert f"\n  {f.name} " in out, f.name
    assert mod.main([]) == 2  # no run: the usage, and a failure exit
    assert "options (key=value):" in capsys.readouterr().out


# ---------------------------------------------------------------------- the run
def model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_a_run_its_final_or_a_checkpoint_directory_resolve_to_the_same_run(tmp_path):
    run = tmp_path / "run"
    final = model_dir(run / rundir.FINAL)
    assert RunDir.of(run) == RunDir.of(final) == RunDir(run, final)
    saved = model_dir(tmp_path / "saved-policy")  # no run around it: its answers go beside it
    assert RunDir.of(saved) == RunDir(saved, saved)
    assert RunDir.of(run).require_model() == final
    with pytest.raises(FileNotFoundError, match=r"nope is not a checkpoint \(no config.json or adapter_config"):
        RunDir.of(tmp_path / "nope").require_model()
    assert RunDir.at(tmp_path / "new") == RunDir(tmp_path / "new", tmp_path / "new" / rundir.FINAL)


def test_metrics_and_analysis_are_written_atomically_where_the_readers_look(tmp_path):
    run = RunDir.at(tmp_path / "run")
    assert run.status() == "missing"
    run.path.mkdir()
    assert run.status() == "failed" and run.load_metrics() is None
    run.write_metrics({"status": "completed", "a": 1})
    assert run.status() == "completed" and rundir.load_metrics(run.path) == {"status": "completed", "a": 1}
    assert run.merge_metrics({"b": 2}) == {"status": "completed", "a": 1, "b": 2}
    other = tmp_path / "elsewhere.json"
    run.merge_metrics({"c": 3}, other)
    assert json.loads(other.read_text()) == {"c": 3} and "c" not in run.load_metrics()
    assert run.write_analysis("t.json", {"x": 1}) == run.path / rundir.ANALYSIS / "t.json"
    run.write_analysis("t.md", "| x |\n")
    assert (run.analysis / "t.md").read_text() == "| x |\n"
    assert sorted(p.name for p in run.analysis.iterdir()) == ["t.json", "t.md"]  # no temporary file left


def test_a_checkpoint_without_its_manifest_is_broken(tmp_path):
    ckpt = tmp_path / rundir.CHECKPOINTS / "step-4"
    ckpt.mkdir(parents=True)
    (ckpt / rundir.TRAINER_STATE).write_text(json.dumps({"step": 4, "fingerprint": "f", "log_lines": 2}))
    assert rundir.checkpoint_problem(ckpt) == "no manifest.json (the checkpoint was not finished)"
    assert rundir.checkpoints(tmp_path) == [(4, ckpt)] and rundir.checkpoints(tmp_path, complete_only=True) == []
    assert rundir.latest_checkpoint(tmp_path) is None and rundir.status(tmp_path) == "incomplete"
    rundir.write_checkpoint_manifest(ckpt)
    assert rundir.checkpoint_problem(ckpt) is None and rundir.checkpoint_fingerprint(tmp_path) == "f"
    (ckpt / rundir.TRAINER_STATE).write_text(json.dumps({"step": 4}))  # no fingerprint, no log length
    rundir.write_checkpoint_manifest(ckpt)
    assert rundir.checkpoint_problem(ckpt) == "unreadable trainer_state.json"


# ---------------------------------------------------------------------- the latent
def third_latent():
    """A third latent, written against the interface alone: z is one of two fixed codes; the prior picks the
    first for a positive first hidden coordinate."""
    from lpc.latent import Latent, LatentOutput

    class Fixed(Latent):
        kind, inference_modes = "fixed", ("argmax",)

        def __init__(self, hidden_size):
            super().__init__(hidden_size, name="fixed", gate_init=None)
            self.inference = "argmax"
            self.table = torch.nn.Parameter(torch.stack([torch.ones(hidden_size), -torch.ones(hidden_size)]))
            self.prior = self.posterior = torch.nn.Identity()

        def prior_probs(self, h_prompt):
            first = (h_prompt[:, 0] > 0).float()
            return torch.stack([first, 1 - first], -1)

        def prior_z(self, h_prompt, inference=None):
            return self.table[self.prior_probs(h_prompt).argmax(-1)]

        @property
        def num_codes(self):
            return 2

        def code_vector(self, k):
            return self.table[k]

        def forward(self, h_prompt, h_chosen=None, h_rejected=None, progress=1.0, mode="train"):
            z = self.prior_z(h_prompt)
            return LatentOutput(z=z, kl=torch.zeros(z.shape[0]))

    return Fixed


def test_a_latent_without_prior_z_cannot_be_built():
    from lpc.latent import Latent, all_inference_modes

    class Incomplete(Latent):
        kind, inference_modes = "incomplete", ()

    with pytest.raises(TypeError, match="abstract method.* prior_z"):
        Incomplete(4, name="incomplete")
    assert set(all_inference_modes()) >= {"expectation", "argmax", "sample", "mean"}


def test_a_third_latent_generates_and_is_probed_without_any_edit_in_evaluation():
    from lpc.backbones import tiny_llama
    from lpc.evaluation.generate import GenerateError, latent_z
    from lpc.evaluation.integrity import codes_to_probe
    from lpc.policy import PreferenceModel, hidden_states

    torch.manual_seed(0)
    lm, _ = tiny_llama()
    model = PreferenceModel(lm, third_latent()(lm.config.hidden_size), calibrate=False)
    ids = torch.tensor([[1, 5, 9, 4]])
    h = hidden_states(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1]
    z, probs, source = latent_z(model, ids)
    assert source == "prior (argmax)" and torch.equal(z, model.latent.prior_z(h)[0])
    assert probs.tolist() == model.latent.prior_probs(h)[0].tolist()
    z, probs, source = latent_z(model, ids, code=1)
    assert source == "code 1" and torch.equal(z, -torch.ones(lm.config.hidden_size)) and probs is None
    with pytest.raises(GenerateError, match=r"code=2 is not allowed: an integer in \[0, 1\]"):
        latent_z(model, ids, code=2)
    with pytest.raises(
        GenerateError, match=r"inference='mean' is not allowed for a fixed latent: one of \('argmax',\)"
    ):
        latent_z(model, ids, inference="mean")
    assert codes_to_probe({"prior_code": torch.tensor([1, 1, 0])}, model.latent, 5) == [1, 0]


def test_converting_smollm2_leaves_the_callers_rng_alone(tmp_path):
    """The first run on a machine converts the shipped GGUF; it must then train exactly as every later run of
    its seed, which loads the converted copy (found as seeds 0 and 1 of a fresh machine's pretrained tier)."""
    from lpc.backbones import smollm2

    torch.manual_seed(0)
    before = torch.get_rng_state()
    fresh, _ = smollm2(cache_dir=str(tmp_path))  # converts
    assert torch.equal(torch.get_rng_state(), before)
    again, _ = smollm2(cache_dir=str(tmp_path))  # loads the conversion
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))
