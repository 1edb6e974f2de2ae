"""The README's API tour runs as written, the docs site builds without a warning, and every
Colab notebook runs top to bottom in a Jupyter kernel."""
from __future__ import annotations

import doctest
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]


def test_readme_tour_runs():
  readme = (ROOT / 'README.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', readme, re.S)
  assert blocks, 'README has no python block'
  scope = {}
  exec(compile(blocks[0], 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  merged, frozen = scope['merged'], scope['frozen']
  assert merged['encoder']['layer_0']['attention']['query']['kernel'].shape == (384, 384)
  assert not np.array_equal(merged['encoder']['layer_0']['attention']['query']['kernel'],
                            frozen['encoder']['layer_0']['attention']['query']['kernel'])


def test_quickstart_commands_match_ci():
  readme = (ROOT / 'README.md').read_text()
  commands = re.findall(r'```bash\n(.*?)\n```', readme, re.S)
  assert len(commands) == 2
  assert commands[1] in (ROOT / '.ci' / 'run').read_text()
  assert 'experiments.run --config=configs/minilm_vader_lora.py' in commands[0]


def test_configs_and_commands_import_from_anywhere(tmp_path):
  """`pip install -e .` installs `configs` and `experiments` beside `peftjax`."""
  out = subprocess.run([sys.executable, '-c', 'import configs.minilm_vader, experiments.cli'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
  assert out.returncode == 0, out.stderr[-2000:]


# Each notebook's `parameters` cell, made small: every notebook runs in about a minute on 2
# CPU cores. A notebook in colabs/ without an entry here fails `test_notebooks_are_clean`.
SMALL = {
    'quickstart': {'ROWS': 64, 'EPOCHS': 1, 'MAX_LENGTH': 16},
    'methods_tour': {'MODEL': 'tiny', 'ROWS': 32, 'EPOCHS': 1, 'MAX_LENGTH': 16},
    'merging': {'RANK': 2, 'DENSITY': 0.001, 'SENTENCES': 2},
    'language_models': {'STEPS': 2, 'ROWS': 16, 'LENGTH': 32},
    'scale_out': {'ROWS': 32, 'EPOCHS': 1, 'LAYOUTS': [{'data': 2, 'fsdp': 2, 'tensor': 2}]},
}
NOTEBOOKS = ROOT / 'colabs'


def test_notebooks_are_clean():
  """Outputs cleared; the first code cell installs from `REPO` (guarded) and fetches the
  assets; a `parameters` cell holds the sizes; nothing edits sys.path."""
  assert sorted(p.stem for p in NOTEBOOKS.glob('*.ipynb')) == sorted(SMALL)
  for path in NOTEBOOKS.glob('*.ipynb'):
    cells = json.loads(path.read_text())['cells']
    code = [c for c in cells if c['cell_type'] == 'code']
    assert all(not c['outputs'] and c['execution_count'] is None for c in code), path.name
    first = ''.join(code[0]['source'])
    assert "REPO = 'https://github.com/" in first and 'pip install -q "git+{REPO}"' in first
    assert "find_spec('peftjax') is None" in first and 'peftjax.data.assets fetch' in first
    tagged = [''.join(c['source']) for c in code if 'parameters' in c['metadata'].get('tags', [])]
    assert len(tagged) == 1 and all(f'{k} = ' in tagged[0] for k in SMALL[path.stem]), path.name
    assert not any('sys.path' in ''.join(c['source']) for c in code), path.name


@pytest.mark.long
@pytest.mark.parametrize('name', sorted(SMALL))
def test_notebook_runs(name, tmp_path, monkeypatch):
  """The notebook top to bottom in a Jupyter kernel (papermill), with small parameters."""
  papermill = pytest.importorskip('papermill', reason="papermill is not installed (pip install -e '.[test]')")
  pytest.importorskip('ipykernel', reason="ipykernel is not installed (pip install -e '.[test]')")
  # The kernel sees this checkout, and the devices a fresh runtime has (not the suite's 8).
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  out = tmp_path / f'{name}.ipynb'
  papermill.execute_notebook(str(NOTEBOOKS / f'{name}.ipynb'), str(out), parameters=SMALL[name],
                             kernel_name='python3', cwd=str(tmp_path), progress_bar=False)
  cells = json.loads(out.read_text())['cells']
  errors = [o for c in cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors, errors

def test_docs_site_builds_strict(tmp_path):
  """`mkdocs build --strict`: a broken link, a docstring griffe cannot parse or a page missing
  from the nav fails; every name of `peftjax.__all__` has its entry in the API reference."""
  pytest.importorskip('mkdocs', reason="mkdocs is not installed (pip install -e '.[test]')")
  pytest.importorskip('mkdocstrings_handlers.python',
                      reason="mkdocstrings[python] is not installed (pip install -e '.[test]')")
  site = tmp_path / 'site'
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
         'NO_MKDOCS_2_WARNING': '1'}
  out = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '-q', '-d', str(site)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  import peftjax  # pylint: disable=import-outside-toplevel
  html = ' '.join(p.read_text() for p in (site / 'api').rglob('*.html'))
  documented = set(re.findall(r'id="peftjax\.([A-Za-z_0-9]+)"', html))
  assert not set(peftjax.__all__) - documented, 'missing from docs/api/*.md'


# Modules whose docstrings hold examples of the public API (`>>>`), run as doctests.
DOCTESTED = ['peftjax.core.adapter', 'peftjax.core.paths', 'peftjax.core.leaves',
             'peftjax.core.linen', 'peftjax.io.adapter_file', 'peftjax.methods',
             'peftjax.methods.lora', 'peftjax.methods.lora_pro', 'peftjax.methods.full',
             'peftjax.methods.svd_init', 'peftjax.methods.data_init']


@pytest.mark.parametrize('module', DOCTESTED)
def test_docstring_examples_run(module):
  result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
  assert result.attempted and not result.failed


@pytest.mark.long
@pytest.mark.parametrize('page', ['index.md', 'methods/low_rank.md', 'methods/sparse.md',
                                  'methods/other.md', 'extending.md'])
def test_docs_page_examples_run(page):
  """Every python block of the page runs as written (on the pretrained MiniLM-L6)."""
  text = (ROOT / 'docs' / page).read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, page, 'exec'), {})  # pylint: disable=exec-used
