"""What a benchmark says about the machine it ran on, and which GPU each local process gets."""
import glob
import os
import re
import subprocess


def cpu_model() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 'unknown CPU (no lscpu)'
    fields = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
    model = fields.get('Model name', 'unknown CPU').strip()
    return f'{model}, {fields.get("CPU(s)", "?").strip()} CPUs'


def _cpuinfo_flags():
    """The CPU's flags (a set) from /proc/cpuinfo, None where it cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((set(line.split(':', 1)[1].split()) for line in f
                         if line.startswith('flags')), set())
    except OSError:
        return None


def cpu_flags() -> str:
    """The instruction sets that decide a CPU step's speed, from /proc/cpuinfo's (lscpu's)
    flags: AVX2, AVX-512, bfloat16 (AVX512_BF16) and AMX, each 'yes' or 'no'."""
    flags = _cpuinfo_flags()
    if flags is None:
        return 'CPU flags unknown'
    have = {'AVX2': 'avx2' in flags, 'AVX-512': 'avx512f' in flags,
            'bf16': bool({'avx512_bf16', 'amx_bf16'} & flags), 'AMX': 'amx_tile' in flags}
    text = ', '.join(f'{name} {"yes" if ok else "no"}' for name, ok in have.items())
    # oneDNN (TensorFlow's x86 kernels) can be held to an older instruction set, e.g.
    # ONEDNN_MAX_CPU_ISA=AVX2 times an AVX-512 machine's convolutions as an AVX2 CPU runs them.
    limit = _onednn_limit(os.environ)
    return f'{text}; oneDNN limited to {limit} (ONEDNN_MAX_CPU_ISA)' if limit else text


def visible_gpus(environ=os.environ, gpus=None, device_files=None) -> list:
    """The GPUs this process may hand out, as CUDA_VISIBLE_DEVICES spells them: `gpus` (a
    --gpus flag's comma-separated ids) if given, else $CUDA_VISIBLE_DEVICES if set ('' and -1:
    none), else this machine's NVIDIA devices (/dev/nvidiaN: no TensorFlow, no CUDA started)."""
    if gpus is None:
        gpus = environ.get('CUDA_VISIBLE_DEVICES')
    if gpus is None:
        files = glob.glob('/dev/nvidia[0-9]*') if device_files is None else device_files
        return sorted((m.group(1) for m in map(re.compile(r'.*/nvidia(\d+)$').match, files) if m),
                      key=int)
    ids = [g.strip() for g in gpus.split(',') if g.strip()]
    return [] if ids[:1] == ['-1'] else ids


def process_environments(processes: int, gpus: list, environ=os.environ) -> list:
    """The environment of each of `processes` local processes (trainings, workers): each sees
    only its own GPU of `gpus`, round-robin when there are more processes than GPUs, with
    memory growth on (TF_FORCE_GPU_ALLOW_GROWTH, unless `environ` sets it) so that processes
    sharing a GPU do not each reserve all of its memory. Without GPUs, `environ` unchanged."""
    if not gpus:
        return [dict(environ) for _ in range(processes)]
    return [dict(environ, CUDA_VISIBLE_DEVICES=gpus[i % len(gpus)],
                 TF_FORCE_GPU_ALLOW_GROWTH=environ.get('TF_FORCE_GPU_ALLOW_GROWTH', 'true'))
            for i in range(processes)]


# The instruction sets at which oneDNN (TensorFlow's x86 kernels) computes bfloat16 natively; a
# limit below them (ONEDNN_MAX_CPU_ISA=AVX2, AVX512_CORE, ...) makes bfloat16 emulated, slower
# than float32 (runs/SPEED.md).
_BF16_ISAS = ('AVX512_CORE_BF16', 'AVX10_1_512', 'AVX512_CORE_FP16', 'AVX10_1_512_AMX',
              'AVX512_CORE_AMX', 'AVX10_1_512_AMX_FP16', 'AVX512_CORE_AMX_FP16', 'AVX10_2_512',
              'AVX10_2_512_AMX_2', 'ALL', 'DEFAULT')


def native_bfloat16(cpu_flags=None, environ=os.environ, gpu_capabilities=None) -> str:
    """Why this machine computes bfloat16 natively ('' if it does not): every GPU of compute
    capability 8.0 or more (A100 on), or, without GPUs, a CPU with AVX512_BF16 or AMX-BF16 whose
    oneDNN is not held below them by ONEDNN_MAX_CPU_ISA. `cpu_flags`: /proc/cpuinfo's flags;
    `gpu_capabilities`: each visible GPU's (major, minor), both read from the machine if None."""
    if gpu_capabilities is None:
        import tensorflow as tf
        gpu_capabilities = [tf.config.experimental.get_device_details(g).get(
            'compute_capability', (0, 0)) for g in tf.config.list_physical_devices('GPU')]
    if gpu_capabilities:
        return 'GPUs of compute capability >= 8.0' if min(gpu_capabilities) >= (8, 0) else ''
    if cpu_flags is None:
        cpu_flags = _cpuinfo_flags() or set()
    found = sorted({'avx512_bf16', 'amx_bf16'} & set(cpu_flags))
    limit = _onednn_limit(environ)
    if not found or (limit and limit not in _BF16_ISAS):
        return ''
    return 'CPU with ' + ' and '.join(f.upper() for f in found)


def _onednn_limit(environ) -> str:
    """The instruction set oneDNN is held to (ONEDNN_MAX_CPU_ISA), upper case; '' if none."""
    return (environ.get('ONEDNN_MAX_CPU_ISA') or environ.get('DNNL_MAX_CPU_ISA') or '').upper()


def avx2_only(cpu_flags=None, environ=os.environ, gpu_capabilities=None) -> str:
    """Why this machine computes float32 no wider than AVX2 ('' if it does not): no GPU, and a
    CPU without AVX-512, or one whose oneDNN ONEDNN_MAX_CPU_ISA holds below AVX-512. A step of
    small_cnn costs ~2.5x an AVX-512 CPU's CPU-seconds there (runs/RECIPE.md section 6), so an
    hour buys fewer steps. Arguments as native_bfloat16's (`gpu_capabilities`: any list, one
    entry per visible GPU)."""
    if gpu_capabilities is None:
        import tensorflow as tf
        gpu_capabilities = tf.config.list_physical_devices('GPU')
    if gpu_capabilities:
        return ''
    if cpu_flags is None:
        cpu_flags = _cpuinfo_flags() or set()
    if 'avx512f' not in cpu_flags:
        return 'CPU without AVX-512'
    limit = _onednn_limit(environ)
    if limit and not limit.startswith(('AVX512', 'AVX10')) and limit not in ('ALL', 'DEFAULT'):
        return f'oneDNN held to {limit} (ONEDNN_MAX_CPU_ISA)'
    return ''


def resolve_precision(precision: str, **machine) -> str:
    """--precision as the layers get it: `auto` is mixed_bfloat16 where the machine computes
    bfloat16 natively (`native_bfloat16`: twice float32's step rate on an AVX512_BF16 CPU,
    runs/RECIPE.md section 5), float32 elsewhere; any other value is itself."""
    if precision != 'auto':
        return precision
    return 'mixed_bfloat16' if native_bfloat16(**machine) else 'float32'
