"""Record, config and metric key strings shared by the ServerApp and the ClientApp."""

# Flower run config (pyproject [tool.flwr.app.config]) and node config
RUN_CONFIG = "fedmm-config"        # JSON of a validated common.config.Config
PARTITION_ID = "partition-id"      # simulation: set by Flower's simulation engine
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"            # deployment: the site's own training manifest
DEVICE = "device"                  # deployment: cpu / cuda / auto
SITE_NAME = "site-name"            # deployment: seeds this site's shuffling and dropout

# Records inside a Message
ARRAYS = "arrays"                  # Flower's default ArrayRecord key: the adapter_state
CONFIG = "config"                  # Flower's default ConfigRecord key
METRICS = "metrics"

# Round config (server -> client)
SERVER_ROUND = "server-round"      # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"        # set by Flower's FedProx
ABSENT_CLASS_SCALE = "absent-class-scale"  # FedRS restricted softmax
MODALITY_DROPOUT_TEXT = "modality-dropout-text"
MODALITY_DROPOUT_IMAGE = "modality-dropout-image"
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
WEIGHT_DECAY = "weight-decay"
MAX_GRAD_NORM = "max-grad-norm"
LABEL_NAMES = "label-names"        # the global label set, in class-index order
TRAIN_MANIFEST = "train-manifest"  # simulation: the manifest that partitions are cut from

# Metrics (client -> server)
NUM_EXAMPLES = "num-examples"      # Flower's default weighting key
NUM_IMAGE_EXAMPLES = "num-image-examples"  # training rows with an image (weights the vision tower)
NUM_TEXT_EXAMPLES = "num-text-examples"    # training rows with text (weights the text tower)
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
BASE_RESIDUALS = "base-residuals"  # exact LoRA aggregation: residual folded into base weights
FREEZE_LORA_A = "freeze-lora-a"    # ffa LoRA aggregation: sites keep A frozen, upload the rest
ATTACK = "attack"                  # simulation only: none / scale / signflip
ATTACK_FRACTION = "attack-fraction"
ATTACK_SCALE = "attack-scale"
LORA_RANK = "lora-rank"            # deployment node config: this site's LoRA rank

# Privacy (common/privacy.py, server/privacy.py, client/privacy.py)
ARRAY_KEYS = "array-keys"          # SecAgg+: adapter key order of the unnamed legacy Parameters
SITE_EPSILON = "site-epsilon"      # local DP-SGD: this site's cumulative ε (train metrics)
LOCAL_DP_NOISE = "local-dp-noise"  # local DP-SGD: this site's noise multiplier (train metrics)
EPSILON = "epsilon"                # metrics.jsonl / summary.json: cumulative ε at `delta`
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
SECAGG_ERROR_BOUND = "secagg_error_bound"  # metrics.jsonl: per-coordinate bound vs plaintext
