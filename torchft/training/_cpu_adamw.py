"""The stochastic-rounding AdamW update as one C loop, for bf16 weights on the CPU.

Compiled by torch, the update's bit-level rounding is slow on the CPU: its C++ code reinterprets
each fp32 value as an integer through memory, element by element, and the update took ~4x torch's
fused AdamW. Written as a plain C loop, the compiler vectorizes the same arithmetic (fp32 math, the
integer hash of the noise, the rounding) and the update runs at the speed of the fused AdamW, with
no temporaries at all.

The loop computes exactly what :func:`torchft.training.optim._adamw_update` computes eagerly, bit
for bit (IEEE square root and division, a fused multiply-add exactly where torch's ``lerp`` has one), so a run does not depend on which
of the two updated it. It is built once per process with the system's C compiler (~0.2 s) into a
temporary folder; without a compiler the optimizer falls back to the torch-compiled update.
"""
import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* x rounded to bf16 up or down at random: the 16 dropped bits plus noise in [0, 2^16) carry into
   the kept bits with probability (dropped bits) / 2^16. */
static inline uint16_t float_to_bf16_stochastic(float x, uint32_t noise) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    return (uint16_t)((bits + noise) >> 16);
}

/* The 31-bit hash of torchft.training.optim._hash31 (every product cut to its low 31 bits). */
static inline uint32_t hash31(uint32_t x) {
    x &= 0x7FFFFFFFu;
    x = ((x >> 16) & 0xFFFFu) ^ x;
    x = (x * 0x45D9F3Bu) & 0x7FFFFFFFu;
    x = ((x >> 16) & 0xFFFFu) ^ x;
    x = (x * 0x45D9F3Bu) & 0x7FFFFFFFu;
    return ((x >> 16) & 0xFFFFu) ^ x;
}

/* Elements [start, end) of p, m, v (bf16, in place) from g (bf16). The noise of element i is the
   hash of i * 0x27D4EB2F + key, windows at bits 0, 7 and 15 for p, m and v. */
void sr_adamw(uint16_t *p, const uint16_t *g, uint16_t *m, uint16_t *v, int64_t start, int64_t end,
              float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float bias2_sqrt,
              float lr_over_bias1, float decay, uint32_t key) {
    for (int64_t i = start; i < end; i++) {
        float gi = bf16_to_float(g[i]);
        float mi = bf16_to_float(m[i]);
        mi = fmaf(one_minus_beta1, gi - mi, mi);  /* lerp(m, g, 1 - beta1), fused as torch's lerp is */
        float vi = bf16_to_float(v[i]) * beta2 + (gi * gi) * one_minus_beta2;
        float denom = sqrtf(vi) / bias2_sqrt + eps;
        float pi = bf16_to_float(p[i]) * decay - (lr_over_bias1 * mi) / denom;
        uint32_t bits = hash31((uint32_t)i * 0x27D4EB2Fu + key);
        p[i] = float_to_bf16_stochastic(pi, bits & 0xFFFFu);
        m[i] = float_to_bf16_stochastic(mi, (bits >> 7) & 0xFFFFu);
        v[i] = float_to_bf16_stochastic(vi, (bits >> 15) & 0xFFFFu);
    }
}
"""

# -ffp-contract=off: no fused multiply-adds but the one written out, so the loop rounds as torch's eager ops do;
# -fno-math-errno: sqrtf may vectorize (it never sets errno on the values an update sees).
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]

# Below this many elements an update runs on the calling thread: handing it out costs more.
_CHUNK = 2**18


@functools.cache
def _library():
    """The compiled loop (``ctypes`` function), or None when no C compiler builds it."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.debug("no C compiler: bf16 AdamW on the CPU uses the torch-compiled update")
        return None
    folder = tempfile.mkdtemp(prefix="torchft_adamw_")
    try:
        source, library = os.path.join(folder, "sr_adamw.c"), os.path.join(folder, "sr_adamw.so")
        with open(source, "w") as f:
            f.write(_SOURCE)
        subprocess.run([compiler, *_FLAGS, source, "-o", library], check=True, capture_output=True)
        function = ctypes.CDLL(library).sr_adamw  # the file may go once loaded
    except (OSError, subprocess.CalledProcessError) as e:
        log.debug("the C AdamW loop did not build (%s): using the torch-compiled update", e)
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float] * 7 + [ctypes.c_uint32]
    function.restype = None
    return function


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="torchft_adamw")


def available() -> bool:
    """Whether the C loop is built (it is, wherever a C compiler is on the PATH)."""
    return _library() is not None


@functools.lru_cache(maxsize=64)
def _scalars(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple:
    """The loop's scalar arguments, computed in fp32 tensors as the eager update computes them (so the
    loop matches it bit for bit); cached, since every weight of a step shares them."""
    step_t, lr_t = torch.tensor(float(step)), torch.tensor(lr)
    lr_over_bias1 = (lr_t / (1 - beta1**step_t)).item()
    bias2_sqrt = (1 - beta2**step_t).sqrt().item()
    decay = (1 - lr_t * weight_decay).item()
    return (1 - beta1, beta2, 1 - beta2, eps, bias2_sqrt, lr_over_bias1, decay)


def sr_adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, found_inf, seed: int, beta1: float, beta2: float,
                    eps: float, weight_decay: float) -> None:
    """:func:`torchft.training.optim._adamw_update` for CPU tensors, all bf16 [n] and contiguous.

    ``step``, ``lr`` and ``found_inf`` are [] CPU tensors: reading them costs nothing. Large
    tensors are split into chunks run on torch's number of threads (ctypes lets go of the GIL).
    """
    if found_inf.item():
        return
    step.add_(1)
    count = int(step.item())
    key = (count * -1640531527 + seed) & 0xFFFFFFFF  # the noise's key, wrapping as the eager int32 one does
    scalars = (*_scalars(count, lr.item(), beta1, beta2, eps, weight_decay), key)
    args = (p.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr())
    function, n = _library(), p.numel()
    threads = torch.get_num_threads()
    if n <= _CHUNK or threads == 1:
        function(*args, 0, n, *scalars)
        return
    bounds = [n * k // threads for k in range(threads + 1)]
    futures = [_pool(threads).submit(function, *args, start, end, *scalars)
               for start, end in zip(bounds[:-1], bounds[1:])]
    for future in futures:
        future.result()
