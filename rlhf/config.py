"""Structured config schema: every key a run accepts, with its type.

Hydra merges the YAML groups under ``conf/`` over these dataclasses, so a misspelled key or a
value of the wrong type fails at compose time with a message naming it. Values that are
DeepSpeed-Chat defaults are documented where they are set: the group YAML files.
Components receive one of these small group dataclasses (or plain values), never the whole tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING  # short name shown in tables, e.g. "opt-1.3b"
    family: str = MISSING  # key of rlhf.models.families.FAMILIES
    path: str = MISSING  # hub id, local HF directory, or a tiny spec name ("tiny-opt")
    init: str = "pretrained"  # pretrained | random (real shape, no weights) | tiny (built offline)
    dtype: str = "auto"  # auto (hardware precision) | fp32 | fp16 | bf16
    trust_remote_code: bool = False  # explicit opt-in for models with custom code
    allow_pickle: bool = False  # explicit opt-in to load .bin/.pt pickle weights
    arch: Dict[str, Any] = field(default_factory=dict)  # HF config kwargs (random init, planner)
    params_b: float = 0.0  # parameter count in billions (planner), 0 = derive from arch


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


@dataclass
class LoraConfig:
    name: str = "none"
    rank: int = 0  # 0 = LoRA off (DeepSpeed-Chat lora_dim)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=list)  # empty = the family's default
    only_optimize_lora: bool = False  # freeze everything but the adapters
    lr: float = 5e-4  # learning rate of the adapter weights (DeepSpeed-Chat lora_learning_rate)


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
    demo_size: int = 2000  # pairs generated for the demo task (train; eval gets a tenth)
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
    init_from: Optional[str] = None  # start from an HF directory (e.g. a step-1 output)
    loss_mode: str = "divergent"  # divergent (DeepSpeed-Chat) | last (final score only)


@dataclass
class DPOConfig(TrainConfig):
    init_from: Optional[str] = None  # start from this HF directory instead of actor.path
    beta: float = 0.1  # implicit reward scale: beta * (logp - logp_ref)
    loss: str = "sigmoid"  # key of rlhf.algos.dpo.DPO_LOSSES
    label_smoothing: float = 0.0  # conservative DPO (sigmoid loss only)
    precompute_ref: bool = False  # reference log-probs computed once before training, no reference model kept


@dataclass
class PretrainConfig(TrainConfig):
    """stage=pretrain: causal-LM training on raw text packed into blocks."""

    init_from: Optional[str] = None  # start from this HF directory instead of model.path
    data: Optional[str] = None  # .txt | .jsonl/.json | directory | hub id; None = data.unsupervised, else the demo corpus
    text_field: str = "text"  # the document field of .jsonl/.json records and datasets
    block_size: int = 512  # tokens per packed training block (documents joined with EOS, no padding)
    eval_share: float = 0.05  # share of the documents held out for perplexity


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
    ppo_epochs: int = 1
    kl_ctl: float = 0.1
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    clip_reward_value: float = 5.0
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
    eval_every: int = 0
    log_every: int = 1


@dataclass
class CriticConfig:
    path: Optional[str] = None  # critic init (DeepSpeed-Chat: the step-2 model dir); None = the reward model


@dataclass
class PipelineConfig:
    steps: List[int] = field(default_factory=lambda: [1, 2, 3])  # which steps to run (1 sft, 2 rm, 3 ppo/dpo)
    algo: str = "ppo"  # ppo (SFT -> RM -> PPO) | dpo (SFT -> DPO)
    eval: List[str] = field(default_factory=list)  # eval suites run on each step's model (eval.* settings)


@dataclass
class ChatConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.8
    top_k: int = 10
    top_p: float = 1.0
    max_history_tokens: int = 1024  # older turns are dropped beyond this


@dataclass
class StageConfig:
    name: str = MISSING  # key of rlhf.stages.STAGES
    inline: bool = False  # run in the launching process whatever the hardware (plan: nothing to distribute)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0 = off (the final model is always saved)
    every_minutes: float = 0.0
    keep_last: int = 2


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
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # hardware.launcher=slurm


@dataclass
class PlanConfig:
    """The memory planner (rlhf/engine/memory.py): stage=plan and the check every stage runs."""

    memory_fraction: float = 0.9  # share of GPU/host memory model states may use (rest: activations)
    check: bool = True  # training stages stop at start when the setting cannot fit


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
    resume: Optional[str] = None  # auto | <checkpoint path>
    run_dir: str = ""  # "" = Hydra's output dir for this job
    cache_dir: str = ""  # tiny models, demo data, tokenised data; "" = <project>/.cache


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)  # config.yaml lists it first: every group is typed


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
