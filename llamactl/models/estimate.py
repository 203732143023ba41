"""How much memory a model needs when llama-server loads it, from its GGUF header alone: the
weights (the tensor data), the KV cache for its context, and the compute buffers. An estimate
for deciding what fits and what to evict, not an allocator: llama-server's own log has the
exact figures once it runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llamactl.models.gguf import GGUFInfo

#: llama-server's physical batch (-ub, common/common.h n_ubatch): the compute buffers scale
#: with it.
DEFAULT_UBATCH = 512
#: What llama-server uses when neither -c nor the model says: its own fallback.
FALLBACK_CTX = 4096


@dataclass(frozen=True)
class Estimate:
    """Bytes a loaded model takes, by part."""

    weights: int
    kv_cache: int
    compute: int
    ctx: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def describe(self) -> str:
        mib = 1 << 20
        return (
            f"{self.total / mib:.0f} MiB (weights {self.weights / mib:.0f}, KV cache "
            f"{self.kv_cache / mib:.0f} for {self.ctx} tokens, compute {self.compute / mib:.0f})"
        )


def _int(info: GGUFInfo, key: str) -> int | None:
    value = info.metadata.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)  # per-layer values (some architectures): the largest bounds it
    return None


def flag_value(args: Sequence[str], *names: str) -> str | None:
    """The last value given to one of `names` in a llama-server argument list."""
    found = None
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in names:
            if eq:
                found = value
            elif i + 1 < len(args):
                found = args[i + 1]
    return found


#: llama-server's environment variables for the flags an estimate reads (common/arg.cpp).
_ENV_FLAGS = {
    "LLAMA_ARG_CTX_SIZE": "--ctx-size",
    "LLAMA_ARG_UBATCH": "--ubatch-size",
    "LLAMA_ARG_CACHE_TYPE_K": "--cache-type-k",
}


def env_as_flags(env: Mapping[str, str]) -> tuple[str, ...]:
    """The settings an estimate reads, given as environment variables (a preset's
    LLAMA_ARG_CTX_SIZE), as flags: put them before the real flags, which win over them in
    llama-server as in `flag_value`."""
    out: tuple[str, ...] = ()
    for name, flag in _ENV_FLAGS.items():
        if name in env:
            out += (flag, env[name])
    return out


def _kv_bytes_per_element(args: Sequence[str]) -> float:
    kind = (flag_value(args, "-ctk", "--cache-type-k") or "f16").lower()
    return {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}.get(kind, 2.0)


def estimate(info: GGUFInfo, args: Sequence[str] = ()) -> Estimate:
    """The memory llama-server needs for this model with these flags (-c, -ub, -ctk)."""
    arch = info.architecture or ""
    weights = max(0, info.size_bytes - info.data_offset)
    n_layer = _int(info, f"{arch}.block_count") or 0
    n_embd = _int(info, f"{arch}.embedding_length") or 0
    n_head = _int(info, f"{arch}.attention.head_count") or 0
    n_head_kv = _int(info, f"{arch}.attention.head_count_kv") or n_head
    head_k = _int(info, f"{arch}.attention.key_length") or (n_embd // n_head if n_head else 0)
    head_v = _int(info, f"{arch}.attention.value_length") or head_k
    ctx_flag = flag_value(args, "-c", "--ctx-size")
    ctx = int(ctx_flag) if ctx_flag and ctx_flag.isdigit() else 0
    if ctx <= 0:  # -c 0 or none: the context the model was trained for (common.h n_ctx = 0)
        ctx = info.context_length or FALLBACK_CTX
    # One KV cache for all slots (llama-server's unified cache splits -c among -np slots).
    kv = int(n_layer * ctx * n_head_kv * (head_k + head_v) * _kv_bytes_per_element(args))
    ub_flag = flag_value(args, "-ub", "--ubatch-size")
    ubatch = int(ub_flag) if ub_flag and ub_flag.isdigit() else DEFAULT_UBATCH
    vocab = info.metadata.get("tokenizer.ggml.tokens")
    n_vocab = getattr(vocab, "length", None) or (len(vocab) if isinstance(vocab, list) else 0)
    # The output logits of a batch plus a few activations of the widest layer, in f32: close
    # to the "compute buffer size" llama.cpp logs for small and middle-sized models.
    compute = ubatch * (n_vocab + 8 * n_embd) * 4
    return Estimate(weights=weights, kv_cache=kv, compute=compute, ctx=ctx)


def available_memory() -> int | None:
    """Bytes of RAM the kernel says can be used without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
