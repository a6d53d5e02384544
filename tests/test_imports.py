"""Dependencies point one way: commands -> api -> core -> algorithms, data -> nn -> base.

Read from the source (every import statement, at any depth, of every module), not from a running
process, so an import inside a function counts as much as one at the top.
"""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
# Where the installed package's modules live in the repository (setup.cfg's package_dir).
ROOTS = {'ssl_ema': REPO / 'ssl_ema', 'ssl_ema.algorithms': REPO / 'algorithms',
         'ssl_ema.data': REPO / 'data'}
# Layer of each package; a module may import its own layer's modules only inside its own package.
LAYERS = {'ssl_ema.base': 0, 'ssl_ema.nn': 1, 'ssl_ema.data': 2, 'ssl_ema.algorithms': 2,
          'ssl_ema.core': 3, 'ssl_ema.api': 4, 'ssl_ema': 4, 'ssl_ema.bench': 4}
COMMAND = 5   # every other module right under ssl_ema/ is a command (python -m ssl_ema.<verb>)
SHARED_BY_COMMANDS = {'ssl_ema.cli'}   # the one wrapper every command runs in


def modules():
    """{module name: path} of every module of the package."""
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob('*.py'):
            parts = path.relative_to(root).with_suffix('').parts
            if package == 'ssl_ema' and parts[0] in ('algorithms', 'data'):
                continue
            parts = parts[:-1] if parts[-1] == '__init__' else parts
            found['.'.join((package,) + parts)] = path
    return found


def group(module: str) -> str:
    """The package that decides a module's layer."""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if prefix == 'ssl_ema':
            continue
        if module == prefix or module.startswith(prefix + '.'):
            return prefix
    return 'ssl_ema' if module == 'ssl_ema' else module   # a command: its own group


def layer(module: str) -> int:
    return LAYERS.get(group(module), COMMAND)


def imports(path: pathlib.Path, module: str):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:   # relative: resolve against this module's package
                package = module.split('.')[:-node.level + (path.name == '__init__.py')]
                base = '.'.join(package + ([base] if base else []))
            for alias in node.names:   # `from ssl_ema import train` imports ssl_ema.train
                yield node.lineno, f'{base}.{alias.name}'


def violations(known):
    found = []
    for module, path in sorted(known.items()):
        for line, name in imports(path, module):
            if not name.startswith('ssl_ema'):
                continue
            target = name
            while target not in known and '.' in target:   # ssl_ema.core.ema.EMA -> the module
                target = target.rsplit('.', 1)[0]
            mine, theirs = layer(module), layer(target)
            where = f'{path.name}:{line} {module} imports {target}'
            if theirs > mine:
                found.append(f'{where}: layer {theirs} above its own {mine}')
            elif (theirs == mine and group(module) != group(target)
                  and target not in SHARED_BY_COMMANDS and group(target) != 'ssl_ema'):
                found.append(f'{where}: another package of the same layer')
    return found


def test_dependencies_point_one_way():
    assert violations(modules()) == []


def test_the_check_catches_an_import_that_points_back(tmp_path):
    """A library module importing a command, and data importing an algorithm, are caught."""
    known = modules()
    loop = tmp_path / 'loop.py'
    loop.write_text('from ssl_ema import posthoc\n')
    data = tmp_path / 'pipeline.py'
    data.write_text('def f():\n    from ssl_ema.algorithms import base\n')
    known.update({'ssl_ema.core.loop': loop, 'ssl_ema.data.pipeline': data})
    found = violations(known)
    assert any('ssl_ema.core.loop imports ssl_ema.posthoc' in v for v in found), found
    assert any('ssl_ema.data.pipeline imports ssl_ema.algorithms.base' in v for v in found), found


def test_every_command_keeps_its_python_m_name():
    """`python -m ssl_ema.<verb>` for every command users have."""
    for verb in ('train', 'evaluate', 'export', 'predict', 'posthoc', 'benchmark', 'launch',
                 'bench_step', 'bench_ema', 'bench_distribute'):
        assert (REPO / 'ssl_ema' / f'{verb}.py').is_file(), verb
