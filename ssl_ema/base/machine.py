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
