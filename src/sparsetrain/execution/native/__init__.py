"""Fused C kernels for compressed activations and sparse convolutions, built on first use (else numpy and torch).

SWAT saves each layer input as a bitmask plus the kept values, and the bit-packed ReLU
saves one bit per element. In numpy that is several single-threaded passes (abs, compare,
boolean gather, zero fill, boolean scatter); the kernels in ``compressed.c`` do each side in
one multi-threaded pass, which is what keeps SWAT's step time near the dense one;
``compressed_grad.c`` computes a weight gradient straight from such a compressed input, and
``compact_pool.c`` is a max-pool that saves a byte per output. The direct sparse convolution of the
``direct`` execution backend is in ``direct_conv.c`` (and, register-tiled for stride-1 planes, in
``tiled_conv.c``, which also lists SWAT's kept weights from a threshold); the condensed Linear kernels are
in ``condensed.c``. The families share ``parallel.h`` and build into one library, whose entry points
``kernels.h`` declares once (the compiler checks the definitions against it, cffi each call).

The library is compiled with the system C compiler (``$CC``, else ``cc``), tuned for the
CPU at hand (-march=native), into the cache directory ($SPARSETRAIN_CACHE, else
~/.cache/sparsetrain) the first time it is needed, keyed by the source, the compiler and
the CPU. Without a compiler, or with ``SPARSETRAIN_NATIVE=0``, every
caller falls back to the numpy path, which gives identical results.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import cffi
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake as _is_fake

__all__ = [
    "available",
    "bf16_kernels",
    "compress",
    "compress_nonzero",
    "decompress",
    "relu_bits",
    "relu_grad",
    "select",
    "kth_largest_abs",
    "sparse_conv_forward",
    "sparse_conv_backward_input",
    "sparse_conv_backward_weight",
    "compressed_weight_grad",
    "tiled_supported",
    "tiled_conv",
    "tiled_conv_weight_grad",
    "threshold_lists",
    "max_pool2",
    "max_pool2_grad",
    "condensed_forward",
    "condensed_forward_few",
    "condensed_backward",
    "library_path",
    "nhwc_block",
    "nhwc_conv_forward",
    "nhwc_conv_input_grad",
    "nhwc_conv_weight_grad",
    "nhwc_conv_backward",
]

_DIR = Path(__file__).parent
# one library, its sources split by family: compressed activations, direct convolution, condensed Linear
_SOURCES = [
    _DIR / "compressed.c",
    _DIR / "compressed_grad.c",
    _DIR / "direct_conv.c",
    _DIR / "tiled_conv.c",
    _DIR / "compact_pool.c",
    _DIR / "condensed.c",
    _DIR / "nhwc_conv.c",
]
_KERNELS_H = _DIR / "kernels.h"
_HEADERS = [_KERNELS_H, _DIR / "parallel.h", _DIR / "scratch.h", _DIR / "vectors.h", _DIR / "bf16.h"]
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=gnu99"]
_lib: "_Library | None" = None
_tried = False


def _parsed_header() -> cffi.FFI:
    """cffi's reading of ``kernels.h``, where every entry point is declared once (its preprocessor lines left out:
    cffi parses plain declarations). Parsing takes about 30 ms, so it runs when the library is built, and the
    result is kept beside the library (:func:`_declarations`)."""
    ffi = cffi.FFI()
    ffi.cdef("\n".join(line for line in _KERNELS_H.read_text().splitlines() if not line.lstrip().startswith("#")))
    return ffi


_DECLARATIONS_MODULE = "_sparsetrain_kernels_h"


def _write_declarations(target: Path) -> None:
    """``kernels.h`` as cffi's own precompiled form (a Python module of type tables, under a millisecond to load),
    written to ``target`` (beside the library it describes, under the same key)."""
    ffi = _parsed_header()
    ffi.set_source(_DECLARATIONS_MODULE, None)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        os.replace(ffi.compile(tmpdir=tmp, verbose=False), target)


def _declarations(path: Path | None):
    """The declarations module at ``path`` (see :func:`_write_declarations`): its ``ffi``. Else, where there is
    none (a library built by hand), ``kernels.h`` parsed now."""
    if path is None:
        return _parsed_header()
    why = _trusted(path)  # (running it runs its code, as loading the library does)
    if why:
        raise OSError(why)
    spec = importlib.util.spec_from_file_location(_DECLARATIONS_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi


class _Library:
    """The loaded kernels: each function ``kernels.h`` declares, as an attribute that takes tensors (passed by their
    data's address), None (a NULL pointer), tuples of ints (passed as a temporary array of the declared type, as
    the sizes are) and plain numbers. cffi checks each call's arguments, their count and kinds, against the
    declaration, so no signature is restated here."""

    def __init__(self, path: Path, declarations: Path | None = None):
        ffi = _declarations(declarations)
        self._lib = ffi.dlopen(str(path))
        for name in dir(self._lib):
            try:
                setattr(self, name, _passing_tensors(name, getattr(self._lib, name), ffi))
            except AttributeError:
                raise OSError(f"{path} lacks the function {name}") from None
        self.has_bf16 = bool(self.condensed_bf16())  # (asked once: read under torch.compile as a plain attribute)


def _passing_tensors(name: str, fn, ffi):
    """``fn`` taking a tensor where its declaration takes a pointer (its data's address), or a number (a
    one-element tensor, as ``torch.jit.trace`` hands sizes over)."""
    pointers = [arg.kind == "pointer" for arg in ffi.typeof(fn).args]
    cast, null = ffi.cast, ffi.NULL

    def call(*args):
        if len(args) != len(pointers):
            raise TypeError(f"{name} expects {len(pointers)} arguments, got {len(args)}")
        return fn(
            *[
                (cast("void *", a.data_ptr()) if p else a.item())
                if isinstance(a, torch.Tensor)
                else null
                if a is None
                else a
                for a, p in zip(args, pointers)
            ]
        )

    return call


def elementwise_threads() -> int:
    """Threads for the one-pass kernels (compress, decompress, ReLU bits, select, top-K threshold): torch's, where
    the library runs on PyTorch's own OpenMP threads; else one, since after each of its ops PyTorch's OpenMP
    workers keep spinning for a while, and a plain thread of ours would fight a spinning worker for its core
    (measured on 2 cores: SWAT's step on ResNet-20 was 1.43x dense with two such threads, 1.21x with one)."""
    lib = _load()
    return torch.get_num_threads() if lib is not None and lib.uses_openmp() else 1


def _cpu_identity() -> str:
    """What -march=native depends on: the machine and its CPU's model and feature flags."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            ident += "".join(line for line in f if line.startswith(("model name", "flags", "Features", "CPU part")))[
                :4096
            ]
    except OSError:
        pass
    return ident


def compiler() -> list[str]:
    """``$CC`` split like a shell word list (``CC="gcc -m64"`` is a compiler with a flag), else ``cc``."""
    words = shlex.split(os.environ.get("CC", "cc"))
    return words or ["cc"]


def _compiler_version(cc: list[str]) -> str:
    """The compiler's first ``--version`` line (empty when it cannot say): part of the cache key."""
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
        return (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path() -> Path:
    """Where the compiled library for these sources, this compiler (and its version) and this CPU lives
    (a shared cache may serve several CPUs and compilers)."""
    from ...core.paths import default_cache_dir

    cc = compiler()
    ident = " ".join([*cc, _compiler_version(cc), *_FLAGS, _cpu_identity()])
    key = hashlib.sha1(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS) + ident.encode()).hexdigest()[:16]
    return _private(default_cache_dir() / "native") / f"sparsetrain_kernels-{key}.so"


_fallback_dir: Path | None = None


def _trusted(path: Path) -> str | None:
    """None when ``path`` (a folder or a library) belongs to this user and no one else may write it; else why not."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {oct(st.st_mode & 0o777)})"
    return None


def _private(folder: Path) -> Path:
    """``folder``, created 0700, when it is this user's alone; else a private folder of this process's, with one
    warning (a library in a folder others can write could be replaced by theirs, and loading runs its code)."""
    global _fallback_dir
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        why = _trusted(folder)
    except OSError as e:
        why = f"{folder} cannot be used ({e.strerror or e})"
    if why is None:
        return folder
    if _fallback_dir is None:
        _fallback_dir = Path(tempfile.mkdtemp(prefix="sparsetrain-native-"))
        warnings.warn(
            f"sparsetrain: the kernel cache is not private ({why}); building in {_fallback_dir} instead. "
            "Set SPARSETRAIN_CACHE to a folder of your own",
            RuntimeWarning,
            stacklevel=4,
        )
    return _fallback_dir


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _build(target: Path, portable: bool = False) -> None:
    """Compile the kernels into ``target``: tuned for this CPU where the compiler can, portable
    otherwise (or when asked: tests use it to check the paths older CPUs take)."""
    cc = compiler()
    if shutil.which(cc[0]) is None:
        raise RuntimeError(f"no C compiler ({cc[0]!r}, from CC={os.environ.get('CC', 'cc')!r}) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        portable_flags = [f for f in _FLAGS if not f.startswith("-march")]
        tries = [portable_flags] if portable else [_FLAGS, portable_flags]
        # OpenMP where the compiler has it: the condensed kernels then share PyTorch's own worker threads
        for flags in [[*f, "-fopenmp"] for f in tries] + tries:
            done = subprocess.run([*cc, *flags, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[:500]}")
        digest = _digest(Path(tmp))
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)
        # atomic: concurrent builders (DDP ranks) never load a half-written file; the digest is checked before every
        # load, so a damaged file is rebuilt
        target.with_suffix(".sha1").write_text(digest)
        declarations = _declarations_path(target)
        _write_declarations(declarations)
        _stamp(declarations)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path, declarations: Path | None = None) -> _Library:
    """Load the library at ``path`` (with its ``declarations``, else ``kernels.h`` parsed now); OSError when it is
    not this user's alone, does not load, or lacks one of the functions ``kernels.h`` declares."""
    why = _trusted(path)
    if why:
        raise OSError(why)
    return _Library(path, declarations)


def _load() -> "_Library | None":
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("SPARSETRAIN_NATIVE", "1") == "0":
        return None
    try:
        path = library_path()
        declarations = _declarations_path(path)
        if not (_intact(path) and _intact(declarations)):  # absent, or damaged since built: never load a damaged file
            _build(path)
        try:
            _lib = _open(path, declarations)
            if _lib.chunk_count(1) != 1:
                raise OSError("self-test failed")
        except OSError:  # a library that is not ours alone, does not load, lacks a function or fails: rebuilt once
            path.unlink(missing_ok=True)
            _build(path)
            # loaded from a name of its own: the dynamic loader would hand back the library it already opened at `path`
            fresh = path.with_name(f"{path.stem}.{os.getpid()}.so")
            shutil.copy2(path, fresh)
            try:
                _lib = _open(fresh, declarations)
            finally:
                fresh.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:
        warnings.warn(
            f"sparsetrain: native kernels unavailable ({e}); using the slower numpy path", RuntimeWarning, stacklevel=3
        )
    return _lib


def _declarations_path(library: Path) -> Path:
    """Where the declarations of the library at ``library`` are kept (see :func:`_write_declarations`)."""
    return library.with_name(library.stem + "_h.py")


def _stamp(path: Path) -> None:
    """Record ``path``'s digest beside it (read by :func:`_intact`)."""
    path.with_suffix(".sha1").write_text(_digest(path))


def _intact(path: Path) -> bool:
    """True when ``path`` exists and still has the digest recorded when it was built."""
    stamp = path.with_suffix(".sha1")
    try:
        return path.exists() and stamp.exists() and stamp.read_text().strip() == _digest(path)
    except OSError:
        return False


def available(t: torch.Tensor | None = None) -> bool:
    """True when the kernels are loaded (and, given ``t``, apply to it: float32, contiguous, on the CPU)."""
    if t is not None and not (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()):
        return False
    return _load() is not None


def _offsets(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Where each chunk's kept values start, and how many there are in all."""
    ends = counts.cumsum(0)
    return ends - counts, int(ends[-1])


_AT_LEAST, _ABS_AT_LEAST, _NONZERO = 0, 1, 3  # keep_bits_f32's modes (compressed.c)


def compress(flat: torch.Tensor, threshold: float, absolute: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed bits of ``|flat| >= threshold`` (``flat >= threshold`` if not absolute), the kept values in order)."""
    return _keep(flat, float(threshold), _ABS_AT_LEAST if absolute else _AT_LEAST, 1.0)


def compress_nonzero(flat: torch.Tensor, max_share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed bits of the entries whose bits are not all zero, their values): ``flat`` exactly (``-0.0`` and NaN
    kept), in fewer bytes where it holds zeros; None when more than ``max_share`` of its entries are kept (one
    counting pass is all that costs)."""
    return _keep(flat, 0.0, _NONZERO, max_share)


def _keep(flat: torch.Tensor, threshold: float, mode: int, max_share: float):
    lib, n, threads = _load(), flat.numel(), elementwise_threads()
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8)
    counts = torch.empty(lib.chunk_count(n), dtype=torch.int64)
    lib.keep_bits_f32(flat, n, threshold, mode, packed, counts, threads)
    offsets, total = _offsets(counts)
    if total > max_share * n:
        return None
    values = torch.empty(total, dtype=flat.dtype)
    lib.gather_f32(flat, n, packed, offsets, values, threads)
    return packed, values


def decompress(packed: torch.Tensor, values: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense 1-D tensor of ``numel`` entries: ``values`` where the bit is set, zero elsewhere (into ``out`` if given)."""
    lib, threads = _load(), elementwise_threads()
    counts = torch.empty(lib.chunk_count(numel), dtype=torch.int64)
    lib.count_bits(packed, numel, counts, threads)
    offsets, total = _offsets(counts)
    if total != values.numel():
        raise ValueError(f"bitmask holds {total} set bits but {values.numel()} values were given")
    if out is None:
        out = torch.empty(numel, dtype=values.dtype)
    elif not (out.numel() == numel and out.dtype == values.dtype and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {values.dtype} tensor of {numel} entries")
    lib.scatter_f32(packed, values, offsets, numel, out, threads)
    return out


def relu_bits(flat: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(relu(flat), packed bits of flat > 0) in one pass; ``out`` may be ``flat`` itself (in place)."""
    n = flat.numel()
    out = torch.empty_like(flat) if out is None else out
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8)
    _load().relu_bits_f32(flat, n, out, packed, elementwise_threads())
    return out, packed


def relu_grad(grad: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``grad`` where the packed bit is set, zero elsewhere (ReLU's backward from its bitmask)."""
    out = torch.empty_like(grad)
    _load().relu_grad_f32(grad, packed, grad.numel(), out, elementwise_threads())
    return out


def select(flat: torch.Tensor, threshold: float) -> torch.Tensor:
    """``flat`` where ``|flat| >= threshold``, zero elsewhere, in one pass."""
    out = torch.empty_like(flat)
    _load().select_f32(flat, flat.numel(), float(threshold), out, elementwise_threads())
    return out


def kth_largest_abs(flat: torch.Tensor, k: int) -> tuple[float, int]:
    """(the k-th largest ``|flat|``, how many entries reach it), exact, in three passes over memory."""
    lib, n = _load(), flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    thr, count = torch.empty(1), torch.empty(1, dtype=torch.int64)
    hist = torch.empty(lib.chunk_count(n) * 2048, dtype=torch.int32)  # (uint32 counts to C)
    lib.kth_largest_abs_f32(flat, n, k, thr, count, hist, elementwise_threads())
    return float(thr[0]), int(count[0])


def sparse_conv_forward(
    geom: tuple[int, ...],
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    by_out: tuple,
    out: torch.Tensor,
    batch_inner: bool = False,
) -> torch.Tensor:
    """Direct sparse convolution into ``out``. ``geom`` = N, Cin, H, W, Cout, Ho, Wo, strides, paddings,
    dilations (int64); ``by_out`` = (co_ptr, ci, kh, kw) lists the kept entries by output channel.
    Tensors are NCHW, or [C, H, W, N] with ``batch_inner`` (faster for small feature maps)."""
    fn = _load().sparse_conv_forward_bi if batch_inner else _load().sparse_conv_forward
    fn(geom, x, values, bias, *by_out, out, torch.get_num_threads())  # by_out: co_ptr, ci, kh, kw
    return out


def sparse_conv_backward_input(
    geom: tuple[int, ...],
    grad: torch.Tensor,
    values: torch.Tensor,
    by_in: tuple,
    gx: torch.Tensor,
    batch_inner: bool = False,
) -> torch.Tensor:
    """The input gradient of :func:`sparse_conv_forward` into ``gx``; ``by_in`` = (ci_ptr, co, kh, kw, value index)
    lists the kept entries by input channel."""
    fn = _load().sparse_conv_backward_input_bi if batch_inner else _load().sparse_conv_backward_input
    fn(geom, grad, values, *by_in, gx, torch.get_num_threads())  # by_in: ci_ptr, co, kh, kw, value index
    return gx


def sparse_conv_backward_weight(
    geom: tuple[int, ...], x: torch.Tensor, grad: torch.Tensor, by_out: tuple, nnz: int, batch_inner: bool = False
) -> torch.Tensor:
    """The weight gradient of :func:`sparse_conv_forward` at the kept entries only (in ``by_out`` order)."""
    co_ptr, ci, kh, kw = by_out
    lib, threads = _load(), torch.get_num_threads()
    if batch_inner:
        gw = torch.empty(nnz, dtype=torch.float32)
        lib.sparse_conv_backward_weight_bi(geom, x, grad, co_ptr, ci, kh, kw, gw, threads)
        return gw
    parts = max(1, min(threads, geom[0]))
    partial = torch.empty(parts, nnz, dtype=torch.float32)
    lib.sparse_conv_backward_weight(geom, x, grad, co_ptr, ci, kh, kw, partial, parts, threads)
    return partial.sum(0)


@functools.cache
def block_bytes() -> int:
    """The most bytes a block of the channels-last kernels may hold in its buffers (input planes and output rows)
    when a larger block is taken to fill a tile (see :func:`nhwc_block`): a core's second-level cache, as Linux
    reports it (1 MiB where it does not)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size)
        except (OSError, ValueError):
            break
    return 1 << 20


def nhwc_block(geom: tuple[int, ...], bf16: bool = False) -> int:
    """Images per block for the channels-last kernels (``nhwc_conv.c``) of the convolution ``geom``. First the output
    row of ``wo * B`` lanes that wastes the fewest of its whole vectors (pairs of vectors in bfloat16). Among those,
    in float32, the smallest B whose output plane (``ho`` rows of ``wo * B`` lanes) fills the tile of accumulators
    the kernels hold in registers, else the largest whose buffers stay within :func:`block_bytes`: every kept
    weight's offset and broadcast then serve a whole tile of multiply-adds. With the fewest images (VGG-16's
    4 x 4 layers at B = 4: four multiply-adds a kept weight, 2 x 2 at B = 8: two) those overheads were the kernels'
    time: at B = 16 the two layers' forward and backward take 20-30% less on an Intel Xeon. Else the smaller block
    on a tie (more blocks to share out, smaller buffers)."""
    n, cin, h, w, cout, ho, wo, sh, sw, ph, pw = geom[:11]
    lanes = _load().nhwc_lanes_bf16() if bf16 else _load().nhwc_lanes()
    fewest: list[int] = []
    waste = 1.0
    for b in (1, 2, 4, 8, 16):
        if b > 1 and b > n:
            break
        padded = -(-wo * b // lanes) * lanes
        if (padded - wo * b) / padded < waste - 1e-9:
            fewest, waste = [b], (padded - wo * b) / padded
        elif (padded - wo * b) / padded < waste + 1e-9:
            fewest.append(b)
    if bf16:
        return fewest[0]
    planes = cin * -(-(h + 2 * ph) // sh) * -(-(w + 2 * pw) // sw) * sh * sw  # an image's padded input positions
    vectors = lambda b: -(-wo * b // lanes)  # noqa: E731  (of an output row)
    fits = [b for b in fewest if b == fewest[0] or 4 * (b * planes + cout * ho * vectors(b) * lanes) <= block_bytes()]
    tile = _load().nhwc_accumulators()
    full = [b for b in fits if ho * vectors(b) >= tile]
    return full[0] if full else fits[-1]


def _allocated(status: int, kernels: str) -> None:
    """A kernel's status: -1 when its buffers could not be allocated (said as a MemoryError naming ``kernels``), -2
    for a geometry its bfloat16 path does not take (a ValueError)."""
    if status == -2:
        raise ValueError(f"the {kernels} take bfloat16 at stride 1 only (other convolutions compute in float32)")
    if status != 0:
        raise MemoryError(f"the {kernels} could not allocate their buffers")


_NHWC, _TILED = "channels-last sparse convolution kernels", "register-tiled sparse convolution kernels"


def nhwc_conv_forward(
    geom: tuple[int, ...],
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    by_out: tuple,
    out: torch.Tensor,
) -> torch.Tensor:
    """Direct sparse convolution in channels-last: ``x`` and ``out`` are NHWC in memory (a channels-last tensor's
    ``permute(0, 2, 3, 1)``, contiguous); ``geom`` and ``by_out`` as for :func:`sparse_conv_forward`."""
    half = x.dtype == torch.bfloat16  # (x and out bfloat16: values and bias stay float32)
    fn = _load().nhwc_conv_forward_bf16 if half else _load().nhwc_conv_forward
    _allocated(fn(geom, x, values, bias, *by_out, out, nhwc_block(geom, half), torch.get_num_threads()), _NHWC)
    return out


def nhwc_conv_input_grad(
    geom: tuple[int, ...],
    kernel: tuple[int, int],
    grad: torch.Tensor,
    values: torch.Tensor,
    by_in: tuple,
    flipped: tuple,
    gx: torch.Tensor,
) -> torch.Tensor:
    """The input gradient of :func:`nhwc_conv_forward` into ``gx`` (NHWC) from ``grad`` (NHWC). A stride-1
    convolution whose padding is within the kernel's reach takes the forward kernel: the output gradient padded
    by ``dilation * (kernel - 1) - padding``, convolved with the flipped kernel (``flipped``: ptr, co, kh, kw, value
    index, by input channel, taps flipped); other strides scatter each kept entry (``by_in``, taps as they are)."""
    n, cin, h, w, cout, ho, wo, sh, sw, ph, pw, dh, dw = geom
    pad_h, pad_w = dh * (kernel[0] - 1) - ph, dw * (kernel[1] - 1) - pw
    if sh == sw == 1 and pad_h >= 0 and pad_w >= 0:
        ptr, co, fkh, fkw, vidx = flipped
        back = (n, cout, ho, wo, cin, h, w, 1, 1, pad_h, pad_w, dh, dw)
        return nhwc_conv_forward(back, grad, values.index_select(0, vidx), None, (ptr, co, fkh, fkw), gx)
    if grad.dtype != torch.float32:  # (read as float32, a narrower tensor would send the C code past its end)
        raise TypeError(f"a strided convolution's input gradient computes in float32, got a {grad.dtype} gradient")
    scatter = _load().nhwc_conv_input_grad_scatter
    _allocated(scatter(geom, grad, values, *by_in, gx, nhwc_block(geom), torch.get_num_threads()), _NHWC)
    return gx


def nhwc_conv_weight_grad(
    geom: tuple[int, ...], x: torch.Tensor, grad: torch.Tensor, by_out: tuple, nnz: int
) -> torch.Tensor:
    """The gradient of the kept weights of :func:`nhwc_conv_forward` (NHWC ``x`` and ``grad``), in ``by_out`` order."""
    threads = torch.get_num_threads()
    half = x.dtype == torch.bfloat16  # (x and grad bfloat16; the gradient float32)
    block = nhwc_block(geom, half)
    parts = max(1, min(threads, -(-geom[0] // block)))
    partial = torch.empty(parts, nnz, dtype=torch.float32)
    fn = _load().nhwc_conv_weight_grad_bf16 if half else _load().nhwc_conv_weight_grad
    _allocated(fn(geom, x, grad, *by_out, partial, parts, block, threads), _NHWC)
    return partial.sum(0)


def nhwc_conv_backward(
    geom: tuple[int, ...],
    kernel: tuple[int, int],
    x: torch.Tensor,
    grad: torch.Tensor,
    values: torch.Tensor,
    by_out: tuple,
    flipped: tuple,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Both gradients of a stride-1 float32 :func:`nhwc_conv_forward` in one pass over the batch, the output
    gradient laid out once for both: ``gx`` (NHWC) and the kept weights' gradient in ``by_out`` order. None where
    that pass does not apply (a strided convolution, padding beyond the kernel's reach, output rows whose padding
    lanes the output gradient's padding cannot cover): then :func:`nhwc_conv_input_grad` and
    :func:`nhwc_conv_weight_grad` (``flipped`` as for the first). Float32 only."""
    n, cin, h, w, cout, ho, wo, sh, sw, ph, pw, dh, dw = geom
    pad_h, pad_w = dh * (kernel[0] - 1) - ph, dw * (kernel[1] - 1) - pw
    if (sh, sw) != (1, 1) or min(pad_h, pad_w) < 0:
        return None
    (co_ptr, ci, kh, kw), (fptr, co, fkh, fkw, vidx) = by_out, flipped
    back = (n, cout, ho, wo, cin, h, w, 1, 1, pad_h, pad_w, dh, dw)
    threads, block = torch.get_num_threads(), nhwc_block(geom)
    parts = max(1, min(threads, -(-n // block)))
    gx, partial = torch.empty(n, h, w, cin), torch.empty(parts, values.numel())
    fvalues = values.index_select(0, vidx)
    pointers = (geom, back, x, grad, co_ptr, ci, kh, kw, fvalues, fptr, co, fkh, fkw, gx, partial)
    status = _load().nhwc_conv_backward(*pointers, parts, block, threads)
    if status == -2:
        return None
    _allocated(status, _NHWC)
    return gx, partial.sum(0)


def tiled_supported(ho: int, wo: int) -> bool:
    """Whether the register-tiled kernels (``tiled_conv.c``) cover an output plane of ``ho`` x ``wo``."""
    lib = _load()
    return lib is not None and bool(lib.tiled_conv_supported(ho, wo))


def _tiled_dims(x: torch.Tensor, padding: tuple[int, int], out_shape) -> tuple[int, ...]:
    n, cin, h, w = x.shape
    _, cout, ho, wo = out_shape
    return (n, cin, h, w, *padding, cout, ho, wo)


def tiled_conv(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    lists: tuple,
    out: torch.Tensor,
    padding: tuple[int, int],
) -> torch.Tensor:
    """A stride-1 direct sparse convolution of ``x`` [N, Cin, H, W] (contiguous), zero-padded by ``padding`` (each
    image in a buffer of the kernel's own), into ``out`` [N, Cout, Ho, Wo] (register-tiled); ``lists`` = (ptr,
    channel, kh, kw) lists the kept entries by output channel, in the order of ``values``. Check
    :func:`tiled_supported` first."""
    ptr, ch, kh, kw = lists
    dims = _tiled_dims(x, padding, out.shape)
    lib, threads = _load(), torch.get_num_threads()
    args = (dims, x, values, bias, ptr, ch, kh, kw, out)
    _allocated(lib.tiled_conv_forward(*args, threads), _TILED)
    return out


def tiled_conv_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, lists: tuple, nnz: int, padding: tuple[int, int]
) -> torch.Tensor:
    """The gradient of the kept weights of :func:`tiled_conv` (planes: ``x`` [N, Cin, H, W] padded by ``padding``,
    ``grad`` [N, Cout, Ho, Wo], both contiguous), in the order of ``lists``."""
    ptr, ch, kh, kw = lists
    threads = torch.get_num_threads()
    parts = max(1, min(threads, x.shape[0]))
    partial = torch.empty(parts, nnz, dtype=torch.float32)
    dims = _tiled_dims(x, padding, grad.shape)
    _allocated(
        _load().tiled_conv_weight_grad(dims, x, grad, ptr, ch, kh, kw, partial, parts, threads),
        _TILED,
    )
    return partial[0] if parts == 1 else partial.sum(0)


def threshold_lists(weight: torch.Tensor, threshold: float) -> tuple[torch.Tensor, tuple, tuple]:
    """The entries of a conv weight ``[Cout, Cin, KH, KW]`` with ``|w| >= threshold``: (their values in weight order,
    the lists by output channel (co_ptr, ci, kh, kw), the lists by input channel (ci_ptr, co, kh, kw, value
    index)), as :class:`~sparsetrain.execution.backends.DirectStructure` holds them; two passes over the weight."""
    w = weight.detach().contiguous()
    cout, cin, kh, kw = w.shape
    lib, threads = _load(), torch.get_num_threads()
    co_ptr = torch.empty(cout + 1, dtype=torch.int64)
    lib.threshold_counts(w, cout, cin * kh * kw, float(threshold), co_ptr, threads)
    nnz = int(co_ptr[-1])
    values = torch.empty(nnz, dtype=torch.float32)
    ci, co = torch.empty(nnz, dtype=torch.int32), torch.empty(nnz, dtype=torch.int32)
    khs, kws, kh_t, kw_t = (torch.empty(nnz, dtype=torch.int16) for _ in range(4))
    ci_ptr, vidx = torch.empty(2 * cin + 1, dtype=torch.int64), torch.empty(nnz, dtype=torch.int32)
    lib.threshold_lists(
        w, cout, cin, kh, kw, float(threshold), co_ptr, ci, khs, kws, values, ci_ptr, co, kh_t, kw_t, vidx, threads
    )
    return values, (co_ptr, ci, khs, kws), (ci_ptr[: cin + 1], co, kh_t, kw_t, vidx)


def pool_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout a pooling kernel keeps: channels-last when ``x`` has it, else NCHW."""
    return torch.channels_last if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format


def _pool_call(fn, dims_of: torch.Tensor, big: torch.Tensor, small: torch.Tensor, *ptrs) -> None:
    """Call a pooling kernel: sizes from ``dims_of``, the strides of the input-sized and output-sized tensors."""
    strides = (*big.stride(), *small.stride())
    channels_inner = int(pool_layout(big) == torch.channels_last)
    fn(tuple(dims_of.shape), strides, *ptrs, channels_inner, torch.get_num_threads())


def max_pool2(x: torch.Tensor, positions: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """2x2 max-pooling, stride 2, of a float32 ``x`` [N, C, H, W] in its own layout (NCHW or channels-last):
    (the output, one uint8 per output giving the window position of its maximum, row-major; None when
    ``positions`` is off, as inference wants)."""
    fmt = pool_layout(x)
    x = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    out = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=fmt)
    where = torch.empty(out.shape, dtype=torch.uint8, memory_format=fmt) if positions else None
    _pool_call(_load().max_pool2_forward, out, x, out, x, out, where)
    return out, where


def max_pool2_grad(grad: torch.Tensor, where: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The input gradient of :func:`max_pool2` (input ``shape``, in the layout of ``where``): ``grad`` at each
    window's maximum, zero elsewhere."""
    fmt = pool_layout(where)
    grad = grad.contiguous(memory_format=fmt)
    odd = shape[2] % 2 or shape[3] % 2  # rows or columns outside every window get no gradient
    gx = torch.empty(shape, dtype=grad.dtype, memory_format=fmt)
    if odd:
        gx.zero_()
    _pool_call(_load().max_pool2_backward, grad, gx, grad, grad, where, gx)
    return gx


def condensed_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    rows: tuple,
    out_features: int,
) -> torch.Tensor:
    """``x [T, in] @ W_s.T + bias`` for a sparse W_s given by ``rows`` = (row_ptr int64, col int32: the kept
    entries row by row, in the order of ``values``): nnz * T multiply-adds (``condensed.c``)."""
    t, n_in = x.shape
    half = x.dtype == torch.bfloat16  # (values and bias stay float32: the kernel rounds the values once)
    y = torch.empty(t, out_features, dtype=x.dtype)
    fn = _load().condensed_forward_bf16 if half else _load().condensed_forward
    if _rows_call(fn, (t, n_in, out_features), x, values, bias, rows, y) != 0:
        raise MemoryError("condensed_forward: no memory for the token-block buffers")
    return y


def bf16_kernels() -> bool:
    """Whether this build has the kernels' bfloat16 paths (AVX-512 builds; one vdpbf16ps per 32 products where the
    CPU has AVX512-BF16): :func:`condensed_forward`, :func:`condensed_backward`, :func:`nhwc_conv_forward`,
    :func:`nhwc_conv_weight_grad` and the stride-1 :func:`nhwc_conv_input_grad` then take bfloat16 inputs and
    gradients."""
    lib = _load()
    return lib is not None and lib.has_bf16


def _rows_call(fn, dims: tuple, x: torch.Tensor, values, bias, rows: tuple, y: torch.Tensor) -> int:
    """Call a condensed forward kernel (both take dims, input, values, bias, row lists, output, threads)."""
    return fn(dims, x, values, bias, *rows, y, torch.get_num_threads())  # rows: row_ptr, col


FEW_TOKENS = 64  # condensed.c's token block: a Linear input of fewer tokens runs on condensed_forward_few at inference


def condensed_forward_few(
    xt: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, rows: tuple, out_features: int
):
    """:func:`condensed_forward` with the tokens innermost, ``xt [in, T] -> [out, T]``, rows split among the threads
    over chunks of tokens (the token-block forward gives each thread whole blocks of 64 tokens: with few tokens one
    block, one thread; and it transposes, where a one-image batch's unfolded patches, or its NCHW 1 x 1 input, come
    laid so already). Forward only: inference."""
    n_in, t = xt.shape
    lanes = _load().condensed_lanes()
    tp = max(-(-t // lanes) * lanes, lanes)  # rows padded to whole vectors (zeros)
    if tp != t:
        padded = torch.zeros(n_in, tp)
        padded[:, :t] = xt
        xt = padded
    xt = xt.contiguous()  # (held here: the C code reads its memory)
    y = torch.empty(out_features, tp, dtype=torch.float32)
    _rows_call(_load().condensed_forward_few, (tp, n_in, out_features), xt, values, bias, rows, y)
    return y[:, :t]


def condensed_backward(
    x: torch.Tensor, grad: torch.Tensor, values: torch.Tensor, rows: tuple, input_grad: bool, weight_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of :func:`condensed_forward`, from the same row lists: for the input ``[T, in]`` and for the
    kept weights only (in ``rows`` order)."""
    row_ptr, col = rows
    t, n_in = x.shape
    nnz, threads = values.numel(), torch.get_num_threads()
    half = x.dtype == torch.bfloat16  # x, grad and the input gradient bfloat16; the weights' gradient float32
    gx = torch.empty(t, n_in, dtype=x.dtype) if input_grad else None
    if t == 0:
        return (gx, torch.zeros(nnz) if weight_grad else None)
    # one partial sum of the weight gradient per worker: at most 256 MB of them
    workers = max(1, min(threads, -(-t // 64), (1 << 26) // max(nnz, 1)))
    partial = torch.empty(workers, nnz, dtype=torch.float32) if weight_grad else None
    dims = (t, n_in, grad.shape[1])
    fn = _load().condensed_backward_bf16 if half else _load().condensed_backward
    used = fn(dims, x, grad, values, row_ptr, col, gx, partial, workers, threads)
    if used < 0:
        raise MemoryError("condensed_backward: no memory for the token-block buffers")
    return gx, (partial[:used].sum(0) if weight_grad else None)


def compressed_weight_grad(
    packed: torch.Tensor,
    values: torch.Tensor,
    shape: tuple,
    grad: torch.Tensor,
    kernel: tuple[int, int],
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    channels_first: bool = False,
) -> torch.Tensor:
    """The weight gradient of a convolution from its *compressed* input, ``[Cin, KH, KW, Cout]``.

    ``packed``/``values`` are what :func:`compress` made of the input ``[N, H, W, Cin]`` in memory order
    (channels-last; a Linear's tokens are N images of 1 x 1 under a 1x1 kernel); ``grad`` is the output
    gradient ``[N, Ho, Wo, Cout]``, contiguous (zero-padded here to a multiple of 64 channels). With
    ``channels_first`` the input was compressed in NCHW order instead (``shape`` still names N, H, W, Cin).
    Each kept input entry costs KH x KW vector multiply-adds over the output channels (``compressed_grad.c``):
    the work falls with the input's density, and the dense input is never rebuilt.
    """
    lib, threads = _load(), torch.get_num_threads()
    n, h, w, cin = shape
    _, ho, wo, cout = grad.shape
    kh, kw = kernel
    if h >= 1 << 10 or w >= 1 << 10:
        raise ValueError(f"feature maps up to 1023 x 1023 are supported, got {h} x {w}")
    plane_off = None
    if channels_first:  # kept entries per plane; an image's offset is that of its first plane
        plane_off = torch.empty(n * cin + 1, dtype=torch.int64)
        lib.compressed_image_offsets(packed, n * cin, h * w, plane_off, threads)
        img_off = plane_off[::cin].contiguous()
    else:
        img_off = torch.empty(n + 1, dtype=torch.int64)
        lib.compressed_image_offsets(packed, n, h * w * cin, img_off, threads)
    kept = int(img_off[-1])
    if kept != values.numel():
        raise ValueError(f"bitmask holds {kept} set bits but {values.numel()} values were given")
    gwt = torch.empty(cin, kh, kw, cout, dtype=torch.float32)
    gstride = -(-cout // 64) * 64
    if gstride != cout:  # the kernels read whole blocks of 64 output channels
        grad = F.pad(grad, (0, gstride - cout))
    ch_ptr = torch.empty(n * (cin + 1), dtype=torch.int64)
    pos, val = torch.empty(max(kept, 1), dtype=torch.int32), torch.empty(max(kept, 1), dtype=torch.float32)
    geom = (n, cin, h, w, cout, ho, wo, kh, kw, *stride, *padding, *dilation)
    offsets = (img_off, plane_off)  # (plane_off None: NULL)
    lib.compressed_conv_weight_grad(geom, packed, values, *offsets, grad, gwt, ch_ptr, pos, val, gstride, threads)
    return gwt


class NoDataError(RuntimeError):
    """A kernel was handed a tensor that holds no data the C code could read: a fake or meta tensor (what
    ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` trace with), a tensor wrapped by ``torch.func``
    (``grad``, ``vmap``), or one on another device. Raised before any C code runs, so the process lives on.
    ``layer``: the weight name of the sparse layer that refused (set where a layer re-raises it), else None."""

    layer: str | None = None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def what_is_wrong(t: torch.Tensor, cpu: bool = True) -> str | None:
    """Why the C kernels cannot read ``t`` (None when they can); ``cpu=False`` leaves out the device (for layers
    that run elsewhere too and only need a tensor that holds data)."""
    device = t.device.type
    if type(t) in _PLAIN and device != "meta" and (device == "cpu" or not cpu):
        if not torch._C._functorch.is_functorch_wrapped_tensor(t):
            return None  # the common case, first and cheap (a fake tensor is never of a plain type)
    if device == "meta" or _is_fake(t):
        return "a fake or meta tensor (one a compiler or exporter traces with)"
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return "a tensor wrapped by torch.func (grad, vmap, functional_call's transforms)"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"a {type(t).__name__} (a tensor subclass)"
    if cpu and t.device.type != "cpu":
        return f"a tensor on {t.device}"
    return None


def _guarded(fn):
    """``fn`` refusing, with :class:`NoDataError`, tensors whose memory the C code cannot read, and never traced by
    ``torch.compile`` (its calls into C run as Python, on real tensors, at a graph break)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (tuple, list)) else (a,):
                why = torch.is_tensor(t) and what_is_wrong(t)
                allowed = (torch.float32, torch.bfloat16) if fn.__name__ in _TAKE_BF16 else (torch.float32,)
                if torch.is_tensor(t) and t.is_floating_point() and t.dtype not in allowed and not why:
                    # read as float32, a narrower tensor would send the C code past its end
                    raise TypeError(
                        f"the native kernel {fn.__name__} was handed a {t.dtype} tensor; it computes in "
                        f"{' or '.join(str(d) for d in allowed)} (under torch.autocast the sparse layers cast their "
                        "inputs to what they compute in; a model in another dtype runs execution='masked')"
                    )
                if why:
                    raise NoDataError(
                        f"the native kernel {fn.__name__} was handed {why}; the sparse kernels run on real CPU "
                        "tensors: run this transform over execution='masked', or over the model sp.remove() returns"
                    )
        return fn(*args, **kwargs)

    return torch.compiler.disable(call)


# entry points with a bfloat16 path (bf16_kernels()); the channels-last input gradient at stride 1 only
_TAKE_BF16 = (
    "condensed_forward",
    "condensed_backward",
    "nhwc_conv_forward",
    "nhwc_conv_weight_grad",
    "nhwc_conv_input_grad",
)

for _name in __all__:  # every entry point that takes tensors checks them before any C code runs
    if _name not in (
        "available",
        "bf16_kernels",
        "nhwc_block",
        "tiled_supported",
        "elementwise_threads",
        "library_path",
        "compiler",
    ):
        globals()[_name] = _guarded(globals()[_name])
__all__ += ["NoDataError", "what_is_wrong"]
