"""Tests for `sara route-map` (sara_cli/routing.py) and the gate recording it reads (sara_cli/gates.py).

The Mo-SARA adapters are built directly on tiny Llamas (inject + checkpoint.save_adapter), so the
router weights are known exactly. Gates are checked against a float64 re-computation of the
paper's router, g = softmax((z W_g1) W_g2) with z = x V_k, written out in this file.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ASSETS, one_line_error, run_cli, tiny_llama

EXPERTS = 5
TEXTS = ["Below is a short question. What is 2 + 3?", "Tom has 7 apples and eats 2.", "Is the sky green?"]


pytestmark = pytest.mark.usefixtures("one_thread")


def build_adapter(base_dir: Path, run_dir: Path, method: str = "mosara", edit=None) -> Path:
    """Wrap q_proj and v_proj of the checkpoint in `base_dir` and save the adapter as a run folder.

    `edit(layers)` may change the adapter weights before they are saved. Returns `run_dir`.
    """
    from transformers import AutoModelForCausalLM

    from sara_cli.adapters import checkpoint
    from sara_cli.model import hub
    from sara_cli.adapters.inject import inject_adapters

    options = ({"tau": 0.5, "num_experts": EXPERTS, "v_position": "after", "dropout": 0.0} if method == "mosara"
               else {"tau": 0.5, "use_lambda": True, "init_lambda": "ones", "zero_init": "none", "dropout": 0.0})
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    layers = inject_adapters(model, method, options, "q_proj,v_proj")
    if edit is not None:
        with torch.no_grad():
            edit(layers)
    meta = {"method": method, "options": options, "targets": list(layers),
            "base_model": {"name_or_path": str(base_dir), "revision": None, "path": str(base_dir),
                           "dtype": "float32", "trust_remote_code": False,
                           "fingerprint": hub.fingerprint(base_dir)}}
    checkpoint.save_adapter(model, run_dir / "adapter", meta)
    return run_dir


@pytest.fixture(scope="module")
def mosara_run(llama_dir, tmp_path_factory) -> Path:
    """Mo-SARA on the tiny Llama with its random (token-dependent) router."""
    return build_adapter(llama_dir, tmp_path_factory.mktemp("mosara") / "run")


@pytest.fixture(scope="module")
def routed_model(mosara_run):
    from sara_cli.adapters import checkpoint

    model, tokenizer, _ = checkpoint.load_adapter_model(mosara_run / "adapter", device="cpu")
    return model, tokenizer


def reference_gates(model, tokenizer, texts) -> dict[str, np.ndarray]:
    """Per real token, in float64: softmax(((x Vh^T) W_g1) W_g2) from each layer's captured input."""
    from sara_cli.adapters.registry import MoSaraLayer

    batch = tokenizer(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()  # (B, T)
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, MoSaraLayer):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach())))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    for name, x in inputs.items():
        layer = model.get_submodule(name)
        x64 = x[mask].double().numpy()  # (N, in)
        Vh, W_g1, W_g2 = (t.detach().double().numpy()
                          for t in (layer.mosara_Vh, layer.mosara_router_in, layer.mosara_router_out))
        z = x64 @ Vh.T  # (N, k)
        logits = (z @ W_g1) @ W_g2  # (N, 1) -> (N, m)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        result[name] = e / e.sum(axis=1, keepdims=True)
    return result


def test_recorded_gates_sum_to_one_and_match_the_router(routed_model):
    from sara_cli.adapters.gates import collect_gates

    model, tokenizer = routed_model
    gates = collect_gates(model, tokenizer, TEXTS, batch_size=2)  # two batches, the first padded
    reference = reference_gates(model, tokenizer, TEXTS)
    real_tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert sorted(gates) == sorted(reference) and len(gates) == 4  # 2 layers x (q_proj, v_proj)
    for name, g in gates.items():
        assert g.shape == (real_tokens, EXPERTS) and g.dtype == torch.float32
        torch.testing.assert_close(g.sum(dim=-1), torch.ones(real_tokens), atol=1e-6, rtol=0)
        torch.testing.assert_close(g.double(), torch.from_numpy(reference[name]), atol=1e-6, rtol=0)
    # A random router routes token by token: the test data is not trivially static.
    assert any(len(set(g.argmax(-1).tolist())) > 1 for g in gates.values())
    assert all(not layer.record_gates and not layer.recorded_gates
               for name, layer in model.named_modules() if name in gates)


def test_summary_has_one_row_per_layer_and_a_column_per_expert(routed_model):
    from sara_cli.adapters.gates import collect_gates
    from sara_cli.analysis.routing import summarize

    model, tokenizer = routed_model
    gates = collect_gates(model, tokenizer, TEXTS)
    maps = summarize(gates, None)
    assert sorted(maps) == ["q_proj", "v_proj"]
    assert list(summarize(gates, ["v_proj"])) == ["v_proj"]
    for module, m in maps.items():
        assert m.layers == [0, 1]
        assert np.asarray(m.mean_gate).shape == (2, EXPERTS)  # (layers, experts)
        for i, layer in enumerate(m.layers):
            g = gates[f"model.layers.{layer}.self_attn.{module}"].double().numpy()  # (N, m)
            mean = g.mean(axis=0)
            np.testing.assert_allclose(m.mean_gate[i], mean, atol=1e-6)
            assert m.dominant[i] == int(mean.argmax())
            assert m.dominant_share[i] == pytest.approx(mean.max(), abs=1e-6)
            assert m.top_agreement[i] == pytest.approx(float((g.argmax(1) == mean.argmax()).mean()))
            entropy = float(-(g * np.log(g)).sum(axis=1).mean())  # nats
            assert m.entropy[i] == pytest.approx(entropy, abs=1e-5)
            assert 0.0 <= m.entropy[i] <= math.log(EXPERTS) + 1e-6
        assert m.tokens == g.shape[0]


def read_outputs(out: Path):
    saved = json.loads((out / "route-map.json").read_text())
    with open(out / "route-map.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return saved, rows


def assert_csv_matches_json(saved: dict, rows: list[dict]) -> None:
    expected = [(task, module, layer, expert, value)
                for task, modules in saved["tasks"].items()
                for module, m in modules.items()
                for layer, row in zip(m["layers"], m["mean_gate"])
                for expert, value in enumerate(row)]
    assert len(rows) == len(expected)
    for row, (task, module, layer, expert, value) in zip(rows, expected):
        assert (row["task"], row["module"], int(row["layer"]), int(row["expert"])) == (task, module, layer, expert)
        assert float(row["mean_gate"]) == pytest.approx(value, abs=5e-7)  # the CSV keeps 6 decimals


def test_route_map_command_writes_png_json_csv_and_prints_the_heatmap(mosara_run, tmp_path):
    import matplotlib.image

    out = tmp_path / "map"
    result = run_cli("route-map", mosara_run, "--data", "builtin:mawps-quickstart", "--limit", 16, "--out", out)
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(out / "route-map.png")
    assert image.ndim == 3 and image.shape[1] > 200 and image.shape[0] > 100
    assert image.std() > 0.05  # not a blank canvas

    saved, rows = read_outputs(out)
    assert (saved["experts"], saved["tokens"]) == (EXPERTS, "prompt")
    assert list(saved["tasks"]) == ["mawps-quickstart"]
    for m in saved["tasks"]["mawps-quickstart"].values():
        assert np.asarray(m["mean_gate"]).shape == (2, EXPERTS)
        np.testing.assert_allclose(np.asarray(m["mean_gate"]).sum(axis=1), 1.0, atol=1e-5)
        assert set(m) == {"layers", "mean_gate", "entropy", "dominant", "dominant_share", "top_agreement", "tokens"}
    assert_csv_matches_json(saved, rows)

    text = result.stdout
    for header in ("mawps-quickstart / q_proj: mean gate", "mawps-quickstart / v_proj: mean gate",
                   "layer", "e0", "e4", "dominant", "top-1 agree", "entropy"):
        assert header in text, text
    summary = [line for line in text.splitlines() if line.startswith("routing is ")]
    assert len(summary) == 1 and "--routing mean" in summary[0]
    assert "route-map.png" in text


def test_route_map_tasks_and_module_filter(mosara_run, tmp_path):
    result = run_cli("route-map", mosara_run / "adapter", "--task", "svamp,boolq", "--limit", 3,
                     "--modules", "v_proj", "--tokens", "all", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    saved, rows = read_outputs(tmp_path)
    assert saved["tokens"] == "all"
    assert {task: list(modules) for task, modules in saved["tasks"].items()} == {"svamp": ["v_proj"],
                                                                                 "boolq": ["v_proj"]}
    assert_csv_matches_json(saved, rows)


def test_route_map_writes_into_the_run_folder_by_default(mosara_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the current folder
    result = run_cli("route-map", mosara_run, "--task", "svamp", "--limit", 2)
    assert result.exit_code == 0, result.output
    assert (mosara_run / "route-map" / "route-map.json").is_file()
    assert f"wrote {mosara_run / 'route-map'}/route-map.png" in " ".join(result.stdout.split())
    assert list(tmp_path.iterdir()) == []
    result = run_cli("route-map", mosara_run / "adapter", "--task", "svamp", "--limit", 2)  # the adapter folder
    assert result.exit_code == 0 and list(tmp_path.iterdir()) == []
    shutil.rmtree(mosara_run / "route-map")


def test_an_out_that_is_a_file_fails_before_any_work(mosara_run, tmp_path, monkeypatch):
    import sara_cli.analysis.routing as routing

    target = tmp_path / "map.png"
    target.write_bytes(b"mine")
    monkeypatch.setattr(routing, "route_map", lambda *a, **k: pytest.fail("the model was run"))
    one_line_error(run_cli("route-map", mosara_run, "--task", "svamp", "--out", target), str(target), "is a file")
    assert target.read_bytes() == b"mine"


def test_many_modules_are_laid_out_in_a_grid(tmp_path):
    """All-linear Llama: seven panels in rows of at most four, not one 1845 px strip."""
    from PIL import Image

    from sara_cli.analysis.routing import PANEL_COLUMNS, ModuleMap, RouteMap, plot

    result = RouteMap(model="m", tokens="prompt", experts=5)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    result.maps["gsm8k"] = {m: ModuleMap(list(range(4)), [[0.2] * 5] * 4, [1.0] * 4, [0] * 4, [0.2] * 4,
                                          [0.2] * 4, 10) for m in modules}
    plot(result, tmp_path / "map.png")
    with Image.open(tmp_path / "map.png") as image:
        width, height = image.size
    assert PANEL_COLUMNS == 4 and width <= 1400 and 1.5 <= width / height <= 3, (width, height)


def forced_base(tmp_path: Path) -> Path:
    """A tiny Llama whose embedding coordinate 0 is 1 for every token (the others ~0.02).

    The residual stream then keeps a large positive coordinate 0 through both layers, so the
    normalised input x of every q_proj/v_proj has x_0 > 0 for every token.
    """
    from transformers import AutoTokenizer

    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(tmp_path)
    return tmp_path


def force_expert_2(layers) -> None:
    """W_g1 = V_k^T e_0, so z W_g1 = x . (V_k V_k^T e_0) > 0; W_g2 = 50 (-1, -1, 0, -1, -1).

    logits = (z W_g1) W_g2 has no bias: for s = z W_g1 > 0 expert 2 wins by 50 s, for s < 0 it
    would lose. The base from `forced_base` makes s > 0 for every token.
    """
    for layer in layers.values():
        layer.mosara_router_in.copy_(layer.mosara_Vh[:, :1])  # (k, 1)
        layer.mosara_router_out.copy_(torch.tensor([[-50.0, -50.0, 0.0, -50.0, -50.0]]))  # (1, m)


def test_hand_set_router_makes_expert_2_dominate(tmp_path):
    run = build_adapter(forced_base(tmp_path / "base"), tmp_path / "run", edit=force_expert_2)
    out = tmp_path / "map"
    result = run_cli("route-map", run, "--data", "builtin:mawps-quickstart", "--limit", 8, "--out", out)
    assert result.exit_code == 0, result.output
    saved, rows = read_outputs(out)
    modules = saved["tasks"]["mawps-quickstart"]
    assert sorted(modules) == ["q_proj", "v_proj"]
    for m in modules.values():
        assert m["layers"] == [0, 1]
        assert m["dominant"] == [2, 2]
        assert m["top_agreement"] == [1.0, 1.0]
        assert min(m["dominant_share"]) > 0.999
        assert max(m["entropy"]) < 1e-2
    assert_csv_matches_json(saved, rows)
    assert "routing is static: the dominant expert holds 100% of the gate" in result.stdout
    assert "top choice of 100% of tokens" in result.stdout


# -- bad input -------------------------------------------------------------------------------------


def test_an_adapter_that_is_not_mosara_is_named(llama_dir, tmp_path):
    run = build_adapter(llama_dir, tmp_path / "sara-run", method="sara")
    one_line_error(run_cli("route-map", run, "--task", "svamp", "--out", tmp_path / "map"),
                   "is a sara adapter", "Mo-SARA")
    assert not (tmp_path / "map").exists()


@pytest.mark.parametrize(("args", "fragments"), [
    (["--task", "svamp,gsm9k"], ["'gsm9k'", "svamp", "winogrande"]),
    (["--data", "/nonexistent/records.json"], ["/nonexistent/records.json", "does not exist"]),
    (["--task", "svamp", "--limit", "0"], ["--limit", "got 0"]),
    (["--task", "svamp", "--data", "builtin:mawps-quickstart"], ["either --task", "or --data"]),
    (["--task", "svamp", "--tokens", "some"], ["--tokens", "'some'"]),
    (["--task", "svamp", "--modules", "v_proj,o_proj"], ["--modules o_proj", "q_proj, v_proj"]),
])
def test_bad_input(mosara_run, tmp_path, args, fragments):
    one_line_error(run_cli("route-map", mosara_run, *args, "--out", tmp_path / "map"), *fragments)
    assert not (tmp_path / "map").exists()


def test_records_without_instruction(mosara_run, tmp_path):
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"question": "What is 2 + 3?", "output": "5"}]))
    one_line_error(run_cli("route-map", mosara_run, "--data", records, "--out", tmp_path / "map"),
                   "'instruction'", "question")


def test_a_folder_without_an_adapter(tmp_path):
    one_line_error(run_cli("route-map", tmp_path, "--task", "svamp"), "holds no sara adapter")
