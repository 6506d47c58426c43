"""The recipe: one typed schema that the local runner, the rendered Jobs, the chart's values schema and the
in-pod entrypoint all read. Declare a setting here once; everything else derives from it.

Unknown keys are errors, and every problem in a recipe is reported at once with its field path
(``finetune.lora.r: Input should be greater than 0``). Overrides use ``a.b.c=value`` (value parsed as YAML).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from os.path import isabs, normpath
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, JsonValue, ValidationError, create_model,
                      field_validator, model_validator)

from kubetune import registry
from kubetune.distributed import split_global_batch
from kubetune.errors import RecipeError

# The original notebook's template; the only change is that context and question are joined with ". ".
DEFAULT_PROMPT_TEMPLATE = (
    "# Instruction:\nUse the context below to produce the result\n# context:\n{context}. {question}\n# result:\n"
)
PROMPT_PLACEHOLDERS = ("context", "question")

# The stages come from the registry (kubetune.registry), read once here: the recipe's `stages`, `resources` and
# `infer.models` fields are built from it.
STAGE_NAMES = registry.recipe_stages()
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]
# On Kubernetes a CPU-only stage first brings the recipe's hub model and data set onto the claim, so that the
# GPU stages never wait on the network (docs/kubernetes.md). It is not a recipe stage: the pipeline gets it
# when the recipe names something on the hub (kubetune.sources.pod_stages), and `kubetune run` reads the hub directly.
FETCH_STAGE = "fetch"
POD_STAGES = registry.pod_stages()
# Recipe stages that load their model onto one device (no `multi_process` in the registry): more than one GPU is
# refused (docs/kubernetes.md).
SINGLE_GPU_STAGES = registry.single_gpu_stages()
# Which stage produces each model that infer/evaluate can use ("base" is the recipe's model itself).
MODEL_PRODUCERS: dict[str, str | None] = registry.model_producers()
ModelName = Literal[tuple(MODEL_PRODUCERS)]  # type: ignore[valid-type]


# What the Kubernetes API server accepts in the fields that recipe strings become (apimachinery's validation):
# a recipe that validates must also be accepted by the cluster, not refused at submit or, worse, by the driver.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"  # namespaces
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # Secrets, claims
QUALIFIED_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"  # label keys, resources
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[kMGTPE]|[KMGTPE]i|m)?$"  # cpu, memory, sizes (no sign)
INT32_MAX = 2**31 - 1  # backoffLimit, ttlSecondsAfterFinished
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds

# (RE2-compatible, no look-around: the chart's values schema checks the same patterns in Helm)
DnsSubdomain = Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]
QualifiedName = Annotated[str, Field(pattern=QUALIFIED_NAME, max_length=317)]
LabelKey = QualifiedName
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE)]
Quantity = Annotated[str, Field(pattern=QUANTITY, max_length=64)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


# What a YAML file can hold (PyYAML's reader; YAML 1.1 printable characters). A string with anything else came from
# an escape ("\\x9a", "\\ud800" in double quotes) and would make the recipe that the pods read (the ConfigMap's
# text) unreadable there, or (a lone surrogate) not even writable as UTF-8.
_NOT_IN_YAML = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _unwritable(value: Any) -> str | None:
    """The first character in ``value`` (a string, or strings nested in lists and mappings) that YAML cannot hold."""
    if isinstance(value, str):
        found = _NOT_IN_YAML.search(value)
        return found.group() if found else None
    if isinstance(value, dict):
        return next((c for k, v in value.items() if (c := _unwritable(k) or _unwritable(v))), None)
    if isinstance(value, (list, tuple)):
        return next((c for v in value if (c := _unwritable(v))), None)
    return None


class Section(BaseModel):
    # Field docstrings become descriptions: in the JSON schema, the chart's values.schema.json and the docs.
    # allow_inf_nan=False: YAML's .inf and .nan are floats to pydantic, and no setting can use them.
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)
    # Fields that decide nothing in a stage's output (how weights may load, what is watched): left out of every
    # fingerprint, so that adding one to a finished run's recipe reruns nothing
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset()

    def fingerprinted(self) -> dict[str, Any]:
        """The section's settings as a fingerprint hashes them (``not_in_fingerprint`` left out)."""
        return self.model_dump(exclude=set(self.not_in_fingerprint) or None)

    @field_validator("*")  # after: the innermost field names itself
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        char = _unwritable(value)
        if char is not None:
            what = "a lone UTF-16 surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
            raise ValueError(f"contains {what} (U+{ord(char):04X}), which a recipe file cannot hold")
        return value


class RunSection(Section):
    # DNS-1035 label: a Service's name (the UI's) must start with a letter, not a digit.
    name: Annotated[str, Field(pattern=r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")] = "demo"
    """Run name: a DNS-1035 label (starts with a lower-case letter; then lower case, digits, '-'; at most 40
    characters) used in paths and Kubernetes object names."""
    artifacts_root: str = Field("artifacts", min_length=1)
    """Folder (on the shared PVC in a cluster) under which ``<run>/<stage>/`` artifacts are written. A relative
    path is below the working directory (in a pod: the claim's mount_path), so it may not climb out with '..'."""

    @field_validator("artifacts_root")
    @classmethod
    def _stays_below_working_dir(cls, root: str) -> str:
        if "\x00" in root:
            raise ValueError("contains a NUL character")
        if not isabs(root) and normpath(root).split("/")[0] == "..":
            raise ValueError(f"{root} climbs out of the working directory (in a pod: out of the claim, where "
                             "artifacts would vanish with the pod); use a path below it, or an absolute path")
        return root


class ModelSection(Section):
    not_in_fingerprint = frozenset({"allow_pickle"})  # how weights may load, not what they are
    name_or_path: str = Field(min_length=1)
    """Hub id (``bigscience/bloom-1b1``) or local folder of the base model."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); pin a commit for reproducible runs."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Load dtype of unquantized weights; auto = bfloat16 on GPUs that have it, else float32."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model. Off unless you trust the model's authors."""
    allow_pickle: bool = False
    """Load weights stored as pickles (pytorch_model.bin) when the model has no safetensors. Off: a pickle can run
    code when it is loaded; convert the model to safetensors instead if you can."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside name_or_path (loaded dequantized; see ``kubetune import-gguf``)."""


class ColumnMap(Section):
    context: str = "context"
    """Source column holding the schema (CREATE TABLE statements) the question is asked against."""
    question: str = "question"
    """Source column holding the natural-language question."""
    answer: str = "answer"
    """Source column holding the reference SQL: the training target, and what evaluate compares results with."""


class DataSection(Section):
    source: str = "builtin:text2sql"
    """``builtin:text2sql``, a local .json/.jsonl/.csv/.parquet file or folder, or a hub data set id."""
    split: str = "train"
    """Split of a hub data set or folder to read."""
    columns: ColumnMap = ColumnMap()
    """Which source columns hold context, question and answer (renamed to those on load)."""
    builtin_examples: Annotated[int, Field(ge=10, le=1_000_000)] = 2000
    """Number of examples the builtin generator makes (ignored for other sources)."""
    eval_size: Annotated[float, Field(gt=0)] = 0.1
    """Held-out evaluation examples: a fraction if < 1, else a count."""
    train_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Fraction of the remaining examples used for training (the original used 0.1)."""
    max_eval_examples: Annotated[int, Field(ge=1)] | None = None
    """Cap on evaluation examples used by infer/evaluate (generation is the slow part)."""
    seed: Seed = 42
    """Seed of the shuffle that splits train from eval, and of the builtin generator: the same seed gives
    the same rows."""


class PromptSection(Section):
    template: str = DEFAULT_PROMPT_TEMPLATE
    """Prompt with ``{context}`` and ``{question}``; the answer follows it, then the end-of-sequence token."""
    allow_mismatch: bool = False
    """Let a stage use a model trained with another template (normally refused)."""

    @field_validator("template")
    @classmethod
    def _placeholders(cls, template: str) -> str:
        import string

        try:
            parsed = [(f, spec, conversion) for _, f, spec, conversion in string.Formatter().parse(template)
                      if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
        fields = {f for f, _, _ in parsed}
        # {question:d} or {question!r} would fail (or change the text) when a row is formatted, after the model loaded
        decorated = sorted({"{" + f + (f"!{c}" if c else "") + (f":{s}" if s else "") + "}"
                            for f, s, c in parsed if s or c})
        if decorated:
            raise ValueError(f"placeholder(s) {', '.join(decorated)} carry a format spec or conversion; write plain "
                             "{context} and {question}")
        unknown = fields - set(PROMPT_PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {{context}} and {{question}}")
        if "question" not in fields:
            raise ValueError("must contain {question}")
        return template


class LoraSection(Section):
    r: Annotated[int, Field(ge=1, le=1024)] = 16  # higher: more capacity, more memory
    """Rank of the LoRA update matrices: higher adds capacity and adapter size (linear in r); 16 suits
    one task on a ≥1B model."""
    alpha: Annotated[float, Field(gt=0)] = 32
    """Scale of the update (applied as alpha / r); 2 × r is the common choice and needs no new learning rate
    when r changes."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Dropout on the LoRA input during training (0 to <1); a little regularizes small data sets."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]), or all-linear: every linear layer but the output
    head, more capacity for some more memory. A name the model lacks is refused before training."""


class BitsAndBytesSection(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (normal float, fits normally distributed weights; QLoRA's choice) or fp4 (bitsandbytes
    only: torchao has NF4 alone)."""
    double_quant: bool = True
    """Quantize the quantization constants too: about 0.4 bits/parameter saved."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype the 4-bit weights are dequantized to for each matmul; auto = the model's load dtype
    (model.dtype)."""


class FinetuneSection(Section):
    not_in_fingerprint = frozenset({"profile_step"})  # profiling a step decides nothing
    lora: LoraSection = LoraSection()
    """Shape of the LoRA adapter that is trained (the base stays frozen)."""
    base_precision: Literal["none", "8bit", "4bit"] = "none"
    """Load the frozen base in 8 or 4 bits (QLoRA), quantized by base_quantizer; none = the model dtype."""
    base_quantizer: Literal["bitsandbytes", "torchao"] = "bitsandbytes"
    """Library that quantizes the frozen base when base_precision is 4bit or 8bit. bitsandbytes: its Linear4bit
    (bnb settings apply) and LLM.int8 layers, kernels that torch.compile cannot see into. torchao: 4bit is its
    NF4Tensor, the QLoRA data type as torchtune's QLoRA uses it (a scale per block of 64 weights, the scales
    quantized in blocks of 256), 8bit its int8 weight-only tensor (one scale per output row); both are tensors
    torch.compile traces, so with finetune.compile the dequantize fuses into the compiled step. Which is faster
    depends on the architecture: bench/packed.py measures both."""
    bnb: BitsAndBytesSection = BitsAndBytesSection()
    """bitsandbytes settings of the 4-bit base (base_precision: 4bit, base_quantizer: bitsandbytes; torchao
    always quantizes its scales and dequantizes to the activations' dtype, and refuses fp4)."""
    epochs: Annotated[float, Field(gt=0)] = 1.0
    """Passes over the training split (fractions allowed, 0.5 = half); ignored when max_steps is set."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (overrides epochs); the schedule is planned for them."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Sequences per device per forward/backward. Activation memory grows linearly with it; the
    effective batch per optimizer step is batch_size × grad_accum (× GPUs)."""
    grad_accum: Annotated[int, Field(ge=1)] = 1
    """Forward/backward passes summed before each optimizer step: a large effective batch without the
    memory of a large batch_size, at the same tokens/s."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4
    """Peak learning rate of the adapter (AdamW); 2e-4 is usual for LoRA, lower it for large r or
    full-size batches."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """How the learning rate falls after warm-up (transformers' scheduler names)."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    """Share of the planned optimizer steps over which the learning rate rises from 0 to its peak."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW decoupled weight decay on the adapter weights; 0 = none (LoRA rarely needs it)."""
    max_length: Annotated[int, Field(ge=16)] = 512
    """Tokens per sequence (prompt + answer); longer rows are truncated."""
    packing: bool = False
    """Pack several examples into each max_length sequence (TRL's best-fit packing), each example attending only to
    itself: fewer, fuller sequences when rows are short. BLOOM (ALiBi) packs through FlexAttention with a block
    mask per example; other models whose attention mask ignores position_ids are refused."""
    compile: bool = False
    """torch.compile the model's forward and backward. Needs packing: every micro-batch is then batch_size rows
    × max_length tokens, one shape, so it compiles once (the report's compile.frames_after_warmup says 0); the
    first step pays the compile (tens of seconds to minutes), later ones fuse LoRA's elementwise work."""
    liger_kernels: bool = False
    """Run the model's RMSNorm, rotary embedding and gated MLP through Liger's fused Triton kernels (liger-kernel:
    a CUDA GPU, Gemma 3 and Llama-likes; BLOOM, Falcon and CodeGen have none). The LM head and loss stay TRL's
    chunked ones, which never hold the whole logits. Under compile, inductor fuses much of the same work itself:
    bench/packed.py measures both before a recipe turns this on."""
    profile_step: Annotated[int, Field(ge=1)] | None = None
    """Run this optimizer step (counted from 1) under torch.profiler: the report's profile says where its time went
    (wall and GPU-busy milliseconds, kernel launches, the costliest kernels) and the whole trace is saved next to the
    adapter as profile-step-N.json.gz. Pick a step after the first (which compiles, under compile); that step
    runs a little slower. null = no profile. Not in the fine-tune's fingerprint: adding it to a finished run's
    recipe reruns nothing (profile under a new run.name)."""
    completion_only_loss: bool = True
    """Learn only the answer tokens, not the prompt."""
    group_by_length: bool = False
    """Batch rows of similar length together (random groups of 50 batches, sorted inside): less padding per batch
    when lengths vary, at the cost of batches that are less mixed. The alternative to packing for models whose
    attention cannot keep packed examples apart."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: much less memory, about 30% slower."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 on GPUs that support it, else fp32."""
    save_steps: Annotated[int, Field(ge=1)] = 100
    """Checkpoint every N steps; a restarted fine-tune resumes from the latest complete one."""
    save_total_limit: Annotated[int, Field(ge=1)] = 2
    """Checkpoints kept on the claim (older ones are deleted); each holds the adapter and optimizer
    state, so more cost disk, not memory."""
    eval_steps: Annotated[int, Field(ge=1)] | None = None
    """Compute the loss on the evaluation split every N optimizer steps; null = never (each evaluation
    costs a pass over that split)."""
    logging_steps: Annotated[int, Field(ge=1)] = 10
    """Log loss and learning rate every N optimizer steps."""
    seed: Seed = 42
    """Seed of the adapter's initialization, the data order and dropout."""

    def quantizer_problems(self) -> list[str]:
        """torchao quantizes a 4/8-bit base, and has NF4 but no fp4. A base_quantizer with nothing to quantize is
        refused rather than ignored: a recipe that names torchao most likely meant a quantized base."""
        if self.base_quantizer != "torchao":
            return []
        problems = []
        if self.base_precision == "none":
            problems.append("finetune.base_quantizer: torchao quantizes a 4bit or 8bit base, and "
                            "finetune.base_precision is none; set base_precision: 4bit or 8bit, or leave "
                            "base_quantizer at bitsandbytes")
        if self.bnb.quant_type == "fp4":
            problems.append("finetune.bnb.quant_type: fp4 is a bitsandbytes data type; torchao "
                            "(finetune.base_quantizer) has NF4 only: use nf4")
        return problems


class VerifySection(Section):
    enabled: bool = True
    """Compare merged vs adapter-on-base logits. On, the merge is computed in float32 (twice the memory of
    bf16); off, in merge.dtype."""
    prompts: Annotated[int, Field(ge=1)] = 4
    """How many training prompts to compare merged vs adapter-on-base logits on."""
    tolerance: Annotated[float, Field(gt=0)] = 0.05
    """Largest allowed absolute logit difference, computed in float32 (a correct merge gives ~1e-4; in bf16 the
    forward's own rounding gives ~0.7–1.2 on Gemma 3 270M, which would hide real errors)."""


class MergeSection(Section):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the merged model is saved in; never 4/8-bit (merging into quantized weights loses the update)."""
    max_shard_size: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,6}[KkMmGg]([Ii]?[Bb])$")] = "2GB"
    """Largest safetensors file of the merged model, as transformers reads it: 500MB, 2GB, 4GiB."""
    verify: VerifySection = VerifySection()
    """Check the merged model against the adapter on its base before it is written."""


class CalibrationSection(Section):
    source: Literal["train", "eval"] = "train"
    """Calibrate on the recipe's own training prompts (not c4): the model is quantized for the task it does."""
    samples: Annotated[int, Field(ge=1)] = 128
    """Calibration prompts GPTQ sees: more give a steadier Hessian estimate and take longer (time and
    activation memory grow linearly); 128 is GPTQ's usual number."""
    max_length: Annotated[int, Field(ge=8)] = 512
    """Tokens per calibration sample; longer ones are truncated."""


class QuantizeSection(Section):
    method: Literal["gptq"] = "gptq"
    """Quantization algorithm; GPTQ (through GPTQModel) is the only one so far."""
    bits: Literal[4, 8] = 8
    """Bits per weight: 8 keeps accuracy within a point or so; 4 halves the size again and usually costs
    more accuracy."""
    group_size: Annotated[int, Field(ge=-1)] = 128
    """Columns sharing one scale; -1 = one per row. Must divide the layers' input size."""
    desc_act: bool = False
    """Quantize columns in order of activation size: slightly better accuracy, slower kernels."""
    sym: bool = True
    """Symmetric quantization (zero point fixed at the middle): what most fast kernels (marlin, exllama)
    need; asymmetric fits skewed weights slightly better."""
    damp_percent: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Share of the Hessian's mean diagonal added to it before it is inverted (0 to 1): higher is more
    stable, lower fits the calibration data more closely."""
    calibration: CalibrationSection = CalibrationSection()
    """The prompts that GPTQ measures activations on."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Calibration samples per forward pass while quantizing: faster, with activation memory that grows
    linearly with it."""
    backend: Literal["auto", "torch", "triton", "exllama_v2", "marlin"] = "auto"
    """Kernel used when the quantized model is loaded (auto = torch on CPU, triton on GPU: no JIT download)."""

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (per row) or a positive divisor of the hidden size")
        return v


class InferSection(Section):
    models: list[ModelName] = ["base", "adapter", "merged", "quantized"]
    """Which models generate answers for the evaluation split (each needs its stage to have run)."""
    prompts: list[str] = []
    """Extra free-form prompts (already in template form) to answer, besides the evaluation split."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 128
    """Longest generated answer in tokens; an answer cut off here is usually invalid SQL."""
    greedy: bool = True
    """Take the most likely token at each step (deterministic, what evaluation compares); false samples
    with temperature."""
    temperature: Annotated[float, Field(gt=0)] = 0.7
    """Used only when greedy is false."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Prompts generated together: higher is faster until the GPU is full; the KV cache grows linearly
    with it."""


@dataclass(frozen=True)
class GateRule:
    """What a gate compares. Its limit is in points of execution accuracy (percent for ``min_accuracy``)."""

    kind: Literal["max_drop", "min_gain", "min_accuracy"]
    model: str
    references: tuple[str, ...] = ()
    """max_drop, min_gain: the model it is compared with, the first of these that was inferred."""


# Gates a recipe can set, on the held-out split (evaluate.gates) or on a named set (evaluate.sets.<name>.gates);
# kubetune.stages.evaluate computes each of them, and its docstring says what they measure.
GATES: dict[str, GateRule] = {
    "quantized_max_drop": GateRule("max_drop", "quantized", ("merged", "adapter")),
    "merged_vs_adapter_max_drop": GateRule("max_drop", "merged", ("adapter",)),
    "adapter_min_gain_over_base": GateRule("min_gain", "adapter", ("base",)),
    **{f"{m}_min_execution_accuracy": GateRule("min_accuracy", m) for m in MODEL_PRODUCERS},
}


def known_gates() -> list[str]:
    return list(GATES)


def _check_gates(gates: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(gates) - set(GATES))
    if unknown:
        raise ValueError(f"unknown gate(s) {', '.join(unknown)}; known gates: {', '.join(GATES)}")
    for name, limit in gates.items():
        if GATES[name].kind == "min_accuracy" and not 0 <= limit <= 100:
            raise ValueError(f"{name}: {limit} is not a percentage between 0 and 100")
    return gates


# The names are in the JSON schema too, so Helm refuses a misspelt gate through the chart's values schema.
Gates = Annotated[dict[str, float], AfterValidator(_check_gates),
                  Field(json_schema_extra={"propertyNames": {"enum": list(GATES)}})]
HELDOUT_SET = "heldout"  # the default evaluation set: the seeded held-out split of data.source
SetName = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,38}[a-z0-9])?$")]


class EvalSetSection(Section):
    """A named test set that infer and evaluate score besides the held-out split. Its settings are outside the
    fine-tune, merge and quantize fingerprints: adding one to a finished run infers and evaluates only it."""

    source: str = Field(min_length=1)
    """``builtin:text2sql``, a local .json/.jsonl/.csv/.parquet file or folder, or a hub data set id. Every row is
    a test row (no split)."""
    split: str = "train"
    """Split of a hub data set or folder to read (a single file has only ``train``)."""
    columns: ColumnMap = ColumnMap()
    """Which source columns hold context, question and answer."""
    max_examples: Annotated[int, Field(ge=1)] | None = None
    """Use the first N rows (in the source's order) only; generation is the slow part."""
    builtin_examples: Annotated[int, Field(ge=10, le=1_000_000)] = 200
    """Rows the builtin generator makes (builtin sources only)."""
    seed: int = 1234
    """Seed of the builtin generator; it must differ from data.seed, else the set is the training data."""
    gates: Gates = {}
    """Gates on this set's scores, as evaluate.gates (e.g. merged_min_execution_accuracy: 75)."""

    def as_data(self) -> "DataSection":
        """The set as a data section, for :func:`kubetune.data.load_examples`."""
        return DataSection(source=self.source, split=self.split, columns=self.columns,
                           builtin_examples=self.builtin_examples, seed=self.seed)


class EvaluateSection(Section):
    not_in_fingerprint = frozenset({"sets"})  # each evaluation set has its own fingerprint
    timeout_s: Annotated[float, Field(gt=0)] = 2.0
    """Wall-clock limit for one SQL query in SQLite."""
    gates: Gates = {}
    """Named limits that fail the pipeline, e.g. quantized_max_drop: 2.0 (points of execution accuracy)."""
    databases: Annotated[int, Field(ge=1, le=50)] = 3
    """Test-suite databases each query runs on: more catch more wrong queries, and take longer."""

    sets: dict[SetName, EvalSetSection] = {}
    """Named test sets scored besides the held-out split (which is the set ``heldout``), each with its own
    source, column map, size cap and gates: ``{spider-dev: {source: dev.jsonl, max_examples: 500}}``."""

    @field_validator("sets")
    @classmethod
    def _set_names(cls, sets: dict[str, EvalSetSection]) -> dict[str, EvalSetSection]:
        if HELDOUT_SET in sets:
            raise ValueError(f"'{HELDOUT_SET}' is the held-out split of data.source; give the set another name")
        return sets


class Resources(Section):
    gpus: Annotated[int, Field(ge=0, le=16)] = 1
    """GPUs the stage's pod requests (as kubernetes.gpu_resource); 0 = a CPU pod."""
    gpu_type: Annotated[LabelValue, Field(min_length=1)] | None = None
    """Node label value of ``nvidia.com/gpu.product`` to schedule on, e.g. NVIDIA-H100-80GB-HBM3."""
    cpu: Quantity = "4"
    """CPU request (Kubernetes quantity: 4, 500m); no limit is set, so a data loader is never throttled."""
    memory: Quantity = "32Gi"
    """Host memory request and limit (Kubernetes quantity: 32Gi); over it the pod is OOM-killed and retried."""


class FinetuneResources(Resources):
    """The fine-tune's pods: one process per GPU (torchrun), on ``nodes`` pods (docs/kubernetes.md)."""

    nodes: Annotated[int, Field(ge=1, le=64)] = 1
    """Pods of the fine-tune, each with ``gpus`` GPUs; more than 1 renders a TrainJob or PyTorchJob (see
    ``multi_node``) and needs a ReadWriteMany claim."""
    parallelism: Literal["auto", "ddp", "fsdp"] = "auto"
    """ddp: a whole copy of the model per GPU (fastest where it fits one GPU); fsdp: weights, gradients and
    optimizer state sharded across the GPUs (FSDP2; for models that do not fit one, not with a 4/8-bit base);
    auto: fsdp where the estimator says a DDP fine-tune does not fit one of the pod's GPUs (16-bit base), else ddp."""
    multi_node: Literal["trainjob", "pytorchjob"] = "trainjob"
    """With nodes > 1: a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org) or a Training Operator v1 PyTorchJob
    (kubeflow.org), whichever the cluster has installed."""
    training_runtime: DnsSubdomain = "torch-distributed"
    """The ClusterTrainingRuntime a TrainJob runs on (Kubeflow Trainer installs torch-distributed)."""

    @property
    def processes(self) -> int:
        """Training processes in all: one per GPU (one on a CPU-only pod), on every node."""
        return max(self.gpus, 1) * self.nodes


def _resources_model(spec: registry.StageSpec) -> type[Resources]:
    """The class of ``resources.<stage>``: the spec's ``resources_model`` (a Resources subclass), else Resources."""
    return registry.resolve(spec.resources_model) if spec.resources_model else Resources


# resources.<stage> for every stage of the registry, with the stage's defaults and its own model where it has one
ResourcesSection = create_model(
    "ResourcesSection", __base__=Section, __module__=__name__,
    **{spec.name: (model, Field(model(**spec.resources), description=spec.resources_note))
       for spec in registry.specs() for model in [_resources_model(spec)]})


class PvcSection(Section):
    claim_name: DnsSubdomain | None = None
    """PersistentVolumeClaim holding every run's artifacts and caches; default ``<run.name>-data``."""
    create: bool = True
    """Create the claim (false: use an existing one, e.g. shared by several runs)."""
    size: Quantity = "200Gi"
    """Capacity requested when kubetune creates the claim (Kubernetes quantity): the base model, merged and
    quantized copies, checkpoints and the hub cache: several times the model's 16-bit size."""
    storage_class: DnsSubdomain | None = None
    """None = the cluster's default StorageClass."""
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]] = ["ReadWriteOnce"]
    """ReadWriteOnce works (stages run one at a time); with ReadWriteMany the driver also reads _SUCCESS markers."""
    mount_path: Annotated[str, Field(pattern=r"^/[^\x00-\x1f\x7f:]*$")] = "/workspace"
    """Where every pod mounts the claim; also their working directory, so relative paths land on it."""


class SecretKeyRef(Section):
    name: DnsSubdomain
    """Name of the Secret, in the run's namespace."""
    key: Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]{1,253}$")] = "token"
    """Key inside the Secret that holds the value."""


class DriverResources(Section):
    cpu: Quantity = "100m"
    """CPU request of the driver pod: it only polls the API server."""
    memory: Quantity = "256Mi"
    """Memory request and limit of the driver pod."""
    poll_s: Annotated[float, Field(gt=0)] = 15
    """Seconds between two looks at the stage Jobs."""


class KubernetesSection(Section):
    """How the stages run as Jobs (``kubetune submit``, the Helm chart); ignored by ``kubetune run``."""

    image: Annotated[str, Field(pattern=r"^[^\s\x00-\x1f\x7f]+$")] = "ghcr.io/kubetune/kubetune:0.1.0"
    """Image of every stage pod and the driver (``make images`` builds it); pin a tag or digest."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    """When the kubelet pulls the image: IfNotPresent (a moving tag may then be stale on a node),
    Always, or Never."""
    image_pull_secrets: list[DnsSubdomain] = []
    """Secrets (docker-registry type, in the run's namespace) for pulling the image from a private
    registry."""
    namespace: Annotated[str, Field(pattern=DNS_LABEL)] | None = None
    """Namespace to submit to when --namespace is not given (else the kubeconfig context's)."""
    pvc: PvcSection = PvcSection()
    """The PersistentVolumeClaim that holds the run's artifacts and caches."""
    gpu_resource: QualifiedName = "nvidia.com/gpu"
    """Extended resource requested for ``resources.<stage>.gpus`` (e.g. amd.com/gpu, nvidia.com/mig-1g.10gb)."""
    gpu_product_label: QualifiedName = "nvidia.com/gpu.product"
    """Node label that ``resources.<stage>.gpu_type`` selects on (set by NVIDIA GPU feature discovery)."""
    node_selector: dict[LabelKey, LabelValue] = {}
    """Node labels every stage pod must match (e.g. a node pool); GPU stages add gpu_type's label."""
    tolerations: list[dict[str, JsonValue]] = []
    """Kubernetes Toleration objects for the stage pods (and the chart's UI), e.g. {key: dedicated, value: ml,
    effect: NoSchedule}."""
    gpu_tolerations: list[dict[str, JsonValue]] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                    "effect": "NoSchedule"}]
    """Tolerations added to the pods that request GPUs: the taint GPU node pools usually carry (GKE and the GPU
    operator's examples use nvidia.com/gpu). [] for none; name your pool's taint otherwise."""
    affinity: dict[str, JsonValue] | None = None
    """A Kubernetes Affinity object for the stage pods."""
    priority_class_name: DnsSubdomain | None = None
    """PriorityClass of every pod of the run (where quotas or preemption are scoped by priority)."""
    runtime_class_name: DnsSubdomain | None = None
    """RuntimeClass of the pods that request GPUs: ``nvidia`` on k3s/RKE2 and wherever the NVIDIA runtime is not the
    node's default. CPU pods (the driver, evaluate) keep the default runtime."""
    pod_labels: dict[LabelKey, LabelValue] = {}
    """Extra labels on every pod (e.g. cost centre, ``sidecar.istio.io/inject: "false"``); kubetune's own
    (``app.kubernetes.io/*``, ``kubetune.io/*``) cannot be replaced."""
    pod_annotations: dict[QualifiedName, str] = {}
    """Extra annotations on every pod."""
    env: list[dict[str, JsonValue]] = []
    """Extra EnvVar objects for the stage pods (and the chart's UI), after kubetune's own so that they win:
    HF_ENDPOINT, HF_HUB_OFFLINE, HTTPS_PROXY/NO_PROXY, REQUESTS_CA_BUNDLE, SSL_CERT_FILE… Not the driver's: it only
    talks to the API server, which a proxy variable would misroute."""
    env_from: list[dict[str, JsonValue]] = []
    """EnvFromSource objects (a ConfigMap or Secret of variables) for the stage pods and the UI."""
    extra_volumes: list[dict[str, JsonValue]] = []
    """Volume objects added to the stage pods and the UI, e.g. a corporate CA bundle from a ConfigMap. Pod Security
    "restricted" admits configMap, secret, projected, emptyDir, csi, ephemeral and persistentVolumeClaim."""
    extra_volume_mounts: list[dict[str, JsonValue]] = []
    """VolumeMount objects for extra_volumes in the stage container and the UI (``{name: ca, mountPath: /etc/ca,
    readOnly: true}``)."""
    fs_group: Annotated[int, Field(ge=1)] | None = 1001
    """Pod fsGroup: the kubelet makes the claim group-owned by it (and setgid) and adds it to the pods' groups, so
    the image's user (1001, group 0) can write to a root-owned 0755 volume (block storage: EBS, PD, Azure Disk,
    Ceph RBD). A non-root group, which admission policies accept. null on OpenShift: restricted-v2 assigns one
    from the namespace's range and refuses a fixed one."""
    fs_group_change_policy: Literal["OnRootMismatch", "Always"] = "OnRootMismatch"
    """OnRootMismatch: re-own the claim only when its top folder does not match already (Always walks every file on
    every mount: minutes for a claim full of checkpoints)."""
    hf_token_secret: SecretKeyRef | None = None
    """Secret (and key) holding a Hugging Face token, passed as HF_TOKEN; never written into the recipe."""
    queue: Annotated[LabelValue, Field(min_length=1)] | None = None
    """Kueue LocalQueue: Jobs are created suspended and labelled for Kueue to admit."""
    backoff_limit: Annotated[int, Field(ge=0, le=INT32_MAX)] = 3
    """Retries of a stage pod after a transient failure (permanent exit codes fail the Job at once)."""
    active_deadline_s: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = 86400
    """Seconds a stage Job may run in all (retries included) before Kubernetes stops it; null = no
    limit. The default (a day) stops a hung stage from holding GPUs for ever."""
    ttl_after_finished_s: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = 604800
    """Seconds after the run ends (its driver Job finishes) until its Jobs and pods are deleted; the artifacts stay
    on the claim. Never counted per stage while the run goes on. null: kept until ``kubetune cancel``."""
    termination_grace_s: Annotated[int, Field(ge=0, le=INT32_MAX)] = 300
    """Time between SIGTERM and SIGKILL: long enough to write a fine-tune checkpoint."""
    shm_size: Quantity = "16Gi"
    """Memory-backed /dev/shm (data loader workers, NCCL)."""
    driver: DriverResources = DriverResources()
    """The in-cluster driver's pod (CPU only; it creates the stage Jobs in order)."""

    @field_validator("pod_labels")
    @classmethod
    def _own_labels(cls, pod_labels: dict[str, str]) -> dict[str, str]:
        own = [key for key in pod_labels if key.startswith(OWN_LABEL_PREFIXES)]
        if own:
            raise ValueError(f"{', '.join(own)}: kubetune sets the app.kubernetes.io/ and kubetune.io/ labels itself")
        return pod_labels

    @model_validator(mode="after")
    def _extra_volumes(self) -> "KubernetesSection":
        names = [v.get("name") for v in self.extra_volumes]
        problems = [f"extra_volumes: {n!r} is kubetune's own volume; choose another name"
                    for n in names if n in KUBETUNE_VOLUMES]
        problems += [f"extra_volumes: a volume needs a name ({v})" for v in self.extra_volumes if not v.get("name")]
        problems += [f"extra_volume_mounts: {m.get('name')!r} is not one of extra_volumes ({names})"
                     for m in self.extra_volume_mounts if m.get("name") not in names]
        if problems:
            raise ValueError("; ".join(problems))
        return self


OWN_LABEL_PREFIXES = ("app.kubernetes.io/", "kubetune.io/")
KUBETUNE_VOLUMES = ("recipe", "data", "dshm", "tmp")  # the stage pods' and the chart UI's own volumes


def gate_models(name: str, models: list[str]) -> tuple[list[str], str | None]:
    """(the models a gate compares, a problem if the recipe did not infer them)."""
    rule = GATES[name]
    if not rule.references:
        need = [rule.model]
    else:
        need = [rule.model, next((r for r in rule.references if r in models), rule.references[-1])]
        if len(rule.references) > 1 and (rule.model not in models or need[1] not in models):
            alternatives = " (or ".join(repr(r) for r in rule.references) + ")" * (len(rule.references) - 1)
            return need, f"needs {rule.model!r} and {alternatives} in infer.models"
    missing = [m for m in need if m not in models]
    if missing:
        return need, f"needs {' and '.join(repr(m) for m in missing)} in infer.models"
    return need, None


def gate_problems(gates: dict[str, float], models: list[str], where: str = "evaluate.gates") -> list[str]:
    """Gates that name a model that is not inferred, as recipe problems (``evaluate.gates.<name>: ...``)."""
    problems = []
    for name in gates:
        problem = gate_models(name, list(models))[1]
        if problem:
            problems.append(f"{where}.{name}: {problem} (it has {list(models)})")
    return problems


class MetricsSection(Section):
    """Prometheus metrics of each stage while it runs (docs/monitoring.md)."""

    enabled: bool = True
    """Serve ``/metrics`` from each stage pod while it runs (the Job gets a container port named ``metrics``)."""
    port: Annotated[int, Field(ge=1024, le=65535)] = 9477
    """Port of ``/metrics``; not 9400, which NVIDIA's DCGM exporter uses."""
    local: bool = False
    """Serve outside the stage pods that kubetune renders too (``kubetune run``/``stage`` on a workstation, in a
    notebook or a CML session), on 127.0.0.1 only. Those pods alone serve on all interfaces."""
    pushgateway: str | None = None
    """Pushgateway URL (``http://pushgateway.monitoring:9091``): each stage pushes its start and final values
    (status, duration, peak memory), grouped by run and stage, so a stage shorter than a scrape is not lost."""
    push_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    """Seconds a whole push may take (connecting, sending, the answer); a push that takes longer is given up
    with a warning: monitoring never fails or stalls a stage."""


class ServeSection(Section):
    """How ``kubetune serve`` and ``kubetune render --serve`` serve a finished run's model with vLLM
    (docs/serving.md); no stage reads it, so it is in no fingerprint."""

    model: Literal["merged", "quantized"] = "merged"
    """Which model to serve: the merge stage's checkpoint or the quantize stage's GPTQ one."""
    platform: Literal["kserve", "deployment"] = "kserve"
    """On a cluster: a KServe InferenceService (OpenShift AI's single-model serving) reading the model from the
    claim, or a plain Deployment + Service where KServe is absent."""
    runtime: str = "vllm-runtime"
    """KServe ServingRuntime of the vLLM server (OpenShift AI's "vLLM ServingRuntime for KServe" is created under
    the name you give it; upstream KServe's is kserve-huggingfaceserver with model_format huggingface)."""
    model_format: str = "vLLM"
    """modelFormat.name the ServingRuntime supports."""
    image: str = "vllm/vllm-openai:v0.32.0"
    """vLLM server image of the plain Deployment (its entrypoint is ``vllm serve``)."""
    port: Annotated[int, Field(ge=1024, le=65535)] = 8080
    """Port of the OpenAI-compatible API (and of /health)."""
    replicas: Annotated[int, Field(ge=0)] = 1
    """Server pods (0 scales the server down and keeps its objects)."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Share of the GPU's memory vLLM takes for weights and KV cache."""
    max_model_len: Annotated[int, Field(ge=16)] | None = None
    """Longest prompt + answer in tokens; default finetune.max_length + infer.max_new_tokens (what was evaluated)."""
    extra_args: list[str] = []
    """More ``vllm serve`` arguments, appended as given (e.g. --enforce-eager)."""
    resources: Resources = Resources(gpus=1, cpu="4", memory="24Gi")
    """The server pod's resources; GPUs are requested as kubernetes.gpu_resource on a kubernetes.gpu_type node."""


class Recipe(Section):
    """A whole experiment: what model, what data, which stages and how."""

    run: RunSection = RunSection()
    """Run name and where its artifacts go."""
    model: ModelSection
    """The base model to fine-tune."""
    data: DataSection = DataSection()
    """Training and held-out data."""
    prompt: PromptSection = PromptSection()
    """How a row becomes a prompt; saved with every model the run writes."""
    finetune: FinetuneSection = FinetuneSection()
    """LoRA/QLoRA fine-tune settings."""
    merge: MergeSection = MergeSection()
    """How the adapter is merged into the 16-bit base."""
    quantize: QuantizeSection = QuantizeSection()
    """GPTQ quantization of the merged model."""
    infer: InferSection = InferSection()
    """Generation of answers on the evaluation sets."""
    evaluate: EvaluateSection = EvaluateSection()
    """Scoring of the answers by executing their SQL, and the gates that fail the run."""
    resources: ResourcesSection = ResourcesSection()
    """Each stage pod's GPUs, CPU and memory on Kubernetes."""
    kubernetes: KubernetesSection = KubernetesSection()
    """How the stages run as Jobs."""
    metrics: MetricsSection = MetricsSection()
    """Prometheus metrics of the stages."""
    serve: ServeSection = ServeSection()
    """How the finished model is served with vLLM."""
    stages: list[StageName] = list(STAGE_NAMES)
    """Stages this recipe runs, in pipeline order."""

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        problems = []
        ordered = [s for s in STAGE_NAMES if s in self.stages]
        if ordered != list(self.stages):
            problems.append(f"stages: list them once each, in pipeline order {list(STAGE_NAMES)}")
        if "infer" in self.stages:
            for m in self.infer.models:
                producer = MODEL_PRODUCERS[m]
                if producer is not None and producer not in self.stages:
                    problems.append(f"infer.models: '{m}' needs stage '{producer}' in stages")
        if "evaluate" in self.stages:
            problems += gate_problems(self.evaluate.gates, list(self.infer.models))
            for name, spec in self.evaluate.sets.items():
                problems += gate_problems(spec.gates, list(self.infer.models), f"evaluate.sets.{name}.gates")
        for name, spec in self.evaluate.sets.items():
            if spec.source.startswith("builtin:") and spec.source == self.data.source and spec.seed == self.data.seed:
                problems.append(f"evaluate.sets.{name}.seed: equals data.seed, so the builtin generator would "
                                "make the training rows; choose another seed")
        problems += self.finetune.quantizer_problems()
        if self.finetune.compile and not self.finetune.packing:
            problems.append("finetune.compile: needs finetune.packing=true (one batch shape); unpacked batches vary "
                            "in length and would recompile")
        if self.resources.fetch.gpus:
            problems.append("resources.fetch.gpus: the fetch stage only downloads; it takes no GPU (set 0)")
        problems += self._multi_gpu_problems()
        if problems:
            raise ValueError("\n".join(problems))  # one problem a line, each starting with its field path
        return self

    def _multi_gpu_problems(self) -> list[str]:
        """Only the fine-tune spreads over several GPUs; the other stages refuse more than one before anything is
        submitted, so that no GPU is paid for and left idle."""
        problems = []
        for stage in SINGLE_GPU_STAGES:
            if stage in self.stages and getattr(self.resources, stage).gpus > 1:
                problems.append(f"resources.{stage}.gpus: {stage} runs on one GPU (it loads the model onto a single "
                                "device), so more would sit idle; set 1, or 0 for the CPU")
        res, ft = self.resources.finetune, self.finetune
        if res.nodes > 1 and res.gpus == 0:
            problems.append("resources.finetune.nodes: several nodes need resources.finetune.gpus >= 1 (NCCL)")
        if split_global_batch(ft.batch_size, ft.grad_accum, res.processes) is None:
            problems.append(f"finetune.batch_size: the global batch (batch_size {ft.batch_size} × grad_accum "
                            f"{ft.grad_accum}) does not divide among {res.processes} processes (gpus × nodes); "
                            "make batch_size × grad_accum a multiple of it")
        if res.parallelism == "fsdp" and ft.base_precision != "none":
            problems.append(f"resources.finetune.parallelism: fsdp cannot shard a {ft.base_precision} "
                            f"{ft.base_quantizer} base (QLoRA under FSDP2 is not supported here); use ddp, or "
                            "finetune.base_precision: none")
        return problems

    # ---- derived facts -------------------------------------------------------------------------------
    def upstream(self, stage: str) -> list[str]:
        """Stages whose artifacts ``stage`` reads (fetch fills the hub cache, which is no artifact of the run)."""
        return registry.spec(stage).upstream(self)

    def eval_sets(self) -> list[str]:
        """The evaluation sets infer and evaluate score: the held-out split first, then ``evaluate.sets``."""
        return [HELDOUT_SET, *self.evaluate.sets]

    def stage_sets(self, stage: str) -> list[str]:
        """The evaluation sets ``stage`` runs once each for: all of them for infer and evaluate, else the held-out
        split only (the registry's ``per_eval_set``)."""
        return self.eval_sets() if registry.spec(stage).per_eval_set else [HELDOUT_SET]

    def fingerprint(self, stage: str, eval_set: str = HELDOUT_SET) -> str:
        """Hash of everything that decides ``stage``'s output: its inputs and its own section.

        Changing ``infer.max_new_tokens`` leaves the fine-tune's fingerprint alone, so a rerun skips it. For infer
        and evaluate, each evaluation set has its own fingerprint (and folder); ``evaluate.sets`` is in none of
        the others, so adding a set leaves every finished stage and set as it is.
        """
        spec = registry.spec(stage)
        section = getattr(self, stage, None)  # a stage without settings of its own has no section
        own = section.fingerprinted() if isinstance(section, Section) else {}
        parts: dict[str, Any] = {
            "stage": stage,
            "model": self.model.fingerprinted(),
            "prompt": self.prompt.template,
            "own": own,
            "upstream": {u: self.fingerprint(u, eval_set if registry.spec(u).per_eval_set else HELDOUT_SET)
                         for u in self.upstream(stage)},
        }
        if spec.reads_data and (eval_set == HELDOUT_SET or not spec.per_eval_set):
            parts["data"] = self.data.model_dump()
        if eval_set != HELDOUT_SET and spec.per_eval_set:
            parts["eval_set"] = self.evaluate.sets[eval_set].model_dump(exclude={"gates"} if stage == "infer" else None)
            if stage == "evaluate":
                parts["own"] = {**own, "gates": {}}  # the held-out split's gates are not this set's
        return _sha256(parts)[:16]

    def job_fingerprint(self, stage: str) -> str:
        """One hash for a stage Job: the fingerprints of every evaluation set for infer and evaluate."""
        if not registry.spec(stage).per_eval_set or not self.evaluate.sets:
            return self.fingerprint(stage)
        return _sha256({s: self.fingerprint(stage, s) for s in self.eval_sets()})[:16]

    def recipe_hash(self) -> str:
        return _sha256(self.model_dump())[:16]


def _with_registered_sections(recipe: type[Recipe]) -> type[Recipe]:
    """The recipe with a section for each stage that the registry gives settings and this module does not."""
    extra: dict[str, Any] = {}
    for spec in registry.specs():
        if spec.settings and spec.name not in recipe.model_fields:
            section = registry.resolve(spec.settings)
            extra[spec.name] = (section, Field(default_factory=section, description=section.__doc__))
    return create_model("Recipe", __base__=recipe, __module__=__name__, **extra) if extra else recipe


Recipe = _with_registered_sections(Recipe)  # type: ignore[misc]


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---- loading ------------------------------------------------------------------------------------------
# A recipe has a few hundred values; aliases that expand to more than this are a "billion laughs" document, which
# would take minutes and gigabytes in render and in every stage that dumps the recipe.
MAX_EXPANDED_NODES = 100_000


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what it would otherwise accept silently: a key given twice (the second
    would replace the first, dropping a section without a word) and aliases that expand without bound."""

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *defaults' overrides on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}: YAML would keep only the last one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (aliases share nodes: memoized by id)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise yaml.constructor.ConstructorError(None, None, "an alias refers to a node that contains it",
                                                node.start_mark)
    size = 1
    if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        open_nodes.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        for child in children:
            size += _expanded_size(child, sizes, open_nodes)
            if size > MAX_EXPANDED_NODES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"aliases expand to more than {MAX_EXPANDED_NODES:,} values", node.start_mark)
        open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def load_yaml(text: str) -> Any:
    """``text`` as plain data, through :class:`RecipeLoader` (no tags beyond YAML's own, as yaml.safe_load)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def parse_override(text: str) -> tuple[list[str], Any]:
    """``finetune.lora.r=8`` → (['finetune', 'lora', 'r'], 8). The value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key.strip()):
        raise RecipeError("--set", [f"{text!r}: expected KEY.PATH=VALUE, e.g. finetune.lora.r=8"])
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and section)"
        if loc == "(recipe)" and err["type"] == "value_error":  # cross-section checks name their own fields
            problems.extend(msg.splitlines())
        else:
            problems.append(f"{loc}: {msg}")
    return problems


def recipe_from_dict(data: Any, source: str = "recipe", overrides: list[str] = ()) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(source, [f"(recipe): expected a mapping of sections, got {type(data).__name__}"])
    data = apply_overrides(data, list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, format_validation_error(exc)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(str(path), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), [f"cannot read: {exc}"]) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise RecipeError(str(path), ["not valid YAML (collections nested too deeply)"]) from None
    return recipe_from_dict(data, str(path), overrides)


def recipe_json_schema() -> dict:
    """JSON schema of the recipe (used for the Helm chart's values.schema.json)."""
    return Recipe.model_json_schema()
