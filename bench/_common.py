"What every benchmark script shares: the machine line of its results header and a warmed-up median timer."
import datetime, os, platform, statistics, time


def machine_info(device: str = 'cpu') -> dict:
    "CPU model, cores, torch threads, GPU, versions and date."
    import torch
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else 'none',
                torch=torch.__version__, python=platform.python_version(), date=datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), device=device)


def machine() -> str:
    "One line for a results header."
    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores ({m['threads']} torch thread{'s' if m['threads'] != 1 else ''}), GPU: {m['gpu']}; torch {m['torch']}, Python {m['python']}; {m['date']}"


def median_time(fn, repeats: int) -> float:
    "Median seconds of `repeats` calls of `fn` after one warm-up call."
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)
