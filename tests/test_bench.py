"""The transformers side of bench/train_step.py's comparison: same shape as our config."""

import math
import runpy

import pytest

from bench import transformers_step
from olmo2_jax import config as config_lib
from olmo2_jax import convert


def test_transformers_step_runs_our_configs_shape():
    r = transformers_step.run("configs/tiny.py", seq=32, batch=2, steps=1, warmup=1,
                              compile_=False, device="cpu")
    c = runpy.run_path("configs/tiny.py")["get_config"]()
    assert r["params"] == config_lib.count_params(c.model)["total"]
    assert r["tok_s"] > 0 and r["batch"] == 2 and r["seq"] == 32
    # a freshly initialised model predicts ~uniformly: CE ~ ln(vocab)
    assert abs(r["loss"] - math.log(c.model.padded_vocab_size)) < 0.5


def test_transformers_step_refuses_a_model_of_another_shape(monkeypatch):
    real = convert.hf_config_from_model

    def one_layer_short(m, ids, dtype):
        hf = real(m, ids, dtype)
        hf["num_hidden_layers"] -= 1
        return hf
    monkeypatch.setattr(convert, "hf_config_from_model", one_layer_short)
    with pytest.raises(ValueError, match="parameters, our config configs/tiny.py"):
        transformers_step.run("configs/tiny.py", seq=32, batch=2, steps=1, warmup=0,
                              compile_=False, device="cpu")
