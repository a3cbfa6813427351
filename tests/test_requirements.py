"""requirements.txt tells the truth: every package the code imports is declared, and the floors are
releases that have what the code calls."""
import ast
import importlib.metadata
import sys
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [*(REPO / 'm2d').rglob('*.py'), *(REPO / 'util').rglob('*.py'), *REPO.glob('*.py')]
OPTIONAL = {'transformers'}  # M2D-CLAP's text encoder, imported only when text is encoded (docs/runtime.md)
# Calls whose first release sets a floor: (package, the call, the first version that has it).
FIRST_RELEASES = [('torch', 'torch.serialization.safe_globals', '2.5')]  # pytorch/pytorch#127939, after 2.4


def requirements(path: Path = REPO / 'requirements.txt') -> dict[str, Requirement]:
    lines = [line.split('#')[0].strip() for line in path.read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {canonicalize_name(r.name): r for r in reqs}


def floor(req: Requirement) -> Version:
    return max(Version(s.version) for s in req.specifier if s.operator in ('>=', '=='))


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    imported = {}
    for path in SHIPPED:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for top in {name.split('.')[0] for name in names} - set(sys.stdlib_module_names) - {'m2d', 'util'}:
                for dist in distributions.get(top, [top]):
                    imported.setdefault(canonicalize_name(dist), path.relative_to(REPO))
    missing = {d: str(p) for d, p in imported.items() if d not in requirements() and d not in OPTIONAL}
    assert not missing, f'imported but not in requirements.txt: {missing}'


def test_floors_have_what_the_code_calls():
    reqs = requirements()
    for package, call, first in FIRST_RELEASES:
        module, name = call.rsplit('.', 1)
        assert any(call in path.read_text() for path in SHIPPED), f'{call} is no longer used: drop its entry'
        assert hasattr(sys.modules[module], name)
        assert floor(reqs[package]) >= Version(first), f'{call} needs {package}>={first}'
    # torchvision 0.N is built for torch 2.(N - 15): the floors pair up, as the pins do.
    pins = requirements(REPO / 'constraints.txt')
    for pair in (reqs, pins):
        assert floor(pair['torchvision']).minor == floor(pair['torch']).minor + 15
    assert Version(torch.__version__.split('+')[0]) >= floor(reqs['torch'])
