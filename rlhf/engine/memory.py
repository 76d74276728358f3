"""Memory planner: per GPU and per node, for every ZeRO stage and offload choice, what each step needs.

Nothing is allocated: parameter counts come from ``model.params_b``, or from a meta-device build of
``model.arch`` (or of the tiny model's config), which also gives the largest layer (ZeRO-3 gathers
one at a time), the LoRA adapter size and the shape (width, depth, heads, vocabulary).

Per GPU = the model states of every model of the step + the transient bytes of its busiest phase
(phases run one after another): a model's training pass (activations, ``activation_bytes``), or step
3's generation (KV cache + the hybrid engine's 16-bit replica of the actor, or per-layer gathering when
the replica does not fit, as rlhf/engine/hybrid.py decides). ``plan.memory_fraction`` keeps the rest
free for fragmentation and the CUDA context.

Model-state bytes per parameter, for P parameters on N GPUs in all (G per node, M nodes), w = 2 for
16-bit weights (fp16/bf16) or 4 for fp32, Adam, b = 1.5 (DeepSpeed's ``additional_buffer_factor``),
L = parameters of the largest layer. Trained parameters (DeepSpeed keeps fp32 master weights 4,
fp32 gradients 4 and Adam's two moments 8 = 16 bytes of optimizer-side state per parameter):

    ZeRO-0      GPU  2w + 16 (w = 2: 2 + 2 + 16 = 20)  |  fp32: 4 + 4 + 8 = 16 (no master copy)
    ZeRO-1      GPU  2w + 16/N                          (weights and gradients replicated)
    ZeRO-2      GPU  w + (w + 16)/N                     (w = 2: 2 + 18/N, DeepSpeed's estimator)
      +offload  GPU  w;          host  16/M * b         (each rank offloads its 1/N partition)
    ZeRO-3      GPU  4L + (w + 16)/N                    (w = 2: 4L + 18/N)
      +opt off  GPU  4L + w/N;   host  16/M * b
      +params   GPU  4L;         host  (16 + w)/M * b
      ZeRO++ hpZ                 GPU  + w/H             (a secondary weight partition within H ranks)
    loading (transient, host): w * G per node (every rank materialises the model in the dtype it is
    loaded in), w / M under ZeRO-3 with ``zero.zero_init`` (deepspeed.zero.Init builds it sharded).

ZeRO-2/3 GPU bytes with 16-bit weights are DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``); its host figures
are not used (they assume an fp32 copy per rank). Frozen parameters (a LoRA base with
``only_optimize_lora``, step 3's reference and reward models) hold weights only: w per GPU, w/N under
ZeRO-3 (+4L gather buffer), on the host when offloaded; MixZ++ (``zero_quantized_nontrainable_weights``)
holds them in int8 (1 byte). Several models in one step stack on the GPU; on the host each model's load
peak comes on top of what earlier models keep offloaded.

DeepSpeed-Chat's published largest actors (one V100-32G: OPT-2.7B ... 64x A100-80G: OPT-175B) are
reproduced by tests/test_plan_published.py and by ``python run.py sweep=largest_model``.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

GB = 2**30  # GiB, as DeepSpeed's estimators and nvidia-smi report
BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for host buffers
OPTIM_BYTES = 16  # fp32 master weights 4 + fp32 gradients 4 + Adam moments 8 (per trained parameter)
SUGGESTED_LORA = "lora=r128 lora.only_optimize_lora=true"  # DeepSpeed-Chat's single-GPU OPT-13B setting


class DoesNotFit(MemoryError):
    """The chosen setting cannot hold its model states; the message names the smallest change that fits."""


class UnknownSize(ValueError):
    """Neither model.params_b nor an architecture the planner can build offline."""


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Setting:
    """One ZeRO stage x offload choice."""

    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def override(self) -> str:
        """The command-line change selecting it (conf/zero options where one exists)."""
        if self.offload_param:
            return f"zero={self.stage}-offload" if self.offload_optimizer else \
                f"zero={self.stage} zero.offload_param=true"
        if self.offload_optimizer:
            return "zero=2-offload" if self.stage == 2 else f"zero={self.stage} zero.offload_optimizer=true"
        return f"zero={self.stage}"


# every choice, cheapest in speed first (suggestions take the first that fits)
SETTINGS: List[Setting] = [Setting(0), Setting(1), Setting(2), Setting(3), Setting(2, True),
                           Setting(3, True), Setting(3, True, True)]


@dataclass(frozen=True)
class Shape:
    """What the planner needs of one model."""

    name: str
    params: int  # total parameters
    largest_layer: int = 0  # parameters of the largest module (0 = unknown)
    lora_per_rank: int = 0  # LoRA parameters per unit of rank on the family's targets (0 = unknown)
    source: str = "params_b"  # params_b | arch | tiny | local
    hidden: int = 0  # width (0 = unknown: no activation / KV-cache term)
    layers: int = 0  # decoder blocks
    heads: int = 0  # attention heads
    kv_heads: int = 0  # key/value heads (grouped-query attention; 0 = heads)
    vocab: int = 0  # vocabulary (the LM head's logits)


@dataclass(frozen=True)
class Machine:
    """Plain values of a hardware profile (plus the weight precision)."""

    name: str
    nodes: int
    gpus_per_node: int
    gpu_gb: float  # per device; 0 = no GPU (or unknown): check host memory only
    host_gb: float  # per node
    weight_bytes: int  # 2 (fp16/bf16) or 4 (fp32)
    on_gpu: bool = True

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Role:
    """One model of a step: trained or frozen, its LoRA and (step 3) its own ZeRO stage."""

    name: str  # model | actor | critic | reference | reward | policy
    shape: Shape
    trained: bool
    lora_rank: int = 0
    only_lora: bool = False
    stage: Optional[int] = None  # None = the setting's stage
    offload: Optional[bool] = None  # frozen models: offload their weights (None = the setting's offload_param)
    work: Optional["Work"] = None  # activations / generation of this model (None = model states only)


@dataclass(frozen=True)
class Work:
    """What a model computes besides holding its states: a training (or scoring) pass of ``batch`` rows of
    ``seq`` tokens, and for the step-3 actor the generation of ``gen_batch`` rows with a KV cache."""

    batch: int
    seq: int
    checkpointing: bool = False
    lm_head: bool = True  # logits over the vocabulary (causal LMs; reward/critic models have a value head)
    backward: bool = True  # frozen models only run forward passes (no stored activations)
    gen_batch: int = 0  # step-3 actor: rows generated per rollout (0 = no generation)
    gather: str = "once"  # ppo.hybrid_gather: once (a full 16-bit replica if it fits) | per_layer


@dataclass(frozen=True)
class ZeroPP:
    """ZeRO++ / MixZ++ switches that change memory (quantized weight/gradient collectives only change traffic)."""

    hpz: int = 1  # zero_hpz_partition_size: a secondary copy of the 16-bit weights sharded over this many ranks
    quantized_frozen: bool = False  # zero_quantized_nontrainable_weights (MixZ++): frozen weights held in int8
    zero_init: bool = True  # ZeRO-3 builds models already sharded (deepspeed.zero.Init): host load / N


@dataclass
class Estimate:
    """Bytes of one model (or one step): per GPU, and per node on the host."""

    gpu: float = 0.0  # kept: model states
    host_load: float = 0.0  # transient: ranks loading the model before DeepSpeed shards it
    host_states: float = 0.0  # kept: offloaded optimizer states / parameters
    work: float = 0.0  # transient GPU bytes of the model's busiest phase (activations, KV cache, replica)

    @property
    def host(self) -> float:
        return max(self.host_load, self.host_states)

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.gpu + other.gpu, self.host_load + other.host_load, self.host_states + other.host_states,
                        max(self.work, other.work))


# ---------------------------------------------------------------- formulas


def _deepspeed_gpu_bytes(params: int, stage: int, offload_optimizer: bool, offload_param: bool,
                         largest_layer: int, gpus_per_node: int, nodes: int) -> Optional[float]:
    """DeepSpeed's estimator (16-bit weights, ZeRO-2/3) for the GPU bytes; None where it has none."""
    try:
        if stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            _, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=offload_optimizer,
                                                           additional_buffer_factor=BUFFER)
            return float(gpu)
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            _, gpu, _ = estimate_zero3_model_states_mem_needs(
                params, largest_layer, gpus_per_node, nodes, cpu_offload=offload_optimizer,
                cpu_offload_params=offload_param, zero_init=False, additional_buffer_factor=BUFFER)
            return float(gpu)
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return None
    return None


def load_bytes(params: float, *, stage: int, weight_bytes: int, gpus_per_node: int, nodes: int,
               zero_init: bool = True) -> float:
    """Host bytes per node while loading: every rank of the node materialises the model in the dtype it
    is loaded in, unless ZeRO-3 builds it already sharded (``deepspeed.zero.Init``): then 1/N each."""
    if stage == 3 and zero_init:
        return params * weight_bytes / nodes
    return params * weight_bytes * gpus_per_node


def trained_states(params: int, *, stage: int, offload_optimizer: bool = False, offload_param: bool = False,
                   gpus_per_node: int = 1, nodes: int = 1, largest_layer: int = 0, weight_bytes: int = 2,
                   zero_init: bool = True, hpz: int = 1) -> Estimate:
    """Model states of ``params`` trained parameters (Adam) under one ZeRO setting (module docstring)."""
    w, n, g, m, p = weight_bytes, gpus_per_node * nodes, gpus_per_node, nodes, float(params)
    if stage == 0:
        gpu = p * (2 * w + (OPTIM_BYTES if w == 2 else 8))
    elif stage in (1, 2):
        replicated_grads = w if stage == 1 else 0  # ZeRO-1 keeps full gradients, ZeRO-2 a 1/N share
        gpu = p * (w + replicated_grads) if offload_optimizer else \
            p * (w + replicated_grads) + p * (OPTIM_BYTES + (w if stage == 2 else 0)) / n
    elif stage == 3:  # a gather buffer for the largest layer + this rank's share of what stays on the GPU
        gpu = 4.0 * largest_layer + p * ((0 if offload_param else w) + (0 if offload_optimizer else OPTIM_BYTES)) / n
    else:
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if w == 2 and stage in (2, 3) and not (offload_param and not offload_optimizer):
        ds = _deepspeed_gpu_bytes(params, stage, offload_optimizer, offload_param, largest_layer, g, m)
        gpu = ds if ds is not None else gpu
    if stage == 3 and hpz > 1 and not offload_param:  # ZeRO++ hpZ: a secondary 16-bit partition within hpz ranks
        gpu += p * w / hpz
    load = load_bytes(p, stage=stage, weight_bytes=w, gpus_per_node=g, nodes=m, zero_init=zero_init)
    states = 0.0
    if offload_optimizer and stage in (1, 2):
        states = p * OPTIM_BYTES / m * BUFFER  # each rank offloads its 1/N partition
    elif stage == 3 and (offload_optimizer or offload_param):
        states = p * ((OPTIM_BYTES if offload_optimizer else 0) + (w if offload_param else 0)) / m * BUFFER
    return Estimate(gpu=gpu, host_load=load, host_states=states)


def frozen_states(params: int, *, stage: int, offload: bool = False, gpus_per_node: int = 1, nodes: int = 1,
                  largest_layer: int = 0, weight_bytes: int = 2, zero_init: bool = True, hpz: int = 1,
                  quantized: bool = False) -> Estimate:
    """Weights only (inference): replicated under ZeRO 0-2, sharded (+ a gather buffer) under ZeRO-3;
    MixZ++ (``quantized``) keeps frozen ZeRO-3 weights in int8 (1 byte)."""
    w, n, p = weight_bytes, gpus_per_node * nodes, float(params)
    load = load_bytes(p, stage=stage, weight_bytes=w, gpus_per_node=gpus_per_node, nodes=nodes, zero_init=zero_init)
    if stage != 3:
        return Estimate(gpu=p * w, host_load=load)
    held = 1 if quantized else w
    if offload:
        return Estimate(gpu=4.0 * largest_layer, host_load=load, host_states=p * held / nodes * BUFFER)
    secondary = p * held / hpz if hpz > 1 else 0.0
    return Estimate(gpu=4.0 * largest_layer + p * held / n + secondary, host_load=load)


def activation_bytes(shape: Shape, work: Work, weight_bytes: int) -> float:
    """GPU bytes of one forward (+ backward) pass: per block ``34 * seq * batch * hidden`` bytes in 16-bit
    (Korthikanti et al. 2022 without the ``5 * heads * seq / hidden`` attention-score term: transformers'
    SDPA attention does not store the scores); with checkpointing only each block's input is kept plus one
    block's working set; the LM head adds 16-bit logits and an fp32 log-softmax and its gradient
    (``seq * batch * vocab * (w + 8)``)."""
    if not shape.hidden or not shape.layers:
        return 0.0
    h, L, s, b = shape.hidden, shape.layers, work.seq, work.batch
    block = 34 * s * b * h * weight_bytes / 2
    if not work.backward:  # inference: one block's working set at a time
        acts = block
    else:
        acts = (L * s * b * h * weight_bytes + block) if work.checkpointing else L * block
    logits = s * b * shape.vocab * (weight_bytes + (8 if work.backward else 4)) if work.lm_head else 0.0
    return acts + logits


def kv_cache_bytes(shape: Shape, batch: int, seq: int, weight_bytes: int) -> float:
    """Keys and values of every block for ``batch`` rows of ``seq`` tokens."""
    if not shape.hidden or not shape.layers:
        return 0.0
    kv_dim = shape.hidden * (shape.kv_heads or shape.heads or 1) / max(shape.heads, 1)
    return 2.0 * shape.layers * batch * seq * kv_dim * weight_bytes


def generation_bytes(shape: Shape, work: Work, stage: int, lora: bool, weight_bytes: int, fits_replica: bool) -> float:
    """Step-3 generation (rlhf/engine/hybrid.py): the KV cache plus, under ZeRO-3, a full 16-bit replica of the
    actor (``hybrid_gather=once``; the engine falls back to per-layer gathering, 4 x the largest layer, when
    the replica does not fit) or, under ZeRO 0-2 with LoRA, a fused replica (else generation is direct)."""
    kv = kv_cache_bytes(shape, work.gen_batch, work.seq, weight_bytes)
    replica = shape.params * weight_bytes
    if stage == 3:
        buffer = replica if (work.gather == "once" and fits_replica) else 4.0 * shape.largest_layer
    else:
        buffer = replica if (lora and fits_replica) else 0.0
    return kv + buffer + activation_bytes(shape, replace(work, batch=work.gen_batch, backward=False,
                                                          checkpointing=False, seq=1), weight_bytes)


def role_states(role: Role, setting: Setting, machine: Machine, zpp: ZeroPP = ZeroPP(),
                replica: bool = True) -> Estimate:
    """One model of a step: the trained part (all, or the LoRA adapters), the frozen part, and its work."""
    stage = setting.stage if role.stage is None else role.stage
    kw = dict(gpus_per_node=machine.gpus_per_node, nodes=machine.nodes, weight_bytes=machine.weight_bytes,
              zero_init=zpp.zero_init, hpz=zpp.hpz)
    shape = role.shape
    if not role.trained:
        offload = setting.offload_param if role.offload is None else role.offload
        est = frozen_states(shape.params, stage=stage, offload=offload and stage == 3,
                            largest_layer=shape.largest_layer, quantized=zpp.quantized_frozen, **kw)
    else:
        adapters = role.lora_rank * shape.lora_per_rank if role.lora_rank > 0 else 0
        if role.lora_rank > 0 and not shape.lora_per_rank:
            adapters = 0  # unknown adapter size: count the model as fully trained (conservative)
        only_lora = role.only_lora and adapters > 0
        trained = adapters if only_lora else shape.params + adapters
        est = trained_states(trained, stage=stage, offload_optimizer=setting.offload_optimizer and stage > 0,
                             offload_param=setting.offload_param and stage == 3, largest_layer=shape.largest_layer,
                             **kw)
        if only_lora:  # the frozen base: weights only, no second gather buffer
            est = est + frozen_states(shape.params, stage=stage, offload=setting.offload_param and stage == 3,
                                      quantized=zpp.quantized_frozen, **kw)
    if role.work is not None:
        w = machine.weight_bytes
        work = activation_bytes(shape, role.work, w) if (role.trained or role.work.batch) else 0.0
        if role.work.gen_batch:
            work = max(work, generation_bytes(shape, role.work, stage, role.lora_rank > 0, w, replica))
        est = replace(est, work=work)
    return est


def step_states(roles: List[Role], setting: Setting, machine: Machine, zpp: ZeroPP = ZeroPP(),
                fraction: float = 1.0) -> Tuple[Estimate, List[Estimate]]:
    """All models of one step: model states add up on the GPU, plus the busiest phase's transient bytes
    (activations of one model's pass, or the actor's generation: phases run one after another); host peak
    = max over loads of (kept so far + that load). The actor's generation replica is counted when it fits
    (as the hybrid engine decides), else per-layer gathering."""
    parts = [role_states(r, setting, machine, zpp) for r in roles]
    if machine.on_gpu and machine.gpu_gb > 0 and any(r.work and r.work.gen_batch for r in roles):
        states = sum(e.gpu for e in parts)
        if states + max(e.work for e in parts) > machine.gpu_gb * GB * fraction:
            parts = [role_states(r, setting, machine, zpp, replica=False) for r in roles]
    kept, host_peak = 0.0, 0.0
    for e in parts:
        host_peak = max(host_peak, kept + e.host)
        kept += e.host_states
    total = Estimate(gpu=sum(e.gpu for e in parts) + max((e.work for e in parts), default=0.0),
                     host_load=host_peak, host_states=kept)
    return total, parts


def need(total: Estimate, machine: Machine) -> Tuple[float, float]:
    """(bytes per GPU, bytes of host memory per node); on a CPU profile every rank's states are host memory."""
    if machine.on_gpu:
        return total.gpu, total.host
    return 0.0, total.gpu * machine.gpus_per_node + total.host_states


def fits(gpu_bytes: float, host_bytes: float, machine: Machine, fraction: float) -> Tuple[bool, bool]:
    """(GPU fits, host fits) within ``fraction`` of the profile's memory; an unknown size (0) always fits."""
    gpu_ok = not machine.on_gpu or machine.gpu_gb <= 0 or gpu_bytes <= machine.gpu_gb * GB * fraction
    host_ok = machine.host_gb <= 0 or host_bytes <= machine.host_gb * GB * fraction
    return gpu_ok, host_ok


# ---------------------------------------------------------------- model shapes


def _hf_config(model_cfg, cache_dir: Optional[str]):
    """The model's transformers config without downloading anything, or None when it cannot be had."""
    from transformers import AutoConfig

    from rlhf.models.families import planning_family

    family = planning_family(model_cfg)
    if model_cfg.init == "tiny":
        from rlhf.models.load import resolve_path

        return AutoConfig.from_pretrained(resolve_path(model_cfg, Path(cache_dir or ".cache")))
    if family is not None and family.needs_remote_code:
        return None  # building custom code is not planning: use model.params_b
    if model_cfg.arch and family is not None:
        return AutoConfig.for_model(family.model_types[0], **dict(model_cfg.arch))
    local = Path(str(model_cfg.path)).expanduser()
    if (local / "config.json").is_file():
        return AutoConfig.from_pretrained(str(local))
    return None


@functools.lru_cache(maxsize=32)
def _count_meta(config_json: str, targets: Tuple[str, ...]) -> Tuple[int, int, int]:
    """(params, largest layer, LoRA params per rank) of a model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(config_json)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
    return int(total), int(largest), int(per_rank)


_DIM_KEYS = {  # Shape field -> config keys that hold it, in the spellings of the families we know
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "multi_query_group_num"),
    "vocab": ("vocab_size", "padded_vocab_size"),
}


def _dims(values: Dict[str, Any]) -> Dict[str, int]:
    """Width, depth, heads and vocabulary from a config dict (HF config or ``model.arch``)."""
    out = {}
    for name, keys in _DIM_KEYS.items():
        out[name] = int(next((values[k] for k in keys if values.get(k)), 0) or 0)
    return out


def model_shape(model_cfg, cache_dir: Optional[str] = None, lora_targets: Optional[List[str]] = None) -> Shape:
    """Parameter count of ``model_cfg``: ``params_b`` if set, else counted from its architecture."""
    from rlhf.models.families import planning_family

    family = planning_family(model_cfg)
    targets = tuple(lora_targets or (family.lora_targets if family is not None else ()))
    config = _hf_config(model_cfg, cache_dir)
    if config is None:
        if not model_cfg.params_b:
            raise UnknownSize(f"model {model_cfg.name}: set model.params_b (or model.arch) so the planner knows "
                              "its size")
        dims = _dims(dict(model_cfg.arch or {}))
        vocab, hidden = dims["vocab"], dims["hidden"]
        return Shape(model_cfg.name, int(model_cfg.params_b * 1e9), largest_layer=vocab * hidden, **dims)
    total, largest, per_rank = _count_meta(config.to_json_string(use_diff=False), targets)
    source = "tiny" if model_cfg.init == "tiny" else ("arch" if model_cfg.arch else "local")
    if model_cfg.params_b:
        total, source = int(model_cfg.params_b * 1e9), "params_b"
    return Shape(model_cfg.name, total, largest, per_rank, source, **_dims(config.to_dict()))


# ---------------------------------------------------------------- the plan of a run


@dataclass
class Scenario:
    """What a plan varies: the ZeRO setting, LoRA, the reference offload and the machine."""

    setting: Setting
    lora_rank: int
    only_lora: bool
    offload_reference: bool
    critic_lora: bool
    machine: Machine
    changes: List[str] = field(default_factory=list)  # command-line changes from the run's own config
    role_zero: bool = True  # honour ppo.actor_zero / critic_zero (not once the plan picks the setting)
    zpp: ZeroPP = ZeroPP()  # ZeRO++ / MixZ++ and sharded loading (zero group)
    checkpointing: bool = False  # force gradient checkpointing on for every trained model
    batch: int = 0  # force this per-device batch (training and generation); 0 = the config's


def zero_pp(zero) -> ZeroPP:
    """The memory-relevant ZeRO++ / MixZ++ switches of the zero group (only under ZeRO-3)."""
    stage3 = int(zero.stage) == 3
    return ZeroPP(hpz=int(zero.zero_hpz_partition_size) if stage3 else 1,
                  quantized_frozen=bool(zero.zero_quantized_nontrainable_weights) and stage3,
                  zero_init=bool(zero.zero_init))


def _machine(cfg, nodes: Optional[int] = None, procs: Optional[int] = None) -> Machine:
    hw = cfg.hardware
    dtype = hw.precision if cfg.model.dtype == "auto" else cfg.model.dtype
    return Machine(hw.name, int(nodes or hw.nodes), int(procs or hw.procs_per_node), float(hw.gpu_memory_gb),
                   float(hw.host_memory_gb), 4 if dtype == "fp32" else 2, hw.accelerator != "cpu")


def _train_work(section, sc: Scenario, lm_head: bool = True, rows: int = 1, seq: Optional[int] = None) -> Work:
    """A stage section's (sft, rm, dpo, pretrain) training pass: micro batch x rows per example,
    ``seq`` tokens (default the section's max_seq_len)."""
    return Work((sc.batch or int(section.micro_batch_size)) * rows, int(seq or section.max_seq_len),
                bool(section.gradient_checkpointing) or sc.checkpointing, lm_head=lm_head)


def _held(stage: str) -> Dict[str, bool]:
    """The models ``stage`` holds, role -> trained, as the stage declares them (rlhf.stages.STAGES)."""
    from rlhf.stages import STAGES

    return dict(STAGES[stage].models)


def _section(stage: str) -> str:
    """The config section of a training stage (grpo is the ppo stage's)."""
    return "ppo" if stage == "grpo" else stage


def _step1(cfg, shape, sc: Scenario, model_key: str = "model", stage: str = "sft") -> Tuple[str, List[Role]]:
    section = cfg[stage]
    seq = int(section.block_size) if stage == "pretrain" else None  # pretraining packs blocks
    return ("step 1 (sft)" if stage == "sft" else stage,
            [Role(model_key, shape(model_key), _held(stage)["actor"], sc.lora_rank, sc.only_lora,
                  work=_train_work(section, sc, seq=seq))])


def _step2(cfg, shape, sc: Scenario, model_key: str = "model", stage: str = "rm") -> Tuple[str, List[Role]]:
    # chosen and rejected answers of every pair go through the model together
    return ("step 2 (rm)", [Role("reward", shape(model_key), _held(stage)["reward"], sc.lora_rank, sc.only_lora,
                                 work=_train_work(cfg.rm, sc, lm_head=False, rows=2))])


def _step3(cfg, shape, sc: Scenario, model_key: str = "", stage: str = "ppo") -> Tuple[str, List[Role]]:
    """DeepSpeed-Chat's four models; frozen ones use ZeRO-3 when their trained twin does, else ZeRO-0.
    Work: the actor generates (KV cache, the hybrid engine's replica) and trains on prompt + answer tokens,
    the critic trains, the reference and reward models score (forward only). Only the models the stage
    holds (STAGES: grpo holds no critic) and its settings build (critic-free estimators, reward.fn alone)."""
    ppo = cfg.ppo
    actor_stage = ppo.actor_zero if (ppo.actor_zero is not None and sc.role_zero) else sc.setting.stage
    critic_stage = ppo.critic_zero if (ppo.critic_zero is not None and sc.role_zero) else sc.setting.stage
    actor_lora = sc.lora_rank if ppo.actor_lora else 0
    critic_lora = sc.lora_rank if (ppo.critic_lora or sc.critic_lora) else 0
    seq, train, gen = int(ppo.max_prompt_len) + int(ppo.max_answer_len), sc.batch or int(ppo.train_batch_size), \
        sc.batch or int(ppo.generation_batch_size)
    from rlhf.algos.ppo import get_estimator

    held = _held(stage)
    built = {"critic": get_estimator(ppo.advantage).critic, "reward": ppo.reward_model}
    return ("step 3 (ppo)", [r for r in [
        Role("actor", shape("actor"), held["actor"], actor_lora, sc.only_lora, actor_stage,
             work=Work(train, seq, bool(ppo.actor_gradient_checkpointing) or sc.checkpointing, gen_batch=gen,
                       gather=str(ppo.hybrid_gather))),
        Role("critic", shape("reward"), held.get("critic", False), critic_lora, sc.only_lora, critic_stage,
             work=Work(train, seq, bool(ppo.critic_gradient_checkpointing) or sc.checkpointing, lm_head=False)),
        Role("reference", shape("actor"), held["reference"], stage=3 if actor_stage == 3 else 0,
             offload=sc.offload_reference or None, work=Work(train, seq, backward=False)),
        Role("reward", shape("reward"), held["reward"], stage=3 if critic_stage == 3 else 0,
             work=Work(gen, seq, lm_head=False, backward=False)),
    ] if r.name in held and built.get(r.name, True)])


def _dpo(cfg, shape, sc: Scenario, model_key: str = "model", stage: str = "dpo") -> Tuple[str, List[Role]]:
    held = _held(stage)
    roles = [Role("policy", shape(model_key), held["policy"], sc.lora_rank, sc.only_lora,
                  work=_train_work(cfg.dpo, sc, rows=2))]
    if not cfg.dpo.precompute_ref:
        roles.append(Role("reference", shape(model_key), held["reference"],
                          work=replace(_train_work(cfg.dpo, sc, rows=2), backward=False)))
    return ("dpo", roles)


def _inference(cfg, shape, sc: Scenario) -> Tuple[str, List[Role]]:
    return ("inference", [Role("model", shape("model"), False)])


def training_stages(cfg, stage: str) -> List[str]:
    """The training stages a run of ``stage`` executes: itself, the pipeline's steps
    (rlhf.config.pipeline_steps: ``pipeline.steps``, ``pipeline.algo`` and ``pipeline.compare``) or
    the whole pipeline for ``plan``; none for the others."""
    from rlhf.config import pipeline_steps
    from rlhf.stages import STAGES

    algo = str(cfg.pipeline.algo)
    if stage == "plan":
        return ["sft", "rm", "grpo" if algo == "grpo" else "ppo"]
    if stage == "pipeline":  # step 2 trains a reward model only for an algorithm that loads one
        return [name for _, name in pipeline_steps(cfg.pipeline, cfg.ppo)]
    return [stage] if stage in STAGES and STAGES[stage].step is not None else []


def stage_steps(cfg, stage: str, shape, sc: Scenario) -> List[Tuple[str, List[Role]]]:
    """The steps (each a list of models) whose memory a run of ``stage`` needs, built from the
    stages' descriptions (step number and models held); a stage that trains nothing: inference."""
    from rlhf.stages import STAGES

    composite = stage in ("plan", "pipeline")  # the pipeline's roles: sft and dpo on the actor, rm on the reward model
    out = []
    for name in training_stages(cfg, stage):
        step, held = STAGES[name].step, _held(name)
        build = {1: _step1, 2: _step2}.get(step) or (_step3 if "reward" in held else _dpo)
        key = ("reward" if step == 2 else "actor") if composite else "model"
        out.append(build(cfg, shape, sc, key, name))
    return out or [_inference(cfg, shape, sc)]


@dataclass
class StepResult:
    title: str
    gpu_gb: float  # per GPU
    host_gb: float  # per node
    gpu_fits: bool
    host_fits: bool
    models: Dict[str, Dict[str, float]]  # role -> {"gpu_gb", "host_gb"}

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits


@dataclass
class Outcome:
    scenario: Scenario
    steps: List[StepResult]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.steps)


class Planner:
    """Evaluates scenarios of one run's config (shapes are counted once)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.stage = str(cfg.stage.name)
        if self.stage == "plan" and cfg.plan.get("stage"):
            self.stage = str(cfg.plan.stage)
        self._shapes: Dict[str, Shape] = {}
        self.fraction = float(cfg.plan.memory_fraction)

    def shape(self, key: str) -> Shape:
        if key not in self._shapes:
            targets = list(self.cfg.lora.target_modules) or None
            self._shapes[key] = model_shape(self.cfg[key], self.cfg.cache_dir or None, targets)
        return self._shapes[key]

    def current(self) -> Scenario:
        z, lora = self.cfg.zero, self.cfg.lora
        return Scenario(Setting(int(z.stage), bool(z.offload_optimizer), bool(z.offload_param)), int(lora.rank),
                        bool(lora.only_optimize_lora), bool(self.cfg.ppo.offload_reference), False, _machine(self.cfg),
                        zpp=zero_pp(z))

    def evaluate(self, sc: Scenario) -> Outcome:
        results = []
        for title, roles in stage_steps(self.cfg, self.stage, self.shape, sc):
            total, parts = step_states(roles, sc.setting, sc.machine, sc.zpp, self.fraction)
            gpu, host = need(total, sc.machine)
            models = {}
            for role, est in zip(roles, parts):
                g, h = need(replace(est, work=0.0), sc.machine)
                models[role.name] = {"gpu_gb": g / GB, "host_gb": h / GB, "work_gb": est.work / GB}
            results.append(StepResult(title, gpu / GB, host / GB, *fits(gpu, host, sc.machine, self.fraction), models))
        return Outcome(sc, results)

    def with_setting(self, sc: Scenario, setting: Setting) -> Scenario:
        if setting == sc.setting:
            return sc
        return replace(sc, setting=setting, changes=[*sc.changes, setting.override], role_zero=False)

    def _sections(self) -> List[str]:
        """The config sections of the steps this stage runs (for the command-line changes)."""
        return list(dict.fromkeys(_section(s) for s in training_stages(self.cfg, self.stage)))

    def _ckpt_change(self) -> str:
        return " ".join("ppo.actor_gradient_checkpointing=true ppo.critic_gradient_checkpointing=true" if s == "ppo"
                        else f"{s}.gradient_checkpointing=true" for s in self._sections())

    def _batch_change(self, n: int) -> str:
        return " ".join(f"ppo.train_batch_size={n} ppo.generation_batch_size={n}" if s == "ppo"
                        else f"{s}.micro_batch_size={n}" for s in self._sections())

    def candidates(self) -> List[Scenario]:
        """Changes to try, smallest first: the ZeRO setting; gradient checkpointing; the reference offload;
        LoRA; a smaller per-device batch (with more accumulation to keep the global batch); more GPUs."""
        base = self.current()
        others = [s for s in SETTINGS if s != base.setting]
        out = [self.with_setting(base, s) for s in others]
        ckpt = self._ckpt_change()
        if ckpt:
            base = replace(base, checkpointing=True, changes=[ckpt])
            out += [base] + [self.with_setting(base, s) for s in others]
        # step-3 RLHF (ppo, grpo: a reference and a reward model): offloading the reference and a LoRA critic
        has_step3 = any({"reference", "reward"} <= set(_held(s)) for s in training_stages(self.cfg, self.stage))
        if has_step3 and not base.offload_reference:
            ref = replace(base, offload_reference=True, changes=[*base.changes, "ppo.offload_reference=true"])
            out += [ref] + [self.with_setting(ref, s) for s in others]
        if not (base.lora_rank > 0 and base.only_lora):
            lora = replace(base, lora_rank=128, only_lora=True, critic_lora=has_step3,
                           changes=[*base.changes, SUGGESTED_LORA + (" ppo.critic_lora=true" if has_step3 else "")])
            out += [lora] + [self.with_setting(lora, s) for s in others]
        if self._sections():
            for n in (4, 1):
                small = replace(base, batch=n, changes=[*base.changes, self._batch_change(n)])
                out += [small] + [self.with_setting(small, s) for s in others]
        m = base.machine
        sizes = [(1, p) for p in (2, 4, 8) if p > m.gpus_per_node] if m.nodes == 1 else []
        per_node = max(m.gpus_per_node, 8)
        sizes += [(k, per_node) for k in (2, 4, 8, 16, 32, 64) if k > m.nodes]
        for nodes, procs in sizes:
            change = " ".join(c for c in (f"hardware.nodes={nodes}" if nodes != m.nodes else "",
                                          f"hardware.procs_per_node={procs}" if procs != m.gpus_per_node else "") if c)
            grown = replace(base, machine=replace(m, nodes=nodes, gpus_per_node=procs), changes=[*base.changes, change])
            out += [self.with_setting(grown, s) for s in (Setting(3), Setting(3, True), Setting(3, True, True))]
        return out

    def suggest(self) -> Optional[Outcome]:
        for sc in self.candidates():
            outcome = self.evaluate(sc)
            if outcome.fits:
                return outcome
        return None


def best_fit(cfg, param_offload: bool = False) -> Optional[Outcome]:
    """The first ZeRO setting (fastest first, ``SETTINGS``) under which the run's steps fit, or None.
    ``param_offload=False`` leaves out parameter offload, as DeepSpeed-Chat's largest-model table does."""
    planner = Planner(cfg)
    cur = planner.current()
    for s in SETTINGS:
        if s.offload_param and not param_offload:
            continue
        outcome = planner.evaluate(replace(cur, setting=s, role_zero=False))
        if outcome.fits:
            return outcome
    return None


def _describe(cfg) -> str:
    z = cfg.zero
    setting = Setting(int(z.stage), bool(z.offload_optimizer), bool(z.offload_param)).override
    lora = f"lora rank {cfg.lora.rank}{' (adapters only)' if cfg.lora.only_optimize_lora else ''}" \
        if cfg.lora.rank else "no LoRA"
    zpp = zero_pp(z)
    extras = [f"hpZ {zpp.hpz}"] * (zpp.hpz > 1) + ["MixZ++ int8 frozen weights"] * zpp.quantized_frozen
    return f"{setting}{' (' + ', '.join(extras) + ')' if extras else ''}, {lora}"


def make_plan(cfg) -> Dict[str, Any]:
    """The whole plan of a run as plain data: every setting's needs, the current one, a suggestion."""
    planner = Planner(cfg)
    cur = planner.current()
    current = planner.evaluate(cur)
    rows = []
    for s in SETTINGS:
        o = planner.evaluate(replace(cur, setting=s, role_zero=False))
        rows.append({"setting": s.override, "fits": o.fits, "steps": [_step_dict(st) for st in o.steps]})
    suggestion = None if current.fits else planner.suggest()
    m = cur.machine
    return {
        "stage": planner.stage,
        "hardware": {"name": m.name, "nodes": m.nodes, "gpus_per_node": m.gpus_per_node, "gpu_gb": m.gpu_gb,
                     "host_gb": m.host_gb, "weight_bytes": m.weight_bytes, "on_gpu": m.on_gpu},
        "memory_fraction": planner.fraction,
        "models": {k: asdict(v) for k, v in planner._shapes.items()},
        "current": {"setting": _describe(cfg), "fits": current.fits,
                    "steps": [_step_dict(st) for st in current.steps]},
        "rows": rows,
        "fits": current.fits,
        "suggestion": " ".join(suggestion.scenario.changes) if suggestion else None,
        "suggestion_steps": [_step_dict(st) for st in suggestion.steps] if suggestion else None,
    }


def _step_dict(st: StepResult) -> Dict[str, Any]:
    return dict(asdict(st), fits=st.fits)


def format_plan(plan: Dict[str, Any]) -> str:
    """The plan as the console/markdown table ``stage=plan`` prints (✗ marks what does not fit)."""
    hw, frac = plan["hardware"], plan["memory_fraction"]
    gpu_cap, host_cap = hw["gpu_gb"] * frac, hw["host_gb"] * frac
    where = (f"{hw['nodes']} node(s) x {hw['gpus_per_node']} GPU(s) of {hw['gpu_gb']:g} GB"
             if hw["on_gpu"] else f"{hw['nodes']} node(s) x {hw['gpus_per_node']} CPU rank(s)")
    lines = [f"Memory plan on {hw['name']}: {where}, {hw['host_gb']:g} GB host per node, "
             f"{'16' if hw['weight_bytes'] == 2 else '32'}-bit weights. Model states (weights, gradients, "
             f"optimizer) plus the busiest phase (activations, KV cache, generation replica); usable: {frac:g} of "
             "each memory"
             + (f" = {gpu_cap:.1f} GB per GPU, {host_cap:.1f} GB host." if hw["on_gpu"] else f" = {host_cap:.1f} GB host."),
             ""]
    for key, s in plan["models"].items():
        extra = f", largest layer {s['largest_layer'] / 1e6:.1f}M" if s["largest_layer"] else ""
        lora = f", LoRA {s['lora_per_rank']:,} params per rank" if s["lora_per_rank"] else ""
        lines.append(f"- {key}: {s['name']}, {s['params'] / 1e9:.3f}B params (from {s['source']}){extra}{lora}")

    def cells(st: Dict[str, Any]) -> List[str]:
        host = f"{_gb(st['host_gb'])}{'' if st['host_fits'] else ' ✗'}"
        return [f"{_gb(st['gpu_gb'])}{'' if st['gpu_fits'] else ' ✗'}", host] if hw["on_gpu"] else [host]

    titles = [st["title"] for st in plan["rows"][0]["steps"]]
    cols = [f"{t} {u}" for t in titles for u in (("GPU GB", "host GB") if hw["on_gpu"] else ("host GB",))]
    lines += ["", "| setting | " + " | ".join(cols) + " | fits |", "|---" * (len(cols) + 2) + "|"]
    for row in plan["rows"]:
        lines.append(f"| {row['setting']} | " + " | ".join(c for st in row["steps"] for c in cells(st))
                     + f" | {'yes' if row['fits'] else 'no'} |")
    cur = plan["current"]
    lines += ["", f"Chosen: {cur['setting']} -> {'fits' if cur['fits'] else 'does NOT fit'}"]
    for st in cur["steps"]:
        per = ", ".join(f"{k} {_gb(v['gpu_gb'])} GPU (+{_gb(v.get('work_gb', 0))} working) / {_gb(v['host_gb'])} host"
                        if hw["on_gpu"]
                        else f"{k} {_gb(v['host_gb'])} host" for k, v in st["models"].items())
        lines.append(f"  {st['title']}: " + " | ".join(cells(st)) + f" GB  ({per})")
    if not cur["fits"]:
        lines.append(f"Smallest change that fits: {plan['suggestion']}" if plan["suggestion"] else
                     "Nothing tried fits (ZeRO/offload, LoRA, up to 64 nodes): use GPUs with more memory.")
    return "\n".join(lines)


def _gb(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def check_fits(cfg) -> None:
    """Raise ``DoesNotFit`` (with the smallest change that fits) when the run's setting cannot hold its
    model states; called at the start of every training stage. ``plan.check=false`` skips it. On a CPU
    profile (gpu_memory_gb 0) only host memory is checked."""
    if not cfg.plan.check:
        return
    planner = Planner(cfg)
    try:
        outcome = planner.evaluate(planner.current())
    except UnknownSize as err:  # a hub model without params_b/arch: nothing to check against, not an error
        log.warning("memory check skipped: %s", err)
        return
    if outcome.fits:
        return
    m = outcome.scenario.machine
    bad = [s for s in outcome.steps if not s.fits]
    needs = "; ".join(f"{s.title} needs {s.gpu_gb:.1f} GB per GPU and {s.host_gb:.1f} GB host per node"
                      if m.on_gpu else f"{s.title} needs {s.host_gb:.2f} GB host memory per node" for s in bad)
    have = (f"{m.gpu_gb * planner.fraction:.1f} of {m.gpu_gb:g} GB per GPU, " if m.on_gpu and m.gpu_gb else "") + \
        f"{m.host_gb * planner.fraction:.1f} of {m.host_gb:g} GB host usable"
    suggestion = planner.suggest()
    advice = (f"smallest change that fits: {' '.join(suggestion.scenario.changes)}" if suggestion else
              "no ZeRO/offload, LoRA or node count tried fits: use GPUs with more memory")
    raise DoesNotFit(
        f"{cfg.model.name} on {m.name} with {_describe(cfg)} does not fit: {needs} ({have}); {advice}. "
        f"`python run.py stage=plan model={cfg.model.name} hardware={m.name}` prints every option; "
        "plan.check=false skips this check.")
