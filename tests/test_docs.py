"""The README stays a short guide, and the docs' relative links lead somewhere: to a file that exists and,
with a #fragment, to a heading in it."""
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
PAGES = [README, *sorted((REPO / 'docs').glob('*.md')), REPO / 'bench' / 'RESULTS.md', REPO / 'data' / 'README.md']
NOTEBOOK = REPO / 'examples' / 'quickstart.ipynb'
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^```[^\n]*\n.*?^```', re.S | re.M)


def headings(markdown: str) -> list[str]:
    """The heading lines' text, outside code blocks."""
    return [m.group(2).strip() for m in re.finditer(r'^(#{1,6}) (.*)$', FENCE.sub('', markdown), re.M)]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings: lower case, punctuation dropped, spaces to hyphens, -1, -2... on repeats."""
    seen, out = {}, set()
    for text in headings(markdown):
        slug = re.sub(r'[^\w\- ]', '', text.lower()).replace(' ', '-')
        out.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
        seen[slug] = seen.get(slug, 0) + 1
    return out


def relative_links(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == '.ipynb':
        text = '\n'.join(''.join(c['source']) for c in json.loads(text)['cells'] if c['cell_type'] == 'markdown')
    return [t for t in LINK.findall(FENCE.sub('', text)) if not re.match(r'[a-z]+:', t)]


def test_readme_is_a_short_guide_with_the_sections_a_newcomer_looks_for():
    text = README.read_text()
    assert len(text.splitlines()) <= 320
    sections = headings(text)
    for wanted in ('Two commands', 'Released weights', 'Four uses', 'Runtime', 'Command line', 'Pre-training',
                   'Evaluation', 'Results', 'Citation', 'License', 'Links'):
        assert any(h.startswith(wanted) for h in sections), f'README has no "{wanted}" section'
    first_block = FENCE.search(text).group(0).splitlines()[1:-1]
    assert FENCE.search(text).group(0).startswith('```python') and len(first_block) <= 5
    assert 'from m2d import RuntimeM2D' in first_block and text.index('```python') < text.index('## Two commands')
    assert 'Masked Modeling Duo: Learning Representations by Encouraging Both Networks to Model the Input' in \
        text[text.index('## Citation'):]
    assert 'bash run_demo.sh' in text and 'bash run_tests.sh' in text


@pytest.mark.parametrize('page', [*PAGES, NOTEBOOK], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_and_headings_that_exist(page):
    broken = []
    for link in relative_links(page):
        target, _, fragment = link.partition('#')
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(link)
        elif fragment and path.suffix == '.md' and fragment not in anchors(path.read_text()):
            broken.append(link)
    assert not broken, f'{page.name}: broken links {broken}'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_user_docs_carry_no_traces_of_the_machines_they_were_written_on(page):
    leftovers = r'\blent\b|development machine|GPU time left|(?<![.\w])/work/|\.\./shared'
    found = re.findall(leftovers, page.read_text(), re.I)
    assert not found, f'{page.name}: {found}'
