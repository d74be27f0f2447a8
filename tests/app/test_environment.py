"""The process environment lpc-train refuses before any model loads: an OMP_NUM_THREADS that is set but not a
positive integer (accelerate parses it with int() when it starts several CPU processes, and fails there)."""

from __future__ import annotations

import pytest

from conftest import run_train


@pytest.mark.parametrize("value", [None, "1", "2", "16", " 4 ", "08"])
def test_an_unset_or_positive_integer_omp_num_threads_is_accepted(value):
    from lpc.environment import check_environment

    check_environment({} if value is None else {"OMP_NUM_THREADS": value})


@pytest.mark.parametrize("value", ["", " ", "0", "-1", "abc", "2.5", "4,2", "1e3", "+"])
def test_any_other_omp_num_threads_is_refused_naming_it_its_value_and_what_is_allowed(value):
    from lpc.environment import check_environment
    from lpc.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        check_environment({"OMP_NUM_THREADS": value})
    assert str(err.value).startswith(f"environment variable OMP_NUM_THREADS={value!r} is not allowed: ")
    assert "a positive integer" in str(err.value)


def test_lpc_train_with_an_empty_omp_num_threads_exits_2_before_any_model_loads(tmp_path):
    """LPC_CACHE_DIR is where loading the tiny model would write its tokenizer: absent, nothing loaded."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_train([], run_dir, env={"OMP_NUM_THREADS": "", "LPC_CACHE_DIR": str(cache)}, check=False, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "config error: environment variable OMP_NUM_THREADS='' is not allowed: a positive integer" in out
    assert not cache.exists() and not (run_dir / "metrics.json").exists()
