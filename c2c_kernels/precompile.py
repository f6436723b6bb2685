"""`python -m c2c_kernels.precompile`: compile every CPU kernel into Numba's cache, once.

The CPU kernels are `numba.njit(cache=True)` functions: the first process to call one
compiles it (tens of seconds per parallel kernel) and writes the machine code to the
cache (`__pycache__/*.nbi|*.nbc` beside c2c_kernels/*.py, or under `NUMBA_CACHE_DIR`);
later processes load it in well under a second. `c2cserve up` runs this step before it
starts workers, so N workers do not each compile the same kernels silently while their
start-up clock runs. It runs `kernels.warmup()` (the exact variants a worker warms up)
and prints a progress line every few seconds with an estimate; with a warm cache it
only loads the code and says so.
"""

from __future__ import annotations

import os
import sys
import threading
import time

# Measured: a cold `kernels.warmup()` took 73-77 s of CPU time (one core, single-threaded
# LLVM) on the 2-core AMD EPYC dev VM, Numba 0.68.1 (`NUMBA_CACHE_DIR=$(mktemp -d)
# python -c "import kernels; kernels.warmup()"`); ~2.3x that wall time when the machine
# ran three busy processes on its two cores.
COLD_COMPILE_CPU_S = 75.0
TICK_S = 5.0
COLD_LINE = "compiling CPU kernels (first run only, ~{estimate_s:.0f} s)..."


def kernel_dispatchers() -> list:
    """Every cached (`cache=True`) Numba dispatcher of the imported `c2c_kernels` modules."""
    from numba.core.caching import FunctionCache
    from numba.core.dispatcher import Dispatcher

    import c2c_kernels  # noqa: F401  (imports the CPU kernel modules)
    import c2c_kernels.membw  # noqa: F401  (workers measure their read bandwidth with it)

    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("c2c_kernels.") or module is None:
            continue
        for value in vars(module).values():
            if isinstance(value, Dispatcher) and isinstance(value._cache, FunctionCache) \
                    and value.py_func.__module__ == name:
                found[id(value)] = value
    return list(found.values())


def is_cached(dispatcher) -> bool:
    """Whether the cache holds code of this function for this machine and source.

    Reads Numba's cache index (a private but long-stable layout); when that fails the
    answer is "no", which only costs a message that over-states the work."""
    from numba.core.registry import cpu_target

    magic = cpu_target.target_context.codegen().magic_tuple()
    try:
        index = dispatcher._cache._cache_file._load_index()
    except (AttributeError, OSError, ValueError, EOFError):
        return False
    return any(key[1] == magic for key in index)


def estimate_s(num_cold: int, num_total: int) -> float:
    """Wall seconds a compile of `num_cold` of `num_total` kernels should take here:
    the measured CPU time, scaled when more processes are runnable than cores."""
    cores = max(1, len(os.sched_getaffinity(0)))
    contention = max(1.0, (os.getloadavg()[0] + 1.0) / cores)
    return COLD_COMPILE_CPU_S * num_cold / max(1, num_total) * contention


def _num_compiled(dispatchers: list) -> int:
    return sum(len(d.overloads) for d in dispatchers)


def _tick(dispatchers: list, estimate: float, started_s: float, done: threading.Event) -> None:
    while not done.wait(TICK_S):
        elapsed_s = time.monotonic() - started_s
        note = f"of ~{estimate:.0f} s" if elapsed_s <= estimate else \
            f"(past the ~{estimate:.0f} s estimate: the machine is busy)"
        print(f"  compiling CPU kernels: {elapsed_s:.0f} s {note}, "
              f"{_num_compiled(dispatchers)} kernel variants done", flush=True)


def precompile() -> float:
    """Compile (or load) every kernel a worker warms up; returns the seconds it took.

    With C2C_QUANTIZE set (`up --quantize`), the quantized kernels (int8 and q4) too."""
    import c2c_kernels as kernels
    from c2c_kernels import membw

    is_quantized = bool(os.environ.get("C2C_QUANTIZE", "").strip())
    if is_quantized:
        import c2c_kernels.cpu_q4  # noqa: F401  (and cpu_int8, cpu_vnni: kernel_dispatchers finds them)
    dispatchers = kernel_dispatchers()
    num_cold = sum(not is_cached(d) for d in dispatchers)
    started_s = time.monotonic()
    if num_cold == 0:
        _warm(kernels, is_quantized)
        membw.compile_probe()
        took_s = time.monotonic() - started_s
        print(f"CPU kernels loaded from the cache in {took_s:.1f} s", flush=True)
        return took_s
    estimate = estimate_s(num_cold, len(dispatchers))
    print(COLD_LINE.format(estimate_s=estimate), flush=True)
    done = threading.Event()
    ticker = threading.Thread(target=_tick, args=(dispatchers, estimate, started_s, done), daemon=True)
    ticker.start()
    try:
        _warm(kernels, is_quantized)
        membw.compile_probe()
    finally:
        done.set()
    took_s = time.monotonic() - started_s
    cache_dir = dispatchers[0]._cache.cache_path if dispatchers else "?"
    print(f"CPU kernels compiled in {took_s:.0f} s ({num_cold} of {len(dispatchers)} kernels were cold; "
          f"cache: {cache_dir})", flush=True)
    return took_s


def _warm(kernels, is_quantized: bool) -> None:
    kernels.warmup()
    for mode in ("int8", "q4") if is_quantized else ():
        kernels.warmup_quantized(mode)


def main() -> int:
    precompile()
    return 0


if __name__ == "__main__":
    sys.exit(main())
