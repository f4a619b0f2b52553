"""Compact Mo-SARA adapter files: U_k, V_k left out and rebuilt from the base on load.

Checked against independent computations: numpy's SVD for the canonical factors, and the full
file (which stores the vectors) for everything a compact file rebuilds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import one_line_error, run_cli, tiny_llama
from sara_cli.adapters import checkpoint, frozen
from sara_cli.adapters.initialize import CheckpointWeights, MatrixSource
from sara_cli.adapters.inject import adapter_layers, inject_adapters
from sara_cli.adapters.mosara import MoSaraLayer
from sara_cli.errors import SaraError
from sara_cli.model import hub
from sara_cli.model.spectrum import TopK

OPTIONS = {"tau": 0.5, "num_experts": 5, "v_position": "after", "dropout": 0.0}
TEXT = "Question: Tom has 7 apples and eats 2. How many are left? Answer: 5."
MODULE = "model.layers.0.self_attn.q_proj"

pytestmark = pytest.mark.usefixtures("one_thread")


def save_runs(base_dir: Path, folder: Path, storages=("full", "compact")) -> dict[str, Path]:
    """One trained-looking Mo-SARA adapter on `base_dir`, saved once per storage as a run folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    layers = inject_adapters(model, "mosara", OPTIONS, "q_proj,v_proj", weights=CheckpointWeights(base_dir))
    with torch.no_grad():  # v = 0 would hide the vectors; a strong router spreads the gates
        for layer in layers.values():
            layer.mosara_v.normal_(0.0, 0.5)
            layer.mosara_router_out.mul_(20.0)
    runs = {}
    for storage in storages:
        meta = {"method": "mosara", "options": {**OPTIONS, "storage": storage}, "targets": list(layers),
                "base_model": {"name_or_path": str(base_dir), "revision": None, "path": str(base_dir),
                               "dtype": "float32", "trust_remote_code": False,
                               "fingerprint": hub.fingerprint(base_dir)}}
        runs[storage] = folder / storage
        checkpoint.save_adapter(model, runs[storage] / "adapter", meta)
    return runs


@pytest.fixture(scope="module")
def runs(llama_dir, tmp_path_factory) -> dict[str, Path]:
    return save_runs(llama_dir, tmp_path_factory.mktemp("compact"))


def logits(run: Path, base: str | None = None) -> torch.Tensor:
    model, tokenizer, _ = checkpoint.load_adapter_model(run / "adapter", base=base, device="cpu")
    with torch.no_grad():
        return model(**tokenizer(TEXT, return_tensors="pt")).logits[0]


# -- the canonical signs ---------------------------------------------------------------------------

class FlippedSource:
    """A source whose decomposition returns the same vectors with other signs."""

    def __init__(self, W: torch.Tensor, seed: int):
        self.source = MatrixSource("m", lambda: W)
        self.seed = seed

    def weight(self):
        return self.source.weight()

    def top(self, k=None, tau=None):
        top = self.source.top(k=k, tau=tau)
        generator = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (top.s.numel(),), generator=generator).double() * 2 - 1
        return TopK(U=top.U * signs, s=top.s, Vh=top.Vh * signs[:, None], spectrum=top.spectrum)


def test_frozen_factors_do_not_depend_on_the_svd_sign_pattern():
    torch.manual_seed(3)
    W = torch.randn(24, 16, dtype=torch.float64)  # (out, in)
    built = []
    for seed in (1, 2, 3):
        torch.manual_seed(0)
        base = torch.nn.Linear(16, 24, dtype=torch.float32)
        base.weight.data.copy_(W)
        built.append(MoSaraLayer(base, tau=0.5, source=FlippedSource(W, seed)))
    for layer in built[1:]:
        assert torch.equal(layer.mosara_U, built[0].mosara_U) and torch.equal(layer.mosara_Vh, built[0].mosara_Vh)
    # against numpy's SVD: the same top-k triplets, each with v_i . r > 0
    layer, k = built[0], built[0].k
    Un, s, Vhn = np.linalg.svd(W.numpy())
    U, Vh = layer.mosara_U.double().numpy(), layer.mosara_Vh.double().numpy()
    np.testing.assert_allclose(U @ np.diag(s[:k]) @ Vh, Un[:, :k] @ np.diag(s[:k]) @ Vhn[:k], atol=1e-5)
    reference = frozen.directions(16, 2)[:, 0].numpy()
    flips = np.sign(Vhn[:k] @ reference)  # numpy's own signs, turned by the rule
    np.testing.assert_allclose(Vh, Vhn[:k] * flips[:, None], atol=1e-5)
    np.testing.assert_allclose(U, Un[:, :k] * flips, atol=1e-5)
    assert (Vh @ reference > 0).all()


# -- what a compact file holds -------------------------------------------------------------------

def test_compact_file_holds_no_vectors_and_loads_the_same_model(runs):
    full = load_file(runs["full"] / "adapter" / checkpoint.WEIGHTS_NAME)
    compact = load_file(runs["compact"] / "adapter" / checkpoint.WEIGHTS_NAME)
    assert not any(key.endswith(checkpoint.FROZEN) for key in compact)
    assert set(full) - set(compact) == {k for k in full if k.endswith(checkpoint.FROZEN)}
    for key, value in compact.items():  # everything else is stored unchanged
        assert torch.equal(value, full[key]), key
    config = json.loads((runs["compact"] / "adapter" / checkpoint.CONFIG_NAME).read_text())
    assert config["storage"] == "compact" and config["stored_factors"] == []
    sizes = {s: (runs[s] / "adapter" / checkpoint.WEIGHTS_NAME).stat().st_size for s in runs}
    assert sizes["compact"] < sizes["full"] / 2, sizes
    full_logits, compact_logits = logits(runs["full"]), logits(runs["compact"])
    assert float((full_logits - compact_logits).abs().max()) <= 1e-5
    base_model, tokenizer, _ = checkpoint.load_adapter_model(runs["full"] / "adapter", device="cpu")
    with torch.no_grad():  # the vectors matter: dropping the adapter changes the logits
        for layer in adapter_layers(base_model).values():
            layer.mosara_v.zero_()
        plain = base_model(**tokenizer(TEXT, return_tensors="pt")).logits[0]
    assert float((plain - full_logits).abs().max()) > 1e-3


def test_rebuilt_vectors_equal_the_stored_ones(runs):
    full, _, _ = checkpoint.load_adapter_model(runs["full"] / "adapter", device="cpu")
    compact, _, _ = checkpoint.load_adapter_model(runs["compact"] / "adapter", device="cpu")
    full_layers, compact_layers = adapter_layers(full), adapter_layers(compact)
    for name, layer in compact_layers.items():
        torch.testing.assert_close(layer.mosara_U, full_layers[name].mosara_U, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.mosara_Vh, full_layers[name].mosara_Vh, rtol=0, atol=1e-6)
        assert layer.rebuildable and not full_layers[name].rebuildable


def test_full_files_written_before_compact_still_load(runs, tmp_path):
    """An old file: no storage in the config, no probe or fingerprint tensors."""
    old = tmp_path / "old" / "adapter"
    old.mkdir(parents=True)
    tensors = load_file(runs["full"] / "adapter" / checkpoint.WEIGHTS_NAME)
    save_file({k: v for k, v in tensors.items() if "probe" not in k and "fingerprint" not in k},
              str(old / checkpoint.WEIGHTS_NAME))
    config = json.loads((runs["full"] / "adapter" / checkpoint.CONFIG_NAME).read_text())
    config["options"].pop("storage")
    (old / checkpoint.CONFIG_NAME).write_text(json.dumps(config))
    assert torch.equal(logits(old.parent), logits(runs["full"]))


# -- where a rebuild cannot be trusted -------------------------------------------------------------

def test_a_damaged_probe_is_a_one_line_error_naming_the_module(runs, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(runs["compact"], damaged)
    path = damaged / "adapter" / checkpoint.WEIGHTS_NAME
    tensors = load_file(path)
    tensors[f"{MODULE}.mosara_probe_Vh"][3, 1] += 0.01
    save_file(tensors, str(path))
    with pytest.raises(SaraError, match="adapter.storage: full") as raised:
        checkpoint.load_adapter_model(damaged / "adapter", device="cpu")
    assert str(raised.value).startswith(f"{MODULE}: the singular vectors rebuilt")
    one_line_error(run_cli("route-map", damaged, "--data", "builtin:mawps-quickstart", "--limit", 1,
                           "--out", tmp_path / "map"), MODULE, "probe", "adapter.storage: full",
                   stdout_empty=False)


def test_another_base_is_refused_by_name(runs, llama_dir, tmp_path):
    other = tiny_llama()
    with torch.no_grad():
        torch.manual_seed(5)
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama_dir / name).is_file():
            (other_dir / name).write_bytes((llama_dir / name).read_bytes())
    with pytest.raises(SaraError, match="adapter.storage: full") as raised:
        logits(runs["compact"], base=str(other_dir))
    assert str(raised.value).startswith(f"{MODULE}: the base weight is not the one")
    logits(runs["full"], base=str(other_dir))  # a full file carries its vectors: it loads


def test_a_near_degenerate_module_keeps_its_vectors(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        q = model.model.layers[0].self_attn.q_proj.weight  # (64, 64)
        U, s, Vh = torch.linalg.svd(q.double())
        s[2] = s[1] * (1 + 1e-9)  # a tie inside the top k: the pair's vectors are any rotation
        q.copy_((U * s) @ Vh)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    from conftest import ASSETS
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(base_dir)
    found = save_runs(base_dir, tmp_path / "runs")
    config = json.loads((found["compact"] / "adapter" / checkpoint.CONFIG_NAME).read_text())
    assert config["stored_factors"] == [MODULE]
    compact = load_file(found["compact"] / "adapter" / checkpoint.WEIGHTS_NAME)
    assert {k for k in compact if k.endswith(checkpoint.FROZEN)} == {f"{MODULE}.mosara_U", f"{MODULE}.mosara_Vh"}
    assert float((logits(found["compact"]) - logits(found["full"])).abs().max()) <= 1e-5


def test_stable_reads_the_gaps_and_the_sign_margin():
    U, Vh = torch.eye(4, dtype=torch.float64)[:, :2], torch.eye(4, dtype=torch.float64)[:2]
    Vh = frozen.canonical(U, Vh)[1]
    assert frozen.stable(torch.tensor([4.0, 3.0, 1.0, 0.5]), (U, Vh))
    assert not frozen.stable(torch.tensor([4.0, 3.0, 3.0 * (1 - 1e-9), 0.5]), (U, Vh))  # tie at k
    assert not frozen.stable(torch.tensor([4.0, 4.0, 1.0, 0.5]), (U, Vh))  # tie inside the top k
    r = frozen.directions(4, 2)[:, 0]
    orthogonal = torch.stack([r[1] * torch.tensor([1.0, 0, 0, 0]).double() - r[0] * torch.tensor([0, 1.0, 0, 0]).double(),
                              torch.tensor([0, 0, 1.0, 0]).double()])
    orthogonal[0] /= orthogonal[0].norm()
    assert not frozen.stable(torch.tensor([4.0, 3.0, 1.0, 0.5]), (U, orthogonal))  # v_1 . r = 0


# -- the pipeline on both kinds of file ------------------------------------------------------------

def ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_merge_and_export_give_the_same_figures_on_both_files(runs, tmp_path):
    outputs = {}
    for storage, run in runs.items():
        common = ["--routing", "mean", "--calibration", "builtin:mawps-quickstart"]
        ok(run_cli("merge", run, "--out", tmp_path / storage / "hf", *common))
        ok(run_cli("merge", run, "--out", tmp_path / storage / "peft", "--format", "peft-lora", "--no-verify", *common))
        outputs[storage] = {kind: load_file(tmp_path / storage / kind / name) for kind, name in
                            (("hf", "model.safetensors"), ("peft", "adapter_model.safetensors"))}
    for kind in ("hf", "peft"):
        assert outputs["full"][kind].keys() == outputs["compact"][kind].keys()
        for key, value in outputs["full"][kind].items():
            torch.testing.assert_close(outputs["compact"][kind][key], value, rtol=0, atol=1e-6, msg=key)
    cards = {s: (tmp_path / s / "hf" / "README.md").read_text() for s in runs}
    figure = [line for line in cards["full"].splitlines() if "largest absolute logit difference" in line]
    assert figure and figure[0] in cards["compact"]  # the verification's figures agree


def test_route_map_and_eval_give_the_same_figures_on_both_files(runs, tmp_path):
    maps, losses = {}, {}
    for storage, run in runs.items():
        ok(run_cli("route-map", run, "--data", "builtin:mawps-quickstart", "--limit", 4,
                   "--out", tmp_path / storage / "map"))
        maps[storage] = json.loads((tmp_path / storage / "map" / "route-map.json").read_text())
        ok(run_cli("eval", run, "--task", "loss", "--data", "builtin:mawps-quickstart", "--limit", 8,
                   "--json", tmp_path / storage / "loss.json"))
        losses[storage] = json.loads((tmp_path / storage / "loss.json").read_text())
    for summary in (maps, losses):
        for key in ("adapter", "run", "model"):  # where the figures came from: the folders differ
            summary["full"].pop(key, None), summary["compact"].pop(key, None)
    assert maps["full"] == maps["compact"]
    assert losses["full"]["loss"] == pytest.approx(losses["compact"]["loss"], abs=1e-6)


def test_chat_answers_the_same_on_both_files(runs):
    answers = [ok(run_cli("chat", run, "--prompt", "What is 2 + 3?", "--max-new-tokens", 8)).stdout
               for run in runs.values()]
    assert answers[0] == answers[1]


def test_a_compact_run_resumes_from_its_checkpoint(llama_dir, tmp_path):
    """A finished compact run, its final adapter deleted and its last checkpoint too: the rerun
    resumes from checkpoint-2 (a compact file) and ends on the same adapter."""
    import shutil

    import yaml

    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(llama_dir), "dtype": "float32"},
        "adapter": {"method": "mosara", "targets": "q_proj,v_proj", "tau": 0.5, "num_experts": 3},
        "data": {"train_file": "builtin:mawps-quickstart", "limit": 16, "cutoff_len": 64},
        "train": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4,
                  "learning_rate": 0.05, "logging_steps": 1, "save_steps": 2, "seed": 0}}))
    ok(run_cli("train", recipe))
    reference = load_file(out / "adapter" / checkpoint.WEIGHTS_NAME)
    assert not any(key.endswith(checkpoint.FROZEN) for key in reference)
    saved = load_file(out / "checkpoint-2" / checkpoint.WEIGHTS_NAME)
    assert not any(key.endswith(checkpoint.FROZEN) for key in saved)
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoint-3", ignore_errors=True)
    result = ok(run_cli("train", recipe))
    assert "resuming from checkpoint-2" in result.output
    resumed = load_file(out / "adapter" / checkpoint.WEIGHTS_NAME)
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


def test_storage_may_change_on_resume():
    from sara_cli.training.rundir import changed_settings

    before = {"adapter": {"method": "mosara", "tau": 0.5}}  # a run from before `storage`
    assert changed_settings(before, {"adapter": {"method": "mosara", "tau": 0.5, "storage": "compact"}}) == []
    assert changed_settings(before, {"adapter": {"method": "mosara", "tau": 0.4}}) == ["adapter.tau: 0.5 -> 0.4"]
