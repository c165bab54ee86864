"""The schema: a tree of frozen dataclasses, one per config section, with each key's default, bounds and help.

The sections of a task and of the tile pipeline live beside their owners (hpcfl/tasks/dino/config.py,
hpcfl/tasks/segment/config.py, hpcfl/tasks/mil_config.py, hpcfl/wsi/config.py) and are registered here as
fields of :class:`Config`; those modules import only :mod:`hpcfl.fields`, so the schema never imports
the code that reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple

from ..tasks.dino.config import DinoConfig
from ..tasks.mil_config import MilConfig
from ..tasks.segment.config import SegmentConfig, VolumesConfig
from ..wsi.config import TilesConfig
from .. import sitelist
from ..fields import setting as _f

# The aggregation rules a config may name (hpcfl.aggregation.STRATEGIES implements them; a unit test keeps
# the two equal): the schema names them without importing the aggregation package.
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean", "krum")


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("", help="run directory name under `root`; default: the config file's stem")
    root: str = _f("runs", help="parent of run directories (relative to the working directory)")
    seed: int = _f(0, help="seed for model init, data partition and shuffling", min=0)


@dataclass(frozen=True)
class SiteOverrides:
    local_epochs: Optional[int] = _f(None, help="this site's local epochs per round", min=1)
    local_steps: Optional[int] = _f(None, help="this site's local optimizer steps per round", min=1)
    lr: Optional[float] = _f(None, help="this site's learning rate", gt=0.0)
    batch_size: Optional[int] = _f(None, help="this site's per-rank batch size", min=1)


@dataclass(frozen=True)
class SiteConfig:
    name: str = _f(help="site (institution) name; letters, digits, '-', '_', '.'")
    ranks: int = _f(1, help="MPI ranks (data-parallel replicas) of this site", min=1)
    overrides: SiteOverrides = _f(SiteOverrides(), help="per-site training overrides")
    dropout: float = _f(0.0, help="simulated: probability that this site does not return its update in a round (seeded)", min=0.0, max=1.0)
    speed: float = _f(1.0, help="simulated: relative speed; a round takes steps * fl.stragglers.step_time_s / speed simulated seconds", gt=0.0)




@dataclass(frozen=True)
class ServerOptConfig:
    lr: Optional[float] = _f(None, help="server learning rate (default 1.0 for fedavgm, 0.01 for fedadam/fedyogi/fedadagrad)", gt=0.0)
    momentum: float = _f(0.9, help="fedavgm: server momentum", min=0.0, max=0.999)
    beta1: Optional[float] = _f(None, help="first-moment decay (default 0.9 for fedadam/fedyogi, 0.0 for fedadagrad)", min=0.0, max=0.999)
    beta2: float = _f(0.99, help="fedadam/fedyogi: second-moment decay", min=0.0, max=0.999)
    tau: float = _f(1e-3, help="fedadam/fedyogi/fedadagrad: adaptivity (epsilon); second moments start at tau^2", gt=0.0)


@dataclass(frozen=True)
class RobustConfig:
    trim_fraction: float = _f(0.1, help="trimmed_mean: fraction of sites trimmed at each end, per coordinate", min=0.0, max=0.49)
    byzantine: int = _f(0, help="krum: number of Byzantine sites f tolerated (needs sites >= 2f + 3)", min=0)
    krum_keep: int = _f(1, help="krum: sites kept and averaged (1 = Krum, more = Multi-Krum)", min=1)


@dataclass(frozen=True)
class SamplingConfig:
    fraction: float = _f(1.0, help="fraction of sites sampled each round (seeded, reproducible)", gt=0.0, max=1.0)
    min_sites: int = _f(1, help="sample at least this many sites", min=1)


@dataclass(frozen=True)
class StragglerConfig:
    step_time_s: float = _f(1.0, help="simulated seconds one local step takes at speed 1", gt=0.0)
    deadline_s: Optional[float] = _f(None, help="simulated round deadline: sites slower than this do not return (null = wait for all)", gt=0.0)


@dataclass(frozen=True)
class FLConfig:
    rounds: int = _f(10, help="federated rounds", min=1)
    local_epochs: Optional[int] = _f(None, help="local epochs per round (default 1 when local_steps is unset)", min=1)
    local_steps: Optional[int] = _f(None, help="local optimizer steps per round instead of epochs", min=1)
    strategy: Literal[STRATEGIES] = _f("fedavg", help="aggregation rule (docs/algorithms.md)")  # type: ignore[valid-type]
    proximal_mu: float = _f(0.01, help="fedprox: weight mu of the proximal term mu/2 |w - w_global|^2 in local training", gt=0.0)
    server: ServerOptConfig = _f(ServerOptConfig(), help="server optimizer (fedavgm, fedadam, fedyogi, fedadagrad)")
    robust: RobustConfig = _f(RobustConfig(), help="robust rules (trimmed_mean, krum)")
    sampling: SamplingConfig = _f(SamplingConfig(), help="which sites take part in a round")
    stragglers: StragglerConfig = _f(StragglerConfig(), help="simulated time and the round deadline")
    min_sites: int = _f(1, help="a round aggregates only if at least this many sites return", min=1)
    on_too_few: Literal["retry", "skip", "fail"] = _f("retry", help="when fewer than min_sites return: redraw who takes part (up to max_retries), keep the global model unchanged, or stop with an error")
    max_retries: int = _f(10, help="retry: redraws before the round fails", min=1)


@dataclass(frozen=True)
class FeatureBagsConfig:
    dir: str = _f("data/features", help="tile features, one file per slide (written by `hpcfl features`)")
    labels: str = _f("", help="slide labels CSV: slide_id,label[,site] (required)")
    partition: Literal["slide", "labels"] = _f("labels", help="which site owns a slide: the CSV's site column (labels), or a seeded round-robin (slide)")
    max_tiles: int = _f(512, help="training: at most this many tiles of a slide per step (a seeded sample; evaluation sees all)", min=1)


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "synthetic", "tiles", "volumes", "arrays", "features"] = _f("digits", help="dataset: scikit-learn's bundled digits, synthetic Gaussian classes, WSI tiles, NIfTI volumes (task: segment), arrays of your own (data.path), or per-slide tile features (bags, for task: mil)")
    path: str = _f("", help="arrays: directory with x.npy (float32, (N, ...)) and y.npy (labels 0..C-1), memory-mapped and shared by the processes of a node")
    val_fraction: float = _f(0.2, help="fraction of each site's data held out for validation", gt=0.0, max=0.9)
    partition: Literal["iid", "dirichlet", "quantity"] = _f("iid", help="how samples are split over sites: iid, label skew Dir(dirichlet_alpha) per class, or quantity skew (site sizes Dir(dirichlet_alpha), labels IID); computed per site on demand, so 10,000 sites cost no per-site objects")
    dirichlet_alpha: float = _f(0.5, help="concentration for partition: dirichlet or quantity (smaller = more skew)", gt=0.0)
    samples: int = _f(4096, help="synthetic: number of samples", min=16)
    features: int = _f(64, help="synthetic: features per sample", min=1)
    classes: int = _f(10, help="synthetic: number of classes", min=2)
    tiles: TilesConfig = _f(TilesConfig(), help="whole-slide-image tiles")
    volumes: VolumesConfig = _f(VolumesConfig(), help="3D volumes, one decathlon datalist per site (task: segment)")
    bags: FeatureBagsConfig = _f(FeatureBagsConfig(), help="task mil: per-slide tile features (one bag per slide) and slide labels")
    array_backend: Literal["auto", "numpy", "cupy"] = _f("auto", help="array math: CuPy where a GPU exists (auto), else NumPy; for tile batches auto follows data.tiles.decode_device")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("mlp", help="`mlp`, `cnn`, or `package.module:factory` (called with num_features, num_classes, **args)")
    hidden: Tuple[int, ...] = _f((64,), help="mlp: hidden layer widths")
    batchnorm: bool = _f(False, help="mlp: BatchNorm after each hidden layer")
    conv_blocks: int = _f(3, help="cnn: strided conv + GroupNorm + ReLU blocks (16, 32, 64, ... channels)", min=1, max=8)
    stain_jitter: float = _f(0.0, help="cnn: in training only, scale each image's optical density per colour channel by exp(sigma * N(0,1)) (x -> x**k for inputs in [0, 1]): robustness to stain and scanner colour shifts between slides (hpcfl.stain); 0 = off", min=0.0, max=2.0)
    args: Dict[str, Any] = _f({}, help="extra keyword arguments for a factory model")


@dataclass(frozen=True)
class TrainConfig:
    device: Literal["auto", "cpu", "cuda"] = _f("auto", help="where site ranks train: auto = the rank's GPU when CUDA is available, else the CPU")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", help="mixed precision of local training (autocast; fp16 with a loss scale, fresh each round); the federation always exchanges fp32 weights")
    channels_last: bool = _f(False, help="feed image batches in channels-last memory format (faster convolutions on tensor-core GPUs)")
    cudnn_benchmark: bool = _f(True, help="let cuDNN pick the fastest convolution algorithms (GPU only)")
    optimizer: Literal["sgd", "adam", "adamw"] = _f("sgd", help="local optimizer (state is reset every round)")
    lr: float = _f(0.05, help="learning rate", gt=0.0)
    momentum: float = _f(0.0, help="sgd momentum", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, help="weight decay", min=0.0)
    batch_size: int = _f(32, help="per-rank batch size", min=1)
    eval_batch_size: int = _f(1024, help="per-rank evaluation batch size", min=1)
    threads: int = _f(0, help="torch threads per rank; 0 = cores / ranks on this node", min=0)
    grad_clip: float = _f(0.0, help="clip the (site-averaged) gradient to this global L2 norm before each step; 0 = off", min=0.0)


@dataclass(frozen=True)
class SiteBackendConfig:
    backend: Literal["horovod", "torch"] = _f("horovod", help="data parallelism inside a site: Horovod process sets, or torch.distributed groups (NCCL where each rank of a site has its own GPU, else Gloo: docs/gpu.md)")


@dataclass(frozen=True)
class PipelineConfig:
    stages: Tuple[str, ...] = _f(("pretrain", "features", "mil"), help="stages `hpcfl launch` runs, in this order: pretrain (the `pretrain` config's federation), features (`hpcfl features` of its run into data.bags.dir), mil (this config)")
    pretrain: str = _f("", help="config of the encoder's federation (e.g. configs/pathology-dino.yaml; relative to the working directory, as data paths are)")
    pretrain_set: Tuple[str, ...] = _f((), help="--set overrides of the pretrain stage")
    checkpoint: Literal["best", "last"] = _f("best", help="features: the pretrain run's best.npz or its last checkpoint")
    batch_size: int = _f(256, help="features: tiles per forward pass", min=1)
    ranks: int = _f(0, help="features: processes (0 = the pretrain config's site ranks)", min=0)


@dataclass(frozen=True)
class PercentileConfig:
    percent: float = _f(10.0, help="share only the largest percent% of |delta w| (the rest as zero)", gt=0.0, max=100.0)
    gamma: float = _f(0.01, help="shared values are clipped to [-gamma, gamma]", gt=0.0)


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float = _f(1.0, help="z: Gaussian noise of std z * clip_norm is added to the sum of clipped updates", min=0.0)
    clip_norm: float = _f(1.0, help="C: each site's update is clipped to L2 norm C (the initial C when adaptive)", gt=0.0)
    delta: float = _f(1e-5, help="delta of the (epsilon, delta) guarantee reported every round", gt=0.0, max=1.0)
    adaptive: bool = _f(False, help="adaptive clipping (Andrew et al. 2021): C tracks a quantile of the update norms")
    target_quantile: float = _f(0.5, help="adaptive: fraction of updates that should be unclipped", gt=0.0, max=1.0)
    clip_lr: float = _f(0.2, help="adaptive: geometric learning rate of C", gt=0.0)
    count_noise_multiplier: float = _f(10.0, help="adaptive: noise multiplier of the unclipped-count (spends part of the budget)", gt=0.0)


@dataclass(frozen=True)
class SecAggConfig:
    frac_bits: int = _f(24, help="fixed-point fractional bits of the masked integers (mod 2^64)", min=8, max=40)


@dataclass(frozen=True)
class PrivacyConfig:
    exclude_vars: Tuple[str, ...] = _f((), help="regexes of parameter names never sent: each site keeps its own values (partial weight sharing)")
    percentile: Optional[PercentileConfig] = _f(None, help="percentile privacy (Shokri & Shmatikov 2015): share the largest updates, clipped")
    dp: Optional[DPConfig] = _f(None, help="differential privacy, DP-FedAvg: clip each site's update, add Gaussian noise to the sum, account (epsilon, delta)")
    secure_aggregation: Optional[SecAggConfig] = _f(None, help="pairwise-masked uploads: rank 0 learns only the sum")


@dataclass(frozen=True)
class EvalConfig:
    locally_tuned: bool = _f(True, help="every round, each site also evaluates its locally trained model on its own validation data")
    cross_site: bool = _f(True, help="at the end, every site's final local model and the global model on every site's validation data (cross_site.json)")
    best_metric: str = _f("auto", help="the global model with the best value of this metric is kept as best.npz: val_<a metric of the task> (classify: val_accuracy, val_loss, val_auc, val_balanced_accuracy); auto = the task's first headline metric")
    auc_bins: int = _f(256, help="score histogram bins per class for AUC (summed over ranks and sites exactly; AUC error < 1/bins)", min=16, max=100000)
    sites_every: int = _f(1, help="evaluate the global model on the sites' validation data every N rounds (and in the last round); the round's val_* metrics are null in the rounds between", min=1)
    sites_max: int = _f(128, help="sites the global model is evaluated on per evaluation: every site up to this many, above it a seeded sample of this many, drawn afresh each round (the round's val_* are then over the sample)", min=1)
    cross_site_max: int = _f(16, help="cross-site validation covers every site up to this many sites; above it, a seeded sample of this many (their final local models and the global model on their validation data), and the printed table is summarised per model", min=1)
    central_fraction: float = _f(0.0, help="central evaluation: hold out this fraction of the data set (seeded) before it is split over the sites; the global model is evaluated on it when the sites' validation data is (eval.sites_every), its batches split across every slot rank and summed exactly (the round's central_* metrics); 0 = off. data.name digits, synthetic or arrays, task classify", min=0.0, max=0.9)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _f(1, help="write a checkpoint every N rounds (the last round always)", min=1)
    keep: int = _f(2, help="checkpoints kept on disk", min=1)


@dataclass(frozen=True)
class LaunchConfig:
    mpirun: str = _f("mpirun", help="mpirun executable used by `hpcfl launch`")
    mpirun_args: Tuple[str, ...] = _f((), help="extra mpirun arguments (argv list)")
    chunk_mb: int = _f(8, help="largest MPI message in MiB: models move in chunks of this size, which bounds the reduction buffers MPI allocates at rank 0", min=1, max=1024)
    slots: int = _f(0, help="process groups that simulate the sites (each trains its sites in turn); 0 = one per site where this machine (or cluster) has a core or GPU per rank, else as many as fit", min=0)
    shared_memory: bool = _f(True, help="where rank 0 and every slot leader (up to 16 slots) run on one node, a mean-based strategy's sums and the global model move through one MPI shared-memory window (each written once, read in place) instead of MPI's Reduce and Bcast (summary.json's shared_memory says whether they did); false: always MPI messages. Secure aggregation and the coordinate/select strategies keep MPI")
    assign: Literal["static", "balanced"] = _f("static", help="which slot trains a site: static (each slot a fixed run of sites), or balanced (each round, rank 0 deals the sampled sites to the slots by estimated work, samples x local steps, longest first: with cohort sampling a slot no longer waits on its own unlucky draw); balanced needs sites of one rank count, a mean-based strategy and no private entries")


@dataclass(frozen=True)
class ClusterConfig:
    nodes: int = _f(1, help="nodes of the SLURM job", min=1)
    sockets_per_node: Optional[int] = _f(None, help="CPU sockets per node; when the config sets none of the three node-shape keys, render/submit read them from SLURM (`scontrol show node`); a key left out is otherwise 2", min=1)
    cores_per_socket: Optional[int] = _f(None, help="cores per socket; left out: from SLURM as for sockets_per_node, else 16", min=1)
    gpus_per_node: Optional[int] = _f(None, help="GPUs per node (0 = CPU nodes: one rank per socket, or per cores_per_rank); left out: from SLURM as for sockets_per_node, else 0", min=0)
    cores_per_rank: int = _f(0, help="cores per site rank (0 = a socket on CPU nodes, a GPU's share on GPU nodes)", min=0)
    ranks_per_gpu: int = _f(1, help="site ranks that share one GPU (e.g. 4 to run a 2-site x 2-rank federation on one GPU); sites whose ranks share a GPU use Gloo, not NCCL (site.backend: torch; Horovod refuses them)", min=1)
    aggregator_cores: int = _f(1, help="cores reserved for rank 0 on the first node (0 = not pinned: it mostly sleeps)", min=0)
    aggregator_own_node: bool = _f(False, help="give rank 0 a node of its own (the sites start on the second)")
    oversubscribe: bool = _f(False, help="more ranks than slots: ranks share slots round-robin (#SBATCH --overcommit); for small test clusters")
    partition: str = _f("", help="SLURM partition (#SBATCH --partition)")
    account: str = _f("", help="SLURM account (#SBATCH --account)")
    qos: str = _f("", help="SLURM QOS (#SBATCH --qos)")
    time_limit: str = _f("01:00:00", help="wall-clock limit (#SBATCH --time)")
    mem_per_node: str = _f("", help="memory per node, e.g. 120G (#SBATCH --mem); empty = the partition's default")
    launcher: Literal["srun", "mpirun", "horovodrun"] = _f("srun", help="how the job starts its ranks")
    srun_mpi: str = _f("pmix", help="srun --mpi plugin (`srun --mpi=list` shows what the cluster offers: pmix, pmi2)")
    modules: Tuple[str, ...] = _f((), help="`module load` lines run before the launch, e.g. [openmpi/4.1, cuda/12.2]")
    setup: Tuple[str, ...] = _f((), help="shell lines run before the launch, e.g. [source /path/to/venv/bin/activate]")
    python: str = _f("python", help="the interpreter that has hpcfl installed, on the compute nodes")
    container: str = _f("", help="Singularity/Apptainer image: every rank runs inside it")
    binds: Tuple[str, ...] = _f((), help="extra container bind mounts (host[:container])")
    requeue: bool = _f(True, help="#SBATCH --requeue: a preempted job restarts and resumes after its last complete round")
    signal_s: int = _f(300, help="seconds before the time limit SLURM warns the job (#SBATCH --signal=B:USR1@N): the federation checkpoints after the round in progress and requeues; 0 = no warning", min=0)


@dataclass(frozen=True)
class FailureInjection:
    rank: int = _f(help="world rank that fails", min=0)
    round: int = _f(help="round in which it fails (at its start)", min=1)
    mode: Literal["raise", "kill", "stop", "oom"] = _f("raise", help="raise an exception, SIGKILL the process, SIGSTOP it (a hung rank), or allocate memory_mb (a leak: killed where a memory limit is lower)")
    memory_mb: int = _f(4096, help="mode oom: MiB the rank allocates, 64 at a time, to exceed its memory limit (it fails with an error if that is not enough)", min=1)


@dataclass(frozen=True)
class RoundHold:
    round: int = _f(help="the round at whose start rank 0 waits (its previous round is checkpointed by then)", min=1)
    file: str = _f(help="rank 0 waits while this file exists; delete it to let the run go on")


@dataclass(frozen=True)
class DebugConfig:
    inject_failure: Optional[FailureInjection] = _f(None, help="make one rank fail on purpose (tests the job's failure handling)")
    hold: Optional[RoundHold] = _f(None, help="hold the run at the start of a round while a file exists: observe a live run at a known round (tests of stop, status, requeue) however fast the machine")
    save_local_weights: bool = _f(False, help="every site rank saves its locally trained weights each round to debug/ (for checking replicas and aggregation)")


@dataclass(frozen=True)
class FaultConfig:
    hang_timeout_s: Optional[float] = _f(None, help="a rank that makes no progress this long ends the job, naming it (null = automatic: hang_floor_s through start-up and the first round, then five times the slowest later round, at least hang_min_s)", gt=0.0)
    hang_floor_s: float = _f(300.0, help="the smallest automatic hang timeout, in seconds, through start-up, the first round and the final cross-site evaluation", gt=0.0)
    hang_min_s: float = _f(60.0, help="once a round after the first has been measured, the automatic hang timeout is five times the slowest such round, at least this many seconds", gt=0.0)
    nonfinite_update: Literal["fail", "skip_site"] = _f("fail", help="a site whose update holds NaN or inf: end the job naming it, or leave it out of that round's aggregate (recorded)")


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = _f("", help="MLflow tracking URI; empty = a local file store in <run.root>/mlruns")
    experiment: str = _f("hpcfl", help="MLflow experiment the run is logged under")


@dataclass(frozen=True)
class ObserveConfig:
    tensorboard: bool = _f(True, help="rank 0 writes TensorBoard event files to runs/<name>/tb/ (every numeric metric, per site)")
    mlflow: Optional[MlflowConfig] = _f(None, help="also log every metric to MLflow (needs mlflow-skinny); null = off")


@dataclass(frozen=True)
class Config:
    sites: Tuple[SiteConfig, ...] = _f(help="the simulated institutions, in rank order (list, or {count, ranks})")
    task: str = _f("classify", help="what is trained: classify (supervised), dino (self-supervised DINO pretraining), segment (MONAI segmentation, Dice), mil (attention MIL on slide labels over tile features), or package.module:Class (a hpcfl.tasks.Task)")
    task_args: Dict[str, Any] = _f({}, help="keyword settings for a user task (package.module:Class), read by the task as cfg.task_args")
    run: RunConfig = _f(RunConfig(), help="run identity")
    fl: FLConfig = _f(FLConfig(), help="federation")
    data: DataConfig = _f(DataConfig(), help="data")
    model: ModelConfig = _f(ModelConfig(), help="model")
    train: TrainConfig = _f(TrainConfig(), help="local training")
    site: SiteBackendConfig = _f(SiteBackendConfig(), help="how the ranks of a site train together")
    privacy: PrivacyConfig = _f(PrivacyConfig(), help="privacy filters around any strategy")
    eval: EvalConfig = _f(EvalConfig(), help="evaluation")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), help="checkpoints")
    launch: LaunchConfig = _f(LaunchConfig(), help="launcher")
    cluster: ClusterConfig = _f(ClusterConfig(), help="the SLURM cluster the job runs on")
    fault: FaultConfig = _f(FaultConfig(), help="hung ranks and diverging sites")
    debug: DebugConfig = _f(DebugConfig(), help="fault injection")
    dino: DinoConfig = _f(DinoConfig(), help="task dino: self-supervised DINO pretraining (hpcfl/tasks/dino)")
    segment: SegmentConfig = _f(SegmentConfig(), help="task segment: MONAI segmentation of tiles or volumes (hpcfl/tasks/segment)")
    mil: MilConfig = _f(MilConfig(), help="task mil: gated attention MIL on slide labels (hpcfl/tasks/mil.py)")
    pipeline: Optional[PipelineConfig] = _f(None, help="stages `hpcfl launch` runs before this config's federation (configs/pathology.yaml)")
    observe: ObserveConfig = _f(ObserveConfig(), help="TensorBoard and MLflow logging of the metrics")

    @property
    def world_size(self) -> int:
        return 1 + sitelist.total_ranks(self.sites)

    def site_local(self, site: SiteConfig) -> Tuple[Optional[int], Optional[int]]:
        """(epochs, steps) a site trains per round; exactly one is not None."""
        steps = site.overrides.local_steps
        epochs = site.overrides.local_epochs
        if steps is None and epochs is None:
            steps, epochs = self.fl.local_steps, self.fl.local_epochs
        if steps is None:
            return (epochs or 1), None
        return None, steps
