"""Loading and saving HF causal LMs: hub id | local dir | init=random (real shape) | init=tiny.

Every model directory this project writes is plain HF format (config.json + model.safetensors +
tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads with no project code.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rlhf.config import ModelConfig
from rlhf.models.families import AUTO, Family, derive_family, family_for_config, get_family, read_config

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


# ---------------------------------------------------------------- paths


def _looks_like_path(s: str) -> bool:
    """A filesystem path rather than a hub id ("org/name")."""
    return s.startswith(("/", "./", "../", "~")) or s.count("/") > 1


def resolve_path(model_cfg: ModelConfig, cache_dir: str | Path, key: str = "model") -> str:
    """Where to load ``model_cfg`` from: a local directory or a hub id.

    init=tiny: builds (or reuses) the tiny model ``model.path`` under ``<cache_dir>/models``.
    Otherwise an existing local path must be a directory with config.json and weights
    (``*.safetensors``; ``*.bin``/``*.pt`` only with ``model.allow_pickle=true``; init=random needs
    only config.json). A string that is not an existing path is returned as a hub id, unless it is
    clearly a filesystem path (starts with / ./ ../ ~), which is a FileNotFoundError. A tiny model
    whose path was pointed at a directory (e.g. ``actor.path=<step-1 output>``) loads that directory.
    ``key`` names the config group in error messages (model, actor, reward).
    """
    from rlhf.models.tiny import TINY_SPECS, build_tiny

    path = str(model_cfg.path)
    if model_cfg.init == "tiny" and path in TINY_SPECS and not Path(path).expanduser().is_dir():
        return str(build_tiny(path, Path(cache_dir) / "models"))
    if model_cfg.init not in ("pretrained", "random", "tiny"):
        raise ValueError(f"{key}.init={model_cfg.init!r}: expected pretrained, random or tiny")
    local = Path(os.path.expanduser(path))
    if not local.exists():
        if _looks_like_path(path):
            raise FileNotFoundError(f"{key}.path={path!r} does not exist (a local directory was expected)")
        return path  # hub id, resolved by from_pretrained (a tiny spec name is only looked up with init=tiny)
    if not local.is_dir():
        raise ValueError(f"{key}.path={path!r} is a file; expected an HF model directory with config.json")
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"{key}.path={path!r} has no config.json: not an HF model directory")
    if model_cfg.init == "random":
        return str(local)
    files = [p.name for p in local.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return str(local)
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickled and model_cfg.allow_pickle:
        return str(local)
    if pickled:
        raise ValueError(
            f"{key}.path={path!r} holds only pickle weights ({', '.join(sorted(pickled))}); loading them can run "
            f"arbitrary code. Convert them to safetensors, or set {key}.allow_pickle=true if you trust the source."
        )
    raise FileNotFoundError(
        f"{key}.path={path!r} has config.json but no weights (*.safetensors); "
        f"use {key}.init=random for a randomly initialised model of this shape"
    )


# ---------------------------------------------------------------- family


def _hub_config(path: str) -> dict | None:
    """config.json of a hub id as plain JSON (downloaded or from the HF cache), None when unreachable."""
    try:
        from transformers.utils import cached_file

        file = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline, unknown repo, gated: the caller decides what that means
        return None
    return read_config(Path(file).parent) if file else None


_FAMILY_CACHE: dict = {}


def config_key(model_cfg) -> str:
    """The config key a model was given under (model | actor | reward), for error messages."""
    return str(getattr(model_cfg, "key", None) or "model")


def resolve_family(model_cfg: ModelConfig, path: str | Path) -> Family:
    """The family of the model at ``path``: from its checkpoint's ``config.json`` (``model_type``,
    ``auto_map``), never by default.

    A registered family is used as is; a causal LM no family covers gets a derived one (logged in
    one line). ``<key>.family`` (``auto`` by default) is only needed where no config can be read
    (``init=random`` from a hub id offline, the planner); set to a registered family it must agree
    with the checkpoint, or name it for an unregistered ``model_type`` to borrow its handling.
    """
    key = config_key(model_cfg)
    declared = str(model_cfg.family or AUTO)
    cache_key = (str(path), declared, key)
    if cache_key in _FAMILY_CACHE:
        return _FAMILY_CACHE[cache_key]
    config = read_config(path)
    if config is None and not _looks_like_path(str(path)) and model_cfg.init != "random":
        config = _hub_config(str(path))
    if config is None:
        if declared == AUTO:
            raise ValueError(
                f"{key}.path={str(path)!r}: no config.json to tell the model family: it is not a local model directory "
                f"and the hub could not be reached (offline?) or has no such repo. Download it and point {key}.path "
                f"at the directory, or for a random-weight shape set {key}.init=random with {key}.family (one of: "
                f"{', '.join(FAMILIES_NAMES())}) and {key}.arch")
        family = get_family(declared, key)
    else:
        found = family_for_config(config)
        model_type = config.get("model_type")
        if declared != AUTO:
            wanted = get_family(declared, key)
            if found is not None and found.name != wanted.name:
                raise ValueError(
                    f"{key}.family={declared!r} but {str(path)!r} is a {model_type!r} model (family {found.name!r}); "
                    f"the family comes from the checkpoint: drop {key}.family (or set {key}.family={found.name})")
            if found is None:
                log.info("%s: model_type %r handled as family %r (%s.family)", key, model_type, wanted.name, key)
            family = wanted
        else:
            family = found or derive_family(config, path, key)
    _FAMILY_CACHE[cache_key] = family
    return family


def FAMILIES_NAMES() -> list[str]:
    from rlhf.models.families import FAMILIES

    return sorted(FAMILIES)


# ---------------------------------------------------------------- tokenizer


def _check_remote_code(family: Family, trust_remote_code: bool, what: str, key: str = "model") -> None:
    if family.needs_remote_code and not trust_remote_code:
        raise ValueError(
            f"{what} of family {family.name!r} runs custom code shipped with the checkpoint; "
            f"review it and set `{key}.trust_remote_code=true` to allow it"
        )


def load_tokenizer(path: str, family: Family, trust_remote_code: bool = False, key: str = "model"):
    """AutoTokenizer for ``path`` with a pad token (per ``family.pad_from``) and the family's
    training padding side. An existing pad token is kept. The family's special tokens (Pangu's
    ``<sep>``, GLM's ``[gMASK]``) must each be one token."""
    from transformers import AutoTokenizer

    _check_remote_code(family, trust_remote_code, f"the tokenizer at {path!r}", key)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    for token in family.special_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the tokenizer at {path!r} splits the {family.name} special token {token!r} into "
                             f"{len(ids)} tokens; a {family.name} tokenizer must keep it whole")
    if tokenizer.pad_token is None:
        order = {"pad": ("eos", "unk"), "eos": ("eos", "unk"), "unk": ("unk", "eos")}[family.pad_from]
        for source in order:
            token = getattr(tokenizer, f"{source}_token")
            if token is not None:
                tokenizer.pad_token = token
                break
        else:
            raise ValueError(f"tokenizer at {path!r} has no pad, eos or unk token to pad with")
    tokenizer.padding_side = family.padding_side
    return tokenizer


# ---------------------------------------------------------------- models


def _zero_dropout_config(config) -> None:
    for key, value in list(vars(config).items()):
        low = key.lower()
        if ("dropout" in low or "layerdrop" in low) and isinstance(value, float):
            setattr(config, key, 0.0)
    for sub in ("text_config", "decoder"):
        if hasattr(config, sub) and hasattr(getattr(config, sub), "to_dict"):
            _zero_dropout_config(getattr(config, sub))


def zero_dropout(model: nn.Module) -> None:
    """Set every ``nn.Dropout`` probability in ``model`` to 0 (in place)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_config(model_cfg: ModelConfig, path: str, *, disable_dropout: bool = False, init: str | None = None):
    """The HF config of ``model_cfg``: from ``path`` when it is loadable (local dir, or hub id for
    pretrained), else (init=random on a hub id) the family's config class built from
    ``model.arch``. Used by both causal-LM and reward-model loading."""
    from transformers import AutoConfig

    family = resolve_family(model_cfg, path)
    key = config_key(model_cfg)
    init = init or effective_init(model_cfg, path)
    _check_remote_code(family, model_cfg.trust_remote_code, f"model {path!r}", key)
    if init == "random" and not Path(path).is_dir():
        if not model_cfg.arch:
            raise ValueError(
                f"{key}.init=random for hub id {path!r} needs {key}.arch (HF config kwargs) to build the "
                "real shape offline"
            )
        if family.needs_remote_code:
            raise ValueError(
                f"{key}.init=random for family {family.name!r} needs a local directory with its config and "
                "custom code in model.path (transformers has no built-in config class for it)"
            )
        config = AutoConfig.for_model(family.model_types[0], **dict(model_cfg.arch))
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        if init == "random" and model_cfg.arch:
            for name, value in dict(model_cfg.arch).items():
                setattr(config, name, value)
    if disable_dropout:
        _zero_dropout_config(config)
    return config


def effective_init(model_cfg: ModelConfig, path: str | Path) -> str:
    """How to build the model at ``path``: the embedded tiny models and every directory other than
    ``<key>.path`` itself (a step's output) load their weights; otherwise ``<key>.init``."""
    if model_cfg.init == "tiny" or str(path) != str(model_cfg.path):
        return "pretrained"
    return str(model_cfg.init)


def _load(auto_cls, model_cfg: ModelConfig, path: str, dtype: torch.dtype, disable_dropout: bool, init: str | None):
    init = init or effective_init(model_cfg, path)
    config = load_config(model_cfg, path, disable_dropout=disable_dropout, init=init)
    from rlhf.engine.setup import zero3_construction  # ZeRO-3: built already sharded (sharded_loading)

    if init == "random":
        with zero3_construction():
            model = auto_cls.from_config(config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    else:
        kwargs = {} if model_cfg.allow_pickle else {"use_safetensors": True}
        try:
            with zero3_construction():
                model = auto_cls.from_pretrained(
                    path, config=config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **kwargs
                )
        except OSError as e:
            if model_cfg.allow_pickle or "safetensors" not in str(e):
                raise
            raise OSError(
                f"{e}\n(only safetensors weights are loaded by default; if {path!r} only has pickle weights "
                "(.bin/.pt) and you trust it, set model.allow_pickle=true)"
            ) from e
    if disable_dropout:
        zero_dropout(model)
    return model


def load_causal_lm(
    model_cfg: ModelConfig,
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    disable_dropout: bool = False,
    init: str | None = None,
):
    """``AutoModelForCausalLM`` for ``model_cfg`` from ``path`` (see ``resolve_path``).

    init (default ``model.init``): ``random`` builds the real shape with random weights (config
    from ``path`` if it is a local dir, else from ``model.arch``); ``pretrained``/``tiny`` load the
    weights (safetensors only unless ``model.allow_pickle``). Families with custom code require
    ``model.trust_remote_code=true``. ``disable_dropout`` zeroes every dropout probability.
    """
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, model_cfg, path, dtype, disable_dropout, init)


# ---------------------------------------------------------------- saving


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def merged_state(model) -> tuple[nn.Module, dict | None]:
    """``(hf_model, state_dict)`` to save ``model`` as a plain HF model without modifying it.

    For a peft model: the underlying transformers model and a state dict with every LoRA delta
    added to its base weight (the same arithmetic as peft's ``merge_and_unload``) and adapter
    keys removed. Otherwise ``(model, None)`` (save its own state dict).
    """
    if not is_peft_model(model):
        return model, None
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    with torch.no_grad():
        for name, module in base.named_modules():
            if not isinstance(module, LoraLayer) or module.merged:
                continue
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if not adapters:
                continue
            if any(a in getattr(module, "lora_variant", {}) for a in adapters):
                raise NotImplementedError(f"{name}: only plain LoRA adapters can be merged for saving")
            weight = module.get_base_layer().weight
            merged = weight.detach().clone()
            for adapter in adapters:
                merged += module.get_delta_weight(adapter).to(weight.dtype)
            state[f"{name}.weight"] = merged
    return base, state


@torch.no_grad()
def scale_delta(model: nn.Module, start: Callable[[str], torch.Tensor | None], scale: float) -> int:
    """Move ``model`` in place to ``start + scale * (trained - start)``, weight by weight (WiSE-FT;
    WARP's interpolation towards the initialisation for ``scale < 1``, ExPO's extrapolation for
    ``scale > 1``). ``start(name)`` gives a weight's value at the start by its name in the plain
    transformers model (e.g. ``dict(start_model.named_parameters()).get``).

    Frozen weights are still their start values and stay as they are. For a peft model the LoRA
    delta ``B @ A`` starts at 0 (``B = 0``), so ``lora_B`` is scaled and ``lora_A`` kept; trained
    base weights move towards their start. Returns the number of tensors changed.
    """
    n = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_B." in name or ".lora_embedding_B." in name:
            p.mul_(scale)
        elif ".lora_" in name:
            continue
        else:
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            w0 = start(key)
            if w0 is None or w0.shape != p.shape:
                got = "missing" if w0 is None else f"shape {tuple(w0.shape)}"
                raise ValueError(f"{key}: the start checkpoint does not match the trained model ({got}, trained "
                                 f"{tuple(p.shape)}); it must be the checkpoint this run started from")
            w0 = w0.to(p.device, torch.float32)
            p.copy_((w0 + scale * (p.float() - w0)).to(p.dtype))
        n += 1
    return n


def atomic_dir(out_dir: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` then move the result to ``out_dir``, replacing an existing one.

    A crash while writing leaves any previous ``out_dir`` intact; the old copy is only removed
    after the new one is in place.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700: give it the mode any new directory gets
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_hf(model, tokenizer, out_dir: str | Path) -> None:
    """Save ``model`` (LoRA merged in, model left unchanged) and ``tokenizer`` to ``out_dir`` as
    safetensors, atomically. The result loads with ``AutoModelForCausalLM.from_pretrained`` alone.

    The model must be whole on this process (under ZeRO-3 gather the parameters first).
    """
    hf_model, state = merged_state(model)

    def write(tmp: Path) -> None:
        hf_model.save_pretrained(str(tmp), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    atomic_dir(out_dir, write)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; ZeRO-3 partitioned parameters count their full size."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def describe_saved(model_dir: str | Path) -> dict:
    """``model_type``, class and parameter count of a saved HF directory, from its config.json and
    the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    d = Path(model_dir)
    config = read_config(d) or {}
    total = 0
    for file in sorted(d.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                n = 1
                for dim in f.get_slice(name).get_shape():
                    n *= int(dim)
                total += n
    return {"model_type": config.get("model_type"), "architecture": (config.get("architectures") or [None])[0],
            "saved_params": total}
