"""Loading a base model: resolve the reference, read its files, quantize, place it on the device.

Every command loads through here, so train, merge's checks, eval, route-map and chat see a base
the same way:
- `load_base_model`: a recipe's model section -> (model, tokenizer, model folder);
- `recorded_model_section`: the model section a run was trained with, to load its base again;
- `load_checkpoint`: a plain checkpoint (a merged model, or a base for `sara eval`).
A run's base with its adapter attached is `adapters.checkpoint.load_adapter_model`: it needs the
adapter files, which live a layer above this one.
"""

from __future__ import annotations

import os
from pathlib import Path

from sara_cli.model import hub, quantize
from sara_cli.errors import SaraError


def device_for_inference() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def training_device() -> str | None:
    """The device this process trains on: its own GPU (LOCAL_RANK) or None for the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def load_tokenizer(folder, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token for batched runs: unk where there is one, so EOS keeps its
    label in training, else EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


TRAIN_SETTING = "set model.trust_remote_code: true in the recipe"
FLAG_SETTING = "pass --trust-remote-code"


def remote_code_error(reference, exc: Exception, setting: str) -> SaraError | None:
    """The one-line refusal for a model folder whose config names its own Python code (auto_map)
    when running it was not asked for; None for any other loading error."""
    text = str(exc)
    if "trust_remote_code" not in text and "custom code" not in text:
        return None
    return SaraError(f"model {reference} needs its own Python code (auto_map in its config), which sara "
                     f"runs only when asked: {setting}, and only for a model whose code you trust, since "
                     "that runs the code on this machine")


def _dtype_argument(name: str):
    """torch dtype for bfloat16/float16/float32; anything else ("auto") keeps the checkpoint's."""
    import torch

    return getattr(torch, name) if name in ("bfloat16", "float16", "float32") else "auto"


def load_base_model(model_cfg, device: str | None = None, device_map: bool = True,
                    compute_dtype: str = "float32", setting: str = TRAIN_SETTING):
    """Load the frozen base model and tokenizer named by a recipe's model section.

    Args:
        model_cfg: a `recipe.ModelSection` (or anything with its fields); `load_in_4bit` /
            `load_in_8bit` quantize it while loading (quantize.py).
        device: where the model goes; None leaves it on the CPU.
        device_map: load straight onto a GPU with a device_map, not through host memory. Training
            passes False: the Trainer and accelerate treat device-mapped models as model-parallel.
            A quantized base always loads with one (bitsandbytes quantizes on the way in).
        compute_dtype: the 4-bit compute dtype (float32, bfloat16, float16).
        setting: how the user allows a model's own code, for the refusal when it needs some.

    Returns:
        (model, tokenizer, model_dir)
    Raises:
        SaraError: the reference does not resolve, the checkpoint is pre-quantized or holds no
            safetensors, or transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM

    model_dir = hub.resolve_model_dir(model_cfg.name_or_path, model_cfg.revision)
    config = hub.load_config(model_dir)
    hub.check_not_quantized(model_dir, config)
    hub.weight_files(model_dir)  # a clear error for .bin-only checkpoints
    kwargs = {"trust_remote_code": model_cfg.trust_remote_code, "dtype": _dtype_argument(model_cfg.dtype)}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    quantization = quantize.bnb_config(model_cfg, compute_dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    on_gpu = device is not None and str(device).startswith("cuda")
    if on_gpu and (device_map or quantization is not None):
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        tokenizer = load_tokenizer(model_dir, model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        refused = remote_code_error(model_cfg.name_or_path, exc, setting)
        raise refused or SaraError(f"could not load model {model_cfg.name_or_path}: {str(exc).splitlines()[0]}") from None
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    if quantization is not None:
        quantize.avoid_cpu_packing_bug(model)
    return model, tokenizer, model_dir


def recorded_model_section(recorded: dict, base: str | None = None, dtype: str | None = None,
                           full_precision: bool = False):
    """The `ModelSection` a run was trained with (its sara_config.json `base_model`), with an
    optional other base folder or dtype; `full_precision` drops a recorded 4-bit/8-bit load."""
    from sara_cli.recipe import ModelSection

    quantized = None if full_precision else recorded.get("quantization")
    return ModelSection(name_or_path=base or recorded["name_or_path"],
                        revision=None if base else recorded.get("revision"),
                        dtype=dtype or recorded.get("dtype", "auto"),
                        trust_remote_code=recorded.get("trust_remote_code", False),
                        load_in_4bit=quantized == "4bit", load_in_8bit=quantized == "8bit")


def skeleton(model_dir: Path):
    """The model `model_dir`'s config describes, on the meta device: its modules and parameter
    shapes, with no weights read or memory allocated. `sara analyze` resolves targets on it, so
    it selects what `sara train` wraps.

    Raises:
        SaraError: transformers cannot build the model from its config (an unknown architecture,
            or one that needs its own code, which analyze never runs).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        if remote_code_error(model_dir, exc, "") is not None:
            raise SaraError(f"model {model_dir} needs its own Python code (auto_map in its config) to be "
                            "built, and sara analyze never runs a model's code; train it with "
                            "model.trust_remote_code: true (only for code you trust) and read its targets "
                            "from the run") from None
        raise SaraError(f"cannot build model {model_dir} from its config.json "
                                   f"({str(exc).splitlines()[0]}); check that transformers knows its "
                                   "architecture") from None


def load_checkpoint(reference: str | Path, dtype: str = "auto", device: str | None = None,
                    trust_remote_code: bool = False, setting: str = FLAG_SETTING):
    """A plain checkpoint through transformers alone, as a user would load it: a merged model or
    a base model. Pre-quantized checkpoints are accepted here (nothing is decomposed).

    Args:
        trust_remote_code: run the folder's own model code (never asked interactively).
        setting: how the user allows that, for the refusal when it is needed.

    Returns (model in eval mode, tokenizer, model_dir).
    Raises:
        SaraError: the model needs its own code and `trust_remote_code` is False.
    """
    from transformers import AutoModelForCausalLM

    model_dir = hub.resolve_model_dir(str(reference))
    hub.weight_files(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_dtype_argument(dtype),
                                                     trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(model_dir, trust_remote_code)
    except (OSError, ValueError) as exc:
        refused = remote_code_error(reference, exc, setting)
        if refused is None:
            raise
        raise refused from None
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, model_dir
