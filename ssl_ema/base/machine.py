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


def cpu_flags() -> str:
    """The instruction sets that decide a CPU step's speed, from /proc/cpuinfo's (lscpu's)
    flags: AVX2, AVX-512, bfloat16 (AVX512_BF16) and AMX, each 'yes' or 'no'."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((set(line.split(':', 1)[1].split()) for line in f
                          if line.startswith('flags')), set())
    except OSError:
        return 'CPU flags unknown'
    have = {'AVX2': 'avx2' in flags, 'AVX-512': 'avx512f' in flags,
            'bf16': bool({'avx512_bf16', 'amx_bf16'} & flags), 'AMX': 'amx_tile' in flags}
    text = ', '.join(f'{name} {"yes" if ok else "no"}' for name, ok in have.items())
    # oneDNN (TensorFlow's x86 kernels) can be held to an older instruction set, e.g.
    # ONEDNN_MAX_CPU_ISA=AVX2 times an AVX-512 machine's convolutions as an AVX2 CPU runs them.
    limit = os.environ.get('ONEDNN_MAX_CPU_ISA') or os.environ.get('DNNL_MAX_CPU_ISA')
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
