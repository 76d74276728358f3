"""Structured config schema: every key a run accepts, with its type.

Hydra merges the YAML groups under ``conf/`` over these dataclasses, so a misspelled key or a
value of the wrong type fails at compose time with a message naming it. Values that are
DeepSpeed-Chat defaults are documented where they are set: the group YAML files.
Components receive one of these small group dataclasses (or plain values), never the whole tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING  # short name shown in tables and run dirs, e.g. "opt-1.3b" (from the path when path is set)
    family: str = "auto"  # auto = from the checkpoint's model_type | a key of rlhf.models.families.FAMILIES
    path: str = MISSING  # hub id, local HF directory, or a tiny spec name ("tiny-opt")
    init: str = "pretrained"  # pretrained | random (real shape, no weights) | tiny (built offline)
    dtype: str = "auto"  # auto (hardware precision) | fp32 | fp16 | bf16
    trust_remote_code: bool = False  # explicit opt-in for models with custom code
    allow_pickle: bool = False  # explicit opt-in to load .bin/.pt pickle weights
    arch: Dict[str, Any] = field(default_factory=dict)  # HF config kwargs (random init, planner)
    params_b: float = 0.0  # parameter count in billions (planner), 0 = derive from arch
    key: str = "model"  # set by resolve_models: the config key errors name (model | actor | reward)
    fn: Optional[str] = None  # reward role: <module>:<function> scoring (prompts, answers) in step 3 (rlhf/rewards.py)
    fn_weight: float = 1.0  # reward role: factor on fn's scores, added to the reward model's (ppo.reward_model)


@dataclass
class HardwareConfig:
    name: str = MISSING
    accelerator: str = "cpu"  # cpu | cuda
    nodes: int = 1
    procs_per_node: int = 1  # ranks per node (GPUs per node)
    gpu_memory_gb: float = 0.0  # per device; 0 on cpu
    host_memory_gb: float = 24.0  # per node
    precision: str = "fp32"  # fp32 | fp16 | bf16
    backend: str = "gloo"  # gloo | nccl
    launcher: str = "local"  # local (inline / torchrun) | deepspeed | slurm
    hostfile: Optional[str] = None  # for multi-node deepspeed launcher
    master_port: int = 0  # 0 = pick a free port
    threads: int = 0  # torch CPU threads per rank, set at stage start (0 = torch's default)


@dataclass
class ZeroConfig:
    stage: int = 0  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer states (and step) on the CPU
    offload_param: bool = False  # stage 3 only: parameters on the CPU
    pin_memory: bool = True
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 10_000
    zero_init: bool = True  # stage 3: build models already sharded (deepspeed.zero.Init): no rank holds a whole model
    # ZeRO++ (stage 3): int8 weight all-gathers (qwZ), a secondary weight partition within this many ranks
    # (hpZ, 1 = off; usually the GPUs of a node), int8 gradient reduce-scatter (qgZ)
    zero_quantized_weights: bool = False
    zero_hpz_partition_size: int = 1
    zero_quantized_gradients: bool = False
    zero_quantized_nontrainable_weights: bool = False  # MixZ++: frozen (non-LoRA) weights held and gathered in int8


@dataclass
class LoraConfig:
    name: str = "none"
    rank: int = 0  # 0 = LoRA off (DeepSpeed-Chat lora_dim)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=list)  # empty = the family's default
    only_optimize_lora: bool = False  # freeze everything but the adapters
    lr: Optional[float] = None  # adapter learning rate; None = the role's own (sft.lr, ppo.actor_lr, ...); DS-Chat 5e-4


@dataclass
class SourceConfig:
    name: str = MISSING  # key of rlhf.data.sources.SOURCES
    path: Optional[str] = None  # hub id or local dir/file; None = the source's own hub id
    weight: float = 1.0  # share of this source kept when blending (1 = all rows)


@dataclass
class DataConfig:
    name: str = MISSING
    sources: List[SourceConfig] = field(default_factory=list)  # preference pairs
    sft_only: List[SourceConfig] = field(default_factory=list)  # single-answer data, step 1 only
    unsupervised: Optional[str] = None  # plain-text file/dir for pretrain and PTX
    data_split: str = "2,4,4"  # shares of every source for steps 1/2/3
    max_prompt_len: int = 256  # prompts longer than this (tokens) are dropped as bad rows
    cache_dir: Optional[str] = None  # tokenised cache; None = <project cache>/data
    reload: bool = False  # rebuild the tokenised cache
    demo_size: int = 4000  # pairs generated for the demo task (train; eval gets a tenth)
    heldout_prompts: int = 64  # demo prompts scored by the task rule at the end of a stage
    heldout_samples: int = 4  # sampled answers per held-out prompt (temperature 1, seeded) for rule_rate_sampled


@dataclass
class LoggerConfig:
    name: str = "none"
    wandb: bool = False
    project: str = "rlhf"
    entity: Optional[str] = None
    group: Optional[str] = None  # runs of one sweep share a group
    mode: str = "auto"  # auto (online if logged in, else offline) | online | offline | disabled
    progress: bool = True  # progress bar on the console


@dataclass
class TrainConfig:
    """Optimisation settings shared by the trained stages (sft, rm, dpo, pretrain)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    micro_batch_size: int = 16  # per device (per_device_train_batch_size)
    eval_batch_size: int = 16
    grad_accum: int = 1
    max_seq_len: int = 512
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    disable_dropout: bool = False
    eval_every: int = 0  # steps between evals; 0 = once per epoch
    log_every: int = 1
    skip_nonfinite: bool = False  # skip (and count) a step whose loss is NaN/inf instead of stopping


@dataclass
class SFTConfig(TrainConfig):
    mask_prompt: bool = False  # loss on the answer tokens only
    init_from: Optional[str] = None  # start from this HF directory instead of model.name_or_path


@dataclass
class RMConfig(TrainConfig):
    lr: float = 5e-5  # DeepSpeed-Chat step 2
    weight_decay: float = 0.1  # DeepSpeed-Chat's OPT-350m reward recipe
    disable_dropout: bool = True  # reward models train without dropout
    init_from: Optional[str] = None  # start from an HF directory (e.g. a step-1 output)
    loss_mode: str = "divergent"  # divergent (DeepSpeed-Chat) | last (final score only)


@dataclass
class DPOConfig(TrainConfig):
    lr: float = 1e-6  # small: the policy starts from a good SFT model
    micro_batch_size: int = 8  # pairs per rank and step
    disable_dropout: bool = True  # deterministic log-probs for policy and reference
    init_from: Optional[str] = None  # start from this HF directory instead of actor.path
    beta: float = 0.1  # implicit reward scale: beta * (logp - logp_ref)
    loss: str = "sigmoid"  # key of rlhf.algos.dpo.DPO_LOSSES
    label_smoothing: float = 0.0  # conservative DPO (sigmoid loss only)
    sft_weight: float = 0.0  # weight of the chosen answers' per-token NLL added to the loss (RPO; TRL's rpo_alpha); 0 = plain DPO
    precompute_ref: bool = False  # reference log-probs computed once before training, no reference model kept
    delta_scale: float = 1.0  # exported model = start + delta_scale * (trained - start); < 1 keeps more of the start


@dataclass
class PretrainConfig(TrainConfig):
    """stage=pretrain: causal-LM training on raw text packed into blocks."""

    init_from: Optional[str] = None  # start from this HF directory instead of model.path
    data: Optional[str] = None  # .txt | .jsonl/.json | directory | hub id; None = data.unsupervised, else the demo corpus
    text_field: str = "text"  # the document field of .jsonl/.json records and datasets
    block_size: int = 512  # tokens per packed training block (documents joined with EOS, no padding)
    eval_share: float = 0.05  # share of the documents held out for perplexity
    lr: float = 1e-4  # continued pre-training: gentle
    micro_batch_size: int = 8  # blocks per rank and step
    eval_batch_size: int = 8  # blocks per eval forward


@dataclass
class EvalConfig:
    """stage=eval (and pipeline.eval): benchmark suites run by lm-eval."""

    suites: List[str] = field(default_factory=lambda: ["ceval", "mmlu", "clue"])  # ceval | mmlu | clue
    shots: List[int] = field(default_factory=lambda: [0, 5])  # few-shot counts; every suite runs at each
    data_dir: Optional[str] = None  # local copies in the official layouts (<dir>/ceval, mmlu, clue); None = the hub
    limit: Optional[int] = None  # scored items per task (None = all)
    batch_size: int = 16  # lm-eval batch size
    models: List[str] = field(default_factory=list)  # more models in the same table: conf/model names or model dirs


@dataclass
class PPOConfig:
    actor_lr: float = 9.65e-6
    critic_lr: float = 5e-6
    actor_weight_decay: float = 0.0
    critic_weight_decay: float = 0.0
    warmup_steps: int = 100
    scheduler: str = "cosine"
    epochs: int = 1  # passes over the prompt set
    max_steps: int = 0
    max_prompt_len: int = 256
    max_answer_len: int = 256
    min_answer_len: int = 0
    generation_batch_size: int = 16  # per device
    train_batch_size: int = 16  # per device mini batch
    generation_batches: int = 1
    samples_per_prompt: int = 1  # answers sampled per prompt (rows per rollout = prompts x this)
    reward_baseline: str = "none"  # none | group (leave-one-out mean score of the prompt's other samples)
    advantage: str = "gae"  # key of rlhf.algos.ppo.ADVANTAGES: gae | grpo | rloo | reinforce_pp
    reward_model: bool = True  # score answers with the learned reward model (false: reward.fn alone)
    ppo_epochs: int = 1
    kl_ctl: float = 0.1
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    clip_reward_value: float = 5.0  # clips the reward model score only; reward.fn_weight * fn is added after
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ema: bool = False
    ema_beta: float = 0.992
    delta_scale: float = 1.0  # exported actor = start + delta_scale * (trained - start); < 1 keeps more of the start
    unsup_coef: float = 27.8
    ptx: bool = False
    grad_clip: float = 1.0
    actor_gradient_checkpointing: bool = False
    critic_gradient_checkpointing: bool = False
    actor_disable_dropout: bool = True
    critic_disable_dropout: bool = True
    offload_reference: bool = False
    actor_zero: Optional[int] = None  # None = zero.stage
    critic_zero: Optional[int] = None
    actor_lora: bool = True  # apply lora.* to the actor
    critic_lora: bool = False
    hybrid_gather: str = "once"  # once | per_layer
    allow_untrained_critic: bool = False  # accept a critic/reward dir without a trained value head (real models)
    eval_every: int = 0
    log_every: int = 1


@dataclass
class CriticConfig:
    path: Optional[str] = None  # critic init (DeepSpeed-Chat: the step-2 model dir); None = the reward model


PIPELINE_ALGOS = ("ppo", "dpo", "grpo")  # step-3 algorithms; all but dpo score answers with a step-2 reward model


def loads_step2_model(ppo, algo: str = "ppo") -> bool:
    """Does step-3 algorithm ``algo`` (ppo | grpo | dpo) load the step-2 model (``critic.path``): as
    its critic (an estimator with one) or as its reward model (``ppo.reward_model``)? grpo is the PPO
    stage with ``ppo.advantage=grpo``; dpo loads none. The PPO stage, the pipeline's plan (which steps
    run, what ``critic.path`` is wired to) and preflight all ask this one rule."""
    if algo == "dpo":
        return False
    if ppo.reward_model:
        return True
    from rlhf.algos.ppo import ADVANTAGES

    est = ADVANTAGES.get("grpo" if algo == "grpo" else str(ppo.advantage))
    return est is None or est.critic  # an unknown estimator is validate's error, not a reason to skip step 2


def pipeline_steps(pipe, ppo=None) -> List[Tuple[int, str]]:
    """The (step, stage) pairs a pipeline runs, in order: sft (1); rm (2) when a step-3 algorithm
    needs a reward model (any but dpo; with the ``ppo`` section and step 3 in this run, only one that
    loads it: :func:`loads_step2_model`); then ``pipeline.algo`` and each of ``pipeline.compare`` (3),
    all starting from the same step-1 (and step-2) models. ``pipeline.steps`` picks among them."""
    algos = list(dict.fromkeys([str(pipe.algo), *map(str, pipe.compare)]))
    out = [(1, "sft")] if 1 in pipe.steps else []

    def needs_rm(a: str) -> bool:
        if ppo is None or 3 not in pipe.steps:  # a later step 3 may load it
            return a != "dpo"
        return loads_step2_model(ppo, a)

    if 2 in pipe.steps and any(needs_rm(a) for a in algos):
        out.append((2, "rm"))
    if 3 in pipe.steps:
        out += [(3, a) for a in algos]
    return out


@dataclass
class PipelineConfig:
    steps: List[int] = field(default_factory=lambda: [1, 2, 3])  # which steps to run (1 sft, 2 rm, 3 ppo/dpo)
    algo: str = "ppo"  # ppo (SFT -> RM -> PPO) | dpo (SFT -> DPO) | grpo (SFT -> RM -> PPO with ppo.advantage=grpo)
    compare: List[str] = field(default_factory=list)  # more step-3 algos (ppo | dpo | grpo) run from the same SFT (and RM)
    eval: List[str] = field(default_factory=list)  # eval suites run on each step's model (eval.* settings)


@dataclass
class ChatConfig:
    """Generation settings of stage=chat; None = the model family's own default (Pangu/GLM/ChatGLM:
    the Chinese toolkit's max_new_tokens 100, top_k 10, temperature 0.8, sampling), else the value
    in the comment."""

    max_new_tokens: Optional[int] = None  # 256
    do_sample: Optional[bool] = None  # false (greedy)
    temperature: Optional[float] = None  # 0.8
    top_k: Optional[int] = None  # 10
    top_p: float = 1.0
    max_history_tokens: int = 1024  # older turns are dropped beyond this (and beyond the model's context)


@dataclass
class StageConfig:
    name: str = MISSING  # key of rlhf.stages.STAGES
    inline: bool = False  # run in the launching process whatever the hardware (plan: nothing to distribute)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0 = off (the final model is always saved)
    every_minutes: float = 0.0
    keep_last: int = 2
    trust: bool = False  # load a foreign checkpoint whose DeepSpeed files need full unpickling (runs code: trusted files only)


@dataclass
class SlurmConfig:
    """sbatch settings for hardware.launcher=slurm (one Slurm job, one task per rank)."""

    partition: Optional[str] = None  # --partition; None = the cluster default
    account: Optional[str] = None  # --account
    time_min: int = 240  # --time limit in minutes
    cpus_per_task: int = 8  # --cpus-per-task (data loading, CPU Adam with offload)
    extra: List[str] = field(default_factory=list)  # more '#SBATCH' options, e.g. ["--qos=high"]
    wait: bool = True  # sbatch --wait: the run (or sweep job) ends when the Slurm job ends


@dataclass
class LaunchConfig:
    dry_run: bool = False  # print the command(s) that would start the ranks, start nothing
    omp_threads: int = 0  # threads per CPU rank; 0 = cores / ranks
    isolate_jobs: bool = True  # multirun: each job in its own process (own memory peaks, failures contained)
    timeout_s: float = 300.0  # a collective waiting longer than this for another rank fails, naming it (DeepSpeed's default: 30 min)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # hardware.launcher=slurm


@dataclass
class PlanConfig:
    """The memory planner (rlhf/engine/memory.py): stage=plan and the check every stage runs."""

    memory_fraction: float = 0.9  # share of GPU/host memory the estimate may use (rest: fragmentation, CUDA context)
    check: bool = True  # training stages stop at start when the setting cannot fit
    stage: Optional[str] = None  # stage=plan: plan this stage's steps (sft | rm | ppo | dpo | pipeline); null = steps 1-3


@dataclass
class Config:
    model: ModelConfig = MISSING
    stage: StageConfig = MISSING
    hardware: HardwareConfig = MISSING
    zero: ZeroConfig = MISSING
    lora: LoraConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    actor: ModelConfig = MISSING  # step 3 policy (and the pipeline's step-1 model); defaults to model
    reward: ModelConfig = MISSING  # reward/critic model (the pipeline's step-2 model); defaults to model
    critic: CriticConfig = field(default_factory=CriticConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = 1234
    optimized_metric: str = "objective"  # summary.json key sweeps optimise (Optuna, best.json); objective = the stage's default
    anomaly: bool = False  # torch autograd anomaly detection: names the op that made a NaN/inf (slow; debug=anomaly)
    resume: Optional[str] = None  # auto | <checkpoint path>
    run_dir: str = ""  # "" = Hydra's output dir for this job
    run_dir_mode: str = "new"  # new (refuse a run_dir holding another run) | overwrite (move the old run aside)
    cache_dir: str = ""  # tiny models, demo data, tokenised data; "" = <project>/.cache


def register() -> None:
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)  # config.yaml lists it first: every group is typed
    # conf/config.yaml: with run_dir set, Hydra's own files (run.log) go there, not to outputs/
    if not OmegaConf.has_resolver("run_dir_or"):
        OmegaConf.register_new_resolver("run_dir_or", lambda run_dir, default: run_dir or default)
        OmegaConf.register_new_resolver("hydra_subdir", lambda run_dir: None if run_dir else ".hydra")


def compose(overrides: List[str], conf_dir: str):
    """The validated config ``python run.py <overrides>`` would get, composed in-process (no Hydra job,
    run_dir and cache_dir as the config says): tests and ``python -m bench`` use it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    register()
    overrides = quote_numeric_choices(list(overrides))
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        full = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    choices = dict(full.hydra.runtime.choices)
    with open_dict(full):
        del full["hydra"]
    cfg = resolve_models(full, overrides, choices)
    validate(cfg)
    return cfg


# Groups whose option names are numbers ("zero=2"): Hydra's override grammar would read the value
# as an int and refuse it as a group choice, so command-line choices are quoted before parsing.
NUMERIC_GROUPS = ("zero",)


def quote_numeric_choices(overrides: List[str]) -> List[str]:
    """``zero=2`` -> ``zero='2'`` and ``zero=0,2-offload`` -> ``zero='0','2-offload'``."""
    out = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in NUMERIC_GROUPS and value and "'" not in value and '"' not in value:
            choices = value.split(",")
            if any(c.isdigit() for c in choices):
                arg = f"{key}=" + ",".join(f"'{c}'" for c in choices)
        out.append(arg)
    return out


# ---------------------------------------------------------------- which model each stage trains

ROLE_GROUPS = ("actor", "reward")  # per-role model groups; each follows `model` unless chosen or set

def _norm(s: str) -> str:
    return "".join(ch for ch in str(s).lower() if ch.isalnum())


def model_label(path: str, name: str = "") -> str:
    """The name a model goes by in run directories, tables and summaries: ``name`` when ``path`` is
    that model (a tiny spec, or a hub id / directory whose name contains it), else from the path:
    the hub id's repo name or the directory's most telling part (not ``model``, a step name or a
    timestamp)."""
    from pathlib import Path

    path = str(path)
    if name and _norm(name) and _norm(name) in _norm(path):
        return name
    parts = [p for p in Path(path).expanduser().parts if p not in ("/", ".", "..")]
    generic = {"model", "critic", "ema", "sft", "rm", "ppo", "dpo", "pretrain", "checkpoint", "final", "hf"}
    for part in reversed(parts):
        if part.lower() not in generic and not part[:1].isdigit() and not part.startswith("step-"):
            return part
    return parts[-1] if parts else (name or "model")


def _override_keys(overrides: List[str]) -> Dict[str, str]:
    """{key: raw value} of command-line overrides (``model.path=x``, ``+a.b=c``, ``actor=opt-1.3b``)."""
    out = {}
    for arg in overrides:
        key, sep, value = str(arg).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _adopt_path(node, own: set) -> None:
    """A model whose path was set: its family, name, shape and init come from that checkpoint,
    except the keys the user set for it too (``own``)."""
    from rlhf.models.tiny import TINY_SPECS

    path = str(node.path)
    if "init" not in own and node.init == "tiny" and path not in TINY_SPECS:
        node.init = "pretrained"
    if "family" not in own and not (node.init == "tiny" and path in TINY_SPECS):
        node.family = "auto"
    if "name" not in own:
        node.name = model_label(path, str(node.name))
    if "params_b" not in own:
        node.params_b = 0.0
    if "dtype" not in own:
        node.dtype = "auto"
    if "arch" not in own and not any(k.startswith("arch.") for k in own):
        node.arch = {}


def resolve_models(cfg, overrides: List[str], choices: Dict[str, Any]):
    """One rule for which model every stage trains (in place; returns ``cfg``):

    - ``model=<name>`` or ``model.path=<dir|hub id>`` sets the actor and the reward/critic model;
      ``actor=...``/``reward=...`` (a group choice) or ``actor.*``/``reward.*`` keys override per role.
    - a set ``<key>.path`` makes that model the checkpoint's: family ``auto`` (from its
      ``model_type``), name from the path, no preset shape (``init=tiny`` becomes ``pretrained``).
    - a role the stage does not read (``reward=`` for ``stage=sft``, ``critic.path`` outside step 3)
      stops the run, naming the key that works.
    - ``cfg.model`` becomes the stage's own model: the actor (sft, dpo, ppo, chat, pretrain, eval,
      pipeline) or the reward model (rm); ``<model>.key`` records the key the user gave it under.
    """
    import copy

    from omegaconf import OmegaConf, open_dict

    keys = _override_keys(overrides)
    choices = {k: v for k, v in (choices or {}).items()}
    stage = str(cfg.stage.name)

    def own(role: str) -> set:
        return {k.split(".", 1)[1] for k in keys if k.startswith(role + ".") and "." in k}

    def set_by_user(role: str) -> bool:
        chosen = choices.get(role) not in (None, choices.get("model"))
        return chosen or bool(own(role))

    with open_dict(cfg):
        cfg.model.key = "model"
        if "model.path" in keys:
            _adopt_path(cfg.model, own("model"))
        for role in ROLE_GROUPS:
            node = cfg[role]
            if choices.get(role) in (None, choices.get("model")):  # follows `model`
                unset = object()  # a key set to null on the command line (reward.fn=null) is kept
                mine = {k: v for k in own(role) if (v := OmegaConf.select(node, k, default=unset)) is not unset}
                node = copy.deepcopy(cfg.model)
                for k, v in mine.items():
                    OmegaConf.update(node, k, v, merge=False)
                node.key = role if mine else "model"
                cfg[role] = node
            else:
                cfg[role].key = role
            if f"{role}.path" in keys:
                _adopt_path(cfg[role], own(role))
                cfg[role].key = role
        if "critic.path" in keys and "family" not in own("reward"):
            cfg.reward.family = "auto"  # the critic/reward checkpoint given says what it is
        from rlhf.stages import STAGES

        used = STAGES[stage].roles if stage in STAGES else ("actor",)
        if stage == "pipeline" and all(a == "dpo" for a in (cfg.pipeline.algo, *cfg.pipeline.compare)):
            used = ("actor",)
        for role in ROLE_GROUPS:
            if role not in used and set_by_user(role):
                works = "model= / model.path=" + (f" (or {used[0]}=...)" if used else "")
                raise ValueError(f"stage={stage} does not use `{role}` ({role}= / {role}.*): it trains "
                                 f"{'the reward model' if used == ('reward',) else 'the actor'}; set {works}")
        if "critic.path" in keys and stage not in ("ppo", "pipeline", "plan"):
            raise ValueError(f"critic.path is read by stage=ppo (and the pipeline's step 3), not by stage={stage}")
        primary = "reward" if used == ("reward",) else "actor"
        cfg.model = copy.deepcopy(cfg[primary])
    _check_sections(cfg, keys)
    return cfg


STAGE_SECTIONS = ("sft", "rm", "ppo", "dpo", "pretrain", "eval", "chat")


def sections_read(cfg) -> Optional[set]:
    """The stage sections (``sft.*``, ``ppo.*``, ...) a composed run reads; None for all of them
    (``stage=plan`` can plan any stage). A pipeline reads the sections of the steps it runs, ``ppo``
    whenever PPO or GRPO is one of its algorithms (``ppo.reward_model`` decides whether step 2 runs)
    and ``eval`` with ``pipeline.eval``."""
    stage = str(cfg.stage.name)
    if stage == "plan":
        return None
    if stage != "pipeline":
        return {"ppo" if stage == "grpo" else stage}
    out = {"ppo" if name == "grpo" else name for _, name in pipeline_steps(cfg.pipeline, cfg.ppo)}
    if {str(cfg.pipeline.algo), *map(str, cfg.pipeline.compare)} & {"ppo", "grpo"}:
        out.add("ppo")
    if cfg.pipeline.eval:
        out.add("eval")
    return out


def _check_sections(cfg, keys: Dict[str, str]) -> None:
    """A command-line key of a stage section the run never reads (``dpo.lr=1e-5`` with
    ``stage=sft``) stops the run, naming the key that works when the stage's own section has it."""
    from omegaconf import OmegaConf

    read = sections_read(cfg)
    if read is None:
        return
    for key, value in keys.items():
        section, _, rest = key.partition(".")
        if section not in STAGE_SECTIONS or section in read or not rest:
            continue
        works = [f"{s}.{rest}" for s in sorted(read) if OmegaConf.select(cfg, f"{s}.{rest}", default=None) is not None]
        hint = f"; set {' or '.join(works)}" if works else ""
        raise ValueError(f"{key}={value}: stage={cfg.stage.name} does not read `{section}.*` (this run reads "
                         f"{', '.join(f'{s}.*' for s in sorted(read))}){hint}")


# ---------------------------------------------------------------- validation, once, in the parent

# key -> the values it takes (registries are checked against the registry itself, below)
CHOICES: Dict[str, tuple] = {
    "model.init": ("pretrained", "random", "tiny"), "model.dtype": ("auto", "fp32", "fp16", "bf16"),
    "actor.init": ("pretrained", "random", "tiny"), "reward.init": ("pretrained", "random", "tiny"),
    "hardware.accelerator": ("cpu", "cuda"), "hardware.precision": ("fp32", "fp16", "bf16"),
    "hardware.backend": ("gloo", "nccl"), "hardware.launcher": ("local", "deepspeed", "slurm"),
    "zero.stage": (0, 1, 2, 3), "logger.mode": ("auto", "online", "offline", "disabled"),
    "sft.scheduler": ("cosine", "linear", "constant"), "rm.scheduler": ("cosine", "linear", "constant"),
    "dpo.scheduler": ("cosine", "linear", "constant"), "ppo.scheduler": ("cosine", "linear", "constant"),
    "rm.loss_mode": ("divergent", "last"), "ppo.reward_baseline": ("none", "group"),
    "ppo.hybrid_gather": ("once", "per_layer"), "pipeline.algo": PIPELINE_ALGOS,
    "run_dir_mode": ("new", "overwrite"),
}
# keys that must be >= 1 / >= 0
AT_LEAST_ONE = ("sft.epochs", "rm.epochs", "dpo.epochs", "ppo.epochs", "sft.grad_accum", "rm.grad_accum",
                "dpo.grad_accum", "sft.micro_batch_size", "rm.micro_batch_size", "dpo.micro_batch_size",
                "sft.max_seq_len", "rm.max_seq_len", "dpo.max_seq_len", "ppo.max_answer_len", "ppo.max_prompt_len",
                "ppo.generation_batch_size", "ppo.train_batch_size", "ppo.samples_per_prompt", "ppo.ppo_epochs",
                "ppo.generation_batches", "hardware.nodes", "hardware.procs_per_node")
AT_LEAST_ZERO = ("sft.max_steps", "rm.max_steps", "dpo.max_steps", "ppo.max_steps", "checkpoint.every_n_steps",
                 "checkpoint.every_minutes", "checkpoint.keep_last", "sft.warmup_steps", "rm.warmup_steps",
                 "dpo.warmup_steps", "ppo.warmup_steps", "data.heldout_prompts", "data.heldout_samples")


def _rules(cfg) -> List[str]:
    """Cross-field rules, each a message naming the keys (empty when all hold)."""
    errors = []
    z, p = cfg.zero, cfg.ppo
    if z.offload_param and int(z.stage) != 3:
        errors.append("zero.offload_param=true needs zero.stage=3 (only ZeRO-3 offloads parameters)")
    if z.offload_optimizer and int(z.stage) < 1:
        errors.append("zero.offload_optimizer=true needs zero.stage >= 1")
    if p.reward_baseline == "group" and p.samples_per_prompt < 2:
        errors.append("ppo.reward_baseline=group needs ppo.samples_per_prompt >= 2 (the baseline is the mean score "
                      "of a prompt's other answers)")
    rows = p.generation_batch_size * p.samples_per_prompt
    if p.train_batch_size >= 1 and rows % p.train_batch_size:
        errors.append(f"ppo.generation_batch_size={p.generation_batch_size} x ppo.samples_per_prompt="
                      f"{p.samples_per_prompt} = {rows} answers per rollout is not a multiple of "
                      f"ppo.train_batch_size={p.train_batch_size}: each rollout must split into whole mini-batches")
    steps = list(cfg.pipeline.steps)
    if not steps or any(s not in (1, 2, 3) for s in steps):
        errors.append(f"pipeline.steps must be a non-empty subset of [1, 2, 3], got {steps}")
    bad = [a for a in cfg.pipeline.compare if a not in PIPELINE_ALGOS]
    if bad:
        errors.append(f"pipeline.compare={list(cfg.pipeline.compare)}: {', '.join(map(str, bad))} not a step-3 "
                      f"algorithm; expected some of {', '.join(PIPELINE_ALGOS)}")
    from rlhf.algos.ppo import ADVANTAGES

    step3 = (cfg.pipeline.algo, *cfg.pipeline.compare) if cfg.stage.name == "pipeline" and 3 in steps else ()
    runs_ppo = cfg.stage.name == "ppo" or "ppo" in step3
    runs_grpo = cfg.stage.name == "grpo" or "grpo" in step3  # the ppo stage with ppo.advantage=grpo
    est = ADVANTAGES.get(p.advantage)
    ppo_critic_free = runs_ppo and est is not None and not est.critic
    critic_free = ppo_critic_free or runs_grpo
    if ppo_critic_free and p.samples_per_prompt < 2:
        errors.append(f"ppo.advantage={p.advantage} has no critic and compares the answers to one prompt: set "
                      f"ppo.samples_per_prompt >= 2 (got {p.samples_per_prompt}), e.g. 4 with "
                      "ppo.generation_batch_size divided by 4")
    if critic_free and p.reward_baseline == "group":
        which = p.advantage if ppo_critic_free else "grpo"
        errors.append(f"ppo.reward_baseline=group is for ppo.advantage=gae; ppo.advantage={which} sets its own "
                      "baseline (leave ppo.reward_baseline=none)")
    if (runs_ppo or runs_grpo) and cfg.reward.fn:  # imported here so a typo fails before launch
        from rlhf.rewards import load_reward_fn

        try:
            load_reward_fn(cfg.reward.fn, cfg.reward.fn_weight)
        except ValueError as e:
            errors.append(str(e))
    if (runs_ppo or runs_grpo) and not p.reward_model and not cfg.reward.fn:
        errors.append("ppo.reward_model=false leaves nothing to score answers: set reward.fn=<module>:<function> "
                      "(e.g. rlhf.data.demo:reward) or ppo.reward_model=true")
    if critic_free and not p.reward_model and cfg.critic.path:
        errors.append(f"critic.path={cfg.critic.path} is not used: step 3 builds no critic with a critic-free "
                      "estimator, and ppo.reward_model=false loads no reward model (drop critic.path)")
    runs_dpo = cfg.stage.name == "dpo" or "dpo" in step3
    own_start = cfg.stage.name != "pipeline" or 1 not in steps  # step 3 starts from actor.path, not step 1's output
    for key, scale, runs in (("ppo.delta_scale", p.delta_scale, runs_ppo or runs_grpo),
                             ("dpo.delta_scale", cfg.dpo.delta_scale, runs_dpo)):
        if scale <= 0:
            errors.append(f"{key}={scale}: must be > 0 (1.0 exports the trained weights, 0.5 the midpoint between "
                          "the start and the trained weights)")
        elif runs and scale != 1.0 and own_start and cfg.actor.init == "random" and not (
                key == "dpo.delta_scale" and cfg.dpo.init_from):
            errors.append(f"{key}={scale} needs the start's weights, but actor.init=random starts from none: "
                          f"set {key}=1.0 or actor.path=<a checkpoint>")
    if cfg.launch.timeout_s <= 0:
        errors.append(f"launch.timeout_s={cfg.launch.timeout_s}: must be > 0 (seconds a collective waits for a rank)")
    if cfg.hardware.accelerator == "cpu" and cfg.hardware.backend != "gloo":
        errors.append(f"hardware.backend={cfg.hardware.backend} needs GPUs; the CPU runs on gloo")
    return errors


def validate(cfg) -> None:
    """Every choice, registry key and cross-field rule of a composed config, checked in the parent
    before anything is loaded or launched. Raises one ValueError listing every problem, each naming
    its key."""
    from omegaconf import OmegaConf

    errors = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            errors.append(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")
    for key in AT_LEAST_ONE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            errors.append(f"{key}={value}: must be >= 1")
    for key in AT_LEAST_ZERO:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 0:
            errors.append(f"{key}={value}: must be >= 0")
    from rlhf.algos.dpo import DPO_LOSSES
    from rlhf.stages import STAGES

    if cfg.stage.name not in STAGES:
        errors.append(f"stage.name={cfg.stage.name!r}: not a stage; known: {', '.join(sorted(STAGES))}")
    if cfg.dpo.loss not in DPO_LOSSES:
        errors.append(f"dpo.loss={cfg.dpo.loss!r}: not a DPO loss; known: {', '.join(sorted(DPO_LOSSES))}")
    from rlhf.algos.ppo import ADVANTAGES

    if cfg.ppo.advantage not in ADVANTAGES:
        errors.append(f"ppo.advantage={cfg.ppo.advantage!r}: not an estimator; known: {', '.join(ADVANTAGES)}")
    errors += _rules(cfg)
    if errors:
        if len(errors) == 1:  # one line: what a sweep's failed row shows
            raise ValueError(f"invalid config: {errors[0]}")
        raise ValueError(f"invalid config ({len(errors)} problems):\n  " + "\n  ".join(errors))
