"""Record, config and metric key strings shared by the ServerApp and the ClientApp."""

# Flower run config (pyproject [tool.flwr.app.config]) and node config
RUN_CONFIG = "fedmm-config"        # JSON of a validated common.config.Config
PARTITION_ID = "partition-id"      # simulation: set by Flower's simulation engine
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"            # deployment: the site's own training manifest
DEVICE = "device"                  # deployment: cpu / cuda / auto
SITE_NAME = "site-name"            # deployment: seeds this site's shuffling and dropout
LORA_RANK = "lora-rank"            # deployment: this site's LoRA rank
TRAINER_SOCKET = "trainer-socket"  # deployment: this site's warm trainer (client/warm.py)
PERSONAL_DIR = "personal-dir"      # deployment: where the site keeps its personal adapters

# Records inside a Message
ARRAYS = "arrays"                  # Flower's default ArrayRecord key: the adapter_state
CONFIG = "config"                  # Flower's default ConfigRecord key
METRICS = "metrics"
BASE_RESIDUALS = "base-residuals"  # exact LoRA aggregation: residual folded into base weights

# Round config (server -> client): only what changes per round; the rest is the run config
SERVER_ROUND = "server-round"      # set by Flower's strategies

# Metrics (client -> server)
NUM_EXAMPLES = "num-examples"      # Flower's default weighting key
NUM_IMAGE_EXAMPLES = "num-image-examples"  # training rows with an image (weights the vision tower)
NUM_TEXT_EXAMPLES = "num-text-examples"    # training rows with text (weights the text tower)
NUM_AUDIO_EXAMPLES = "num-audio-examples"  # training rows with audio (weights the audio tower)
NUM_MODALITY_EXAMPLES = {"image": NUM_IMAGE_EXAMPLES, "text": NUM_TEXT_EXAMPLES,
                         "audio": NUM_AUDIO_EXAMPLES}
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"    # wall seconds of the site's local training this round
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
EVAL_MACRO_F1 = "eval-macro-f1"
SITE = "site"                      # evaluate reply: ConfigRecord naming the site (SITE_NAME)
PERSONAL_ACCURACY = "personal-accuracy"  # final evaluate reply: the site's personal model
PERSONAL_MACRO_F1 = "personal-macro-f1"
SITE_STARTUP = "site-startup-s"    # seconds from the message's process start to the first step

# Privacy (common/privacy.py, server/privacy.py, client/privacy.py)
ARRAY_KEYS = "array-keys"          # SecAgg+: adapter key order of the unnamed legacy Parameters
SITE_EPSILON = "site-epsilon"      # local DP-SGD: this site's cumulative ε (train metrics)
LOCAL_DP_NOISE = "local-dp-noise"  # local DP-SGD: this site's noise multiplier (train metrics)
EPSILON = "epsilon"                # metrics.jsonl / summary.json: cumulative ε at `delta`
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
SECAGG_ERROR_BOUND = "secagg_error_bound"  # metrics.jsonl: per-coordinate bound vs plaintext
