"""`sara merge`: fold a trained adapter into the base weights and write a plain HF checkpoint.

The base is streamed one safetensors shard at a time: every targeted tensor gets its update
added in float32 and is cast once to the output dtype; every other tensor is copied unchanged.
Everything is written into a staging folder beside --out and renamed into place at the end, so
a failed or interrupted merge leaves nothing at --out.

Per method, the update against the ORIGINAL base W, as low-rank factors delta W = scale * B A:
    lora    B (out, r), A (r, in), scale alpha / r
    pissa   [B, -B0] (out, 2r), [A; A0] (2r, in)            = B A - B0 A0
    sorsa   [U S, -U0 S0] (out, 2r), [Vh; Vh0] (2r, in)     = U S Vh - U0 S0 Vh0
    sara    U diag(lam) (out, k), Vh (k, in)
    mosara  (mean routing only) diag(v) U diag(gbar Lam) (out, k), Vh (k, in)
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sara_cli.adapters import checkpoint
from sara_cli.model import hub
from sara_cli.training import rundir
from sara_cli.errors import SaraError
from sara_cli.files import atomic_dir, check_apart, check_writable, no_space
from sara_cli.merging.verify import check_export, check_merged, mean_routing, verification_texts

DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
BASE_FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")
SKIPPED_FILES = {"config.json", "model.safetensors.index.json", checkpoint.CONFIG_NAME,
                 "adapter_config.json"}


@dataclass
class MergeReport:
    out: Path
    method: str
    format: str = "hf"
    tensors_merged: int = 0
    shards: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    verification: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)  # --format peft-lora: export.export_summary


# -- the update, functional on the saved tensors ----------------------------------------------------

def factors(method: str, options: dict, t: dict, mean_gate=None):
    """(B (out, q), A (q, in), scale) with delta W = scale * B A, from one module's saved tensors.

    Args:
        t: the module's adapter tensors by name without the module path (e.g. "sara_U").
        mean_gate: (m,) static gate for Mo-SARA; required for it.
    """
    import torch

    if method == "lora":
        return t["lora_B"], t["lora_A"], float(options["alpha"]) / t["lora_A"].shape[0]
    if method == "pissa":
        return (torch.cat([t["pissa_B"], -t["pissa_B0"]], dim=1),
                torch.cat([t["pissa_A"], t["pissa_A0"]], dim=0), 1.0)
    if method == "sorsa":
        return (torch.cat([t["sorsa_U"] * t["sorsa_S"], -t["sorsa_U0"] * t["sorsa_S0"]], dim=1),
                torch.cat([t["sorsa_Vh"], t["sorsa_Vh0"]], dim=0), 1.0)
    if method == "sara":
        lam = t.get("sara_lambda")
        return (t["sara_U"] * lam if lam is not None else t["sara_U"]), t["sara_Vh"], 1.0
    if method == "mosara":
        lbar = mean_gate.to(t["mosara_lambda"]) @ t["mosara_lambda"]  # (k,)
        U, Vh, v = t["mosara_U"], t["mosara_Vh"], t["mosara_v"]
        if options.get("v_position", "after") == "after":
            return v[:, None] * U * lbar, Vh, 1.0
        return U * lbar, Vh * v[None, :], 1.0
    raise SaraError(f"unknown adapter method '{method}' in sara_config.json")


def grouped_tensors(adapter_dir: Path, modules: list[str]) -> dict[str, dict]:
    """{module: {tensor name: fp32 tensor}} from adapter_model.safetensors."""
    state = checkpoint.load_safetensors(adapter_dir / checkpoint.WEIGHTS_NAME)
    grouped: dict[str, dict] = {m: {} for m in modules}
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        if module in grouped:
            grouped[module][name] = value.float()
    return grouped


# -- the streaming merge ---------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '200KB' / bytes -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if cleaned.endswith(unit):
            try:
                return int(float(cleaned[: -len(unit)]) * factor)
            except ValueError:
                break
    if cleaned.isdigit():
        return int(cleaned)
    raise SaraError(f"--max-shard-size '{text}' is not a size; use e.g. 5GB, 500MB")


class ShardWriter:
    """Accumulate tensors and write safetensors shards of at most `max_bytes` each."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def names(self) -> list[str]:
        """Every tensor name added so far."""
        return [n for _, names in self.files for n in names] + list(self.pending)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        filename = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.folder / filename), metadata={"format": "pt"})
        self.files.append((filename, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Name the shards the way transformers does and write the index. Returns the count."""
        import json

        self.flush()
        if len(self.files) == 1:
            (self.folder / self.files[0][0]).rename(self.folder / "model.safetensors")
            return 1
        weight_map = {}
        count = len(self.files)
        for i, (filename, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / filename).rename(self.folder / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return count


def stream_merge(base_dir: Path, staging: Path, updates: dict, out_dtype, transposed: bool,
                 max_bytes: int) -> tuple[int, int]:
    """Write base + updates into `staging`, one input tensor at a time.

    Args:
        updates: {checkpoint tensor name: (B, A, scale)}; delta W = scale * B A (out, in).
        out_dtype: torch dtype for floating tensors, or None to keep each tensor's own.

    Returns (tensors merged, shards written).
    """
    import torch
    from safetensors import safe_open

    writer = ShardWriter(staging, max_bytes)
    merged = 0
    for path in hub.weight_files(base_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                target_dtype = out_dtype if (out_dtype is not None and tensor.is_floating_point()) else tensor.dtype
                if name in updates:
                    B, A, scale = updates[name]
                    delta = (B @ A) * scale  # (out, in), float32
                    delta = delta.T if transposed else delta  # as stored: Conv1D keeps (in, out)
                    if tuple(delta.shape) != tuple(tensor.shape):
                        raise SaraError(f"the adapter's update for {name} has shape {tuple(delta.shape)} but "
                                        f"the base tensor has {tuple(tensor.shape)}; the adapter belongs "
                                        "to another model")
                    W = tensor.to(torch.float32) + delta
                    if not bool(torch.isfinite(W).all()):
                        raise SaraError(f"merging {name} produced NaN or inf; the adapter is broken")
                    tensor = W.to(target_dtype)
                    merged += 1
                elif tensor.dtype != target_dtype:
                    tensor = tensor.to(target_dtype)
                writer.add(name, tensor)
    if merged != len(updates):
        missing = sorted(set(updates) - set(writer.names()))
        raise SaraError(f"{len(missing)} adapter targets were not found in the base weights "
                        f"(first: {missing[0]}); is --base the model the adapter was trained on?")
    return merged, writer.finish()


def copy_base_files(base_dir: Path, staging: Path, dtype_name: str | None) -> None:
    """Tokenizer files, generation config, chat template; config.json without sara fields."""
    import json

    for pattern in BASE_FILES:
        for path in base_dir.glob(pattern):
            if path.name not in SKIPPED_FILES and path.is_file():
                shutil.copy2(path, staging / path.name)
    config = {k: v for k, v in hub.load_config(base_dir).items() if not k.startswith("sara")}
    if dtype_name is not None:
        config["dtype"] = dtype_name
        config.pop("torch_dtype", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def stored_dtype(base_dir: Path) -> str:
    """The dtype of the first floating tensor on disk, for configs that do not name one."""
    names = {v: k for k, v in DTYPES.items()}
    for _, entry in hub.tensor_index(base_dir).values():
        if entry["dtype"] in names:
            return names[entry["dtype"]]
    return "float32"


def output_dtype(choice: str, base_dir: Path):
    """(torch dtype or None to keep, config name) for --dtype."""
    import torch

    if choice == "auto":
        config = hub.load_config(base_dir)
        name = config.get("dtype") or config.get("torch_dtype") or stored_dtype(base_dir)
        return None, name
    if choice not in DTYPES:
        raise SaraError(f"--dtype must be auto, bfloat16, float16 or float32, got '{choice}'")
    return getattr(torch, choice), choice


# -- the command -----------------------------------------------------------------------------------

def check_out(out: Path, overwrite: bool) -> None:
    """Fail before any work when --out cannot be created (the write itself is checked again)."""
    if out.exists() and not out.is_dir():
        raise SaraError(f"--out {out} is a file; give a folder path")
    if out.exists() and not overwrite:
        raise SaraError(f"--out {out} already exists; choose another folder or pass --overwrite "
                        "(the old folder is replaced only once the new one is complete)")
    check_writable(out.parent, "--out", given=out)
    rundir.check_outside_managed(out, "--out")


def merge_inputs(adapter_dir: Path, base_dir: Path, calibration: str | None) -> list:
    """(label, path) of what merge reads: the adapter, the base, calibration data. A new folder
    inside a run (RUN/merged) is fine; the run folder itself contains its adapter, so not."""
    from sara_cli.model.builtin import is_builtin

    inputs = [("the adapter", adapter_dir), ("the base model", base_dir)]
    if calibration and not is_builtin(calibration):
        inputs.append(("the calibration data", Path(calibration)))
    return inputs


def check_options(method: str, routing: str, calibration: str | None, fmt: str, dtype: str,
                  max_rank: int | None = None) -> None:
    """The option combinations `merge` accepts for an adapter of `method`."""
    if max_rank is not None and fmt != "peft-lora":
        raise SaraError("--max-rank caps the rank of a --format peft-lora export; a merged checkpoint "
                        "has no rank to cap: add --format peft-lora or drop --max-rank")
    if max_rank is not None and max_rank < 1:
        raise SaraError(f"--max-rank must be at least 1, got {max_rank}")
    if routing not in ("refuse", "mean"):
        raise SaraError(f"--routing must be refuse or mean, got '{routing}'")
    if fmt not in ("hf", "peft-lora"):
        raise SaraError(f"--format must be hf or peft-lora, got '{fmt}'")
    if dtype != "auto" and dtype not in DTYPES:
        raise SaraError(f"--dtype must be auto, bfloat16, float16 or float32, got '{dtype}'")
    if dtype != "auto" and fmt == "peft-lora":
        raise SaraError(f"--dtype {dtype} does not apply to --format peft-lora (the adapter tensors "
                        "are always float32); drop --dtype")
    if method != "mosara":
        if routing != "refuse" or calibration:
            raise SaraError(f"--routing and --calibration apply to Mo-SARA adapters only; this is a "
                            f"{method} adapter, whose merge is exact: drop them")
        return
    if routing == "refuse":
        raise SaraError("Mo-SARA routes every token to its own mix of singular values, so no single "
                        "weight matrix reproduces it exactly; to merge anyway with each layer's "
                        "average routing, pass --routing mean --calibration DATA")
    if not calibration:
        raise SaraError("--routing mean needs --calibration DATA (instruction records to average the gates over)")
    from sara_cli.model.builtin import is_builtin

    if not is_builtin(calibration) and not Path(calibration).expanduser().is_file():
        raise SaraError(f"calibration file {calibration} does not exist; give a JSON/JSONL/CSV/Parquet "
                        "file of instruction records or builtin:mawps-quickstart")


def check_fingerprint(base_ref: str, base_dir: Path, recorded: dict, given: bool) -> None:
    """Refuse a base whose weights are not the ones the adapter was trained on.

    Raises:
        SaraError: naming whether the recorded base's weights changed since training, or
            --base names another model.
    """
    now = hub.fingerprint(base_dir)
    if now == recorded["fingerprint"]:
        return
    trained_on = recorded.get("name_or_path")
    if not given or base_ref == trained_on:
        raise SaraError(f"the weights of base {base_ref} changed since the adapter was trained on it "
                        f"(fingerprint {now}, recorded {recorded['fingerprint']}); restore the original "
                        "weights, give them with --base, or pass --force to merge anyway")
    raise SaraError(f"--base {base_ref} is not the model this adapter was trained on ({trained_on}): its "
                    f"fingerprint is {now}, not {recorded['fingerprint']}; pass --force to merge anyway")


def peak_memory_mb() -> float:
    """This process's peak resident memory: VmHWM on Linux (ru_maxrss can report a parent's
    size for a child started from a large process), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def publish_permissions(folder: Path) -> None:
    """Give the staging folder (mkdtemp: 0700) and its files (0600) the usual umask modes, so a
    server running as another user can read the checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def merge(path: Path, out: Path, base: str | None = None, dtype: str = "auto", max_shard_size: str = "5GB",
          verify: bool = True, routing: str = "refuse", calibration: str | None = None,
          fmt: str = "hf", force: bool = False, overwrite: bool = False,
          max_rank: int | None = None) -> MergeReport:
    """Merge the adapter in `path` (a run or adapter folder) into its base; write to `out`.

    Raises:
        SaraError: no adapter, base mismatch, quantized base, Mo-SARA without --routing mean,
            missing calibration data, a failed verification, or a write error. Nothing is
            left at `out` in any of these cases (with --overwrite, the old `out` stays).
    """
    from safetensors import SafetensorError

    started = time.perf_counter()
    out = Path(out)
    adapter_dir = checkpoint.find_adapter_dir(path)
    config = checkpoint.read_config(adapter_dir)
    method = config["method"]
    check_options(method, routing, calibration, fmt, dtype, max_rank)
    max_bytes = parse_size(max_shard_size)
    check_out(out, overwrite)
    base_ref = base or config["base_model"]["name_or_path"]
    revision = None if base else config["base_model"].get("revision")
    base_dir = hub.resolve_model_dir(base_ref, revision)
    check_apart([("--out", out)], merge_inputs(adapter_dir, base_dir, calibration), "merge")
    base_config = hub.load_config(base_dir)
    hub.check_not_quantized(base_dir, base_config)
    recorded = config["base_model"].get("fingerprint")
    if recorded and not force:
        check_fingerprint(base_ref, base_dir, config["base_model"], bool(base))
    out_dtype, dtype_name = output_dtype(dtype, base_dir)
    report = MergeReport(out=out, method=method, format=fmt)

    texts = verification_texts(config, base_dir=base_dir)
    mean_gates, routed, routed_calibration, calibration_texts = {}, None, None, []
    if method == "mosara":
        mean_gates, routed, routed_calibration, calibration_texts = mean_routing(
            adapter_dir, str(base_dir), dtype_name, calibration, config, texts)

    modules = list(config["ranks"])
    tensors = grouped_tensors(adapter_dir, modules)
    checkpoint.rebuild_frozen(config, tensors, base_dir)  # a compact Mo-SARA file's U_k, V_k
    mapping = hub.match_tensor_names(modules, list(hub.tensor_index(base_dir)))
    updates = {name: factors(method, config["options"], tensors[module], mean_gates.get(module))
               for name, module in mapping.items()}

    try:
        with atomic_dir(out, overwrite=overwrite) as staging:
            if fmt == "peft-lora":
                from sara_cli.model.builtin import is_builtin
                from sara_cli.merging.export import export_summary, write_peft_lora

                # PEFT resolves the base by name; a built-in model is named by its local folder.
                peft_base = str(base_dir) if is_builtin(base_ref) else base_ref
                transposed = hub.is_conv1d_checkpoint(base_config)
                exported = write_peft_lora(staging, updates, mapping, peft_base, transposed, revision, max_rank)
                report.export = export_summary(exported, max_rank)
                report.tensors_merged, report.shards = len(updates), 1  # adapter_model.safetensors
                if verify:
                    # Truncated or mean-routed exports approximate the adapter: figures only.
                    exact = method != "mosara" and not report.export["truncated"]
                    report.verification = check_export(adapter_dir, str(base_dir), staging, dtype_name, texts,
                                                       transposed, exact, routed)
            else:
                report.tensors_merged, report.shards = stream_merge(
                    base_dir, staging, updates, out_dtype, hub.is_conv1d_checkpoint(base_config), max_bytes)
                copy_base_files(base_dir, staging, dtype_name if out_dtype is not None else None)
                if verify:
                    # The adapter model is built on the very files that were merged (base_dir).
                    report.verification = check_merged(adapter_dir, str(base_dir), staging, dtype_name, texts,
                                                       routed, routed_calibration, calibration_texts)
            report.peak_memory_mb = peak_memory_mb()
            report.seconds = time.perf_counter() - started
            from sara_cli.merging.export import model_card

            (staging / "README.md").write_text(model_card(config, base_ref, fmt, report, calibration))
            publish_permissions(staging)
    except (OSError, SafetensorError, RuntimeError) as exc:  # disk full, permissions, a vanished folder
        full = no_space(exc, out)
        if full is not None:
            raise SaraError(f"{full}; nothing was written at {out}") from None
        if isinstance(exc, RuntimeError):
            raise
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise SaraError(f"writing {out} failed: {reason}; nothing was written there. Check free "
                        "space and permissions") from None
    return report
