"""`python -m kif_jax.memory_plan`: a run's per-device memory plan from shapes only (no weights, no devices).

The LLaMA-2-13B pod config on 16 and 32 devices (v4-32, v5e-32), checked against arithmetic on the
architecture; the tiny test model against the figures its real runs wrote (README, Scale-out); and
the command's one-line errors.
"""
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx

from kif_jax.cli import memory_plan_main as main
from kif_jax.models.loading import abstract_model
from kif_jax.models.layers import LoRAParam
from kif_jax.train.plan import plan_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
POD = ROOT / "configs" / "llama2_13b_pod.py"


def _config(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def pod():
    return _config(POD)


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_llama2_13b_is_built_abstractly_from_its_published_sizes(pod):
    model, arch, origin = abstract_model(pod.model, seed=0)
    _, lora, frozen = nnx.split(model, LoRAParam, ...)
    assert (arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers, arch.num_attention_heads,
            arch.num_key_value_heads, arch.vocab_size) == (5120, 13824, 40, 40, 40, 32000)
    # Embeddings + lm_head + 40 x (4 attention + 3 MLP kernels + 2 norms) + the final norm.
    d, ff, v, n = 5120, 13824, 32000, 40
    assert _count(frozen) == 2 * v * d + n * (4 * d * d + 3 * d * ff + 2 * d) + d == 13_015_864_320
    assert _count(lora) == n * 2 * (d * 8 + 8 * d)  # r 8 on q_proj and v_proj
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen))  # nothing allocated


@pytest.mark.parametrize("devices", [16, 32])
def test_13b_pod_plan(pod, devices):
    plan = plan_config(pod, devices, "recurrent_kif")
    assert plan["mesh"] == {"data": 1, "fsdp": devices, "tensor": 1}
    b = plan["per_device_bytes"]
    params = 13_015_864_320
    assert math.isclose(b["frozen"], 13.0e9 * 2 / devices, rel_tol=0.01)
    assert b["frozen"] == params * 2 // devices  # bf16, every weight split over fsdp (5120 = 16 * 320)
    trainable = 40 * 2 * (5120 * 8 + 8 * 5120) * 4 // devices  # float32 LoRA factors
    assert b["trainable"] == trainable
    assert b["optimizer"] == 2 * trainable + 4  # AdamW mu and nu, and its int32 step count
    assert b["importance"] == 4 * trainable + 2 * 4  # S and U EMAs of inner and outer, and their counts
    # bf16, remat none, 32 rows over the devices, 512 + 32 positions: 40 layers of 8 d + 2 ff + 2 heads * length
    # values a token, and the float32 logits (and their gradient) of one 16-position chunk of the decoder loss.
    rows, length = 32 // devices, 512 + 32
    layer = rows * length * 2 * (8 * 5120 + 2 * 13824 + 2 * 40 * length)
    assert b["activations"] == 40 * layer + 2 * rows * 16 * 32000 * 4
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    readme = (ROOT / "README.md").read_text()
    row = (f"| {devices} ({'v4-32' if devices == 16 else 'v5e-32'}) | " + " | ".join(
        f"{b[k]:,}" for k in ("frozen", "trainable", "optimizer", "importance", "activations"))
        + f" | {b['total'] / 2**30:.2f} GiB | ")
    assert row in readme, row


def test_other_methods_size_their_own_states(pod):
    seq = plan_config(pod, 16, "seq_lora")["per_device_bytes"]
    kif = plan_config(pod, 16, "recurrent_kif")["per_device_bytes"]
    assert seq["importance"] == 0 and seq["frozen"] == kif["frozen"] and seq["trainable"] == kif["trainable"]


@pytest.mark.parametrize("shape,want", [
    ((1, 1, 1), (58_688, 6_144, 12_292, 24_584)),
    ((2, 4, 1), (14_672, 1_536, 3_076, 6_152)),
    ((2, 1, 4), (40_256, 3_840, 7_684, 15_368)),
], ids=["1", "2x4x1", "2x1x4"])
def test_tiny_model_plan_matches_its_real_runs(shape, want):
    """The figures the real runs of tests/test_scale_out.py wrote to memory.json (README, Scale-out)."""
    config = _config(ROOT / "tests" / "tiny_config.py")
    config.sharding.num_devices = math.prod(shape)
    config.sharding.data_parallelism, config.sharding.fsdp_parallelism, config.sharding.tensor_parallelism = shape
    config.train.micro_batch_size = 8
    b = plan_config(config, math.prod(shape), "recurrent_kif")["per_device_bytes"]
    assert (b["frozen"], b["trainable"], b["optimizer"], b["importance"]) == want


def test_command_prints_and_writes_memory_json(tmp_path, capsys, pod):
    assert main(["memory_plan", f"--config={POD}", "--devices=16", "--method=recurrent_kif",
                 f"--workdir={tmp_path}", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "recurrent_kif" / "memory.json").read_text())
    assert written == {k: printed[k] for k in ("mesh", "per_device_bytes")}
    assert written == plan_config(pod, 16, "recurrent_kif")
    assert printed["chips"]["v4"]["hbm_bytes"] == 32 * 2**30 and printed["chips"]["v5e"]["hbm_bytes"] == 16 * 2**30
    total = printed["per_device_bytes"]["total"]
    assert printed["chips"]["v5e"]["fits"] == (total <= 16 * 2**30)
    assert main(["memory_plan", f"--config={POD}", "--devices=16"]) == 0  # the table, for the config's methods
    out = capsys.readouterr().out
    assert "recurrent_kif" in out and "GiB" in out and "v4 chip" in out and "v5e chip" in out


@pytest.mark.parametrize("args", [
    ["--devices=0"], ["--devices=-16"], ["--devices=x"], [], ["--devices=16", "--method=nope"],
    ["--devices=16", "--config.sharding.tensor_parallelism=3"], ["--devices=16", "--config.no_such_field=1"],
], ids=["zero", "negative", "not_int", "missing", "unknown_method", "mesh_does_not_fit", "unknown_field"])
def test_user_errors_are_one_line_and_exit_2(capsys, args):
    assert main(["memory_plan", f"--config={POD}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Unknown command line flag" not in err  # overrides reach the config (not only via sys.argv)


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "kif_jax.memory_plan", f"--config={POD}", "--devices=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: --devices must be a positive integer, got 0"


@pytest.mark.parametrize("name,targets,want", [
    ("tiny", "q,v", 8),  # T5: logits over its 8 target positions
    ("tiny-decoder", "q_proj,v_proj", 16),  # tied head: one 16-position chunk of labelled positions
    ("llama-2-7b", "q_proj,v_proj", 16),  # untied lm_head, a plain matmul: the same
    ("llama-2-7b", "q_proj,v_proj,lm_head", 40),  # LoRA on lm_head: logits at every position
])
def test_activation_estimate_counts_the_logits_the_loss_builds(name, targets, want):
    from kif_jax.memory_plan import loss_logit_positions

    config = _config(ROOT / "tests" / "tiny_config.py")
    config.model.name, config.model.lora.targets = name, targets
    model, _, _ = abstract_model(config.model, seed=0)  # shapes only
    assert loss_logit_positions(model, input_length=32, target_length=8) == want
