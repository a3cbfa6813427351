"""The front door: `m2d wav2lms|train|encode|eval|demo`, the published scripts as shims, help on every option."""
import argparse
import importlib

import pandas as pd
import pytest
from test_pretrain import tiny_argv
from test_wav_to_lms import _write

from m2d.checkpoint import load_checkpoint
from m2d.cli import COMMANDS, main
from m2d.cli.common import build_parser, parse_norm_stats
from m2d.train.config import get_args_parser


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every tool's parser, and each sub-command's (m2d eval lineareval, ...)."""
    found = {f'm2d {name}': build_parser(importlib.import_module(module), f'm2d {name}')
             for name, (module, _) in COMMANDS.items()}
    found['mae_train_audio.py'] = get_args_parser(mae=True)
    for prog, parser in list(found.items()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.update({f'{prog} {name}': sub for name, sub in action.choices.items()})
    return found


def test_every_option_has_a_help_line_and_shows_its_default(capsys):
    all_parsers = parsers()
    assert {'m2d wav2lms', 'm2d train', 'm2d encode', 'm2d eval', 'm2d demo', 'm2d eval lineareval',
            'm2d eval finetune', 'mae_train_audio.py'} <= set(all_parsers)
    for prog, parser in all_parsers.items():
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f'{prog} {action.option_strings or action.dest} has no help line'
    text = ' '.join(all_parsers['m2d train'].format_help().split())
    assert '--epochs EPOCHS' in text and 'schedules span it) (default: 300)' in text
    assert 'default 512, or fewer when the dataset has fewer files' in text
    assert 'crop (default: 80x208)' in text and '--norm_stats "[MEAN, STD]"' in text
    assert '(default: .wav)' in all_parsers['m2d wav2lms'].format_help()
    assert '(default: 0.001)' in all_parsers['m2d eval lineareval'].format_help()

    with pytest.raises(SystemExit, match='0'):
        main(['--help'])
    listing = capsys.readouterr().out
    assert all(f'    {name}' in listing for name in ('wav2lms', 'train', 'encode', 'eval', 'demo'))


def test_one_norm_stats_syntax_for_every_tool():
    assert parse_norm_stats('[-7.1, 4.2]') == parse_norm_stats('-7.1 4.2') == [-7.1, 4.2]
    train = get_args_parser().parse_args(['--norm_stats', '[-7.1, 4.2]']).norm_stats
    encode = build_parser(importlib.import_module('m2d.tools.encode'), 'm2d encode').parse_args(
        ['w.pth', 'in', 'out', '--norm_stats', '[-7.1, 4.2]']).norm_stats
    legacy = build_parser(importlib.import_module('m2d.tools.encode'), 'm2d encode').parse_args(
        ['w.pth', 'in', 'out', '--norm_stats', '-7.1', '4.2']).norm_stats
    assert train == encode == legacy == [-7.1, 4.2]


def test_one_max_seconds_for_both_audio_tools():
    limits = {prog: parsers()[prog].parse_args(args).max_seconds
              for prog, args in [('m2d wav2lms', ['src', 'dst']), ('m2d encode', ['w.pth', 'in', 'out'])]}
    assert limits == {'m2d wav2lms': 3600.0, 'm2d encode': 3600.0}


def test_subcommands_run_the_published_tools(tmp_path, lms_data, one_thread):
    src = tmp_path / 'src'
    _write(src / 'a.flac', 16000, 0.5, 1)
    _write(src / 'b.wav', 16000, 0.5, 1)
    assert main(['wav2lms', str(src), str(tmp_path / 'lms'), '--suffix', '.flac', '--workers', '1']) == 0
    assert main(['wav2lms', str(src), str(tmp_path / 'lms'), '--suffix=.wav', '--workers=1',
                 '--csv', str(tmp_path / 'files.csv'), '--data_path', str(tmp_path)]) == 0
    assert pd.read_csv(tmp_path / 'files.csv').file_name.tolist() == ['lms/a.npy', 'lms/b.npy']

    assert main(['train', *tiny_argv(lms_data, tmp_path / 'run', '--epochs', '1')]) == 0
    assert load_checkpoint(tmp_path / 'run' / 'checkpoint-1.pth')['epoch'] == 1
    assert main(['eval', 'summary', str(tmp_path / 'no-results.csv')]) == 2


def test_switches_are_spelled_with_underscores_everywhere():
    evaluator = build_parser(importlib.import_module('m2d.eval.__main__'), 'm2d eval')
    for flag, expected in [([], True), (['--no_dataset_norm'], False), (['--no-dataset_norm'], False)]:
        assert evaluator.parse_args(['lineareval', 'w.pth', 'demo', *flag]).dataset_norm is expected
    assert get_args_parser().parse_args(['--no_pin_mem']).pin_mem is False
