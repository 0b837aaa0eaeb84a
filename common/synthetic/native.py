"""The native engine of `common.synthetic.fastfit`: `csrc/mlp_train.c`, compiled on first use and loaded with ctypes.

`common.synthetic.fastfit.fit(..., engine="auto")` hands a training to this module when it can (float32 CPU tensors, a
BatchedLinear / ReLU stack, a closed-form logit gradient: CE, CE + KL, Alg. 1's joint CE + CE + non-target JS or
+ MSE / L1), and keeps the torch engine otherwise. The kernel trains one run per call, all epochs, fused over tiles of
samples (see the C file for why that is ~2x faster than torch on these shapes); this module loops over the runs.

Building: the C file is plain C11 (no Python or torch headers) and compiles in about a second with the system's C
compiler (`$CC`, else cc / gcc / clang) at -O3 -march=native, into a cache directory (`$CMKD_NATIVE_CACHE`, else
`$XDG_CACHE_HOME/crossmodal-kd`, else `~/.cache/crossmodal-kd`; the system temp dir when that is not writable). The
file name carries a hash of the source, the compiler, the flags and the CPU, so an edited kernel, another compiler or
another machine sharing the home directory gets its own build. A missing compiler or a failed build is not an error
for engine "auto": `unavailable()` says why, once, and the torch engine runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

SOURCE = Path(__file__).resolve().parent / "csrc" / "mlp_train.c"
ABI_VERSION = 1
MAX_LAYERS = 8
MAX_CLASSES = 64
LOSS_KINDS = {"ce": 0, "ce_kl": 1, "joint_ncjsd": 2, "joint_mse": 3, "joint_l1": 4}
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])   # the second where the compiler does not know -march=native

_lib: ctypes.CDLL | None = None
_reason: str | None = None   # why the library is unavailable, once a load failed


def _compiler() -> str | None:
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags (Linux), else platform's description."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return platform.machine() + "\n" + "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.machine() + platform.processor()


def cache_dir() -> Path:
    if os.environ.get("CMKD_NATIVE_CACHE"):
        return Path(os.environ["CMKD_NATIVE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "crossmodal-kd"


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d):
            return True
    except OSError:
        return False


def build(out_dir: Path | None = None, compiler: str | None = None) -> Path:
    """Compile the kernel (if this source / compiler / CPU has no build yet) and return the shared library's path.
    Raises RuntimeError with the compiler's first error line when it cannot be built."""
    cc = compiler or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc / gcc / clang)")
    out_dir = out_dir or cache_dir()
    if not _writable(out_dir):
        out_dir = Path(tempfile.gettempdir()) / "crossmodal-kd"
        out_dir.mkdir(parents=True, exist_ok=True)
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        target = out_dir / f"mlp_train-{key}.so"
        if target.exists():
            return target
        # compile to a private name and rename: concurrent builds (worker processes) never see a partial file
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        cmd = [cc, *flags, "-std=gnu11", "-fPIC", "-shared", "-o", tmp, str(SOURCE), "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            os.unlink(tmp)
            raise RuntimeError(f"{cc} could not be run: {e}") from None
        if proc.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
        errors.append(f"{' '.join(flags)}: {first}")
    raise RuntimeError(f"{SOURCE.name} did not compile with {cc} ({'; '.join(errors)})")


def load() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None (and `unavailable()` says why) when it cannot be had."""
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    if os.environ.get("CMKD_NATIVE", "1") == "0":
        _reason = "disabled by CMKD_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        lib.cmkd_abi_version.restype = ctypes.c_int
        if lib.cmkd_abi_version() != ABI_VERSION:
            raise RuntimeError(f"ABI version {lib.cmkd_abi_version()} != {ABI_VERSION}")
        for name in ("cmkd_vexp", "cmkd_vlog"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            getattr(lib, name).restype = None
        lib.cmkd_train.restype = ctypes.c_int
        lib.cmkd_train.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
            ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_float, ctypes.c_float]
    except (RuntimeError, OSError, AttributeError) as e:
        _reason = f"native engine unavailable: {e}"
        return None
    _lib = lib
    return _lib


def vector_math(name: str, x: torch.Tensor) -> torch.Tensor:
    """The kernel's vector "exp" (for x <= 0) or "log" (for x > 0) of a float32 tensor (for the tests)."""
    lib = load()
    if lib is None:
        raise RuntimeError(_reason)
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    getattr(lib, f"cmkd_v{name}")(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def unavailable() -> str | None:
    """None when the kernel loads, else the reason (a build is attempted if none was yet)."""
    load()
    return _reason


def describe(engine: str, device: torch.device | str = "cpu") -> str:
    """One line for a run's log: which trainer `common.synthetic.fastfit.fit(engine=engine)` will use for closed-form losses
    on `device` (and it loads the kernel, so worker processes forked afterwards inherit it instead of each building)."""
    if engine == "torch":
        return "torch (train.engine: torch)"
    if torch.device(device).type != "cpu":
        return f"torch (the native kernel is CPU-only; device {device})"
    if load() is None:
        return f"torch ({_reason})"
    return f"native C kernel {Path(_lib._name).name} for the closed-form losses, torch for the others"


def _reset() -> None:
    """Forget the loaded library and any failure (tests)."""
    global _lib, _reason
    _lib, _reason = None, None


def unsupported(stacks, inputs, grad) -> str | None:
    """Why the native engine cannot run this training (None: it can). stacks: per model, its BatchedLinear layers."""
    if grad is None or getattr(grad, "kind", None) not in LOSS_KINDS:
        return "the loss has no native closed form (autograd losses run on the torch engine)"
    if len(stacks) != grad.models:
        return f"the {grad.kind} gradient is for {grad.models} model(s), got {len(stacks)}"
    tensors = [x for x in inputs] + [p for layers in stacks for lin in layers for p in (lin.weight, lin.bias)]
    if grad.teacher_probs is not None:
        tensors.append(grad.teacher_probs)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return "the native engine takes float32 CPU tensors"
    if any(len(layers) > MAX_LAYERS for layers in stacks):
        return f"more than {MAX_LAYERS} layers"
    if not 2 <= grad.n_classes <= MAX_CLASSES or any(layers[-1].out_features != grad.n_classes for layers in stacks):
        return f"the native engine takes 2..{MAX_CLASSES} classes, as many as the models' outputs"
    runs, n = inputs[0].shape[0], inputs[0].shape[-1]
    if (any(x.dim() != 3 or x.shape[0] != runs or x.shape[2] != n or x.shape[1] != layers[0].in_features
            for x, layers in zip(inputs, stacks)) or tuple(grad.labels.shape) != (runs, n) or n >= 2 ** 31
            or grad.teacher_probs is not None and tuple(grad.teacher_probs.shape) != (runs, grad.n_classes, n)):
        return "the inputs, labels and teacher probabilities are not (R, D, N), (R, N) and (R, C, N) of these models"
    return _reason if load() is None else None


def _pointer(t: torch.Tensor, run: int) -> int:
    return t.data_ptr() + run * t.stride(0) * t.element_size()


def fit(stacks, inputs, grad, *, epochs: int, lr: float, momentum: float = 0.0, progress: bool = False,
        desc: str | None = None) -> None:
    """Train every run of the stacks in place: full-batch SGD (momentum) on grad's closed form, one kernel call per
    run. stacks[m] are model m's BatchedLinear layers ((R, out, in) weights), inputs[m] its (R, D, N) input; grad is a
    common.synthetic.fastfit.LogitGrad. Call `unsupported` first."""
    lib = load()
    if lib is None:
        raise RuntimeError(_reason)
    n_models = len(stacks)
    runs, n = inputs[0].shape[0], inputs[0].shape[-1]
    xs = [x.contiguous() for x in inputs]
    labels = grad.labels.to(torch.int64).contiguous()
    if labels.min() < 0 or labels.max() >= grad.n_classes:
        raise ValueError(f"labels must lie in [0, {grad.n_classes}), got [{labels.min()}, {labels.max()}]")
    teacher = grad.teacher_probs.contiguous() if grad.teacher_probs is not None else None
    # the kernel writes into (R, out, in) / (R, out, 1) storage: work on contiguous copies when a parameter is not
    params = [[(lin.weight.data.contiguous(), lin.bias.data.contiguous()) for lin in layers] for layers in stacks]
    n_layers = (ctypes.c_int * 2)(*[len(layers) for layers in stacks], *([0] * (2 - n_models)))
    dims = (ctypes.c_int * (2 * (MAX_LAYERS + 1)))()
    for m, layers in enumerate(stacks):
        for k, d in enumerate([layers[0].in_features] + [lin.out_features for lin in layers]):
            dims[m * (MAX_LAYERS + 1) + k] = d
    values = (ctypes.c_float * 3)(*(list(grad.params) + [0.0] * 3)[:3])
    kind = LOSS_KINDS[grad.kind]
    bar = tqdm(range(runs), desc=desc, disable=not progress, leave=False, unit="run")
    for r in bar:
        w = (ctypes.c_void_p * (2 * MAX_LAYERS))()
        b = (ctypes.c_void_p * (2 * MAX_LAYERS))()
        for m, layer_params in enumerate(params):
            for k, (wt, bs) in enumerate(layer_params):
                w[m * MAX_LAYERS + k], b[m * MAX_LAYERS + k] = _pointer(wt, r), _pointer(bs, r)
        x = (ctypes.c_void_p * 2)(*[_pointer(t, r) for t in xs], *([None] * (2 - n_models)))
        status = lib.cmkd_train(n_models, n_layers, dims, w, b, x, _pointer(labels, r), n, grad.n_classes,
                                _pointer(teacher, r) if teacher is not None else None, kind, values, epochs,
                                float(lr), float(momentum))
        if status != 0:
            raise RuntimeError(f"native engine failed on run {r} (status {status}: "
                               + ("bad arguments" if status == -1 else "out of memory") + ")")
    with torch.no_grad():
        for layers, layer_params in zip(stacks, params):
            for lin, (wt, bs) in zip(layers, layer_params):
                if wt.data_ptr() != lin.weight.data_ptr():
                    lin.weight.copy_(wt)
                if bs.data_ptr() != lin.bias.data_ptr():
                    lin.bias.copy_(bs)
