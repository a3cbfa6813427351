"""The front door: `m2d wav2lms|train|encode|eval|demo`, the published scripts as shims, help on every option,
one vocabulary of options (docs/command-line.md) and one-line errors for bad values."""
import argparse
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_pretrain import tiny_argv
from test_wav_to_lms import _write

from m2d.audio.synth import write_labelled_task
from m2d.checkpoint import load_checkpoint
from m2d.cli import COMMANDS, main
from m2d.cli.common import build_parser, parse_norm_stats
from m2d.errors import UsageError
from m2d.eval.finetune import finetune
from m2d.eval.lineareval import linear_evaluation
from m2d.eval.suite import run_suite
from m2d.eval.tasks import resolve_task
from m2d.tools.encode import encode_files
from m2d.train.config import get_args_parser

REPO = Path(__file__).resolve().parents[1]


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every tool's parser, and each sub-command's (m2d eval lineareval, ...)."""
    found = {f'm2d {name}': build_parser(importlib.import_module(module), f'm2d {name}')
             for name, (module, _) in COMMANDS.items()}
    found['train_audio.py'] = get_args_parser()
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


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help line as --help prints it (its default added by m2d's HelpFormatter)."""
    text = parser._get_formatter()._get_help_string(action)
    return ' '.join((text % {'default': action.default} if '%(default)' in text else text).split())


def test_every_help_names_a_true_default():
    """Options that take a value name their default (or what an empty one resolves to); switches never show
    'default: True/False'; a --no_X switch says what is on without it; no empty choice in a usage line."""
    for prog, parser in parsers().items():
        usage = parser.format_usage()
        assert '{,' not in usage and ',}' not in usage, prog
        for action in parser._actions:
            if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
                continue
            name = f'{prog} {"/".join(action.option_strings) or action.dest}'
            text = shown_help(parser, action)
            for empty in ('None', '', '[]'):  # (a value-taking --rrc may well show 'default: True')
                assert f'default: {empty})' not in text, name
            if action.nargs == 0:
                assert '(default: ' not in text, name
                if isinstance(action, argparse._StoreFalseAction):
                    twins = [a for a in parser._actions if a.dest == action.dest and a is not action]
                    assert 'without it' in text or any('default' in shown_help(parser, t) for t in twins), name
            elif action.option_strings or action.nargs == '?':
                assert 'default' in text, name
    train = parsers()['m2d train']
    options = {a.option_strings[0]: shown_help(train, a) for a in train._actions}
    for flag, default in (('--min_lr', '0.0'), ('--seed', '0'), ('--threads', '0'), ('--start_epoch', '0'),
                          ('--device', 'auto')):
        assert options[flag].endswith(f'(default: {default})'), flag
    assert '--preset {small}' in train.format_usage()
    assert "(default: none, every flag's own default)" in options['--preset']
    assert options['--no_pin_mem'] == 'do not pin CPU memory (without it: pinned)'
    assert '(default: 64)' in parsers()['m2d eval lineareval'].format_help()
    assert '(default: 128)' in parsers()['m2d eval finetune'].format_help()


def parse(prog: str, *argv: str) -> argparse.Namespace:
    return parsers()[prog].parse_args(list(argv))


def test_one_vocabulary_of_options_with_the_published_spellings_as_aliases():
    lineareval = ['m2d eval lineareval', 'w.pth', 'demo']
    assert parse(*lineareval, '--data_path', 'a').data_path == parse(*lineareval, '--audio_root', 'a').data_path == 'a'
    assert parse(*lineareval, '--clip_seconds', '2').clip_seconds == parse(*lineareval, '--duration', '2').clip_seconds
    assert parse(*lineareval, '--evar_root', 'e').evar_root == parse(*lineareval, '--data_root', 'e').evar_root == 'e'
    assert parse('m2d wav2lms', 'src', 'dst').data_path == parse('m2d train').data_path == 'data'

    # The weights: WEIGHT_FILE / weight_file, wherever a command takes a checkpoint to encode or evaluate.
    for prog, argv in (('m2d encode', ['w.pth', 'in', 'out']), ('m2d eval lineareval', ['w.pth', 'demo']),
                       ('m2d eval finetune', ['w.pth', 'demo']), ('m2d eval suite', ['w.pth'])):
        assert parse(prog, *argv).weight_file == 'w.pth', prog
        assert 'WEIGHT_FILE' in parsers()[prog].format_usage(), prog
    for function in (encode_files, linear_evaluation, finetune, run_suite):
        assert list(inspect.signature(function).parameters)[0] == 'weight_file', function.__name__

    # One default for the device and the normalisation, on the command lines and in Python.
    for prog, argv in (('m2d train', []), ('m2d encode', ['w', 'i', 'o']), ('m2d eval lineareval', ['w', 'demo']),
                       ('m2d eval finetune', ['w', 'demo']), ('m2d eval suite', ['w'])):
        assert parse(prog, *argv).device == 'auto', prog
    for prog, argv in (('m2d encode', ['w', 'i', 'o']), ('m2d eval lineareval', ['w', 'demo']),
                       ('m2d eval suite', ['w'])):
        assert parse(prog, *argv).dataset_norm is True and parse(prog, *argv, '--no_dataset_norm').dataset_norm is False
        assert parse(prog, *argv, '--norm_stats', '[-7.1, 4.2]').norm_stats == [-7.1, 4.2]
    for function in (encode_files, linear_evaluation, finetune):
        assert inspect.signature(function).parameters['device'].default == 'auto', function.__name__
    for function in (encode_files, linear_evaluation):
        assert inspect.signature(function).parameters['dataset_norm'].default is True, function.__name__


def test_the_earlier_python_keywords_still_work(tmp_path):
    task = str(write_labelled_task(tmp_path / 'small', n_per_class=(2, 1, 1), seconds=0.5))
    audio = str(tmp_path / 'small' / 'audio')
    assert resolve_task(task, audio_root=audio, seconds=1.5) == resolve_task(task, data_path=audio, clip_seconds=1.5)
    assert resolve_task(task, data_path=audio, clip_seconds=1.5).seconds == 1.5
    with pytest.raises(TypeError, match='got both data_path= and its earlier name audio_root='):
        resolve_task(task, audio_root=audio, data_path=audio)
    with pytest.raises(UsageError, match='weight file not found: .*no.pth'):  # weight= reaches weight_file
        linear_evaluation(weight=str(tmp_path / 'no.pth'), task=task, results=None)


BAD_VALUES = {  # each command, with one bad option value
    'm2d wav2lms': ['wav2lms', 'src', 'dst', '--workers', 'many'],
    'm2d train': ['train', '--lr', 'fast'],
    'm2d encode': ['encode', 'w.pth', 'in', 'out', '--batch_size', 'big'],
    'm2d eval lineareval': ['eval', 'lineareval', 'w.pth', 'demo', '--clip_seconds', 'long'],
    'm2d eval finetune': ['eval', 'finetune', 'w.pth', 'demo', '--rrc', 'maybe'],
    'm2d eval suite': ['eval', 'suite', 'w.pth', '--config', 'huge'],
    'm2d eval summary': ['eval', 'summary', '--mode', 'other'],
    'm2d eval make_demo': ['eval', 'make_demo', '--seed', 'x'],
    'm2d demo': ['demo', '--epochs', 'ten'],
    'm2d': ['nope'],
}


@pytest.mark.parametrize('prog', BAD_VALUES)
def test_a_bad_value_is_one_line_for_every_command(prog, capsys):
    with pytest.raises(SystemExit) as done:
        main(BAD_VALUES[prog])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith('error: ') and err.endswith(f' (see {prog} --help)\n'), err
    assert err.count('\n') == 1 and 'usage:' not in err


def test_a_bad_value_is_one_line_for_the_published_scripts():
    for script, argv in (('train_audio.py', ['--seed', '1.5']), ('mae_train_audio.py', ['--preset', 'large']),
                         ('wav_to_lms.py', ['src', 'dst', '--min_length', 'x'])):
        done = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 2 and done.stderr.count('\n') == 1, done.stderr
        assert done.stderr.startswith('error: argument --') and done.stderr.endswith(f' (see {script} --help)\n')
