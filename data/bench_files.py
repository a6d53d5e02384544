"""File-backed folders at scale: indexing, start-up, memory and pipeline speed (a benchmark, not a
test; issue 20's figures in runs/SPEED.md, "File-backed folders").

    python -m ssl_ema.data.bench_files --images=200000        # writes the folder once (~3 min)

1. Writes --images small images (--min_side..--max_side pixels a side, JPEG and PNG in turn, 10
   class folders) under --dir, unless they are there already.
2. Indexes the folder twice: first with no cache (listing + every file's header), then from the
   cache (listing + signature only).
3. Times the FixMatch-shaped stream (labeled weak + unlabeled weak and strong views, --batch,
   --uratio) of the file-backed pipeline at --image_size: one process building whole batches,
   then --workers processes at once, each building only its share (pipeline.Share), against one
   forward+backward+SGD step of --arch at the same size (data/bench.py's train_step_rate).
4. Starts `python -m ssl_ema.train` (and `ssl_ema.launch --workers=2`) on the folder (FixMatch,
   --start_arch, the default batch) and reports the time from the command's start to its first
   training step and the peak resident memory of every training process (VmHWM) at that moment.
5. Runs `python -m ssl_ema.predict --resize` over the whole folder with each of
   --predict_archs' classifiers at --image_size (a .keras file, untrained: its speed is a trained
   one's; data/ may not import the exporter of ssl_ema.core), between
   two timings of the pipeline's stream of step 3, and reports its images/s (over the command's
   whole run, and from its first progress line, after the first batch, to its last: TensorFlow's
   import and the start-up excluded, as the stream's own timing excludes them), the ratio to the
   stream's (the mean of the two timings), and its peak resident memory.
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from ssl_ema.base.machine import cpu_model
from ssl_ema.data import bench
from ssl_ema.data.images import parse_size

flags.DEFINE_string('dir', os.path.join(tempfile.gettempdir(), 'ssl_ema_bench_folder'),
                    'Folder of images (written if it does not hold --images images).')
flags.DEFINE_integer('images', 200_000, 'Images in the folder.')
flags.DEFINE_integer('min_side', 24, 'Smallest image side written, pixels.')
flags.DEFINE_integer('max_side', 40, 'Largest image side written, pixels.')
flags.DEFINE_string('image_size', '32', 'The --image_size the pipeline reads the folder at.')
flags.DEFINE_integer('workers', 2, 'Local workers for the per-share figures (0: skip them).')
flags.DEFINE_string('share', '', 'Internal: "r,n": time only share r of n of every batch.')
flags.DEFINE_bool('memory_only', False, 'Only report the resident memory of one process before and '
                  'after building the (streamed) dataset and after 20 batches.')
flags.DEFINE_string('start_arch', 'small_cnn', 'Backbone of the start-up runs (a small one: '
                    'the figure is the data path\'s, not wrn28_2\'s activations).')
flags.DEFINE_bool('start', True, 'Also time `ssl_ema.train` and `ssl_ema.launch` to their first '
                  'training step.')
flags.DEFINE_list('predict_archs', ['linear', 'small_cnn'], 'Classifiers `ssl_ema.predict` is '
                  'timed with over the folder (step 5; empty: skip it): `linear` (no convolution: '
                  'the figure is predict\'s reading, decoding and writing) or a --arch.')
FLAGS = flags.FLAGS
CLASSES = 10


def _write_part(args):
    root, first, stop, min_side, max_side = args
    from PIL import Image
    rng = np.random.RandomState(first)
    for i in range(first, stop):
        h, w = rng.randint(min_side, max_side + 1, 2)
        image = Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8))
        path = os.path.join(root, f'class{i % CLASSES}', f'{i:07d}.{"png" if i % 2 else "jpg"}')
        image.save(path, quality=90)


def write_folder(root: str, n: int, log) -> None:
    import multiprocessing
    listed = sum(len(os.listdir(os.path.join(root, f'class{c}'))) for c in range(CLASSES)
                 if os.path.isdir(os.path.join(root, f'class{c}')))
    if listed == n:
        return
    for c in range(CLASSES):
        os.makedirs(os.path.join(root, f'class{c}'), exist_ok=True)
    start = time.perf_counter()
    chunks = [(root, a, min(a + 5000, n), FLAGS.min_side, FLAGS.max_side) for a in range(0, n, 5000)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(_write_part, chunks)
    log(f'wrote {n} images in {root} in {time.perf_counter() - start:.0f} s')


def pipeline_rate(dataset, share) -> float:
    """Images/s the FixMatch-shaped stream of `share` delivers, counted as the step consumes
    them (labeled + two views of each unlabeled image)."""
    first, rows = share.rows(FLAGS.batch)
    per_step = rows * (1 + 2 * FLAGS.uratio)
    return bench.images_per_second(dataset.train(FLAGS.batch, FLAGS.uratio, ('weak', 'strong'),
                                                 share=share), per_step, FLAGS.steps)


def build(name):
    from ssl_ema import data
    return data.build(name, labels=250, valid=500, seed=1, image_size=FLAGS.image_size)


def first_step(command, log, label):
    """Seconds from starting `command` to its 'step 1/' line; peak RSS (MB) of every process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    seconds = None
    for line in process.stdout:
        if line.startswith('step 1/'):
            seconds = time.perf_counter() - start
            break
    pids = [process.pid]
    try:
        with open(f'/proc/{process.pid}/task/{process.pid}/children') as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    peaks = [p for p in map(peak_mb, pids) if p]
    process.terminate()   # SIGTERM: the run saves a checkpoint and stops
    process.wait(timeout=300)
    log(f'{label}: first step after {seconds:.1f} s; peak resident memory (MB) per process: '
        f'{peaks}')


def peak_mb(pid: int) -> int:
    """Peak resident memory (VmHWM) of process `pid` so far, MB; 0 if it is gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            fields = dict(line.split(':', 1) for line in f if ':' in line)
        return int(fields['VmHWM'].split()[0]) // 1024
    except (OSError, KeyError):
        return 0


def tiny_classifier(path: str, shape, arch: str) -> None:
    """A .keras classifier (what predict takes besides an export) of an untrained `arch` for
    `shape` uint8 images, with an export's parts: standardisation inside, softmax out."""
    import keras
    from ssl_ema.nn import backbones
    if arch == 'linear':
        inputs = keras.Input(shape)
        net = keras.Model(inputs, keras.layers.Dense(CLASSES)(keras.layers.Flatten()(inputs)))
    else:
        net = backbones.build(arch, shape, CLASSES, portable=True)
    images = keras.Input(shape, dtype='uint8')
    x = keras.layers.Rescaling(1 / 64., offset=-127.5 / 64.)(images)
    keras.Model(images, keras.layers.Softmax()(net(x))).save(path)


def predict_rate(export: str, out: str):
    """`python -m ssl_ema.predict --resize` over --dir: (images, seconds of the whole command,
    images/s from its first progress line (the first batch) to its last, peak resident memory in
    MB, exit status)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, '-m', 'ssl_ema.predict', f'--model={export}',
                                f'--input={FLAGS.dir}', f'--out={out}', '--resize'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress, peak = [], 0   # (images done, seconds): the first batch, then every 10%
    for line in process.stderr:
        if line.startswith('predict: '):
            progress.append((int(line.split()[1].split('/')[0]), time.perf_counter() - start))
            # VmHWM, not wait4's ru_maxrss: that counts this process's memory, forked before exec
            peak = max(peak, peak_mb(process.pid))
    process.wait()
    seconds = time.perf_counter() - start
    (first, t0), (last, t1) = progress[0], progress[-1]
    return last, seconds, (last - first) / (t1 - t0), peak, process.returncode


def resident_mb() -> int:
    with open('/proc/self/status') as f:
        return int(next(line for line in f if line.startswith('VmRSS')).split()[1]) // 1024


def report_memory(name, log):
    """How the folder's size shows in memory: streaming forced, whatever the folder's size."""
    from ssl_ema.data import folder
    folder.IN_MEMORY_MAX_IMAGES = 0
    before = resident_mb()
    dataset = build(name)
    built = resident_mb()
    batches = iter(dataset.train(FLAGS.batch, FLAGS.uratio, ('weak', 'strong')))
    for _ in range(20):
        next(batches)
    log(f'{name}: {len(dataset.arrays.y_train) + len(dataset.arrays.y_test)} images; resident '
        f'memory after importing TensorFlow {before} MB, after building the dataset {built} MB, '
        f'after 20 batches {resident_mb()} MB')


def main(argv):
    del argv
    import tensorflow as tf
    from ssl_ema.data import folder
    from ssl_ema.data.pipeline import Share
    log = print
    name = f'folder:{FLAGS.dir}'
    if FLAGS.memory_only:
        return report_memory(name, log)
    if FLAGS.share:   # a worker of the per-share figure
        r, n = (int(v) for v in FLAGS.share.split(','))
        dataset = build(name)
        print(f'rate {pipeline_rate(dataset, Share(r, 1, n)):.1f}')
        return
    log(f'CPU: {cpu_model()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}; load average '
        f'{" ".join(f"{v:.1f}" for v in os.getloadavg())} at the start')
    write_folder(FLAGS.dir, FLAGS.images, log)
    for cache in folder._cache_paths(pathlib.Path(FLAGS.dir)):
        if cache.is_file():
            cache.unlink()
    from ssl_ema import data
    for what in ('first indexing (listing + headers)', 'cached index (listing only)'):
        start = time.perf_counter()
        arrays = data.load(name, image_size=parse_size(FLAGS.image_size))
        count = len(arrays.y_train) + len(arrays.y_test)
        log(f'{what}: {time.perf_counter() - start:.1f} s for {count} images '
            f'({type(arrays.x_train).__name__})')
    dataset = build(name)
    one = pipeline_rate(dataset, Share())
    log(f'pipeline, 1 process, whole batches ({FLAGS.batch} + {FLAGS.uratio}x{FLAGS.batch} '
        f'unlabeled, weak + strong views): {one:.0f} images/s')
    from ssl_ema.data.pipeline import SSLData
    from ssl_ema.data.splits import make_split
    arrays = bench.synthetic(shape=dataset.image_shape)
    in_memory = SSLData(arrays, make_split(arrays.y_train, 250, 0, 1, arrays.num_classes), seed=1)
    memory = pipeline_rate(in_memory, Share())
    log(f'the same stream from in-memory arrays (50,000 random images of that shape): '
        f'{memory:.0f} images/s ({memory / one:.2f}x the files\')')
    shape = dataset.image_shape
    step = bench.train_step_rate(FLAGS.arch, FLAGS.train_batch, max(2, FLAGS.steps // 10), shape)
    log(f'{FLAGS.arch} training step (batch {FLAGS.train_batch}, forward+backward+SGD, '
        f'{"x".join(map(str, shape))}): {step:.0f} images/s -> the pipeline delivers '
        f'{one / step:.1f}x that')
    if FLAGS.predict_archs:
        timed = []
        with tempfile.TemporaryDirectory() as tmp:
            for arch in FLAGS.predict_archs:
                tiny_classifier(f'{tmp}/{arch}.keras', shape, arch)
                timed.append((arch, *predict_rate(f'{tmp}/{arch}.keras', f'{tmp}/p.csv'),
                              sum(1 for _ in open(f'{tmp}/p.csv')) - 1))
        again = pipeline_rate(dataset, Share())
        mean = (one + again) / 2
        log(f'the pipeline\'s stream again after predict: {again:.0f} images/s (mean of before '
            f'and after: {mean:.0f})')
        for arch, n, seconds, steady, peak, status, rows in timed:
            log(f'python -m ssl_ema.predict --resize, {arch} classifier of '
                f'{"x".join(map(str, shape))} images, over {n} images: {seconds:.1f} s, '
                f'{n / seconds:.0f} images/s over the whole command ({n / seconds / mean:.2f}x the '
                f'stream), {steady:.0f} images/s after the first batch ({steady / mean:.2f}x); '
                f'{rows} rows, exit status {status}; peak resident memory {peak} MB')
    if FLAGS.workers > 1:
        workers = [subprocess.Popen([sys.executable, '-m', 'ssl_ema.data.bench_files',
                                     f'--share={r},{FLAGS.workers}', f'--dir={FLAGS.dir}',
                                     f'--image_size={FLAGS.image_size}', f'--steps={FLAGS.steps}',
                                     f'--batch={FLAGS.batch}', f'--uratio={FLAGS.uratio}'],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                   for r in range(FLAGS.workers)]
        rates = [float(w.communicate()[0].split('rate ')[-1]) for w in workers]
        log(f'pipeline, {FLAGS.workers} processes at once, each its share: '
            f'{" + ".join(f"{r:.0f}" for r in rates)} = {sum(rates):.0f} images/s '
            f'({sum(rates) / step:.1f}x the step; each worker decodes 1/{FLAGS.workers} of a batch)')
    if FLAGS.start:
        common = [f'--dataset={name}', f'--image_size={FLAGS.image_size}', '--labels=250',
                  '--valid=500', '--algorithm=fixmatch', f'--arch={FLAGS.start_arch}',
                  '--train_steps=1000', '--log_every_steps=1']   # --batch=32 --uratio=4
        with tempfile.TemporaryDirectory() as tmp:
            first_step([sys.executable, '-m', 'ssl_ema.train', *common,
                        f'--train_dir={tmp}/one'], log, 'python -m ssl_ema.train')
            if FLAGS.workers > 1:
                first_step([sys.executable, '-m', 'ssl_ema.launch', f'--workers={FLAGS.workers}',
                            *common, f'--train_dir={tmp}/two'], log,
                           f'python -m ssl_ema.launch --workers={FLAGS.workers} (launcher, workers)')


if __name__ == '__main__':
    app.run(main)
