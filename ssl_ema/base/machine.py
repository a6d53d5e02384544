"""What a benchmark says about the machine it ran on."""
import os
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
