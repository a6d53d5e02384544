"""What a benchmark says about the machine it ran on."""
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
    return ', '.join(f'{name} {"yes" if ok else "no"}' for name, ok in have.items())
